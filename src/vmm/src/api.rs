//! The control API: HTTP/1.1 with JSON bodies on a Unix socket (`--api-socket`), the
//! Firecracker / cloud-hypervisor convention, served by the VMM's event loop thread, so
//! vCPUs never wait for it. `resources/api/openapi.yaml` describes it.
//!
//! - `GET /v1/vm`: vCPUs, uptime, IOMMU, devices;
//! - `GET /v1/stats`: VT-d, interrupt-injection and IOAPIC counters;
//! - `GET /v1/faults`: interrupt rules still armed;
//! - `GET /v1/ioapic`: the redirection table, decoded;
//! - `GET /v1/iommu[?last=N]`: the VT-d unit's state and its last faults;
//! - `GET /v1/idt[?vcpu=N]`: a vCPU's IDT read through the guest page tables;
//! - `GET /metrics`: every counter in the Prometheus text format;
//! - `POST /v1/inject`: one fault, `{"fault": "<kind>", ...}`.
//!
//! Every connection carries one request and is closed after the response; at most 64
//! are open at once, and one that stays silent for 10 s loses its slot. A request
//! that is not understood gets a 4xx with `{"error": "...", "field": "..."}`; nothing a
//! client sends can stop the VMM (sizes are bounded, parsing never panics, long faults
//! run on their own threads).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::inject::{IrqAction, IrqTarget};
use devices::interrupt::{MsiMessage, MsiSource};
use devices::ioapic::IoApic;
use devices::iommu::{DmaError, Vtd};
use devices::pci::Bdf;
use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::Deserialize;
use serde_json::{json, Value};
use vmm_sys_util::epoll::EventSet;

use crate::{DeviceKind, KvmIrqController, VmmError};

/// Largest request head (request line and headers).
const MAX_HEAD: usize = 8 * 1024;
/// Largest request body.
const MAX_BODY: usize = 64 * 1024;
/// Open connections at most (more are refused at once).
const MAX_CONNS: usize = 64;
/// Largest DMA an injection may do.
const MAX_DMA: u32 = 1 << 20;

/// What the API can see and act on.
pub struct ApiContext {
    /// Guest memory (DMA injections without an IOMMU).
    pub mem: vm_memory::GuestMemoryMmap,
    /// The VT-d unit, if the VM has one.
    pub vtd: Option<Arc<Vtd>>,
    /// PCI devices by address.
    pub devices: Vec<(Bdf, DeviceKind)>,
    /// Descriptor-corruption counters of the virtio devices.
    pub virtio_corruption: Vec<(Bdf, Arc<std::sync::atomic::AtomicU32>)>,
    /// Interrupt routing (and its fault rules).
    pub irq: Arc<KvmIrqController>,
    /// The IOAPIC (for its counters).
    pub ioapic: Arc<Mutex<IoApic>>,
    /// When the VMM started.
    pub start: Instant,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Exit counters per vCPU.
    pub vcpu_stats: Vec<Arc<crate::vcpu::VcpuStats>>,
    /// Register requests to the vCPU threads.
    pub vcpu_probes: Vec<Arc<crate::vcpu::VcpuProbe>>,
    /// The event timeline (`--trace-file`).
    pub timeline: Arc<devices::timeline::Timeline>,
}

/// An API error: HTTP status, message and (for a bad request) the offending field.
#[derive(Debug)]
struct ApiError {
    status: u16,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn bad(field: &str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            field: Some(field.to_string()),
        }
    }

    fn status(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            field: None,
        }
    }
}

/// A number given as JSON number or as a string ("0x1000", "4096").
#[derive(Clone, Copy, Debug)]
struct Num(u64);

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Num(n)),
            Raw::S(s) => {
                let t = s.trim();
                let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                    Some(h) => u64::from_str_radix(h, 16),
                    None => t.parse(),
                };
                v.map(Num).map_err(|_| {
                    serde::de::Error::custom(format!("'{s}' is not a number (decimal or 0x-hex)"))
                })
            }
        }
    }
}

/// The body of `POST /v1/inject`.
#[derive(Debug, Deserialize)]
#[serde(tag = "fault", rename_all = "kebab-case", deny_unknown_fields)]
enum Inject {
    /// A DMA by `device` at `iova`.
    Dma {
        device: String,
        iova: Num,
        direction: String,
        length: Num,
    },
    /// `count` faulting writes by `device` beyond the address width (so they fault
    /// whatever is mapped: reason 0x4 with a valid context entry, else the context
    /// fault), to overflow the FRCDs.
    FaultStorm { device: String, count: Num },
    /// The next `count` requests of `device` fail with "invalid context entry".
    ContextInvalid { device: String, count: Num },
    /// Drop the next `count` interrupts of a device, pin or vector.
    DropIrq {
        device: Option<String>,
        vector: Option<Num>,
        pin: Option<Num>,
        count: Num,
    },
    /// Delay them by `delay_ms`.
    DelayIrq {
        device: Option<String>,
        vector: Option<Num>,
        pin: Option<Num>,
        count: Num,
        delay_ms: Num,
    },
    /// Deliver them `copies` extra times.
    DuplicateIrq {
        device: Option<String>,
        vector: Option<Num>,
        pin: Option<Num>,
        count: Num,
        copies: Num,
    },
    /// The next `count` requests of virtio `device` read a corrupted buffer address.
    CorruptDescriptor { device: String, count: Num },
    /// One interrupt on `vector` at APIC `cpu` that no device raised.
    SpuriousIrq { vector: Num, cpu: Num },
    /// `rate_hz` interrupts per second on `vector` at `cpu` for `duration_ms`.
    IrqStorm {
        vector: Num,
        cpu: Num,
        rate_hz: Num,
        duration_ms: Num,
    },
}

fn range(field: &str, v: Num, lo: u64, hi: u64) -> Result<u64, ApiError> {
    if (lo..=hi).contains(&v.0) {
        Ok(v.0)
    } else {
        Err(ApiError::bad(
            field,
            format!("{field} must be between {lo} and {hi}"),
        ))
    }
}

impl ApiContext {
    fn device(&self, field: &str, s: &str) -> Result<(Bdf, DeviceKind), ApiError> {
        let bdf: Bdf = s.parse().map_err(|e: String| ApiError::bad(field, e))?;
        self.devices
            .iter()
            .find(|(b, _)| *b == bdf)
            .copied()
            .ok_or_else(|| ApiError::bad(field, format!("no device at {bdf}")))
    }

    fn vtd(&self) -> Result<&Arc<Vtd>, ApiError> {
        self.vtd
            .as_ref()
            .ok_or_else(|| ApiError::status(409, "this VM has no IOMMU (run with --iommu intel)"))
    }

    fn irq_target(
        &self,
        device: Option<String>,
        vector: Option<Num>,
        pin: Option<Num>,
    ) -> Result<IrqTarget, ApiError> {
        match (device, vector, pin) {
            (Some(d), None, None) => {
                let (bdf, _) = self.device("device", &d)?;
                Ok(IrqTarget::Device(bdf.requester_id()))
            }
            // Ranges were checked with the body (`static_checks`).
            (None, Some(v), None) => Ok(IrqTarget::Vector(v.0 as u8)),
            (None, None, Some(p)) => Ok(IrqTarget::Pin(p.0 as u8)),
            _ => Err(ApiError::bad(
                "device",
                "name exactly one of device, vector or pin",
            )),
        }
    }

    /// Carries out a request that [`parse_inject`] accepted: number ranges and syntax
    /// are checked there; what is left needs the VM (devices, vCPUs, the IOMMU).
    fn inject(&self, req: Inject) -> Result<Value, ApiError> {
        match req {
            Inject::Dma {
                device,
                iova,
                direction,
                length,
            } => {
                let (bdf, _) = self.device("device", &device)?;
                let len = length.0 as usize;
                let sid = bdf.requester_id();
                let handle = match &self.vtd {
                    Some(v) => v.handle(sid),
                    None => devices::iommu::DmaHandle::direct(self.mem.clone(), sid),
                };
                let mut buf = vec![0xfau8; len];
                let r = if direction == "write" {
                    handle.write(iova.0, &buf)
                } else {
                    handle.read(iova.0, &mut buf)
                };
                Ok(match r {
                    Ok(()) => json!({"result": "done", "bytes": len}),
                    Err(DmaError::Fault { iova, reason, .. }) => json!({
                        "result": "fault",
                        "iova": format!("{iova:#x}"),
                        "reason": format!("{:#04x}", reason as u8),
                        "text": reason.linux_text(),
                    }),
                    Err(DmaError::NotRam { gpa }) => {
                        json!({"result": "not-ram", "gpa": format!("{gpa:#x}")})
                    }
                })
            }
            Inject::FaultStorm { device, count } => {
                let (bdf, _) = self.device("device", &device)?;
                let n = count.0 as u32;
                let vtd = self.vtd()?;
                if !vtd.translating() {
                    return Err(ApiError::status(
                        409,
                        "translation is off in the guest (GSTS.TES = 0)",
                    ));
                }
                let (recorded, overflowed) = vtd.fault_storm(bdf.requester_id(), n);
                Ok(json!({"result": "done", "recorded": recorded, "overflowed": overflowed}))
            }
            Inject::ContextInvalid { device, count } => {
                let (bdf, _) = self.device("device", &device)?;
                let n = count.0 as u32;
                self.vtd()?.inject_context_invalid(bdf.requester_id(), n);
                Ok(json!({"result": "armed", "requests": n}))
            }
            Inject::CorruptDescriptor { device, count } => {
                let (bdf, kind) = self.device("device", &device)?;
                let n = count.0 as u32;
                let counter = self
                    .virtio_corruption
                    .iter()
                    .find(|(b, _)| *b == bdf)
                    .map(|(_, c)| c.clone())
                    .ok_or_else(|| {
                        ApiError::bad(
                            "device",
                            format!("{bdf} is {}, not a virtio device", kind.name()),
                        )
                    })?;
                counter.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                Ok(json!({"result": "armed", "requests": n}))
            }
            Inject::DropIrq {
                device,
                vector,
                pin,
                count,
            } => self.arm(device, vector, pin, count, IrqAction::Drop),
            Inject::DelayIrq {
                device,
                vector,
                pin,
                count,
                delay_ms,
            } => {
                let ms = delay_ms.0;
                self.arm(
                    device,
                    vector,
                    pin,
                    count,
                    IrqAction::Delay(Duration::from_millis(ms)),
                )
            }
            Inject::DuplicateIrq {
                device,
                vector,
                pin,
                count,
                copies,
            } => {
                let c = copies.0 as u32;
                self.arm(device, vector, pin, count, IrqAction::Duplicate(c))
            }
            Inject::SpuriousIrq { vector, cpu } => {
                let msg = self.message(vector, cpu)?;
                self.irq
                    .signal_msi(MsiSource::Platform, msg)
                    .map_err(|e| ApiError::status(500, e.to_string()))?;
                Ok(json!({"result": "sent"}))
            }
            Inject::IrqStorm {
                vector,
                cpu,
                rate_hz,
                duration_ms,
            } => {
                let msg = self.message(vector, cpu)?;
                let (rate, ms) = (rate_hz.0, duration_ms.0);
                let irq = self.irq.clone();
                let period = Duration::from_nanos(1_000_000_000 / rate);
                let n = rate * ms / 1000;
                std::thread::Builder::new()
                    .name("fv-irq-storm".into())
                    .spawn(move || {
                        let t0 = Instant::now();
                        for i in 0..n.max(1) {
                            let due = t0 + period * i as u32;
                            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                            }
                            if irq.signal_msi(MsiSource::Platform, msg).is_err() {
                                return;
                            }
                        }
                    })
                    .map_err(|e| ApiError::status(500, e.to_string()))?;
                Ok(json!({"result": "started", "interrupts": n.max(1)}))
            }
        }
    }

    fn message(&self, vector: Num, cpu: Num) -> Result<MsiMessage, ApiError> {
        let v = vector.0;
        let c = range("cpu", cpu, 0, u64::from(self.vcpus.saturating_sub(1)))?;
        Ok(MsiMessage {
            address: 0xfee0_0000 | ((c & 0xff) << 12) | ((c >> 8) << 40),
            data: v as u32,
        })
    }

    fn arm(
        &self,
        device: Option<String>,
        vector: Option<Num>,
        pin: Option<Num>,
        count: Num,
        action: IrqAction,
    ) -> Result<Value, ApiError> {
        let target = self.irq_target(device, vector, pin)?;
        let n = count.0 as u32;
        let id = self.irq.faults().add(target, action, n);
        Ok(json!({"result": "armed", "rule": id, "interrupts": n}))
    }

    fn idt(&self, path: &str) -> Result<Value, ApiError> {
        let n = match path.split_once("vcpu=") {
            Some((_, v)) => v
                .parse::<usize>()
                .map_err(|_| ApiError::bad("vcpu", format!("'{v}' is not a vCPU number")))?,
            None => 0,
        };
        let probe = self.vcpu_probes.get(n).ok_or_else(|| {
            ApiError::bad(
                "vcpu",
                format!("vCPU {n} does not exist (0..{})", self.vcpus),
            )
        })?;
        let snap = probe
            .snapshot(Duration::from_secs(1))
            .ok_or_else(|| ApiError::status(503, format!("vCPU {n} did not answer")))?;
        let mut v = crate::introspect::idt(&self.mem, &snap);
        v["vcpu"] = json!(n);
        Ok(v)
    }

    fn vm(&self) -> Value {
        let devs: Vec<Value> = self
            .devices
            .iter()
            .map(|(b, k)| json!({"bdf": b.to_string(), "kind": k.name()}))
            .collect();
        json!({
            "vcpus": self.vcpus,
            "uptime_ms": self.start.elapsed().as_millis() as u64,
            "iommu": if self.vtd.is_some() { "intel" } else { "off" },
            "devices": devs,
        })
    }

    fn faults(&self) -> Value {
        let rules: Vec<Value> = self
            .irq
            .faults()
            .rules()
            .iter()
            .map(|r| {
                json!({"rule": r.id, "target": format!("{:?}", r.target),
                            "action": format!("{:?}", r.action), "remaining": r.remaining})
            })
            .collect();
        json!({ "irq_rules": rules })
    }

    /// Routes one request; returns (status, JSON body).
    fn handle(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let r = match (method, path) {
            ("GET", "/v1/vm") => Ok(self.vm()),
            ("GET", "/v1/stats") => Ok(crate::metrics::json(self)),
            ("GET", "/v1/ioapic") => Ok(crate::metrics::ioapic(self)),
            ("GET", p) if p == "/v1/idt" || p.starts_with("/v1/idt?") => self.idt(p),
            ("GET", p) if p == "/v1/iommu" || p.starts_with("/v1/iommu?") => {
                let n = p
                    .split_once("last=")
                    .and_then(|(_, v)| v.parse::<usize>().ok())
                    .unwrap_or(16)
                    .min(64);
                crate::metrics::iommu(self, n).ok_or_else(|| {
                    ApiError::status(409, "this VM has no IOMMU (run with --iommu intel)")
                })
            }
            ("GET", "/v1/faults") => Ok(self.faults()),
            ("POST", "/v1/inject") | ("PUT", "/v1/inject") => {
                self.timeline
                    .record(|| devices::timeline::EventKind::Injection {
                        what: String::from_utf8_lossy(body).into_owned(),
                    });
                parse_inject(body).and_then(|i| self.inject(i))
            }
            (
                _,
                "/v1/vm" | "/v1/stats" | "/v1/faults" | "/v1/inject" | "/v1/ioapic" | "/v1/iommu"
                | "/v1/idt" | "/metrics",
            ) => Err(ApiError::status(
                405,
                format!("{method} is not allowed on {path}"),
            )),
            _ => Err(ApiError::status(404, format!("no such path: {path}"))),
        };
        match r {
            Ok(v) => (200, v),
            Err(e) => {
                let mut v = json!({"error": e.message});
                if let Some(f) = e.field {
                    v["field"] = json!(f);
                }
                (e.status, v)
            }
        }
    }
}

/// Checks an inject body the way the API will (for campaign files): `Err((field,
/// message))` when it would be refused before reaching the VM.
pub fn validate_inject(body: &Value) -> Result<(), (String, String)> {
    let bytes = serde_json::to_vec(body).map_err(|e| ("body".to_string(), e.to_string()))?;
    parse_inject(&bytes)
        .map(|_| ())
        .map_err(|e| (e.field.unwrap_or_else(|| "body".into()), e.message))
}

/// The checks that need no VM: number ranges, PCI address syntax, the direction.
fn static_checks(r: &Inject) -> Result<(), ApiError> {
    let bdf = |s: &str| {
        s.parse::<Bdf>()
            .map(|_| ())
            .map_err(|e| ApiError::bad("device", e))
    };
    let target = |d: &Option<String>, v: &Option<Num>, p: &Option<Num>| -> Result<(), ApiError> {
        match (d, v, p) {
            (Some(d), None, None) => bdf(d),
            (None, Some(v), None) => range("vector", *v, 16, 255).map(|_| ()),
            (None, None, Some(p)) => range("pin", *p, 0, 23).map(|_| ()),
            _ => Err(ApiError::bad(
                "device",
                "name exactly one of device, vector or pin",
            )),
        }
    };
    match r {
        Inject::Dma {
            device,
            direction,
            length,
            ..
        } => {
            bdf(device)?;
            range("length", *length, 1, u64::from(MAX_DMA))?;
            if direction != "read" && direction != "write" {
                return Err(ApiError::bad(
                    "direction",
                    format!("'{direction}' is not a direction (read or write)"),
                ));
            }
        }
        Inject::FaultStorm { device, count }
        | Inject::ContextInvalid { device, count }
        | Inject::CorruptDescriptor { device, count } => {
            bdf(device)?;
            range("count", *count, 1, 1_000_000)?;
        }
        Inject::DropIrq {
            device,
            vector,
            pin,
            count,
        } => {
            target(device, vector, pin)?;
            range("count", *count, 1, 1_000_000)?;
        }
        Inject::DelayIrq {
            device,
            vector,
            pin,
            count,
            delay_ms,
        } => {
            target(device, vector, pin)?;
            range("count", *count, 1, 1_000_000)?;
            range("delay_ms", *delay_ms, 1, 60_000)?;
        }
        Inject::DuplicateIrq {
            device,
            vector,
            pin,
            count,
            copies,
        } => {
            target(device, vector, pin)?;
            range("count", *count, 1, 1_000_000)?;
            range("copies", *copies, 1, 100)?;
        }
        Inject::SpuriousIrq { vector, .. } => {
            range("vector", *vector, 16, 255)?;
        }
        Inject::IrqStorm {
            vector,
            rate_hz,
            duration_ms,
            ..
        } => {
            range("vector", *vector, 16, 255)?;
            range("rate_hz", *rate_hz, 1, 100_000)?;
            range("duration_ms", *duration_ms, 1, 60_000)?;
        }
    }
    Ok(())
}

/// Parses an inject body: JSON syntax first (field "body"), then the object and its
/// "fault" kind, then the fields of that kind (serde names them: `missing field `iova``),
/// then the checks that need no VM (`static_checks`).
fn parse_inject(body: &[u8]) -> Result<Inject, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("body", format!("the body is not JSON: {e}")))?;
    let Some(obj) = v.as_object() else {
        return Err(ApiError::bad("body", "the body must be a JSON object"));
    };
    if !obj.get("fault").is_some_and(Value::is_string) {
        return Err(ApiError::bad(
            "fault",
            "\"fault\" (a string naming the fault) is missing",
        ));
    }
    // A bad number is reported with its text ('0xzz'); find the key that holds it.
    let holder = |msg: &str| {
        let quoted = msg.split('\'').nth(1)?;
        obj.iter()
            .find(|(_, val)| val.as_str() == Some(quoted))
            .map(|(k, _)| k.clone())
    };
    let req = serde_json::from_value::<Inject>(v.clone()).map_err(|e| {
        let msg = e.to_string();
        let named = msg.split('`').nth(1).map(str::to_string);
        let field = if msg.starts_with("unknown variant") {
            "fault".to_string()
        } else if msg.contains("field") {
            named.unwrap_or_else(|| "body".into())
        } else {
            holder(&msg).unwrap_or_else(|| "body".into())
        };
        ApiError::bad(&field, msg)
    })?;
    static_checks(&req)?;
    Ok(req)
}

/// A parsed request, or why there is none yet.
enum Parse {
    Incomplete,
    Done {
        method: String,
        path: String,
        body: Vec<u8>,
    },
    Error(u16, String),
}

fn parse_request(buf: &[u8]) -> Parse {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD {
            Parse::Error(431, "request head too large".into())
        } else {
            Parse::Incomplete
        };
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Parse::Error(400, "request head is not UTF-8".into());
    };
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (Some(method), Some(path), Some(version)) = (first.next(), first.next(), first.next())
    else {
        return Parse::Error(400, "malformed request line".into());
    };
    if !version.starts_with("HTTP/1.") {
        return Parse::Error(505, format!("{version} is not supported; use HTTP/1.1"));
    }
    let mut length = 0usize;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                match v.trim().parse::<usize>() {
                    Ok(n) if n <= MAX_BODY => length = n,
                    Ok(_) => {
                        return Parse::Error(413, format!("body larger than {MAX_BODY} bytes"))
                    }
                    Err(_) => return Parse::Error(400, "bad Content-Length".into()),
                }
            }
        }
    }
    let start = end + 4;
    if buf.len() < start + length {
        return Parse::Incomplete;
    }
    Parse::Done {
        method: method.to_string(),
        path: path.to_string(),
        body: buf[start..start + length].to_vec(),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Internal Server Error",
    }
}

fn respond(stream: &mut UnixStream, status: u16, body: &Value) {
    let text = body.to_string();
    let msg = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        reason(status),
        text.len()
    );
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = stream.write_all(msg.as_bytes());
}

fn respond_text(stream: &mut UnixStream, text: &str) {
    let msg = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = stream.write_all(msg.as_bytes());
}

/// The API's event-loop subscriber.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    conns: HashMap<RawFd, (UnixStream, Vec<u8>, Instant)>,
    ctx: Arc<ApiContext>,
}

/// A connection that has not sent a whole request by then is closed.
const IDLE: Duration = Duration::from_secs(10);

impl ApiServer {
    /// Binds `path` (a stale socket file left by a dead VMM is replaced).
    pub fn bind(path: &Path, ctx: Arc<ApiContext>) -> Result<Self, VmmError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(VmmError::Setup(format!(
                    "API socket {} is in use by another process",
                    path.display()
                )));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|e| VmmError::File {
            what: "API socket",
            path: path.to_path_buf(),
            source: e,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| VmmError::Setup(format!("API socket: {e}")))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            conns: HashMap::new(),
            ctx,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        // Clients that connected and went quiet do not keep their slot.
        let stale: Vec<RawFd> = self
            .conns
            .iter()
            .filter(|(_, (_, _, since))| since.elapsed() > IDLE)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            if let Some((stream, _, _)) = self.conns.remove(&fd) {
                let _ = ops.remove(Events::new(&stream, EventSet::IN));
            }
        }
        while let Ok((stream, _)) = self.listener.accept() {
            if self.conns.len() >= MAX_CONNS {
                let mut s = stream;
                respond(&mut s, 503, &json!({"error": "too many connections"}));
                continue;
            }
            let _ = stream.set_nonblocking(true);
            let fd = stream.as_raw_fd();
            if ops.add(Events::new(&stream, EventSet::IN)).is_ok() {
                self.conns.insert(fd, (stream, Vec::new(), Instant::now()));
            }
        }
    }

    fn serve(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some((stream, buf, _)) = self.conns.get_mut(&fd) else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let closed = loop {
            match stream.read(&mut chunk) {
                Ok(0) => break true,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > MAX_HEAD + MAX_BODY {
                        break false;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            }
        };
        let outcome = match parse_request(buf) {
            Parse::Incomplete if !closed && buf.len() <= MAX_HEAD + MAX_BODY => return,
            Parse::Incomplete => Some((400, json!({"error": "incomplete request"}))),
            Parse::Error(status, msg) => Some((status, json!({"error": msg}))),
            Parse::Done { method, path, .. } if method == "GET" && path == "/metrics" => {
                if let Some((mut stream, _, _)) = self.conns.remove(&fd) {
                    let _ = ops.remove(Events::new(&stream, EventSet::IN));
                    respond_text(&mut stream, &crate::metrics::prometheus(&self.ctx));
                }
                return;
            }
            Parse::Done { method, path, body } => Some(self.ctx.handle(&method, &path, &body)),
        };
        if let Some((status, body)) = outcome {
            if let Some((mut stream, _, _)) = self.conns.remove(&fd) {
                let _ = ops.remove(Events::new(&stream, EventSet::IN));
                respond(&mut stream, status, &body);
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else {
            self.serve(fd, ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::warn!("API socket cannot be polled: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_parsing_is_bounded_and_strict() {
        assert!(matches!(
            parse_request(b"GET /v1/vm HTTP/1.1\r\n"),
            Parse::Incomplete
        ));
        match parse_request(b"GET /v1/vm HTTP/1.1\r\nHost: x\r\n\r\n") {
            Parse::Done { method, path, body } => {
                assert_eq!(
                    (method.as_str(), path.as_str(), body.len()),
                    ("GET", "/v1/vm", 0)
                )
            }
            _ => panic!("complete request"),
        }
        let post = b"POST /v1/inject HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"a\":";
        assert!(matches!(
            parse_request(&post[..post.len() - 1]),
            Parse::Incomplete
        ));
        assert!(matches!(parse_request(post), Parse::Done { .. }));
        let errors: [(&[u8], u16); 6] = [
            (b"GET / HTTP/2\r\n\r\n", 505),
            (b"garbage\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n", 413),
            (b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
            (&[b'a'; MAX_HEAD + 10], 431),
            (b"\xff\xfe\r\n\r\n", 400),
        ];
        for (req, want) in errors {
            match parse_request(req) {
                Parse::Error(status, _) => assert_eq!(status, want),
                _ => panic!(
                    "{:?} should be refused with {want}",
                    String::from_utf8_lossy(req)
                ),
            }
        }
    }

    #[test]
    fn inject_bodies_name_the_bad_field() {
        let field = |b: &str| parse_inject(b.as_bytes()).err().and_then(|e| e.field);
        assert_eq!(
            field(r#"{"fault":"dma","device":"00:04.0","direction":"write","length":4}"#)
                .as_deref(),
            Some("iova")
        );
        assert_eq!(field(r#"{"fault":"warp-core"}"#).as_deref(), Some("fault"));
        assert_eq!(
            field(r#"{"fault":"spurious-irq","vector":32,"cpu":0,"colour":1}"#).as_deref(),
            Some("colour")
        );
        assert_eq!(field("").as_deref(), Some("body"));
        assert_eq!(field("[1,2]").as_deref(), Some("body"));
        assert_eq!(field(r#"{"vector":1}"#).as_deref(), Some("fault"));
        assert!(field("not json").is_some());
        let ok = parse_inject(br#"{"fault":"dma","device":"00:04.0","iova":"0x1000","direction":"read","length":"64"}"#);
        assert!(matches!(
            ok,
            Ok(Inject::Dma {
                iova: Num(0x1000),
                length: Num(64),
                ..
            })
        ));
    }
}
