//! The body of `POST /v1/inject`: one fault, `{"fault": "<kind>", ...}`, parsed into
//! [`Inject`] with typed errors ([`BodyError`]) that name the offending field. Numbers
//! may be JSON numbers or strings (`"0x1000"`, `"4096"`). Everything that needs no VM
//! (syntax, kinds, fields, ranges) is checked here, so campaign files are checked with
//! exactly the API's rules ([`validate_inject`]).

use devices::pci::Bdf;
use serde_json::{Map, Value};

/// Largest DMA an injection may do.
pub const MAX_DMA: u64 = 1 << 20;
/// Largest count of a counted fault.
pub const MAX_COUNT: u64 = 1_000_000;
/// Delayed disk requests armed at once (the device holds at most this many back).
pub const MAX_DELAYED_REQUESTS: u64 = devices::virtio::blk::MAX_HELD as u64;

/// Which interrupts a rule applies to, as the body names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A PCI device's MSI/MSI-X messages.
    Device(Bdf),
    /// Messages with this vector.
    Vector(u8),
    /// An IOAPIC pin.
    Pin(u8),
    /// An interrupt-remapping table index.
    Index(u16),
}

/// A parsed injection request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inject {
    /// A DMA by `device` at `iova`.
    Dma {
        /// Requester.
        device: Bdf,
        /// I/O virtual address.
        iova: u64,
        /// A device write to memory (else a read).
        write: bool,
        /// Bytes.
        length: u64,
    },
    /// `count` faulting writes by `device` beyond the address width.
    FaultStorm {
        /// Requester.
        device: Bdf,
        /// Faults.
        count: u64,
    },
    /// The next `count` requests of `device` fail with "invalid context entry".
    ContextInvalid {
        /// Requester.
        device: Bdf,
        /// Requests.
        count: u64,
    },
    /// Drop the next `count` interrupts of `target`.
    DropIrq {
        /// What to match.
        target: Target,
        /// Interrupts.
        count: u64,
    },
    /// Delay them by `delay_ms`.
    DelayIrq {
        /// What to match.
        target: Target,
        /// Interrupts.
        count: u64,
        /// Delay.
        delay_ms: u64,
    },
    /// Deliver them `copies` extra times.
    DuplicateIrq {
        /// What to match.
        target: Target,
        /// Interrupts.
        count: u64,
        /// Extra copies of each.
        copies: u64,
    },
    /// The next `count` requests of virtio `device` read a corrupted buffer address.
    CorruptDescriptor {
        /// The virtio device.
        device: Bdf,
        /// Requests.
        count: u64,
    },
    /// One interrupt on `vector` at APIC `cpu` that no device raised.
    SpuriousIrq {
        /// Vector.
        vector: u8,
        /// Destination (checked against the VM's vCPUs by the API).
        cpu: u64,
    },
    /// The next `count` interrupts of `target` fail their interrupt-remapping lookup
    /// with `reason` (0x22 not present, 0x26 bad source ID, 0x24 reserved bits...).
    IrteFault {
        /// A device, a pin or an index.
        target: Target,
        /// Interrupts.
        count: u64,
        /// The reason recorded.
        reason: devices::iommu::ir::IrFaultReason,
    },
    /// The next `count` requests of disk `device` (touching sectors [`sector`,
    /// `sector` + `sectors`) when given) fail with an I/O error.
    DiskError {
        /// The virtio-blk device.
        device: Bdf,
        /// Requests.
        count: u64,
        /// First sector of the range, if any.
        sector: Option<u64>,
        /// Sectors in the range.
        sectors: u64,
    },
    /// The next `count` data requests of disk `device` fault in the IOMMU.
    DiskDmaFault {
        /// The virtio-blk device.
        device: Bdf,
        /// Requests.
        count: u64,
    },
    /// The next `count` requests of disk `device` complete `delay_ms` late.
    DiskDelay {
        /// The virtio-blk device.
        device: Bdf,
        /// Requests.
        count: u64,
        /// Delay.
        delay_ms: u64,
    },
    /// The power goes: the VM stops at once and every disk loses its unflushed writes.
    PowerCut,
    /// `rate_hz` interrupts per second on `vector` at `cpu` for `duration_ms`.
    IrqStorm {
        /// Vector.
        vector: u8,
        /// Destination.
        cpu: u64,
        /// Rate.
        rate_hz: u64,
        /// Duration.
        duration_ms: u64,
    },
}

/// The fault kinds, as the body names them.
pub const KINDS: [&str; 14] = [
    "dma",
    "fault-storm",
    "context-invalid",
    "drop-irq",
    "delay-irq",
    "duplicate-irq",
    "corrupt-descriptor",
    "spurious-irq",
    "irq-storm",
    "irte-fault",
    "disk-error",
    "disk-dma-fault",
    "disk-delay",
    "power-cut",
];

/// Why a body was refused; [`BodyError::field`] names where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Not JSON at all.
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object.
    #[error("the body must be a JSON object")]
    NotObject,
    /// No `fault` string.
    #[error("\"fault\" (a string naming the fault) is missing")]
    NoFault,
    /// An unknown kind.
    #[error("unknown fault '{0}'; expected one of {list}", list = KINDS.join(", "))]
    UnknownFault(String),
    /// A required field is absent.
    #[error("{field} is missing")]
    Missing {
        /// The field.
        field: &'static str,
    },
    /// A field this kind does not take.
    #[error("unknown field '{field}' for fault {kind}")]
    UnknownField {
        /// The field.
        field: String,
        /// The kind.
        kind: &'static str,
    },
    /// A field that must be a number.
    #[error("{field}: {text} is not a number (decimal or 0x-hex)")]
    NotNumber {
        /// The field.
        field: &'static str,
        /// What was there.
        text: String,
    },
    /// A field that must be a string.
    #[error("{field} must be a string")]
    NotString {
        /// The field.
        field: &'static str,
    },
    /// A number out of range.
    #[error("{field} must be between {lo} and {hi}")]
    Range {
        /// The field.
        field: &'static str,
        /// Smallest allowed.
        lo: u64,
        /// Largest allowed.
        hi: u64,
    },
    /// A malformed PCI address.
    #[error("{0}")]
    Bdf(String),
    /// A direction other than read/write.
    #[error("'{0}' is not a direction (read or write)")]
    Direction(String),
    /// Not exactly one of device, vector, pin.
    #[error("name exactly one of device, vector or pin")]
    Target,
    /// Not exactly one of device, pin, index (irte-fault).
    #[error("name exactly one of device, pin or index")]
    IrteTarget,
    /// An unknown IRTE fault reason.
    #[error("'{0}' is not an IRTE fault reason (not-present, bad-sid, reserved, index, table, compat, request, or a code 0x20..0x26)")]
    Reason(String),
}

impl BodyError {
    /// The field the error is about (`body` for the body as a whole).
    pub fn field(&self) -> &str {
        match self {
            Self::NotJson(_) | Self::NotObject => "body",
            Self::NoFault | Self::UnknownFault(_) => "fault",
            Self::Missing { field }
            | Self::NotNumber { field, .. }
            | Self::NotString { field }
            | Self::Range { field, .. } => field,
            Self::UnknownField { field, .. } => field,
            Self::Bdf(_) | Self::Target | Self::IrteTarget => "device",
            Self::Direction(_) => "direction",
            Self::Reason(_) => "reason",
        }
    }
}

/// The fields of one body, taken one by one; [`Fields::finish`] refuses the rest.
struct Fields<'a> {
    kind: &'static str,
    map: &'a Map<String, Value>,
    taken: Vec<&'static str>,
}

impl<'a> Fields<'a> {
    fn get(&mut self, field: &'static str) -> Option<&'a Value> {
        self.taken.push(field);
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn opt_num(&mut self, field: &'static str) -> Result<Option<u64>, BodyError> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        let bad = || BodyError::NotNumber {
            field,
            text: truncate(&v.to_string()),
        };
        match v {
            Value::Number(n) => n.as_u64().map(Some).ok_or_else(bad),
            Value::String(s) => {
                let t = s.trim();
                match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                    Some(h) => u64::from_str_radix(h, 16),
                    None => t.parse(),
                }
                .map(Some)
                .map_err(|_| bad())
            }
            _ => Err(bad()),
        }
    }

    fn num(&mut self, field: &'static str, lo: u64, hi: u64) -> Result<u64, BodyError> {
        let v = self.opt_num(field)?.ok_or(BodyError::Missing { field })?;
        range(field, v, lo, hi)
    }

    fn opt_str(&mut self, field: &'static str) -> Result<Option<&'a str>, BodyError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(BodyError::NotString { field }),
        }
    }

    fn device(&mut self) -> Result<Bdf, BodyError> {
        let s = self
            .opt_str("device")?
            .ok_or(BodyError::Missing { field: "device" })?;
        s.parse().map_err(BodyError::Bdf)
    }

    fn target(&mut self) -> Result<Target, BodyError> {
        let d = self.opt_str("device")?;
        let v = self.opt_num("vector")?;
        let p = self.opt_num("pin")?;
        match (d, v, p) {
            (Some(d), None, None) => d.parse().map(Target::Device).map_err(BodyError::Bdf),
            (None, Some(v), None) => Ok(Target::Vector(range("vector", v, 16, 255)? as u8)),
            (None, None, Some(p)) => Ok(Target::Pin(range("pin", p, 0, 23)? as u8)),
            _ => Err(BodyError::Target),
        }
    }

    fn irte_target(&mut self) -> Result<Target, BodyError> {
        let d = self.opt_str("device")?;
        let p = self.opt_num("pin")?;
        let i = self.opt_num("index")?;
        match (d, p, i) {
            (Some(d), None, None) => d.parse().map(Target::Device).map_err(BodyError::Bdf),
            (None, Some(p), None) => Ok(Target::Pin(range("pin", p, 0, 23)? as u8)),
            (None, None, Some(i)) => Ok(Target::Index(range("index", i, 0, 65535)? as u16)),
            _ => Err(BodyError::IrteTarget),
        }
    }

    fn reason(&mut self) -> Result<devices::iommu::ir::IrFaultReason, BodyError> {
        use devices::iommu::ir::IrFaultReason as R;
        let v = self
            .get("reason")
            .ok_or(BodyError::Missing { field: "reason" })?;
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return Err(BodyError::NotString { field: "reason" }),
        };
        let code = text
            .strip_prefix("0x")
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .or_else(|| text.parse::<u8>().ok());
        Ok(match text.as_str() {
            "not-present" => R::NotPresent,
            "bad-sid" => R::SourceId,
            "reserved" => R::EntryReserved,
            "index" => R::IndexTooLarge,
            "table" => R::TableAccess,
            "compat" => R::CompatBlocked,
            "request" => R::RequestReserved,
            _ => code
                .and_then(R::from_code)
                .ok_or_else(|| BodyError::Reason(truncate(&text)))?,
        })
    }

    fn finish(self) -> Result<(), BodyError> {
        for k in self.map.keys() {
            if k != "fault" && !self.taken.contains(&k.as_str()) {
                // An empty key still gets a name the client can see.
                let field = if k.is_empty() {
                    "\"\"".to_string()
                } else {
                    truncate(k)
                };
                return Err(BodyError::UnknownField {
                    field,
                    kind: self.kind,
                });
            }
        }
        Ok(())
    }
}

fn truncate(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn range(field: &'static str, v: u64, lo: u64, hi: u64) -> Result<u64, BodyError> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(BodyError::Range { field, lo, hi })
    }
}

/// Parses an inject body.
pub fn parse(body: &[u8]) -> Result<Inject, BodyError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| BodyError::NotJson(truncate(&e.to_string())))?;
    parse_value(&v)
}

/// Parses an inject request given as JSON.
pub fn parse_value(v: &Value) -> Result<Inject, BodyError> {
    let map = v.as_object().ok_or(BodyError::NotObject)?;
    let kind = map
        .get("fault")
        .and_then(Value::as_str)
        .ok_or(BodyError::NoFault)?;
    let kind = *KINDS
        .iter()
        .find(|k| **k == kind)
        .ok_or_else(|| BodyError::UnknownFault(truncate(kind)))?;
    let mut f = Fields {
        kind,
        map,
        taken: Vec::new(),
    };
    let count = |f: &mut Fields<'_>| f.num("count", 1, MAX_COUNT);
    let r = match kind {
        "dma" => {
            let device = f.device()?;
            let iova = f
                .opt_num("iova")?
                .ok_or(BodyError::Missing { field: "iova" })?;
            let write = match f.opt_str("direction")? {
                Some("write") => true,
                Some("read") => false,
                Some(d) => return Err(BodyError::Direction(truncate(d))),
                None => return Err(BodyError::Missing { field: "direction" }),
            };
            let length = f.num("length", 1, MAX_DMA)?;
            Inject::Dma {
                device,
                iova,
                write,
                length,
            }
        }
        "fault-storm" => Inject::FaultStorm {
            device: f.device()?,
            count: count(&mut f)?,
        },
        "context-invalid" => Inject::ContextInvalid {
            device: f.device()?,
            count: count(&mut f)?,
        },
        "corrupt-descriptor" => Inject::CorruptDescriptor {
            device: f.device()?,
            count: count(&mut f)?,
        },
        "drop-irq" => Inject::DropIrq {
            target: f.target()?,
            count: count(&mut f)?,
        },
        "delay-irq" => Inject::DelayIrq {
            target: f.target()?,
            count: count(&mut f)?,
            delay_ms: f.num("delay_ms", 1, 60_000)?,
        },
        "duplicate-irq" => Inject::DuplicateIrq {
            target: f.target()?,
            count: count(&mut f)?,
            copies: f.num("copies", 1, 100)?,
        },
        "spurious-irq" => Inject::SpuriousIrq {
            vector: f.num("vector", 16, 255)? as u8,
            cpu: f.num("cpu", 0, u64::from(u32::MAX))?,
        },
        "irte-fault" => Inject::IrteFault {
            target: f.irte_target()?,
            count: count(&mut f)?,
            reason: f.reason()?,
        },
        "disk-error" => {
            let device = f.device()?;
            let count = count(&mut f)?;
            let sector = f.opt_num("sector")?;
            let sectors = match sector {
                Some(_) => f.num("sectors", 1, u64::MAX)?,
                None => {
                    if f.opt_num("sectors")?.is_some() {
                        return Err(BodyError::Missing { field: "sector" });
                    }
                    0
                }
            };
            Inject::DiskError {
                device,
                count,
                sector,
                sectors,
            }
        }
        "disk-dma-fault" => Inject::DiskDmaFault {
            device: f.device()?,
            count: count(&mut f)?,
        },
        "disk-delay" => Inject::DiskDelay {
            device: f.device()?,
            count: f.num("count", 1, crate::api::inject::MAX_DELAYED_REQUESTS)?,
            delay_ms: f.num("delay_ms", 1, 60_000)?,
        },
        "power-cut" => Inject::PowerCut,
        _ => Inject::IrqStorm {
            vector: f.num("vector", 16, 255)? as u8,
            cpu: f.num("cpu", 0, u64::from(u32::MAX))?,
            rate_hz: f.num("rate_hz", 1, 100_000)?,
            duration_ms: f.num("duration_ms", 1, 60_000)?,
        },
    };
    f.finish()?;
    Ok(r)
}

impl Inject {
    /// A short description for the timeline (never the raw body).
    pub fn summary(&self) -> String {
        let t = |t: &Target| match t {
            Target::Device(b) => format!("device {b}"),
            Target::Vector(v) => format!("vector {v:#x}"),
            Target::Pin(p) => format!("pin {p}"),
            Target::Index(i) => format!("index {i:#x}"),
        };
        match self {
            Self::Dma {
                device,
                iova,
                write,
                length,
            } => format!(
                "dma {} {device} iova {iova:#x} length {length}",
                if *write { "write" } else { "read" }
            ),
            Self::FaultStorm { device, count } => format!("fault-storm {device} x{count}"),
            Self::ContextInvalid { device, count } => {
                format!("context-invalid {device} x{count}")
            }
            Self::CorruptDescriptor { device, count } => {
                format!("corrupt-descriptor {device} x{count}")
            }
            Self::DropIrq { target, count } => format!("drop-irq {} x{count}", t(target)),
            Self::DelayIrq {
                target,
                count,
                delay_ms,
            } => format!("delay-irq {} x{count} by {delay_ms} ms", t(target)),
            Self::DuplicateIrq {
                target,
                count,
                copies,
            } => format!("duplicate-irq {} x{count} +{copies}", t(target)),
            Self::SpuriousIrq { vector, cpu } => format!("spurious-irq {vector:#x} cpu {cpu}"),
            Self::IrteFault {
                target,
                count,
                reason,
            } => format!(
                "irte-fault {} x{count} reason {:#x}",
                t(target),
                *reason as u8
            ),
            Self::DiskError {
                device,
                count,
                sector,
                sectors,
            } => match sector {
                Some(s) => format!("disk-error {device} x{count} sectors {s}+{sectors}"),
                None => format!("disk-error {device} x{count}"),
            },
            Self::DiskDmaFault { device, count } => format!("disk-dma-fault {device} x{count}"),
            Self::DiskDelay {
                device,
                count,
                delay_ms,
            } => format!("disk-delay {device} x{count} by {delay_ms} ms"),
            Self::PowerCut => "power-cut".into(),
            Self::IrqStorm {
                vector,
                cpu,
                rate_hz,
                duration_ms,
            } => format!("irq-storm {vector:#x} cpu {cpu} {rate_hz} Hz {duration_ms} ms"),
        }
    }
}

/// Checks an inject request the way the API will (for campaign files): `Err((field,
/// message))` when it would be refused before reaching the VM.
pub fn validate_inject(body: &Value) -> Result<(), (String, String)> {
    parse_value(body)
        .map(|_| ())
        .map_err(|e| (e.field().to_string(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(b: &str) -> Option<String> {
        parse(b.as_bytes()).err().map(|e| e.field().to_string())
    }

    #[test]
    fn an_empty_key_is_named() {
        let e = parse(br#"{"fault":"drop-irq","vector":"0x41","count":1,"":2}"#)
            .expect_err("empty key");
        assert_eq!(e.field(), "\"\"");
    }

    #[test]
    fn bodies_name_the_bad_field() {
        let cases = [
            (
                r#"{"fault":"dma","device":"00:04.0","direction":"write","length":4}"#,
                "iova",
            ),
            (r#"{"fault":"warp-core"}"#, "fault"),
            (
                r#"{"fault":"spurious-irq","vector":32,"cpu":0,"colour":1}"#,
                "colour",
            ),
            ("", "body"),
            ("[1,2]", "body"),
            (r#"{"vector":1}"#, "fault"),
            ("not json", "body"),
            (
                r#"{"fault":"dma","device":"00:04.0","iova":"0xzz","direction":"read","length":1}"#,
                "iova",
            ),
            (
                r#"{"fault":"dma","device":"0:4","iova":1,"direction":"read","length":1}"#,
                "device",
            ),
            (
                r#"{"fault":"dma","device":"00:04.0","iova":1,"direction":"up","length":1}"#,
                "direction",
            ),
            (
                r#"{"fault":"dma","device":"00:04.0","iova":1,"direction":"read","length":0}"#,
                "length",
            ),
            (
                r#"{"fault":"drop-irq","vector":32,"pin":3,"count":1}"#,
                "device",
            ),
            (r#"{"fault":"drop-irq","pin":24,"count":1}"#, "pin"),
            (r#"{"fault":"drop-irq","pin":2,"count":-1}"#, "count"),
            (r#"{"fault":"drop-irq","pin":2,"count":1.5}"#, "count"),
            (
                r#"{"fault":"delay-irq","pin":2,"count":1,"delay_ms":[1]}"#,
                "delay_ms",
            ),
            (r#"{"fault":"fault-storm","device":7,"count":1}"#, "device"),
            (
                r#"{"fault":"irq-storm","vector":32,"cpu":0,"rate_hz":1000000,"duration_ms":1}"#,
                "rate_hz",
            ),
        ];
        for (body, want) in cases {
            assert_eq!(field(body).as_deref(), Some(want), "{body}");
        }
        assert_eq!(
            field(r#"{"fault":"irte-fault","device":"00:04.0","count":1,"reason":"late"}"#)
                .as_deref(),
            Some("reason")
        );
        assert_eq!(
            field(r#"{"fault":"irte-fault","vector":64,"count":1,"reason":"bad-sid"}"#).as_deref(),
            Some("device")
        );
        assert_eq!(
            parse(br#"{"fault":"irte-fault","index":"0x12","count":2,"reason":"0x22"}"#),
            Ok(Inject::IrteFault {
                target: Target::Index(0x12),
                count: 2,
                reason: devices::iommu::ir::IrFaultReason::NotPresent
            })
        );
        let ok = parse(
            br#"{"fault":"dma","device":"00:04.0","iova":"0x1000","direction":"read","length":"64"}"#,
        );
        assert_eq!(
            ok,
            Ok(Inject::Dma {
                device: Bdf::new(4),
                iova: 0x1000,
                write: false,
                length: 64
            })
        );
    }

    #[test]
    fn errors_stay_short_whatever_the_input() {
        let long = "x".repeat(60_000);
        let body = format!(r#"{{"fault":"{long}"}}"#);
        let e = parse(body.as_bytes()).expect_err("unknown");
        assert!(e.to_string().len() < 400, "{}", e.to_string().len());
        let body = format!(r#"{{"fault":"dma","{long}":1}}"#);
        assert!(parse(body.as_bytes()).expect_err("bad").to_string().len() < 400);
    }
}
