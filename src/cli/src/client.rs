//! `faultvisor inject` and `faultvisor stats`: clients of a running VMM's API socket.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use crate::CliError;

/// Faults `inject` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FaultKind {
    /// A DMA by --device at --iova (--read or --write, --length bytes).
    Dma,
    /// --count faulting writes by --device beyond the address width (overflows the
    /// fault records; reason 0x4 when the device has a valid context entry).
    FaultStorm,
    /// The next --count DMA requests of --device fail: invalid context entry (0x3).
    ContextInvalid,
    /// The next --count requests of virtio --device read a corrupted buffer address
    /// (the device's DMA faults).
    CorruptDescriptor,
    /// Drop the next --count interrupts of --device, --vector or --pin.
    DropIrq,
    /// Delay them by --delay-ms.
    DelayIrq,
    /// Deliver them --copies extra times.
    DuplicateIrq,
    /// One interrupt on --vector at --cpu that no device raised.
    SpuriousIrq,
    /// --rate-hz interrupts per second on --vector at --cpu for --duration-ms.
    IrqStorm,
    /// The next --count interrupts of --device, --pin or --index fail their interrupt
    /// remapping lookup with --reason (recorded as a fault; nothing delivered).
    IrteFault,
    /// The next --count requests of disk --device (touching --sector..+--sectors when
    /// given) fail with an I/O error; the image is not changed.
    DiskError,
    /// The next --count data requests of disk --device fault in the IOMMU.
    DiskDmaFault,
    /// The next --count requests of disk --device complete --delay-ms late.
    DiskDelay,
    /// The power goes: the VM stops at once, every disk loses its unflushed writes.
    PowerCut,
}

impl FaultKind {
    fn api_name(self) -> &'static str {
        match self {
            Self::Dma => "dma",
            Self::FaultStorm => "fault-storm",
            Self::ContextInvalid => "context-invalid",
            Self::CorruptDescriptor => "corrupt-descriptor",
            Self::DropIrq => "drop-irq",
            Self::DelayIrq => "delay-irq",
            Self::DuplicateIrq => "duplicate-irq",
            Self::SpuriousIrq => "spurious-irq",
            Self::IrqStorm => "irq-storm",
            Self::IrteFault => "irte-fault",
            Self::DiskError => "disk-error",
            Self::DiskDmaFault => "disk-dma-fault",
            Self::DiskDelay => "disk-delay",
            Self::PowerCut => "power-cut",
        }
    }
}

pub(crate) const INJECT_EXAMPLES: &str = "\
Examples (the VM runs with --api-socket /tmp/fv.sock):
  faultvisor inject --api-socket /tmp/fv.sock dma --device 00:04.0 --iova 0x1234000 --write --length 64
  faultvisor inject --api-socket /tmp/fv.sock fault-storm --device 00:04.0 --count 40
  faultvisor inject --api-socket /tmp/fv.sock drop-irq --vector 0x41 --count 3
  faultvisor inject --api-socket /tmp/fv.sock irq-storm --vector 0x41 --cpu 0 --rate-hz 10000 --duration-ms 500
  faultvisor inject --api-socket /tmp/fv.sock irte-fault --device 00:05.0 --reason not-present --count 1
  faultvisor inject --api-socket /tmp/fv.sock disk-error --device 00:03.0 --sector 2048 --sectors 8 --count 1
  faultvisor inject --api-socket /tmp/fv.sock power-cut

Exit status: 0 when the VMM accepted the fault (its answer is printed as JSON), 1 when it
refused it (the message names the field), 2 when the VMM cannot be reached.";

/// Arguments of `faultvisor inject`.
#[derive(Debug, Args, Clone)]
pub struct InjectArgs {
    /// The VMM's API socket (`faultvisor run --api-socket PATH`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// What to inject.
    #[arg(value_enum)]
    pub fault: FaultKind,
    /// PCI address of the device (BB:DD.F).
    #[arg(long)]
    pub device: Option<String>,
    /// I/O virtual address (decimal or 0x-hex).
    #[arg(long)]
    pub iova: Option<String>,
    /// The device reads memory (DMA Read).
    #[arg(long, conflicts_with = "write")]
    pub read: bool,
    /// The device writes memory (DMA Write; the default).
    #[arg(long)]
    pub write: bool,
    /// DMA length in bytes.
    #[arg(long, default_value_t = 64)]
    pub length: u64,
    /// How many (faults, requests or interrupts).
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Interrupt vector (decimal or 0x-hex).
    #[arg(long)]
    pub vector: Option<String>,
    /// IOAPIC pin.
    #[arg(long)]
    pub pin: Option<u64>,
    /// Destination APIC ID.
    #[arg(long, default_value_t = 0)]
    pub cpu: u64,
    /// Delay of each interrupt (delay-irq) or disk request (disk-delay).
    #[arg(long, default_value_t = 10)]
    pub delay_ms: u64,
    /// Extra copies of each interrupt (duplicate-irq).
    #[arg(long, default_value_t = 1)]
    pub copies: u64,
    /// Interrupt rate (irq-storm).
    #[arg(long, default_value_t = 1000)]
    pub rate_hz: u64,
    /// Storm length (irq-storm).
    #[arg(long, default_value_t = 100)]
    pub duration_ms: u64,
    /// Interrupt remapping table index (irte-fault).
    #[arg(long, value_name = "N")]
    pub index: Option<String>,
    /// IRTE fault reason (irte-fault): not-present, bad-sid, reserved, index, table,
    /// compat, request, or a code 0x20..0x26.
    #[arg(long, default_value = "not-present")]
    pub reason: String,
    /// First sector of the failing range (disk-error).
    #[arg(long)]
    pub sector: Option<u64>,
    /// Sectors in the failing range (disk-error, with --sector).
    #[arg(long, default_value_t = 1)]
    pub sectors: u64,
}

/// Arguments of `faultvisor stats`.
#[derive(Debug, Args, Clone)]
pub struct StatsArgs {
    /// The VMM's API socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Print the raw JSON.
    #[arg(long)]
    pub json: bool,
}

/// A JSON value for a number given on the command line (hex strings stay strings; the
/// API parses them).
fn num(s: &str) -> serde_json::Value {
    match s.parse::<u64>() {
        Ok(n) => serde_json::json!(n),
        Err(_) => serde_json::json!(s),
    }
}

/// The request body for `args`.
pub fn inject_body(a: &InjectArgs) -> serde_json::Value {
    use serde_json::json;
    let mut b = json!({ "fault": a.fault.api_name() });
    let set = |b: &mut serde_json::Value, k: &str, v: serde_json::Value| b[k] = v;
    match a.fault {
        FaultKind::Dma => {
            if let Some(d) = &a.device {
                set(&mut b, "device", json!(d));
            }
            if let Some(i) = &a.iova {
                set(&mut b, "iova", num(i));
            }
            set(
                &mut b,
                "direction",
                json!(if a.read { "read" } else { "write" }),
            );
            set(&mut b, "length", json!(a.length));
        }
        FaultKind::PowerCut => {}
        FaultKind::DiskDelay => {
            if let Some(d) = &a.device {
                set(&mut b, "device", json!(d));
            }
            set(&mut b, "count", json!(a.count));
            set(&mut b, "delay_ms", json!(a.delay_ms));
        }
        FaultKind::DiskError => {
            if let Some(d) = &a.device {
                set(&mut b, "device", json!(d));
            }
            set(&mut b, "count", json!(a.count));
            if let Some(s) = a.sector {
                set(&mut b, "sector", json!(s));
                set(&mut b, "sectors", json!(a.sectors));
            }
        }
        FaultKind::FaultStorm
        | FaultKind::ContextInvalid
        | FaultKind::CorruptDescriptor
        | FaultKind::DiskDmaFault => {
            if let Some(d) = &a.device {
                set(&mut b, "device", json!(d));
            }
            set(&mut b, "count", json!(a.count));
        }
        FaultKind::DropIrq | FaultKind::DelayIrq | FaultKind::DuplicateIrq => {
            if let Some(d) = &a.device {
                set(&mut b, "device", json!(d));
            }
            if let Some(v) = &a.vector {
                set(&mut b, "vector", num(v));
            }
            if let Some(p) = a.pin {
                set(&mut b, "pin", json!(p));
            }
            set(&mut b, "count", json!(a.count));
            if a.fault == FaultKind::DelayIrq {
                set(&mut b, "delay_ms", json!(a.delay_ms));
            }
            if a.fault == FaultKind::DuplicateIrq {
                set(&mut b, "copies", json!(a.copies));
            }
        }
        FaultKind::IrteFault => {
            if let Some(d) = &a.device {
                set(&mut b, "device", json!(d));
            }
            if let Some(p) = a.pin {
                set(&mut b, "pin", json!(p));
            }
            if let Some(i) = &a.index {
                set(&mut b, "index", num(i));
            }
            set(&mut b, "count", json!(a.count));
            set(&mut b, "reason", json!(a.reason));
        }
        FaultKind::SpuriousIrq | FaultKind::IrqStorm => {
            if let Some(v) = &a.vector {
                set(&mut b, "vector", num(v));
            }
            set(&mut b, "cpu", json!(a.cpu));
            if a.fault == FaultKind::IrqStorm {
                set(&mut b, "rate_hz", json!(a.rate_hz));
                set(&mut b, "duration_ms", json!(a.duration_ms));
            }
        }
    }
    b
}

/// Sends one request; returns (status, parsed JSON body).
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, serde_json::Value), CliError> {
    vmm::api::client::request(socket, method, path, body)
        .map_err(|e| CliError::Unreachable(e.to_string()))
}

/// `faultvisor inject`.
pub fn inject(a: &InjectArgs) -> Result<i32, CliError> {
    let body = inject_body(a);
    let (status, resp) = request(&a.api_socket, "POST", "/v1/inject", Some(&body))?;
    if status == 200 {
        println!("{resp}");
        return Ok(0);
    }
    let msg = resp["error"].as_str().unwrap_or("refused");
    let field = resp["field"]
        .as_str()
        .map(|f| format!(" (field '{f}')"))
        .unwrap_or_default();
    eprintln!("faultvisor: error: the VMM refused the fault: {msg}{field}");
    Ok(1)
}

/// `faultvisor stats`.
pub fn stats(a: &StatsArgs) -> Result<i32, CliError> {
    let (status, s) = request(&a.api_socket, "GET", "/v1/stats", None)?;
    if status != 200 {
        eprintln!(
            "faultvisor: error: {}",
            s["error"].as_str().unwrap_or("stats refused")
        );
        return Ok(1);
    }
    if a.json {
        println!("{s}");
        return Ok(0);
    }
    println!("uptime              {} ms", s["uptime_ms"]);
    if s["vtd"].is_object() {
        for k in [
            "dma_requests",
            "walks",
            "faults_recorded",
            "faults_overflowed",
            "faults_suppressed",
            "fault_events",
            "invalidations",
            "qi_descriptors",
        ] {
            println!("vtd.{k:<18}{}", s["vtd"][k]);
        }
    } else {
        println!("vtd                 (no IOMMU)");
    }
    for k in [
        "dropped",
        "delayed",
        "duplicated",
        "rules_armed",
        "signalled",
    ] {
        println!("irq.{k:<16}{}", s["irq_injection"][k]);
    }
    if let Some(msis) = s["msi"].as_array() {
        for m in msis {
            println!(
                "{:<20}device {} vector {:#x} dest {} raised {} delivered {}",
                format!("msi.gsi{}", m["gsi"]),
                m["device"].as_str().unwrap_or("-"),
                m["vector"].as_u64().unwrap_or(0),
                m["dest"],
                m["raised"],
                m["delivered"]
            );
        }
    }
    if let Some(vcpus) = s["vcpus"].as_array() {
        for v in vcpus {
            let exits: Vec<String> = v["exits"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
                        .map(|(k, n)| format!("{k} {n}"))
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "{:<20}{}",
                format!("vcpu{}.exits", v["vcpu"]),
                exits.join(", ")
            );
        }
    }
    if let Some(pins) = s["ioapic"].as_array() {
        for p in pins {
            println!(
                "ioapic.pin{:<10}raised {} delivered {} masked {} coalesced {}",
                p["pin"], p["raised"], p["delivered"], p["masked"], p["coalesced"]
            );
        }
    }
    Ok(0)
}

/// A command that only needs the API socket.
#[derive(Debug, Args, Clone)]
pub struct SocketArgs {
    /// The VMM's API socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Print the raw JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `faultvisor iommu`.
#[derive(Debug, Args, Clone)]
pub struct IommuArgs {
    /// The VMM's API socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// How many of the last faults to show (at most 64).
    #[arg(long, default_value_t = 16)]
    pub last: usize,
    /// Print the raw JSON.
    #[arg(long)]
    pub json: bool,
}

fn get(socket: &Path, path: &str) -> Result<Result<serde_json::Value, i32>, CliError> {
    let (status, v) = request(socket, "GET", path, None)?;
    if status != 200 {
        eprintln!(
            "faultvisor: error: {}",
            v["error"].as_str().unwrap_or("refused")
        );
        return Ok(Err(1));
    }
    Ok(Ok(v))
}

/// GETs `path` for a table: `Ok(value)` to print as a table, or `Err(exit code)` when
/// the VMM refused or `json` asked for the raw answer (already printed).
fn fetch(
    socket: &Path,
    path: &str,
    json: bool,
) -> Result<Result<serde_json::Value, i32>, CliError> {
    let v = match get(socket, path)? {
        Ok(v) => v,
        Err(c) => return Ok(Err(c)),
    };
    if json {
        println!("{v}");
        return Ok(Err(0));
    }
    Ok(Ok(v))
}

/// `faultvisor ioapic`.
pub fn ioapic(a: &SocketArgs) -> Result<i32, CliError> {
    let v = match fetch(&a.api_socket, "/v1/ioapic", a.json)? {
        Ok(v) => v,
        Err(code) => return Ok(code),
    };
    println!(
        "pin  vector  dest  mode      trigger  polarity  masked  remote-IRR  raised  delivered"
    );
    for p in v["pins"].as_array().cloned().unwrap_or_default() {
        println!(
            "{:>3}  {:>#6x}  {:>4}  {:<8}  {:<7}  {:<8}  {:<6}  {:<10}  {:>6}  {:>9}",
            p["pin"].as_u64().unwrap_or(0),
            p["vector"].as_u64().unwrap_or(0),
            p["dest"].as_u64().unwrap_or(0),
            p["dest_mode"].as_str().unwrap_or(""),
            p["trigger"].as_str().unwrap_or(""),
            p["polarity"].as_str().unwrap_or(""),
            if p["masked"] == true { "yes" } else { "no" },
            if p["remote_irr"] == true { "set" } else { "-" },
            p["raised"].as_u64().unwrap_or(0),
            p["delivered"].as_u64().unwrap_or(0),
        );
    }
    Ok(0)
}

/// `faultvisor iommu`.
pub fn iommu(a: &IommuArgs) -> Result<i32, CliError> {
    let v = match fetch(
        &a.api_socket,
        &format!("/v1/iommu?last={}", a.last.min(64)),
        a.json,
    )? {
        Ok(v) => v,
        Err(code) => return Ok(code),
    };
    println!(
        "translation {}  queued invalidation {}  GSTS {}  FSTS {}",
        if v["translation"] == true {
            "on"
        } else {
            "off"
        },
        if v["queued_invalidation"] == true {
            "on"
        } else {
            "off"
        },
        v["gsts"].as_str().unwrap_or(""),
        v["fsts"].as_str().unwrap_or("")
    );
    println!("root table  {}", v["root_table"].as_str().unwrap_or(""));
    let fe = &v["fault_event"];
    println!(
        "fault event vector {:#x} -> APIC {} {}{}",
        fe["vector"].as_u64().unwrap_or(0),
        fe["dest"],
        if fe["masked"] == true { "(masked)" } else { "" },
        if fe["pending"] == true {
            " (pending)"
        } else {
            ""
        }
    );
    let ir = &v["interrupt_remapping"];
    println!(
        "interrupt remapping {}  table {} ({} entries, {})  compatibility format {}",
        if ir["enabled"] == true { "on" } else { "off" },
        ir["table"].as_str().unwrap_or(""),
        ir["entries"],
        if ir["x2apic"] == true {
            "x2APIC"
        } else {
            "xAPIC"
        },
        if ir["compat_allowed"] == true {
            "allowed (CFI)"
        } else {
            "blocked"
        }
    );
    let rows = ir["rows"].as_array().cloned().unwrap_or_default();
    if !rows.is_empty() {
        println!("  index  P  vector  destination        trigger  SID     SVT  cache    used by");
    }
    for r in &rows {
        let cache = match (r["cached"] == true, r["stale"] == true) {
            (true, true) => "STALE",
            (true, false) => "cached",
            _ => "-",
        };
        let users: Vec<String> = r["users"]
            .as_array()
            .map(|u| {
                u.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "  {:>5}  {}  {:>6}  {:>8} {:<9} {:<7}  {}  {:>3}  {:<7}  {}",
            r["index"],
            if r["present"] == true { "1" } else { "0" },
            r["vector"].as_str().unwrap_or(""),
            r["destination"],
            r["mode"].as_str().unwrap_or(""),
            r["trigger"].as_str().unwrap_or(""),
            r["sid"].as_str().unwrap_or(""),
            r["svt"],
            cache,
            users.join(", ")
        );
    }
    let st = &v["stale_uses"];
    println!(
        "caching {}  stale uses: {} context, {} IOTLB, {} IRTE{}",
        v["caching"].as_str().unwrap_or("?"),
        st["context"],
        st["iotlb"],
        st["irte"],
        if v["caching"] == "exact" {
            ""
        } else {
            " (the detector runs with --iommu intel,caching=exact)"
        }
    );
    for u in st["recent"].as_array().cloned().unwrap_or_default() {
        println!(
            "  {:>10} us  {} (x{})",
            u["last_us"],
            u["text"].as_str().unwrap_or(""),
            u["uses"]
        );
    }
    let faults = v["faults"].as_array().cloned().unwrap_or_default();
    println!("last {} fault(s), newest first:", faults.len());
    for f in faults {
        if f["kind"] == "interrupt" {
            println!(
                "  {:>10} us  [INTR-REMAP] Request device [{}] fault index {} [fault reason {}] {}",
                f["at_us"],
                f["device"].as_str().unwrap_or(""),
                f["index"].as_str().unwrap_or(""),
                f["reason"].as_str().unwrap_or(""),
                f["text"].as_str().unwrap_or("")
            );
            continue;
        }
        println!(
            "  {:>10} us  [DMA {} NO_PASID] Request device [{}] fault addr {} [fault reason {}] {}",
            f["at_us"],
            if f["direction"] == "read" {
                "Read"
            } else {
                "Write"
            },
            f["device"].as_str().unwrap_or(""),
            f["address"].as_str().unwrap_or(""),
            f["reason"].as_str().unwrap_or(""),
            f["text"].as_str().unwrap_or("")
        );
    }
    Ok(0)
}

/// Arguments of `faultvisor idt`.
#[derive(Debug, Args, Clone)]
pub struct IdtArgs {
    /// The VMM's API socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Which vCPU.
    #[arg(long, default_value_t = 0)]
    pub vcpu: usize,
    /// Symbols: an ELF file with a symbol table (the probe guest, a vmlinux) or a
    /// System.map / /proc/kallsyms text file.
    #[arg(long, value_name = "FILE")]
    pub symbols: Option<PathBuf>,
    /// Show every gate, not only present ones.
    #[arg(long)]
    pub all: bool,
}

/// What faultvisor routes to each vector: (vector, description).
/// " via IRTE n" when the row's messages are translated by interrupt remapping.
fn via_irte(row: &serde_json::Value) -> String {
    match row["irte"].as_u64() {
        Some(i) => format!(" via IRTE {i}"),
        None => String::new(),
    }
}

fn routes(socket: &Path) -> Result<Vec<(u64, String)>, CliError> {
    let mut out = Vec::new();
    if let (200, io) = request(socket, "GET", "/v1/ioapic", None)? {
        for p in io["pins"].as_array().cloned().unwrap_or_default() {
            if p["masked"] == false && p.get("blocked").is_none() {
                out.push((
                    p["vector"].as_u64().unwrap_or(0),
                    format!(
                        "IOAPIC pin {}{} -> APIC {} ({}, delivered {})",
                        p["pin"],
                        via_irte(&p),
                        p["dest"],
                        p["trigger"].as_str().unwrap_or(""),
                        p["delivered"]
                    ),
                ));
            }
        }
    }
    if let (200, st) = request(socket, "GET", "/v1/stats", None)? {
        for m in st["msi"].as_array().cloned().unwrap_or_default() {
            let who = match m["device"].as_str() {
                Some(d) => format!("MSI {d} #{}", m["msi_index"]),
                None => "platform MSI".to_string(),
            };
            if m.get("blocked").is_some() {
                continue;
            }
            out.push((
                m["vector"].as_u64().unwrap_or(0),
                format!(
                    "{who}{} -> APIC {} (delivered {})",
                    via_irte(&m),
                    m["dest"],
                    m["delivered"]
                ),
            ));
        }
    }
    if let (200, iommu) = request(socket, "GET", "/v1/iommu?last=0", None)? {
        let fe = &iommu["fault_event"];
        if fe["vector"].as_u64().unwrap_or(0) != 0 {
            out.push((
                fe["vector"].as_u64().unwrap_or(0),
                format!(
                    "VT-d fault event -> APIC {}{}",
                    fe["dest"],
                    if fe["masked"] == true {
                        " (masked)"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    Ok(out)
}

/// `faultvisor idt`.
pub fn idt(a: &IdtArgs) -> Result<i32, CliError> {
    let syms = match &a.symbols {
        Some(p) => Some(crate::symbols::Symbols::load(p).map_err(CliError::Usage)?),
        None => None,
    };
    let v = match get(&a.api_socket, &format!("/v1/idt?vcpu={}", a.vcpu))? {
        Ok(v) => v,
        Err(c) => return Ok(c),
    };
    let routes = routes(&a.api_socket)?;
    let gates = v["gates"].as_array().cloned().unwrap_or_default();
    println!(
        "Dumping IDT: {} (limit {:#x}, vCPU {}, CR3 {}, RIP {})",
        v["idt_base"].as_str().unwrap_or("?"),
        v["idt_limit"].as_u64().unwrap_or(0),
        a.vcpu,
        v["cr3"].as_str().unwrap_or("?"),
        v["rip"].as_str().unwrap_or("?")
    );
    println!();
    for g in gates {
        let vec = g["vector"].as_u64().unwrap_or(0);
        if g["readable"] == false {
            println!("{vec:02x}: <not readable through the guest page tables>");
            continue;
        }
        if g["present"] == false && !a.all {
            continue;
        }
        let handler = g["handler"].as_str().unwrap_or("0");
        let addr = u64::from_str_radix(handler.trim_start_matches("0x"), 16).unwrap_or(0);
        let sym = syms
            .as_ref()
            .and_then(|s| s.resolve(addr))
            .unwrap_or_default();
        let mut line = format!(
            "{vec:02x}: {} {:<24} {} dpl{} ist{}{}",
            &handler[2..],
            sym,
            g["type"].as_str().unwrap_or("?"),
            g["dpl"],
            g["ist"],
            if g["present"] == true {
                ""
            } else {
                " (not present)"
            }
        );
        let here: Vec<&String> = routes
            .iter()
            .filter(|(rv, _)| *rv == vec)
            .map(|(_, d)| d)
            .collect();
        if !here.is_empty() {
            line.push_str("  <- ");
            line.push_str(
                &here
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            );
        }
        println!("{line}");
    }
    Ok(0)
}
