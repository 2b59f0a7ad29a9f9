//! An emulated Intel VT-d DMA-remapping unit (legacy mode) with guest-visible faults.
//!
//! - [`Vtd`] is the register file at [`VTD_BASE`] (4 KiB: GCMD/GSTS, RTADDR, CCMD,
//!   IOTLB/IVA at `IRO`, the invalidation queue, the fault registers and
//!   [`NUM_FAULT_RECORDS`] fault-recording registers at `FRO`), and the fault logic:
//!   the FRCD ring with F bits, FSTS PPF/PFO/FRI/IQE, FECTL IM/IP and the fault-event MSI.
//! - [`DmaHandle`] is what a device model holds: reads and writes by one requester ID go
//!   through the unit when translation is on (TE) and straight to guest memory
//!   otherwise. A faulting request moves no byte, records one fault and returns
//!   [`DmaError::Fault`].
//!
//! Concurrency: the register file sits behind a mutex that only MMIO, invalidations and
//! fault recording take. Translation uses per-handle caches (context + IOTLB) validated
//! against one atomic invalidation generation, so an IOTLB hit takes no shared lock.
//! Every invalidation (CCMD, IOTLB register, a queued context/IOTLB descriptor) bumps
//! the generation; a cache that sees it move replays the invalidations it missed (see
//! [`cache`]): in the default [`CachingMode::Simple`] each one, and SRTP and a TE
//! change, empties every cache; in [`CachingMode::Exact`] each drops exactly what it
//! covers and stale uses are detected. Not-present results are never cached (CAP.CM =
//! 0). The interrupt entry cache is always exact (IEC global or index-selective).
//!
//! Reference: ../shared/docs/vtd-reference.md (register layout §2, walk §4, faults §5).

pub mod cache;
mod dma;
mod io_memory;
pub mod ir;
mod walk;

pub use cache::{CachingMode, Invalidation, StaleKind, StaleRecord, StaleUse};
pub use dma::{DmaError, DmaHandle};
pub use io_memory::{DeviceIommu, DeviceMemory, MAX_MAPPINGS};
pub use walk::{Context, FaultReason, Mapping};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::DeviceMmio;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::interrupt::{InterruptController, MsiMessage, MsiSource};
use crate::sync::lock;
use crate::GuestAnomalies;

/// Host address width the DMAR table announces.
pub const HAW_BITS: u8 = walk::HAW as u8;
/// Base of the register page (as on QEMU's Q35).
pub const VTD_BASE: u64 = 0xfed9_0000;
/// Size of the register page.
pub const VTD_SIZE: u64 = 0x1000;
/// Fault-recording registers (QEMU has 1).
pub const NUM_FAULT_RECORDS: usize = 16;
/// Recorded faults kept for introspection (`faultvisor iommu`).
const HISTORY: usize = 64;
/// IOTLB registers at `IRO * 16`.
const IRO: u64 = 0x10;
/// Fault-recording registers at `FRO * 16`.
const FRO: u64 = 0x20;

/// A context-cache invalidation of granularity `g` (1 global, 2 domain, 3 device).
fn context_invalidation(g: u64, did: u16, sid: u16, fm: u8) -> Invalidation {
    match g {
        2 => Invalidation::ContextDomain(did),
        3 => Invalidation::ContextDevice { sid, fm },
        _ => Invalidation::ContextGlobal,
    }
}

/// Register offsets.
pub mod reg {
    /// Version.
    pub const VER: u64 = 0x000;
    /// Capabilities.
    pub const CAP: u64 = 0x008;
    /// Extended capabilities.
    pub const ECAP: u64 = 0x010;
    /// Global command.
    pub const GCMD: u64 = 0x018;
    /// Global status.
    pub const GSTS: u64 = 0x01c;
    /// Root table address.
    pub const RTADDR: u64 = 0x020;
    /// Context command.
    pub const CCMD: u64 = 0x028;
    /// Fault status.
    pub const FSTS: u64 = 0x034;
    /// Fault event control.
    pub const FECTL: u64 = 0x038;
    /// Fault event data.
    pub const FEDATA: u64 = 0x03c;
    /// Fault event address.
    pub const FEADDR: u64 = 0x040;
    /// Fault event upper address.
    pub const FEUADDR: u64 = 0x044;
    /// Invalidation queue head.
    pub const IQH: u64 = 0x080;
    /// Invalidation queue tail.
    pub const IQT: u64 = 0x088;
    /// Invalidation queue address.
    pub const IQA: u64 = 0x090;
    /// Invalidation completion status.
    pub const ICS: u64 = 0x09c;
    /// Invalidation event control.
    pub const IECTL: u64 = 0x0a0;
    /// Invalidation event data.
    pub const IEDATA: u64 = 0x0a4;
    /// Invalidation event address.
    pub const IEADDR: u64 = 0x0a8;
    /// Invalidation event upper address.
    pub const IEUADDR: u64 = 0x0ac;
    /// Invalidation queue error record.
    pub const IQERCD: u64 = 0x0b0;
    /// Interrupt remapping table address.
    pub const IRTA: u64 = 0x0b8;
    /// Invalidate address (page-selective IOTLB invalidation).
    pub const IVA: u64 = super::IRO * 16;
    /// IOTLB invalidate.
    pub const IOTLB: u64 = super::IRO * 16 + 8;
    /// First fault-recording register.
    pub const FRCD: u64 = super::FRO * 16;
}

/// GCMD/GSTS bits.
pub mod gcmd {
    /// Translation enable.
    pub const TE: u32 = 1 << 31;
    /// Set root table pointer.
    pub const SRTP: u32 = 1 << 30;
    /// Write buffer flush.
    pub const WBF: u32 = 1 << 27;
    /// Queued invalidation enable.
    pub const QIE: u32 = 1 << 26;
    /// Interrupt remapping enable.
    pub const IRE: u32 = 1 << 25;
    /// Set interrupt remapping table pointer.
    pub const SIRTP: u32 = 1 << 24;
    /// Compatibility format interrupts (let through when set).
    pub const CFI: u32 = 1 << 23;
}

/// FSTS bits.
pub mod fsts {
    /// Primary fault overflow (W1C).
    pub const PFO: u32 = 1 << 0;
    /// Primary pending fault (read-only: OR of the F bits).
    pub const PPF: u32 = 1 << 1;
    /// Invalidation queue error (W1C).
    pub const IQE: u32 = 1 << 4;
}

/// FECTL bits.
const FECTL_IM: u32 = 1 << 31;
const FECTL_IP: u32 = 1 << 30;

/// Capability register value: ND 6, SAGAW 39/48-bit, MGAW 47, FRO, 2 MiB and 1 GiB
/// superpages, page-selective invalidation, NFR, MAMV 18. No caching mode, no RWBF,
/// no protected memory ranges.
pub const CAP: u64 = 6
    | (walk::SAGAW << 8)
    | (((walk::MGAW_BITS - 1) as u64) << 16)
    | (FRO << 24)
    | (0x3 << 34)
    | (1 << 39)
    | (((NUM_FAULT_RECORDS - 1) as u64) << 40)
    | (18 << 48);
/// Extended capability register value: page-walk coherency, queued invalidation,
/// interrupt remapping with x2APIC destinations (IR, EIM), IRO, MHMV 15 (handle masks
/// up to 2^15 for multi-message MSI). No posted interrupts.
pub const ECAP: u64 = 1 | (1 << 1) | (1 << 3) | (1 << 4) | (IRO << 8) | (0xf << 20);
/// ECAP.EIM: extended interrupt mode.
const ECAP_EIM: u64 = 1 << 4;
/// ECAP without interrupt remapping (`--iommu intel,intremap=off`).
pub const ECAP_NO_IR: u64 = 1 | (1 << 1) | (IRO << 8);

/// The source ID of IOAPIC interrupt messages: the DMAR table's IOAPIC device scope
/// (bus 0xFF, device 0, function 0).
pub const IOAPIC_SID: u16 = 0xff00;

/// How strictly the source ID of IOAPIC messages is verified against their IRTE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoapicSidCheck {
    /// As hardware: the IOAPIC's messages carry [`IOAPIC_SID`] and an IRTE that asks for
    /// verification must name it.
    #[default]
    Strict,
    /// As QEMU: IRTEs reached from the IOAPIC are not verified (kvm-unit-tests' IOAPIC
    /// IRTE names another device).
    Any,
}

/// Interrupt remapping as the guest set it up, and the interrupt entry cache.
#[derive(Default)]
struct IrState {
    /// IRTA as the guest last wrote it.
    irta: u64,
    /// The table latched by SIRTP.
    table: ir::Table,
    /// Cached entries by index (refreshed by IEC invalidation only).
    cache: std::collections::HashMap<u32, ir::Irte>,
}

#[derive(Default)]
struct IrCounters {
    remapped: AtomicU64,
    blocked: AtomicU64,
    passed: AtomicU64,
}

/// Injected context faults armed per requester, at most.
pub const MAX_CONTEXT_FAULTS: u32 = 1_000_000;

/// An injection would arm more than [`MAX_CONTEXT_FAULTS`] faults for one requester.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{armed} faults are armed for this device already; at most {MAX_CONTEXT_FAULTS} at once")]
pub struct ArmedTooMany {
    /// Already armed.
    pub armed: u32,
}

/// The interrupt address range: device writes there are interrupt requests, never
/// translated (VT-d §3.14).
pub const INTERRUPT_RANGE: std::ops::Range<u64> = 0xfee0_0000..0xfef0_0000;

/// RTADDR bits 11:10, the translation table mode: only legacy (00) is offered (ECAP
/// has neither SMTS nor ADMS).
pub const RTADDR_TTM: u64 = 3 << 10;

/// One fault as the FRCD ring holds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultRecord {
    /// Faulting page address.
    pub page: u64,
    /// Requester ID.
    pub sid: u16,
    /// Reason code.
    pub reason: u8,
    /// A read (DMA Read) rather than a write.
    pub read: bool,
    /// The F bit.
    pub pending: bool,
}

impl FaultRecord {
    fn lo(&self) -> u64 {
        self.page & !0xfff
    }

    fn hi(&self) -> u64 {
        u64::from(self.sid)
            | (u64::from(self.reason) << 32)
            | (u64::from(self.read) << 62)
            | (u64::from(self.pending) << 63)
    }
}

/// The unit's state as `faultvisor iommu` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VtdState {
    /// Global status (TES, RTPS, QIES ...).
    pub gsts: u32,
    /// Root table in use.
    pub root: u64,
    /// Fault status (PPF derived).
    pub fsts: u32,
    /// Fault event control.
    pub fectl: u32,
    /// The fault-event message.
    pub fe_msi: MsiMessage,
    /// Invalidation queue address register.
    pub iqa: u64,
    /// Invalidation queue head.
    pub iqh: u64,
    /// Invalidation queue tail.
    pub iqt: u64,
}

/// Counters of what the unit did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VtdStats {
    /// Faults recorded in an FRCD.
    pub faults_recorded: u64,
    /// Faults dropped because every record was pending (PFO) or PFO was already set.
    pub faults_overflowed: u64,
    /// Faults suppressed by FPD.
    pub faults_suppressed: u64,
    /// Fault-event MSIs sent.
    pub fault_events: u64,
    /// Invalidation completion events sent (wait descriptors with IF).
    pub completion_events: u64,
    /// Queued-invalidation descriptors processed.
    pub qi_descriptors: u64,
    /// Invalidations (register or queued) the guest issued.
    pub invalidations: u64,
    /// Translations that walked the page tables (IOTLB misses).
    pub walks: u64,
    /// DMA requests by devices while translation was on.
    pub dma_requests: u64,
    /// Faults recorded, by reason code (index = reason: 0x1..0xC DMA remapping,
    /// 0x20..0x26 interrupt remapping).
    pub faults_by_reason: [u64; 64],
    /// Interrupt messages remapped through an IRTE.
    pub ir_remapped: u64,
    /// Interrupt messages blocked by a failed lookup (each an attempt to record a fault).
    pub ir_blocked: u64,
    /// Compatibility-format messages let through (IRE off, or CFI set).
    pub ir_passed: u64,
}

impl Default for VtdStats {
    fn default() -> Self {
        Self {
            faults_recorded: 0,
            faults_overflowed: 0,
            faults_suppressed: 0,
            fault_events: 0,
            completion_events: 0,
            qi_descriptors: 0,
            invalidations: 0,
            walks: 0,
            dma_requests: 0,
            faults_by_reason: [0; 64],
            ir_remapped: 0,
            ir_blocked: 0,
            ir_passed: 0,
        }
    }
}

impl std::fmt::Display for VtdStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} DMA requests, {} page walks, {} faults recorded, {} dropped (overflow), {} suppressed (FPD), {} fault events, {} invalidations, {} queued descriptors",
            self.dma_requests,
            self.walks,
            self.faults_recorded,
            self.faults_overflowed,
            self.faults_suppressed,
            self.fault_events,
            self.invalidations,
            self.qi_descriptors
        )
    }
}

struct Regs {
    gsts: u32,
    rtaddr: u64,
    ccmd: u64,
    fsts: u32,
    fectl: u32,
    fedata: u32,
    feaddr: u32,
    feuaddr: u32,
    iqh: u64,
    iqt: u64,
    iqa: u64,
    ics: u32,
    iectl: u32,
    iedata: u32,
    ieaddr: u32,
    ieuaddr: u32,
    iqercd: u64,
    iva: u64,
    iotlb: u64,
    frcd: [FaultRecord; NUM_FAULT_RECORDS],
    next_frcd: usize,
    stats: VtdStats,
    /// The last recorded faults, with microseconds since the unit was created.
    history: std::collections::VecDeque<(u64, FaultRecord)>,
    event_gsi: Option<u32>,
    event_route: Option<MsiMessage>,
}

/// The remapping unit.
pub struct Vtd {
    regs: Mutex<Regs>,
    mem: GuestMemoryMmap,
    irq: Arc<dyn InterruptController>,
    /// GSTS.TES, readable without the register lock.
    te: AtomicBool,
    /// The root table latched by SRTP.
    root: AtomicU64,
    /// The newest invalidation's number in `inval`; caches at an older one replay.
    generation: AtomicU64,
    /// Recent invalidations, for caches to replay.
    inval: Mutex<cache::InvalLog>,
    caching: CachingMode,
    /// Uses of stale cached entries (exact mode).
    stale: cache::StaleLog,
    /// Page walks done (IOTLB misses), for the statistics.
    walks: AtomicU64,
    /// Where DMA requests and faults are traced (`--trace-file`), if anywhere.
    timeline: std::sync::OnceLock<Arc<crate::timeline::Timeline>>,
    created: std::time::Instant,
    /// Injected faults: requester → requests still to fail with "invalid context".
    context_faults: Mutex<std::collections::HashMap<u16, u32>>,
    context_faults_armed: AtomicBool,
    /// One request counter per requester ID (no shared cache line on the hot path);
    /// every handle of a requester shares it, so the map never outgrows the devices.
    pub(crate) request_counters: Mutex<std::collections::BTreeMap<u16, Arc<AtomicU64>>>,
    anomalies: GuestAnomalies,
    /// Interrupt remapping: GSTS.IRES and CFIS readable without a lock.
    ire: AtomicBool,
    cfi: AtomicBool,
    ir: Mutex<IrState>,
    ir_counters: IrCounters,
    ioapic_sid: IoapicSidCheck,
    ecap: u64,
}

impl Vtd {
    /// A unit in its reset state, translating for `mem` and signalling faults through
    /// `irq`.
    pub fn new(mem: GuestMemoryMmap, irq: Arc<dyn InterruptController>) -> Self {
        Self {
            regs: Mutex::new(Regs {
                gsts: 0,
                rtaddr: 0,
                ccmd: 0,
                fsts: 0,
                fectl: FECTL_IM,
                fedata: 0,
                feaddr: 0,
                feuaddr: 0,
                iqh: 0,
                iqt: 0,
                iqa: 0,
                ics: 0,
                iectl: FECTL_IM,
                iedata: 0,
                ieaddr: 0,
                ieuaddr: 0,
                iqercd: 0,
                iva: 0,
                iotlb: 0,
                frcd: [FaultRecord::default(); NUM_FAULT_RECORDS],
                next_frcd: 0,
                stats: VtdStats::default(),
                history: std::collections::VecDeque::with_capacity(HISTORY),
                event_gsi: None,
                event_route: None,
            }),
            mem,
            irq,
            te: AtomicBool::new(false),
            root: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            inval: Mutex::new(cache::InvalLog::default()),
            caching: CachingMode::Simple,
            stale: cache::StaleLog::default(),
            walks: AtomicU64::new(0),
            timeline: std::sync::OnceLock::new(),
            created: std::time::Instant::now(),
            context_faults: Mutex::new(std::collections::HashMap::new()),
            context_faults_armed: AtomicBool::new(false),
            request_counters: Mutex::new(std::collections::BTreeMap::new()),
            anomalies: GuestAnomalies::new(),
            ire: AtomicBool::new(false),
            cfi: AtomicBool::new(false),
            ir: Mutex::new(IrState::default()),
            ir_counters: IrCounters::default(),
            ioapic_sid: IoapicSidCheck::Strict,
            ecap: ECAP,
        }
    }

    /// Offers interrupt remapping or not (before the guest runs).
    pub fn with_interrupt_remapping(mut self, on: bool) -> Self {
        self.ecap = if on { ECAP } else { ECAP_NO_IR };
        self
    }

    /// Offers extended interrupt mode (ECAP.EIM: 32-bit x2APIC destinations) or not
    /// (before the guest runs). Without it IRTA.EIME is ignored: destinations are 8-bit.
    pub fn with_eim(mut self, on: bool) -> Self {
        if !on {
            self.ecap &= !ECAP_EIM;
        }
        self
    }

    /// Whether the unit offers interrupt remapping.
    pub fn offers_interrupt_remapping(&self) -> bool {
        self.ecap & (1 << 3) != 0
    }

    /// Sets how the caches follow invalidations (before the guest runs).
    pub fn with_caching(mut self, c: CachingMode) -> Self {
        self.caching = c;
        self
    }

    /// How the caches follow invalidations.
    pub fn caching(&self) -> CachingMode {
        self.caching
    }

    #[inline]
    pub(crate) fn exact(&self) -> bool {
        self.caching == CachingMode::Exact
    }

    /// Replays the invalidations after `seen` into a cache; returns the generation the
    /// cache is at now.
    pub(crate) fn replay(&self, seen: u64, apply: impl FnMut(&Invalidation)) -> u64 {
        if seen == self.generation() {
            return seen;
        }
        lock(&self.inval).replay(seen, apply)
    }

    /// Caches that fell too far behind the invalidation log and dropped everything.
    pub fn invalidation_overruns(&self) -> u64 {
        lock(&self.inval).overruns
    }

    /// Counts and reports a use of a stale cached entry (log line on its first use,
    /// timeline event on each).
    pub(crate) fn report_stale(&self, u: StaleUse) {
        let now = self.created.elapsed().as_micros() as u64;
        if self.stale.record(u, now) {
            log::warn!("vtd: {}", u.describe());
        }
        self.trace(|| crate::timeline::EventKind::StaleUse {
            cache: u.kind.name(),
            sid: u.sid,
            at: u.at,
            missing: u.missing(),
        });
    }

    /// Stale uses counted per cache (context, IOTLB, IRTE) and the distinct stale
    /// entries used lately, oldest first.
    pub fn stale_uses(&self) -> ([u64; 3], Vec<StaleRecord>) {
        (self.stale.counts(), self.stale.history())
    }

    /// Exact mode: checks a use of IRTE `index` by an interrupt from `sid` against the
    /// table in guest memory (the interrupt went out with the cached entry).
    pub fn irte_use(&self, sid: u16, index: u32) {
        if !self.exact() || !self.remapping() {
            return;
        }
        let st = lock(&self.ir);
        let Some(cached) = st.cache.get(&index).copied() else {
            return;
        };
        let mem = self.read_irte(&st.table, index);
        drop(st);
        if mem != Some(cached) {
            self.report_stale(StaleUse {
                kind: StaleKind::Irte,
                sid,
                did: 0,
                at: u64::from(index),
            });
        }
    }

    /// Sets how IOAPIC messages' source IDs are verified (before the guest runs).
    pub fn with_ioapic_sid_check(mut self, c: IoapicSidCheck) -> Self {
        self.ioapic_sid = c;
        self
    }

    /// Whether interrupt remapping is on (GSTS.IRES).
    pub fn remapping(&self) -> bool {
        self.ire.load(Ordering::Acquire)
    }

    /// The interrupt remapping table latched by SIRTP.
    pub fn ir_table(&self) -> ir::Table {
        lock(&self.ir).table
    }

    /// Entry `index` of the table as guest memory holds it now, and as the interrupt
    /// entry cache holds it (None when not cached).
    pub fn irte(&self, index: u32) -> (Option<ir::Irte>, Option<ir::Irte>) {
        let st = lock(&self.ir);
        let mem = self.read_irte(&st.table, index);
        (mem, st.cache.get(&index).copied())
    }

    fn read_irte(&self, t: &ir::Table, index: u32) -> Option<ir::Irte> {
        let at = t.entry_address(index);
        Some(ir::Irte {
            lo: self.mem.read_obj::<u64>(GuestAddress(at)).ok()?,
            hi: self.mem.read_obj::<u64>(GuestAddress(at + 8)).ok()?,
        })
    }

    /// Looks up an interrupt message from `source` (no fault is recorded here; a
    /// blocked message's fault is recorded when it is raised, by
    /// [`Vtd::record_ir_fault`]). The unit's own messages (`Platform`) pass untouched.
    pub fn remap(&self, source: MsiSource, msg: MsiMessage) -> Result<MsiMessage, ir::IrFault> {
        let sid = match source {
            MsiSource::Pci { bdf, .. } => bdf,
            MsiSource::Ioapic { .. } => IOAPIC_SID,
            MsiSource::Platform => return Ok(msg),
        };
        if !self.remapping() {
            return Ok(msg);
        }
        let fault = |index: u32, reason| ir::IrFault {
            sid,
            index: index as u16,
            reason,
            fpd: false,
        };
        let index = match ir::decode(&msg) {
            ir::Request::Compat => {
                if self.cfi.load(Ordering::Acquire) {
                    self.ir_counters.passed.fetch_add(1, Ordering::Relaxed);
                    return Ok(msg);
                }
                return Err(fault(0, ir::IrFaultReason::CompatBlocked));
            }
            ir::Request::Reserved { index } => {
                return Err(fault(index, ir::IrFaultReason::RequestReserved))
            }
            ir::Request::Remappable { index } => index,
        };
        let mut st = lock(&self.ir);
        if index >= st.table.entries {
            return Err(fault(index, ir::IrFaultReason::IndexTooLarge));
        }
        let e = match st.cache.get(&index) {
            Some(e) => *e,
            None => {
                let Some(e) = self.read_irte(&st.table, index) else {
                    return Err(fault(index, ir::IrFaultReason::TableAccess));
                };
                st.cache.insert(index, e);
                e
            }
        };
        let eime = st.table.eime;
        drop(st);
        let check_sid = match (source, self.ioapic_sid) {
            (MsiSource::Ioapic { .. }, IoapicSidCheck::Any) => ir::Irte {
                hi: e.hi & !(3 << 18),
                ..e
            },
            _ => e,
        };
        let r = check_sid.check(sid, index as u16, eime);
        if r.is_ok() {
            self.ir_counters.remapped.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Empties the interrupt entry cache (all of it, or `count` entries from `first`)
    /// and has the interrupt controller look its routes up again.
    fn invalidate_iec(&self, range: Option<(u32, u32)>) {
        {
            let mut st = lock(&self.ir);
            match range {
                None => st.cache.clear(),
                Some((first, count)) => {
                    let end = first.saturating_add(count);
                    st.cache.retain(|i, _| !(first..end).contains(i));
                }
            }
        }
        self.irq.remap_changed();
    }

    /// A DMA handle for requester `sid` (bus << 8 | devfn).
    pub fn handle(self: &Arc<Self>, sid: u16) -> DmaHandle {
        DmaHandle::translated(self.clone(), sid)
    }

    /// Whether translation is enabled (GSTS.TES).
    #[inline]
    pub fn translating(&self) -> bool {
        self.te.load(Ordering::Acquire)
    }

    /// Counters.
    pub fn stats(&self) -> VtdStats {
        let mut s = lock(&self.regs).stats;
        s.walks = self.walks.load(Ordering::Relaxed);
        s.ir_remapped = self.ir_counters.remapped.load(Ordering::Relaxed);
        s.ir_blocked = self.ir_counters.blocked.load(Ordering::Relaxed);
        s.ir_passed = self.ir_counters.passed.load(Ordering::Relaxed);
        s.dma_requests = lock(&self.request_counters)
            .values()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        s
    }

    /// The request counter of requester `sid`, summed into the statistics.
    pub(crate) fn request_counter(&self, sid: u16) -> Arc<AtomicU64> {
        lock(&self.request_counters)
            .entry(sid)
            .or_insert_with(|| Arc::new(AtomicU64::new(0)))
            .clone()
    }

    /// Traces DMA requests, faults and fault events into `t` from now on.
    pub fn attach_timeline(&self, t: Arc<crate::timeline::Timeline>) {
        let _ = self.timeline.set(t);
    }

    pub(crate) fn trace(&self, kind: impl FnOnce() -> crate::timeline::EventKind) {
        if let Some(t) = self.timeline.get() {
            t.record(kind);
        }
    }

    /// Fault injection: the next `count` translated requests of `sid` fail as if its
    /// context entry were invalid (reason 0x3), each recorded as a fault. At most
    /// [`MAX_CONTEXT_FAULTS`] are armed per requester.
    pub fn inject_context_invalid(&self, sid: u16, count: u32) -> Result<(), ArmedTooMany> {
        if count == 0 {
            return Ok(());
        }
        let mut m = lock(&self.context_faults);
        let armed = m.get(&sid).copied().unwrap_or(0);
        let total = armed
            .checked_add(count)
            .filter(|t| *t <= MAX_CONTEXT_FAULTS)
            .ok_or_else(|| {
                crate::limits::hit(crate::limits::Cap::ContextFaults);
                ArmedTooMany { armed }
            })?;
        m.insert(sid, total);
        self.context_faults_armed.store(true, Ordering::Release);
        Ok(())
    }

    /// Consumes one injected context fault of `sid`, if any (one atomic load when none
    /// is armed).
    /// Whether any injected context fault waits to be taken.
    #[inline]
    pub(crate) fn context_faults_armed(&self) -> bool {
        self.context_faults_armed.load(Ordering::Acquire)
    }

    pub(crate) fn take_context_fault(&self, sid: u16, iova: u64, write: bool) -> bool {
        if !self.context_faults_armed.load(Ordering::Acquire) {
            return false;
        }
        let mut m = lock(&self.context_faults);
        let Some(n) = m.get_mut(&sid) else {
            return false;
        };
        let left = n.saturating_sub(1);
        let had = *n > 0;
        *n = left;
        if left == 0 {
            m.remove(&sid);
        }
        if !had {
            return false;
        }
        if m.is_empty() {
            self.context_faults_armed.store(false, Ordering::Release);
        }
        drop(m);
        self.record_fault(sid, iova, !write, FaultReason::ContextInvalid, false);
        true
    }

    /// Fault injection: `count` device writes by `sid` beyond the address width (reason
    /// 0x4), so that they fault whatever the guest mapped. Returns how many were
    /// recorded and how many overflowed. Needs translation on.
    pub fn fault_storm(&self, sid: u16, count: u32) -> (u64, u64) {
        let before = self.stats();
        for i in 0..u64::from(count) {
            let iova = (1u64 << walk::MGAW_BITS) + i * 0x1000;
            let _ = self.resolve(sid, iova, false, true);
        }
        let after = self.stats();
        (
            after.faults_recorded - before.faults_recorded,
            after.faults_overflowed - before.faults_overflowed,
        )
    }

    pub(crate) fn count_walk(&self) {
        self.walks.fetch_add(1, Ordering::Relaxed);
    }

    /// The fault-recording registers, index order.
    pub fn fault_records(&self) -> [FaultRecord; NUM_FAULT_RECORDS] {
        lock(&self.regs).frcd
    }

    /// The last recorded faults (oldest first), each with microseconds since the unit
    /// was created.
    pub fn fault_history(&self) -> Vec<(u64, FaultRecord)> {
        lock(&self.regs).history.iter().copied().collect()
    }

    /// Register state for introspection: (GSTS, RTADDR latched by SRTP, FSTS, FECTL,
    /// IQA, IQH, IQT).
    pub fn state(&self) -> VtdState {
        let r = lock(&self.regs);
        VtdState {
            gsts: r.gsts,
            root: self.root(),
            fsts: self.fsts_value(&r),
            fectl: r.fectl,
            fe_msi: MsiMessage {
                address: u64::from(r.feaddr) | (u64::from(r.feuaddr) << 32),
                data: r.fedata,
            },
            iqa: r.iqa,
            iqh: r.iqh,
            iqt: r.iqt,
        }
    }

    /// Guest accesses refused so far.
    pub fn anomalies(&self) -> u64 {
        self.anomalies.count()
    }

    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn root(&self) -> u64 {
        self.root.load(Ordering::Acquire)
    }

    pub(crate) fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub(crate) fn interrupts(&self) -> &Arc<dyn InterruptController> {
        &self.irq
    }

    /// What the tables in guest memory say now for `sid` at `iova` (no cache, no fault
    /// recorded): the stale-use detector's reference.
    pub(crate) fn peek(&self, sid: u16, iova: u64, write: bool) -> Option<(Context, Mapping)> {
        let ctx = walk::context_entry(&self.mem, self.root(), sid).ok()?;
        let m = walk::walk(&self.mem, &ctx, iova, write).ok()?;
        Some((ctx, m))
    }

    /// Walks the tables for `sid` at `iova` without any cache; records the fault (once)
    /// when the access is refused. `write` asks for W, `read` for R (both for RW).
    /// Returns the mapping and the domain it belongs to.
    pub(crate) fn resolve(
        &self,
        sid: u16,
        iova: u64,
        read: bool,
        write: bool,
    ) -> Result<(Mapping, u16), FaultReason> {
        if self.take_context_fault(sid, iova, write) {
            return Err(FaultReason::ContextInvalid);
        }
        self.count_walk();
        let ctx = walk::context_entry(&self.mem, self.root(), sid).inspect_err(|&r| {
            self.record_fault(sid, iova, !write, r, false);
        })?;
        let m = walk::walk(&self.mem, &ctx, iova, write).inspect_err(|&r| {
            self.record_fault(sid, iova, !write, r, ctx.fpd);
        })?;
        if read && !m.read {
            self.record_fault(sid, iova, true, FaultReason::ReadDenied, ctx.fpd);
            return Err(FaultReason::ReadDenied);
        }
        Ok((m, ctx.did))
    }

    /// [`Vtd::resolve`] for each page of `[iova, end)` in order, handing each mapping
    /// (and its domain) to `f`: the context entry is read once, each leaf table is
    /// reached by one walk from the top, and every further page of it costs one entry
    /// read. The first page refused records its fault (as `resolve` would) and ends
    /// the walk with its address and reason.
    pub(crate) fn resolve_range(
        &self,
        sid: u16,
        iova: u64,
        end: u64,
        read: bool,
        write: bool,
        mut f: impl FnMut(Mapping, u16),
    ) -> Result<(), (u64, FaultReason)> {
        if self.take_context_fault(sid, iova, write) {
            return Err((iova, FaultReason::ContextInvalid));
        }
        let ctx = walk::context_entry(&self.mem, self.root(), sid).map_err(|r| {
            self.record_fault(sid, iova, !write, r, false);
            (iova, r)
        })?;
        let mut leaf: Option<(u64, walk::LeafTable)> = None;
        let mut at = iova;
        while at < end {
            self.count_walk();
            let walked = match leaf {
                Some((base, t)) if at & !(t.region(at).1 - 1) == base => {
                    walk::walk_from(&self.mem, &ctx, t, at, write)
                }
                _ => walk::walk_leaf(&self.mem, &ctx, at, write),
            };
            let (m, t) = walked.map_err(|r| {
                self.record_fault(sid, at, !write, r, ctx.fpd);
                (at, r)
            })?;
            if read && !m.read {
                self.record_fault(sid, at, true, FaultReason::ReadDenied, ctx.fpd);
                return Err((at, FaultReason::ReadDenied));
            }
            leaf = Some((t.region(at).0, t));
            let size = 1u64 << m.page_shift;
            f(m, ctx.did);
            at = (at & !(size - 1)).saturating_add(size);
        }
        Ok(())
    }

    /// A guest invalidation: logged as it is in exact mode, as "everything" in simple
    /// mode.
    fn invalidate(&self, r: &mut Regs, inv: Invalidation) {
        r.stats.invalidations += 1;
        self.drop_cached(if self.exact() {
            inv
        } else {
            Invalidation::Everything
        });
    }

    fn drop_cached(&self, inv: Invalidation) {
        let mut log = lock(&self.inval);
        let g = log.push(inv);
        self.generation.store(g, Ordering::Release);
    }

    /// SRTP or a TE change: simple mode empties the caches; exact mode keeps them (the
    /// specification has software invalidate afterwards).
    fn table_switch(&self) {
        if !self.exact() {
            self.drop_cached(Invalidation::Everything);
        }
    }

    /// Records a fault for `sid` at `iova` (unless FPD suppresses it) and raises the
    /// fault event when the rules of VT-d §7.3 say so.
    pub(crate) fn record_fault(
        &self,
        sid: u16,
        iova: u64,
        read: bool,
        reason: FaultReason,
        fpd: bool,
    ) {
        let recorded = self.record_fault_locked(
            sid,
            iova & !0xfff,
            read,
            reason as u8,
            fpd && reason.qualified(),
        );
        self.trace(|| crate::timeline::EventKind::Fault {
            sid,
            iova,
            reason: reason as u8,
            recorded,
        });
    }

    /// Records an interrupt-remapping fault (the index in bits 63:48 of the fault
    /// information, as Linux reads it) unless the entry's FPD suppresses it.
    pub fn record_ir_fault(&self, f: ir::IrFault) {
        self.ir_counters.blocked.fetch_add(1, Ordering::Relaxed);
        let recorded = self.record_fault_locked(
            f.sid,
            u64::from(f.index) << 48,
            false,
            f.reason as u8,
            f.fpd && f.reason.qualified(),
        );
        log::debug!(
            "vtd: interrupt remapping fault {:#x} ({}) sid {:#06x} index {:#x}",
            f.reason as u8,
            f.reason.linux_text(),
            f.sid,
            f.index
        );
        self.trace(|| crate::timeline::EventKind::Fault {
            sid: f.sid,
            iova: u64::from(f.index) << 48,
            reason: f.reason as u8,
            recorded,
        });
    }

    /// Records a fault (`page` is the fault information: page address or index << 48)
    /// under the register lock; returns whether an FRCD took it.
    fn record_fault_locked(
        &self,
        sid: u16,
        page: u64,
        read: bool,
        code: u8,
        suppress: bool,
    ) -> bool {
        let mut r = lock(&self.regs);
        if suppress {
            r.stats.faults_suppressed += 1;
            return false;
        }
        let before = self.fsts_value(&r);
        if r.fsts & fsts::PFO != 0 {
            r.stats.faults_overflowed += 1;
            return false;
        }
        let i = r.next_frcd;
        if r.frcd[i].pending {
            r.fsts |= fsts::PFO;
            r.stats.faults_overflowed += 1;
            // Overflow is itself an event when nothing else is pending.
            self.fault_event(&mut r, before);
            return false;
        }
        r.frcd[i] = FaultRecord {
            page,
            sid,
            reason: code,
            read,
            pending: true,
        };
        r.next_frcd = (i + 1) % NUM_FAULT_RECORDS;
        r.stats.faults_recorded += 1;
        r.stats.faults_by_reason[usize::from(code) & 0x3f] += 1;
        if r.history.len() == HISTORY {
            r.history.pop_front();
        }
        let rec = r.frcd[i];
        r.history
            .push_back((self.created.elapsed().as_micros() as u64, rec));
        if before & fsts::PPF == 0 {
            r.fsts = (r.fsts & !(0xff << 8)) | ((i as u32) << 8);
        }
        log::debug!(
            "vtd: fault {code:#x} {} sid {sid:#06x} at {page:#x} -> FRCD {i}",
            if read { "read" } else { "write" }
        );
        self.fault_event(&mut r, before);
        true
    }

    /// FSTS as the guest reads it (PPF derived from the F bits).
    fn fsts_value(&self, r: &Regs) -> u32 {
        let ppf = r.frcd.iter().any(|f| f.pending);
        (r.fsts & !fsts::PPF) | if ppf { fsts::PPF } else { 0 }
    }

    /// Raises the fault event unless a condition was already being serviced
    /// (`before` is FSTS before the new condition).
    fn fault_event(&self, r: &mut Regs, before: u32) {
        if before & (fsts::PPF | fsts::PFO | fsts::IQE) != 0 {
            return;
        }
        r.fectl |= FECTL_IP;
        if r.fectl & FECTL_IM == 0 {
            self.send_fault_event(r);
        }
    }

    fn send_fault_event(&self, r: &mut Regs) {
        r.fectl &= !FECTL_IP;
        let msg = MsiMessage {
            address: u64::from(r.feaddr) | (u64::from(r.feuaddr) << 32),
            data: r.fedata,
        };
        let gsi = match r.event_gsi {
            Some(g) => g,
            None => match self.irq.allocate_gsi() {
                Ok(g) => {
                    r.event_gsi = Some(g);
                    g
                }
                Err(e) => {
                    log::warn!("vtd: no GSI for the fault event: {e}");
                    return;
                }
            },
        };
        if r.event_route != Some(msg) {
            if let Err(e) = self.irq.set_msi_route(gsi, MsiSource::Platform, Some(msg)) {
                log::warn!("vtd: fault event route: {e}");
                return;
            }
            r.event_route = Some(msg);
        }
        match self.irq.trigger(gsi) {
            Ok(()) => {
                r.stats.fault_events += 1;
                self.trace(|| crate::timeline::EventKind::FaultEvent {
                    vector: msg.vector(),
                });
            }
            Err(e) => log::warn!("vtd: fault event: {e}"),
        }
    }

    /// Sends the invalidation completion event from IEDATA/IEADDR/IEUADDR.
    fn send_completion_event(&self, r: &mut Regs) {
        r.iectl &= !FECTL_IP;
        let msg = MsiMessage {
            address: u64::from(r.ieaddr) | (u64::from(r.ieuaddr) << 32),
            data: r.iedata,
        };
        match self.irq.signal_msi(MsiSource::Platform, msg) {
            Ok(()) => r.stats.completion_events += 1,
            Err(e) => log::warn!("vtd: invalidation completion event: {e}"),
        }
    }

    fn iq_error(&self, r: &mut Regs, code: u64) {
        let before = self.fsts_value(r);
        r.fsts |= fsts::IQE;
        r.iqercd = (r.iqercd & !0xf) | (code & 0xf);
        self.fault_event(r, before);
    }

    /// Processes the invalidation queue from IQH to IQT, synchronously.
    fn process_queue(&self, r: &mut Regs) {
        if r.gsts & gcmd::QIE == 0 || r.fsts & fsts::IQE != 0 {
            return;
        }
        let base = r.iqa & !0xfff & ((1 << walk::HAW) - 1);
        if r.iqa & (1 << 11) != 0 {
            // 256-bit descriptors exist only in scalable mode (ECAP.SMTS = 0).
            self.iq_error(r, 5);
            return;
        }
        let entries = 256u64 << (r.iqa & 7);
        let tail = (r.iqt >> 4) & 0x7fff;
        if tail >= entries {
            self.iq_error(r, 1);
            return;
        }
        let mut head = (r.iqh >> 4) & 0x7fff;
        if head >= entries {
            head = 0;
        }
        // At most one lap: head reaches tail within `entries` steps.
        for _ in 0..entries {
            if head == tail {
                break;
            }
            let at = base + head * 16;
            let (lo, hi) = match (
                self.mem.read_obj::<u64>(GuestAddress(at)),
                self.mem.read_obj::<u64>(GuestAddress(at + 8)),
            ) {
                (Ok(l), Ok(h)) => (l, h),
                _ => {
                    r.iqh = head << 4;
                    self.iq_error(r, 2);
                    return;
                }
            };
            if !self.descriptor(r, lo, hi) {
                r.iqh = head << 4;
                return;
            }
            r.stats.qi_descriptors += 1;
            head = (head + 1) % entries;
        }
        r.iqh = head << 4;
    }

    /// Executes one 128-bit descriptor; false (with IQE set) if it is invalid.
    fn descriptor(&self, r: &mut Regs, lo: u64, hi: u64) -> bool {
        let bad = |s: &Self, r: &mut Regs, code| {
            s.iq_error(r, code);
            false
        };
        match lo & 0xf {
            // Context-cache invalidate: G 5:4, DID 31:16, SID 47:32, FM 49:48.
            1 => {
                if hi != 0 || lo & 0xfffc_0000_0000_ffc0 != 0 || (lo >> 4) & 3 == 0 {
                    return bad(self, r, 4);
                }
                let inv = context_invalidation(
                    (lo >> 4) & 3,
                    (lo >> 16) as u16,
                    (lo >> 32) as u16,
                    ((lo >> 48) & 3) as u8,
                );
                self.invalidate(r, inv);
            }
            // IOTLB invalidate: G 5:4, DID 31:16; ADDR 63:12, IH 6, AM 5:0.
            2 => {
                if lo & 0xffff_ffff_0000_ff00 != 0 || (lo >> 4) & 3 == 0 || hi & 0xf80 != 0 {
                    return bad(self, r, 4);
                }
                let inv = self.iotlb_invalidation((lo >> 4) & 3, (lo >> 16) as u16, hi);
                self.invalidate(r, inv);
            }
            // Device-TLB invalidation: no device TLBs (ECAP.DT = 0); accepted.
            3 => {}
            // Interrupt entry cache: global (G = 0) or index-selective, 2^IM entries
            // from IIDX. Reserved: bits 26:5, 63:48 and the whole upper half.
            4 => {
                if hi != 0 || lo & 0xffff_0000_07ff_ffe0 != 0 {
                    return bad(self, r, 4);
                }
                if lo & (1 << 4) == 0 {
                    self.invalidate_iec(None);
                } else {
                    let first = ((lo >> 32) & 0xffff) as u32;
                    let mask = ((lo >> 27) & 0x1f) as u32;
                    self.invalidate_iec(Some((
                        first & !((1u32 << mask.min(16)) - 1),
                        1 << mask.min(16),
                    )));
                }
                r.stats.invalidations += 1;
            }
            // Invalidation wait.
            5 => {
                if lo & (1 << 5) != 0 {
                    let addr = hi & !3;
                    let data = (lo >> 32) as u32;
                    if self.mem.write_obj(data, GuestAddress(addr)).is_err() {
                        return bad(self, r, 2);
                    }
                }
                if lo & (1 << 4) != 0 {
                    // IF: the invalidation completion event (never remapped).
                    r.ics |= 1;
                    r.iectl |= FECTL_IP;
                    if r.iectl & FECTL_IM == 0 {
                        self.send_completion_event(r);
                    }
                }
            }
            _ => return bad(self, r, 3),
        }
        true
    }

    /// A register-based invalidation (CCMD or IOTLB): when bit 63 asks for one, empties
    /// the caches and returns the register with bit 63 clear and the actual granularity
    /// (what was asked; global when 0) reported at `actual_shift`.
    fn complete_invalidation(
        &self,
        r: &mut Regs,
        v: u64,
        req_shift: u32,
        actual_shift: u32,
    ) -> Option<u64> {
        if v & (1 << 63) == 0 {
            return None;
        }
        let granularity = ((v >> req_shift) & 3).max(1);
        let inv = if req_shift == 61 {
            // CCMD: FM 33:32, SID 31:16, DID 15:0.
            context_invalidation(
                granularity,
                v as u16,
                (v >> 16) as u16,
                ((v >> 32) & 3) as u8,
            )
        } else {
            // IOTLB: DID 47:32; the address and mask are in IVA.
            self.iotlb_invalidation(granularity, (v >> 32) as u16, r.iva)
        };
        self.invalidate(r, inv);
        Some((v & !(1 << 63) & !(3 << actual_shift)) | (granularity << actual_shift))
    }

    /// An IOTLB invalidation of granularity `g` (1 global, 2 domain, 3 page-selective
    /// with `addr` = ADDR 63:12 | IH 6 | AM 5:0). A mask beyond CAP.MAMV is undefined
    /// by the specification: it is recorded as a guest anomaly and widened to the
    /// domain.
    fn iotlb_invalidation(&self, g: u64, did: u16, addr: u64) -> Invalidation {
        match g {
            2 => Invalidation::IotlbDomain(did),
            3 => {
                let am = (addr & 0x3f) as u8;
                if u64::from(am) > (CAP >> 48) & 0x3f {
                    self.anomalies.record(
                        "vtd",
                        format_args!(
                            "page-selective invalidation with AM {am} beyond MAMV 18; domain {did} invalidated"
                        ),
                    );
                    return Invalidation::IotlbDomain(did);
                }
                Invalidation::pages(did, addr & !0xfff, am)
            }
            _ => Invalidation::IotlbGlobal,
        }
    }

    fn write_gcmd(&self, r: &mut Regs, v: u32) {
        if v & gcmd::SRTP != 0 {
            // The mode bits are latched with the address: a mode the unit does not
            // offer (scalable, abort-DMA, reserved) makes every translated request fail
            // with "root table address invalid" rather than be walked as legacy.
            let ttm = r.rtaddr & RTADDR_TTM;
            if ttm != 0 {
                self.anomalies.record(
                    "vtd",
                    format_args!(
                        "root table latched in translation table mode {}, which this unit does not offer; DMA is blocked with fault 0x8",
                        ttm >> 10
                    ),
                );
            }
            self.root.store(
                (r.rtaddr & !0xfff & ((1 << walk::HAW) - 1)) | ttm,
                Ordering::Release,
            );
            r.gsts |= gcmd::SRTP;
            self.table_switch();
        }
        if (v ^ r.gsts) & gcmd::QIE != 0 {
            if v & gcmd::QIE != 0 {
                r.gsts |= gcmd::QIE;
                r.iqh = 0;
            } else {
                r.gsts &= !gcmd::QIE;
            }
        }
        if (v ^ r.gsts) & gcmd::TE != 0 {
            let on = v & gcmd::TE != 0;
            if on {
                r.gsts |= gcmd::TE;
            } else {
                r.gsts &= !gcmd::TE;
                r.next_frcd = 0;
            }
            self.te.store(on, Ordering::Release);
            self.table_switch();
            log::debug!(
                "vtd: translation {}",
                if on { "enabled" } else { "disabled" }
            );
        }
        let mut remap_changed = false;
        let v = if self.offers_interrupt_remapping() {
            v
        } else {
            v & !(gcmd::SIRTP | gcmd::IRE | gcmd::CFI)
        };
        if v & gcmd::SIRTP != 0 {
            // The table pointer (and EIME, size) is latched, and the entry cache with it.
            let mut st = lock(&self.ir);
            let irta = if self.ecap & ECAP_EIM == 0 {
                st.irta & !(1 << 11)
            } else {
                st.irta
            };
            st.table = ir::Table::from_irta(irta);
            st.cache.clear();
            r.gsts |= gcmd::SIRTP;
            remap_changed = true;
        }
        for (bit, flag) in [(gcmd::IRE, &self.ire), (gcmd::CFI, &self.cfi)] {
            if (v ^ r.gsts) & bit != 0 {
                let on = v & bit != 0;
                if on {
                    r.gsts |= bit;
                } else {
                    r.gsts &= !bit;
                }
                flag.store(on, Ordering::Release);
                remap_changed = true;
                log::debug!(
                    "vtd: {} {}",
                    if bit == gcmd::IRE {
                        "interrupt remapping"
                    } else {
                        "compatibility-format interrupts"
                    },
                    if on { "enabled" } else { "disabled" }
                );
            }
        }
        if remap_changed {
            self.irq.remap_changed();
        }
        // WBF completes at once (WBFS never reads 1); SFL and EAFL belong to features
        // the capabilities do not offer.
    }

    fn read_reg(&self, r: &Regs, off: u64, len: usize) -> u64 {
        let frcd_end = reg::FRCD + 16 * NUM_FAULT_RECORDS as u64;
        if (reg::FRCD..frcd_end).contains(&off) {
            let rel = off - reg::FRCD;
            let f = &r.frcd[(rel / 16) as usize];
            let q = if rel % 16 < 8 { f.lo() } else { f.hi() };
            return q >> (8 * (rel % 8));
        }
        let v = match off & !7 {
            reg::VER => 0x10,
            reg::CAP => CAP,
            reg::ECAP => self.ecap,
            reg::RTADDR => r.rtaddr,
            reg::CCMD => r.ccmd,
            0x30 => u64::from(self.fsts_value(r)) << 32,
            reg::FECTL => u64::from(r.fectl) | (u64::from(r.fedata) << 32),
            reg::FEADDR => u64::from(r.feaddr) | (u64::from(r.feuaddr) << 32),
            reg::IQH => r.iqh,
            reg::IQT => r.iqt,
            reg::IQA => r.iqa,
            0x98 => u64::from(r.ics) << 32,
            reg::IECTL => u64::from(r.iectl) | (u64::from(r.iedata) << 32),
            reg::IEADDR => u64::from(r.ieaddr) | (u64::from(r.ieuaddr) << 32),
            reg::IQERCD => r.iqercd,
            reg::IRTA => lock(&self.ir).irta,
            reg::IVA => r.iva,
            reg::IOTLB => r.iotlb,
            _ => 0,
        };
        // GCMD (0x18) is write-only and reads 0; GSTS is its upper half.
        let v = if off & !7 == reg::GCMD {
            u64::from(r.gsts) << 32
        } else {
            v
        };
        let v = v >> (8 * (off % 8));
        if len == 8 {
            v
        } else {
            v & 0xffff_ffff
        }
    }

    fn write_reg(&self, r: &mut Regs, off: u64, len: usize, v: u64) {
        let frcd_end = reg::FRCD + 16 * NUM_FAULT_RECORDS as u64;
        if (reg::FRCD..frcd_end).contains(&off) {
            let rel = off - reg::FRCD;
            let i = (rel / 16) as usize;
            // F is bit 127: bit 31 of the dword at +12, or bit 63 of the qword at +8.
            let f_hit = match (rel % 16, len) {
                (12, 4) => v & (1 << 31) != 0,
                (8, 8) => v & (1 << 63) != 0,
                _ => false,
            };
            if f_hit && r.frcd[i].pending {
                r.frcd[i].pending = false;
                self.trace(|| crate::timeline::EventKind::FaultCleared { record: i as u8 });
            }
            return;
        }
        let lo32 = v as u32;
        // 64-bit registers accept a qword, or either dword.
        let set64 = |cur: u64, off_in: u64| -> u64 {
            match (len, off_in) {
                (8, 0) => v,
                (4, 0) => (cur & !0xffff_ffff) | (v & 0xffff_ffff),
                (4, 4) => (cur & 0xffff_ffff) | ((v & 0xffff_ffff) << 32),
                _ => cur,
            }
        };
        match off {
            reg::GCMD => self.write_gcmd(r, lo32),
            o if o & !7 == reg::RTADDR => r.rtaddr = set64(r.rtaddr, o & 7),
            o if o & !7 == reg::CCMD => {
                r.ccmd = set64(r.ccmd, o & 7);
                // ICC (63), requested granularity 62:61, actual 60:59.
                if let Some(v) = self.complete_invalidation(r, r.ccmd, 61, 59) {
                    r.ccmd = v;
                }
            }
            reg::FSTS => {
                r.fsts &= !(lo32 & (fsts::PFO | fsts::IQE | 0xe0));
                let now = self.fsts_value(r);
                if now & (fsts::PPF | fsts::PFO | fsts::IQE) == 0 {
                    r.fectl &= !FECTL_IP;
                }
            }
            reg::FECTL => {
                r.fectl = (r.fectl & FECTL_IP) | (lo32 & FECTL_IM);
                if r.fectl & FECTL_IP != 0 && r.fectl & FECTL_IM == 0 {
                    self.send_fault_event(r);
                }
            }
            reg::FEDATA => r.fedata = lo32,
            reg::FEADDR => {
                r.feaddr = lo32 & !3;
                if len == 8 {
                    r.feuaddr = (v >> 32) as u32;
                }
            }
            reg::FEUADDR => r.feuaddr = lo32,
            o if o & !7 == reg::IQT => {
                r.iqt = set64(r.iqt, o & 7) & 0x7fff0;
                self.process_queue(r);
            }
            o if o & !7 == reg::IQA => r.iqa = set64(r.iqa, o & 7) & !0x7f8,
            o if o & !7 == reg::IRTA => {
                let mut st = lock(&self.ir);
                // Bits 10:4 are reserved (read as 0).
                st.irta = set64(st.irta, o & 7) & !0x7f0;
            }
            reg::ICS => {
                // Clearing IWC also clears a completion event still pending.
                if lo32 & 1 != 0 {
                    r.ics &= !1;
                    r.iectl &= !FECTL_IP;
                }
            }
            reg::IECTL => {
                r.iectl = (r.iectl & FECTL_IP) | (lo32 & FECTL_IM);
                if r.iectl & FECTL_IP != 0 && r.iectl & FECTL_IM == 0 {
                    self.send_completion_event(r);
                }
            }
            reg::IEDATA => r.iedata = lo32,
            reg::IEADDR => r.ieaddr = lo32 & !3,
            reg::IEUADDR => r.ieuaddr = lo32,
            o if o & !7 == reg::IVA => r.iva = set64(r.iva, o & 7),
            o if o & !7 == reg::IOTLB => {
                r.iotlb = set64(r.iotlb, o & 7);
                // IVT (63), requested granularity 61:60, actual 58:57.
                if let Some(v) = self.complete_invalidation(r, r.iotlb, 60, 57) {
                    r.iotlb = v;
                }
            }
            _ => {
                self.anomalies.record(
                    "vtd",
                    format_args!("write to read-only or unknown register {off:#x}"),
                );
            }
        }
    }

    /// Guest read of `data.len()` bytes at `off` (4- and 8-byte aligned accesses).
    pub fn read(&self, off: u64, data: &mut [u8]) {
        let len = data.len();
        if !matches!(len, 4 | 8) || !off.is_multiple_of(len as u64) || off >= VTD_SIZE {
            self.anomalies
                .record("vtd", format_args!("{len}-byte read at {off:#x} refused"));
            data.fill(0xff);
            return;
        }
        let v = {
            let r = lock(&self.regs);
            self.read_reg(&r, off, len)
        };
        data.copy_from_slice(&v.to_le_bytes()[..len]);
    }

    /// Guest write at `off` (4- and 8-byte aligned accesses).
    pub fn write(&self, off: u64, data: &[u8]) {
        let len = data.len();
        if !matches!(len, 4 | 8) || !off.is_multiple_of(len as u64) || off >= VTD_SIZE {
            self.anomalies
                .record("vtd", format_args!("{len}-byte write at {off:#x} refused"));
            return;
        }
        let mut b = [0u8; 8];
        b[..len].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        let mut r = lock(&self.regs);
        self.write_reg(&mut r, off, len, v);
    }
}

/// The MMIO face of the unit, for the VMM's bus.
pub struct VtdMmio(pub Arc<Vtd>);

impl DeviceMmio for VtdMmio {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.0.read(offset, data);
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.0.write(offset, data);
    }
}

#[cfg(test)]
mod isolation;
#[cfg(test)]
mod tests;
