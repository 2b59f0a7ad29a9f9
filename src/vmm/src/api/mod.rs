//! The control API: HTTP/1.1 with JSON bodies on a Unix socket (`--api-socket`), the
//! Firecracker / cloud-hypervisor convention, served by the VMM's event-loop thread, so
//! vCPUs never wait for it. `resources/api/openapi.yaml` describes it.
//!
//! - `GET /v1/vm`: vCPUs, uptime, IOMMU, devices;
//! - `GET /v1/stats`: VT-d, interrupt-injection, IOAPIC and cap counters;
//! - `GET /v1/faults`: interrupt rules still armed;
//! - `GET /v1/ioapic`: the redirection table, decoded;
//! - `GET /v1/iommu[?last=N]`: the VT-d unit's state and its last faults;
//! - `GET /v1/idt[?vcpu=N]`: a vCPU's IDT read through the guest page tables;
//! - `GET /metrics`: every counter in the Prometheus text format;
//! - `POST /v1/inject`: one fault, `{"fault": "<kind>", ...}`.
//!
//! The server never blocks and never lets one client hold up another: every
//! connection is non-blocking with its own state (reading, waiting for a job, writing,
//! draining), replies are written as the socket accepts them, a timer closes
//! connections that have not sent their request within 10 s or not taken their reply
//! within 10 s, and work that takes long (fault storms, interrupt storms, IDT
//! snapshots) runs on a bounded worker pool ([`crate::workers`]). Past 64 connections
//! a client gets a JSON 503. Every request is answered `Connection: close`. A request
//! that is not understood gets a 4xx with `{"error": "...", "field": "..."}`.

pub mod client;
pub mod http;
pub mod inject;

pub use inject::validate_inject;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::inject::{ArmError, IrqAction, IrqTarget};
use devices::interrupt::{MsiMessage, MsiSource};
use devices::ioapic::IoApic;
use devices::iommu::{DmaError, Vtd};
use devices::limits::{self, Cap};
use devices::pci::Bdf;
use event_manager::{EventOps, Events, MutEventSubscriber};
use serde_json::{json, Value};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::workers::{JobKind, Workers};
use crate::{DeviceKind, KvmIrqController, VmmError};
use inject::{Inject, Target};

/// Open connections at most (more get a 503).
pub const MAX_CONNS: usize = 64;
/// Connections being refused with a 503 at once, at most (more are closed at once).
pub const MAX_REJECTS: usize = 16;
/// Time a client has to send its request, and to take its reply.
pub const IDLE: Duration = Duration::from_secs(10);
/// Time a refused or finished connection is drained before it is closed.
const DRAIN: Duration = Duration::from_secs(2);

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
    /// The virtio-blk disks: image (power cut, counters) and fault switches.
    pub disks: Vec<crate::DiskHandle>,
    /// Ends the VM (power cut).
    pub exit: Arc<devices::exit::ExitHandle>,
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
    /// Where long requests run (set when the API is served).
    pub workers: std::sync::OnceLock<Workers>,
}

fn kind_is_disk(ctx: &ApiContext, bdf: Bdf) -> bool {
    ctx.disks.iter().any(|d| d.bdf == bdf)
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

    fn busy(field: &str, message: impl Into<String>) -> Self {
        Self {
            status: 429,
            message: message.into(),
            field: Some(field.to_string()),
        }
    }

    fn json(self) -> (u16, Value) {
        let mut v = json!({"error": self.message});
        if let Some(f) = self.field {
            v["field"] = json!(f);
        }
        (self.status, v)
    }
}

impl From<inject::BodyError> for ApiError {
    fn from(e: inject::BodyError) -> Self {
        Self::bad(e.field(), e.to_string())
    }
}

/// What a request gets.
enum Reply {
    /// A JSON reply now.
    Json(u16, Value),
    /// A text reply now (Prometheus).
    Text(String),
    /// A reply computed on the worker pool.
    Job(Box<dyn FnOnce() -> (u16, Value) + Send>),
    /// A JSON reply now, and an action once the reply is in the socket (or the
    /// connection is gone): a power cut stops the VM only after telling the client.
    JsonThen(u16, Value, Box<dyn FnOnce() + Send>),
}

impl ApiContext {
    fn device(&self, bdf: Bdf) -> Result<(Bdf, DeviceKind), ApiError> {
        self.devices
            .iter()
            .find(|(b, _)| *b == bdf)
            .copied()
            .ok_or_else(|| ApiError::bad("device", format!("no device at {bdf}")))
    }

    fn disk(&self, bdf: Bdf) -> Result<&crate::DiskHandle, ApiError> {
        let (bdf, kind) = self.device(bdf)?;
        self.disks.iter().find(|d| d.bdf == bdf).ok_or_else(|| {
            ApiError::bad(
                "device",
                format!("{bdf} is {}, not a virtio-blk disk", kind.name()),
            )
        })
    }

    fn vtd(&self) -> Result<&Arc<Vtd>, ApiError> {
        self.vtd
            .as_ref()
            .ok_or_else(|| ApiError::status(409, "this VM has no IOMMU (run with --iommu intel)"))
    }

    fn workers(&self) -> Result<&Workers, ApiError> {
        self.workers
            .get()
            .ok_or_else(|| ApiError::status(503, "the API's worker pool is not running"))
    }

    fn irq_target(&self, t: &Target) -> Result<IrqTarget, ApiError> {
        Ok(match t {
            Target::Device(b) => IrqTarget::Device(self.device(*b)?.0.requester_id()),
            Target::Vector(v) => IrqTarget::Vector(*v),
            Target::Pin(p) => IrqTarget::Pin(*p),
            Target::Index(i) => IrqTarget::Index(*i),
        })
    }

    /// Carries out a request that [`inject::parse`] accepted: syntax and ranges are
    /// checked there; what is left needs the VM (devices, vCPUs, the IOMMU).
    fn inject(self: &Arc<Self>, req: Inject) -> Result<Reply, ApiError> {
        let ok = |v: Value| Ok(Reply::Json(200, v));
        match req {
            Inject::Dma {
                device,
                iova,
                write,
                length,
            } => {
                let (bdf, _) = self.device(device)?;
                let len = length as usize;
                let sid = bdf.requester_id();
                let handle = match &self.vtd {
                    Some(v) => v.handle(sid),
                    None => devices::iommu::DmaHandle::direct(
                        self.mem.clone(),
                        sid,
                        Some(self.irq.clone()),
                    ),
                };
                let mut buf = vec![0xfau8; len];
                let r = if write {
                    handle.write(iova, &buf)
                } else {
                    handle.read(iova, &mut buf)
                };
                ok(match r {
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
                    Err(DmaError::Interrupt { address }) => {
                        json!({"result": "interrupt", "address": format!("{address:#x}")})
                    }
                })
            }
            Inject::FaultStorm { device, count } => {
                let (bdf, _) = self.device(device)?;
                let vtd = self.vtd()?.clone();
                if !vtd.translating() {
                    return Err(ApiError::status(
                        409,
                        "translation is off in the guest (GSTS.TES = 0)",
                    ));
                }
                let n = count as u32;
                Ok(Reply::Job(Box::new(move || {
                    let (recorded, overflowed) = vtd.fault_storm(bdf.requester_id(), n);
                    (
                        200,
                        json!({"result": "done", "recorded": recorded, "overflowed": overflowed}),
                    )
                })))
            }
            Inject::ContextInvalid { device, count } => {
                let (bdf, _) = self.device(device)?;
                let n = count as u32;
                self.vtd()?
                    .inject_context_invalid(bdf.requester_id(), n)
                    .map_err(|e| ApiError::busy("count", e.to_string()))?;
                ok(json!({"result": "armed", "requests": n}))
            }
            Inject::CorruptDescriptor { device, count } if kind_is_disk(self, device) => {
                let d = self.disk(device)?;
                d.faults
                    .corrupt_next
                    .store(count as u32, std::sync::atomic::Ordering::SeqCst);
                ok(json!({"result": "armed", "requests": count}))
            }
            Inject::CorruptDescriptor { device, count } => {
                let (bdf, kind) = self.device(device)?;
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
                let n = count as u32;
                counter
                    .fetch_update(
                        std::sync::atomic::Ordering::SeqCst,
                        std::sync::atomic::Ordering::SeqCst,
                        |c| {
                            c.checked_add(n)
                                .filter(|t| u64::from(*t) <= inject::MAX_COUNT)
                        },
                    )
                    .map_err(|c| {
                        limits::hit(Cap::ContextFaults);
                        ApiError::busy(
                            "count",
                            format!(
                                "{c} corruptions are armed already; at most {} at once",
                                inject::MAX_COUNT
                            ),
                        )
                    })?;
                ok(json!({"result": "armed", "requests": n}))
            }
            Inject::DiskError {
                device,
                count,
                sector,
                sectors,
            } => {
                let d = self.disk(device)?;
                let n = count as u32;
                match sector {
                    Some(s) => {
                        *devices::sync::lock(&d.faults.fail_range) =
                            Some((s, s.saturating_add(sectors)));
                        d.faults
                            .range_left
                            .store(n, std::sync::atomic::Ordering::SeqCst);
                    }
                    None => d
                        .faults
                        .fail_next
                        .store(n, std::sync::atomic::Ordering::SeqCst),
                }
                ok(json!({"result": "armed", "requests": n}))
            }
            Inject::DiskDmaFault { device, count } => {
                let d = self.disk(device)?;
                if self.vtd.is_none() {
                    return Err(ApiError::status(
                        409,
                        "this VM has no IOMMU: a disk DMA fault needs --iommu intel",
                    ));
                }
                d.faults
                    .dma_fault_next
                    .store(count as u32, std::sync::atomic::Ordering::SeqCst);
                ok(json!({"result": "armed", "requests": count}))
            }
            Inject::DiskDelay {
                device,
                count,
                delay_ms,
            } => {
                let d = self.disk(device)?;
                d.faults
                    .delay_ms
                    .store(delay_ms, std::sync::atomic::Ordering::SeqCst);
                d.faults
                    .delay_next
                    .store(count as u32, std::sync::atomic::Ordering::SeqCst);
                ok(json!({"result": "armed", "requests": count, "delay_ms": delay_ms}))
            }
            Inject::PowerCut => {
                // The disks first (in-flight requests then fail), then the vCPUs.
                let mut lost = 0u64;
                for d in &self.disks {
                    lost += devices::sync::lock(&d.image).power_cut();
                }
                // The disks take no more writes from now on; the VM stops once the
                // client has its reply (the process exits soon after).
                let (exit, probes) = (self.exit.clone(), self.vcpu_probes.clone());
                Ok(Reply::JsonThen(
                    200,
                    json!({"result": "power cut", "lost_bytes": lost}),
                    Box::new(move || {
                        exit.request(
                            crate::EXIT_POWER_CUT,
                            format!("power cut (injected): {lost} unflushed bytes lost"),
                        );
                        for p in &probes {
                            p.kick();
                        }
                    }),
                ))
            }
            Inject::DropIrq { target, count } => self.arm(&target, count, IrqAction::Drop),
            Inject::DelayIrq {
                target,
                count,
                delay_ms,
            } => self.arm(
                &target,
                count,
                IrqAction::Delay(Duration::from_millis(delay_ms)),
            ),
            Inject::DuplicateIrq {
                target,
                count,
                copies,
            } => self.arm(&target, count, IrqAction::Duplicate(copies as u32)),
            Inject::IrteFault {
                target,
                count,
                reason,
            } => {
                let vtd = self.vtd()?;
                if !vtd.offers_interrupt_remapping() {
                    return Err(ApiError::status(
                        409,
                        "this VM's IOMMU does not offer interrupt remapping (--iommu intel,intremap=off)",
                    ));
                }
                self.arm(&target, count, IrqAction::IrteFault(reason))
            }
            Inject::SpuriousIrq { vector, cpu } => {
                let msg = self.message(vector, cpu)?;
                self.irq
                    .send_msi(MsiSource::Platform, msg)
                    .map_err(|e| ApiError::status(500, e.to_string()))?;
                ok(json!({"result": "sent"}))
            }
            Inject::IrqStorm {
                vector,
                cpu,
                rate_hz,
                duration_ms,
            } => {
                let msg = self.message(vector, cpu)?;
                let irq = self.irq.clone();
                let period = Duration::from_nanos(1_000_000_000 / rate_hz);
                let n = (rate_hz * duration_ms / 1000).max(1);
                self.workers()?
                    .submit(JobKind::IrqStorm, move || {
                        let t0 = Instant::now();
                        for i in 0..n {
                            let due = t0 + period * i as u32;
                            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                            }
                            if irq.send_msi(MsiSource::Platform, msg).is_err() {
                                return;
                            }
                        }
                    })
                    .map_err(|e| ApiError::busy("fault", e.to_string()))?;
                ok(json!({"result": "started", "interrupts": n}))
            }
        }
    }

    fn message(&self, vector: u8, cpu: u64) -> Result<MsiMessage, ApiError> {
        let max = u64::from(self.vcpus.saturating_sub(1));
        if cpu > max {
            return Err(ApiError::bad(
                "cpu",
                format!("cpu must be between 0 and {max}"),
            ));
        }
        Ok(MsiMessage {
            address: 0xfee0_0000 | ((cpu & 0xff) << 12) | ((cpu >> 8) << 40),
            data: u32::from(vector),
        })
    }

    fn arm(&self, target: &Target, count: u64, action: IrqAction) -> Result<Reply, ApiError> {
        let target = self.irq_target(target)?;
        let n = count as u32;
        let id = self
            .irq
            .faults()
            .add(target, action, n)
            .map_err(|e| match e {
                ArmError::TooManyRules => ApiError::busy("fault", e.to_string()),
                ArmError::TooManyPending { .. } => ApiError::busy(
                    if matches!(action, IrqAction::Duplicate(_)) {
                        "copies"
                    } else {
                        "count"
                    },
                    e.to_string(),
                ),
            })?;
        Ok(Reply::Json(
            200,
            json!({"result": "armed", "rule": id, "interrupts": n}),
        ))
    }

    fn idt(&self, path: &str) -> Result<Reply, ApiError> {
        let n = match path.split_once("vcpu=") {
            Some((_, v)) => v.parse::<usize>().map_err(|_| {
                ApiError::bad(
                    "vcpu",
                    format!("'{}' is not a vCPU number", inject_path_text(v)),
                )
            })?,
            None => 0,
        };
        let probe = self.vcpu_probes.get(n).ok_or_else(|| {
            ApiError::bad(
                "vcpu",
                format!("vCPU {n} does not exist (0..{})", self.vcpus),
            )
        })?;
        let probe = probe.clone();
        let mem = self.mem.clone();
        Ok(Reply::Job(Box::new(move || {
            match probe.snapshot(Duration::from_secs(1)) {
                Some(snap) => {
                    let mut v = crate::introspect::idt(&mem, &snap);
                    v["vcpu"] = json!(n);
                    (200, v)
                }
                None => ApiError::status(503, format!("vCPU {n} did not answer")).json(),
            }
        })))
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

    /// Routes one request.
    fn handle(self: &Arc<Self>, method: &str, path: &str, body: &[u8]) -> Reply {
        let json = |v: Value| Ok(Reply::Json(200, v));
        let r = match (method, path) {
            ("GET", "/v1/vm") => json(self.vm()),
            ("GET", "/v1/stats") => json(crate::metrics::json(self)),
            ("GET", "/v1/ioapic") => json(crate::metrics::ioapic(self)),
            ("GET", "/metrics") => Ok(Reply::Text(crate::metrics::prometheus(self))),
            ("GET", p) if p == "/v1/idt" || p.starts_with("/v1/idt?") => self.idt(p),
            ("GET", p) if p == "/v1/iommu" || p.starts_with("/v1/iommu?") => {
                let n = p
                    .split_once("last=")
                    .and_then(|(_, v)| v.parse::<usize>().ok())
                    .unwrap_or(16)
                    .min(64);
                crate::metrics::iommu(self, n)
                    .ok_or_else(|| {
                        ApiError::status(409, "this VM has no IOMMU (run with --iommu intel)")
                    })
                    .map(|v| Reply::Json(200, v))
            }
            ("GET", "/v1/faults") => json(self.faults()),
            ("POST", "/v1/inject") | ("PUT", "/v1/inject") => {
                inject::parse(body).map_err(ApiError::from).and_then(|i| {
                    // The timeline keeps a short summary of what was accepted, never
                    // the body as sent.
                    let what = i.summary();
                    let r = self.inject(i)?;
                    self.timeline
                        .record(|| devices::timeline::EventKind::Injection { what });
                    Ok(r)
                })
            }
            (
                _,
                "/v1/vm" | "/v1/stats" | "/v1/faults" | "/v1/inject" | "/v1/ioapic" | "/v1/iommu"
                | "/v1/idt" | "/metrics",
            ) => Err(ApiError::status(
                405,
                format!("{method} is not allowed on {path}"),
            )),
            _ => Err(ApiError::status(
                404,
                format!("no such path: {}", inject_path_text(path)),
            )),
        };
        match r {
            Ok(reply) => reply,
            Err(e) => {
                let (status, v) = e.json();
                Reply::Json(status, v)
            }
        }
    }
}

/// A path as quoted in an error message (bounded).
fn inject_path_text(path: &str) -> String {
    let mut end = path.len().min(128);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    path[..end].to_string()
}

fn json_response(status: u16, v: &Value) -> Vec<u8> {
    http::response(status, "application/json", &v.to_string())
}

/// Where a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Receiving its request.
    Reading,
    /// Its request runs on the worker pool.
    Waiting,
    /// Sending its reply.
    Writing,
    /// Reply sent, write side shut: reading (and discarding) until the client closes,
    /// so that unread bytes never turn the close into a reset.
    Draining,
}

struct Conn {
    stream: UnixStream,
    id: u64,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    written: usize,
    state: State,
    deadline: Instant,
    /// Refused past the connection cap: it only ever gets the 503.
    reject: bool,
    /// The request left bytes unread (drain before closing).
    leftover: bool,
    /// Runs once the reply is written, or when the connection ends first.
    then: Option<Box<dyn FnOnce() + Send>>,
}

/// How far [`Conn::write_out`] got.
#[derive(Debug, PartialEq, Eq)]
enum Written {
    /// The whole reply is in the socket (and the `then` action has run).
    All,
    /// The socket is full: wait for it to drain.
    Partly,
    /// The peer is gone.
    Failed,
}

impl Conn {
    /// Writes what the socket takes of the reply; once all of it is there, runs the
    /// connection's `then` action (so the client can read the reply even if the action
    /// ends the process).
    fn write_out(&mut self) -> Written {
        while self.written < self.out.len() {
            match self.stream.write(&self.out[self.written..]) {
                Ok(0) => return Written::Failed,
                Ok(n) => self.written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Written::Partly,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return Written::Failed,
            }
        }
        if let Some(f) = self.then.take() {
            f();
        }
        Written::All
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(f) = self.then.take() {
            f();
        }
    }
}

/// The API's event-loop subscriber.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    conns: HashMap<RawFd, Conn>,
    ctx: Arc<ApiContext>,
    timer: TimerFd,
    done_tx: mpsc::Sender<(u64, Vec<u8>)>,
    done_rx: mpsc::Receiver<(u64, Vec<u8>)>,
    done_efd: Arc<EventFd>,
    next_id: u64,
}

/// Why the API socket could not be bound.
fn bind_error(path: &Path, source: std::io::Error) -> VmmError {
    VmmError::File {
        what: "API socket",
        path: path.to_path_buf(),
        source,
    }
}

impl ApiServer {
    /// Binds `path`. A socket file left by a dead VMM is replaced; a live one, or a file
    /// that is not a socket, is an error (nothing but a stale socket is ever removed).
    pub fn bind(path: &Path, ctx: Arc<ApiContext>) -> Result<Self, VmmError> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(VmmError::Setup(format!(
                        "API socket {} is in use by another process",
                        path.display()
                    )));
                }
                std::fs::remove_file(path).map_err(|e| bind_error(path, e))?;
            }
            Ok(_) => {
                return Err(VmmError::Setup(format!(
                    "API socket {} exists and is not a socket; remove it or choose another path",
                    path.display()
                )))
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(|e| bind_error(path, e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| VmmError::Setup(format!("API socket: {e}")))?;
        let timer = TimerFd::new().map_err(|e| VmmError::Setup(format!("API timer: {e}")))?;
        let done_efd = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| VmmError::Setup(format!("API completion event: {e}")))?;
        let (done_tx, done_rx) = mpsc::channel();
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            conns: HashMap::new(),
            ctx,
            timer,
            done_tx,
            done_rx,
            done_efd: Arc::new(done_efd),
            next_id: 0,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            let open = self.conns.values().filter(|c| !c.reject).count();
            let rejecting = self.conns.len() - open;
            let reject = open >= MAX_CONNS;
            if reject {
                limits::hit(Cap::ApiConnections);
                if rejecting >= MAX_REJECTS {
                    limits::hit(Cap::ApiRejects);
                    continue; // closed at once
                }
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            if ops.add(Events::new(&stream, EventSet::IN)).is_err() {
                continue;
            }
            self.next_id += 1;
            let mut c = Conn {
                stream,
                id: self.next_id,
                inbuf: Vec::new(),
                out: Vec::new(),
                written: 0,
                state: State::Reading,
                deadline: Instant::now() + IDLE,
                reject,
                leftover: false,
                then: None,
            };
            if reject {
                c.leftover = true;
                let body = json!({"error": format!("too many connections (at most {MAX_CONNS}); try again later")});
                Self::reply(&mut c, json_response(503, &body), ops);
            }
            self.conns.insert(fd, c);
        }
    }

    /// Queues `bytes` as the reply and starts writing.
    fn reply(c: &mut Conn, bytes: Vec<u8>, ops: &mut EventOps) {
        c.out = bytes;
        c.written = 0;
        c.state = State::Writing;
        c.deadline = Instant::now() + IDLE;
        let _ = ops.modify(Events::new(&c.stream, EventSet::OUT));
    }

    /// Reads what is there; returns false when the connection is finished.
    fn read(c: &mut Conn) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            match c.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    if c.state == State::Reading && !c.reject {
                        c.inbuf.extend_from_slice(&chunk[..n]);
                        if c.inbuf.len() > http::MAX_HEAD + http::MAX_BODY {
                            return true;
                        }
                    } else if c.state == State::Draining {
                        c.inbuf.truncate(0);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
    }

    /// Writes what the socket takes; returns false when the connection is finished.
    fn flush(c: &mut Conn, ops: &mut EventOps) -> bool {
        match c.write_out() {
            Written::All => {}
            Written::Partly => return true,
            Written::Failed => return false,
        }
        if !c.leftover {
            return false;
        }
        let _ = c.stream.shutdown(std::net::Shutdown::Write);
        c.state = State::Draining;
        c.deadline = Instant::now() + DRAIN;
        let _ = ops.modify(Events::new(&c.stream, EventSet::IN));
        true
    }

    fn serve(&mut self, fd: RawFd, events: EventSet, ops: &mut EventOps) {
        let Some(c) = self.conns.get_mut(&fd) else {
            return;
        };
        let alive = match c.state {
            State::Writing => Self::flush(c, ops),
            State::Reading | State::Waiting | State::Draining => {
                let alive = Self::read(c);
                if alive && c.state == State::Reading && !c.reject {
                    match http::parse(&c.inbuf) {
                        http::Parsed::Partial
                            if c.inbuf.len() <= http::MAX_HEAD + http::MAX_BODY => {}
                        http::Parsed::Partial => {
                            c.leftover = true;
                            Self::reply(
                                c,
                                json_response(431, &json!({"error": "request too large"})),
                                ops,
                            );
                        }
                        http::Parsed::Error(status, msg) => {
                            c.leftover = true;
                            Self::reply(c, json_response(status, &json!({"error": msg})), ops);
                        }
                        http::Parsed::Done(req) => {
                            c.leftover = req.used < c.inbuf.len();
                            c.inbuf = Vec::new();
                            match self.ctx.handle(&req.method, &req.path, &req.body) {
                                Reply::Json(status, v) => {
                                    Self::reply(c, json_response(status, &v), ops)
                                }
                                Reply::JsonThen(status, v, then) => {
                                    c.then = Some(then);
                                    Self::reply(c, json_response(status, &v), ops)
                                }
                                Reply::Text(t) => Self::reply(
                                    c,
                                    http::response(200, "text/plain; version=0.0.4", &t),
                                    ops,
                                ),
                                Reply::Job(job) => {
                                    let (tx, efd, id) =
                                        (self.done_tx.clone(), self.done_efd.clone(), c.id);
                                    let submitted = match self.ctx.workers.get() {
                                        Some(w) => w
                                            .submit(JobKind::Job, move || {
                                                let (status, v) = job();
                                                let _ = tx.send((id, json_response(status, &v)));
                                                let _ = efd.write(1);
                                            })
                                            .map_err(|e| ApiError::busy("fault", e.to_string())),
                                        None => Err(ApiError::status(
                                            503,
                                            "the API's worker pool is not running",
                                        )),
                                    };
                                    match submitted {
                                        Ok(()) => {
                                            c.state = State::Waiting;
                                            c.deadline = Instant::now() + 6 * IDLE;
                                        }
                                        Err(e) => {
                                            let (status, v) = e.json();
                                            Self::reply(c, json_response(status, &v), ops);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                alive
                    && !(events.contains(EventSet::HANG_UP)
                        && c.state == State::Reading
                        && c.inbuf.is_empty())
            }
        };
        if !alive {
            self.close(fd, ops);
        }
    }

    fn close(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some(c) = self.conns.remove(&fd) {
            let _ = ops.remove(Events::empty(&c.stream));
        }
    }

    /// Delivers the replies of finished jobs.
    fn completions(&mut self, ops: &mut EventOps) {
        let _ = self.done_efd.read();
        while let Ok((id, bytes)) = self.done_rx.try_recv() {
            let fd = self
                .conns
                .iter()
                .find(|(_, c)| c.id == id && c.state == State::Waiting)
                .map(|(fd, _)| *fd);
            if let Some(c) = fd.and_then(|fd| self.conns.get_mut(&fd)) {
                Self::reply(c, bytes, ops);
                if !Self::flush(c, ops) {
                    if let Some(fd) = fd {
                        self.close(fd, ops);
                    }
                }
            }
        }
    }

    /// Closes every connection past its deadline (slow senders, slow readers).
    fn reap(&mut self, ops: &mut EventOps) {
        let _ = self.timer.wait();
        let now = Instant::now();
        let late: Vec<RawFd> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in late {
            self.close(fd, ops);
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
        } else if fd == self.timer.as_raw_fd() {
            self.reap(ops);
        } else if fd == self.done_efd.as_raw_fd() {
            self.completions(ops);
        } else {
            self.serve(fd, events.event_set(), ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::warn!("API socket cannot be polled: {e:?}");
        }
        let tick = Duration::from_millis(500);
        if let Err(e) = self.timer.reset(tick, Some(tick)) {
            log::warn!("API timer cannot be armed: {e}");
        }
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::warn!("API timer cannot be polled: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(self.done_efd.as_ref(), EventSet::IN)) {
            log::warn!("API completions cannot be polled: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn conn(stream: UnixStream, out: &[u8], then: Box<dyn FnOnce() + Send>) -> Conn {
        Conn {
            stream,
            id: 1,
            inbuf: Vec::new(),
            out: out.to_vec(),
            written: 0,
            state: State::Writing,
            deadline: Instant::now() + IDLE,
            reject: false,
            leftover: false,
            then: Some(then),
        }
    }

    #[test]
    fn then_runs_once_the_whole_reply_is_readable() {
        let (server, mut client) = UnixStream::pair().expect("socket pair");
        server.set_nonblocking(true).expect("nonblocking");
        client.set_nonblocking(true).expect("nonblocking");
        let reply = vec![b'x'; 1 << 20];
        let seen = Arc::new(Mutex::new(None));
        let s2 = seen.clone();
        let mut peer = client.try_clone().expect("clone");
        let mut c = conn(
            server,
            &reply,
            Box::new(move || {
                // What the client can read at the moment the action runs.
                let mut got = Vec::new();
                let _ = peer.read_to_end(&mut got);
                *s2.lock().expect("seen") = Some(got.len());
            }),
        );
        // A 1 MiB reply does not fit in the socket at once: the action waits.
        assert_eq!(c.write_out(), Written::Partly);
        assert!(
            seen.lock().expect("seen").is_none(),
            "ran before the reply was out"
        );
        let mut read = 0;
        let mut buf = vec![0u8; 1 << 16];
        while seen.lock().expect("seen").is_none() {
            if let Ok(n) = client.read(&mut buf) {
                read += n;
            }
            let _ = c.write_out();
        }
        let at_action = seen.lock().expect("seen").expect("ran");
        assert_eq!(
            read + at_action,
            reply.len(),
            "the whole reply was readable first"
        );
    }

    #[test]
    fn then_runs_when_the_connection_ends_first() {
        let (server, client) = UnixStream::pair().expect("socket pair");
        drop(client);
        let ran = Arc::new(AtomicBool::new(false));
        let r2 = ran.clone();
        let mut c = conn(
            server,
            b"reply",
            Box::new(move || r2.store(true, Ordering::SeqCst)),
        );
        assert_eq!(c.write_out(), Written::Failed);
        assert!(!ran.load(Ordering::SeqCst));
        drop(c);
        assert!(
            ran.load(Ordering::SeqCst),
            "a power cut must not be lost with its client"
        );
    }
}
