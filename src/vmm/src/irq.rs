//! KVM implementation of [`InterruptController`]: a GSI routing table pushed with
//! `KVM_SET_GSI_ROUTING` and one irqfd per GSI. GSIs 0..24 are the IOAPIC pins (KVM's
//! split irqchip reserves them, and scans their level-triggered routes to produce
//! `KVM_EXIT_IOAPIC_EOI`); MSI and MSI-X vectors get GSIs from 24 up.
//!
//! Every MSI message enters KVM through [`KvmIrqController::program_msi`], the single
//! place where interrupt remapping translates or blocks it: with the VT-d unit's IRE on,
//! a route holds the message its IRTE translates to (looked up when the device
//! programs it and again after every interrupt entry cache invalidation, so a KVM route
//! is a cached IRTE, stale until the guest invalidates, as on hardware), and a message
//! whose lookup fails gets no route: each time its source raises it, the fault is
//! recorded in the unit's fault-recording registers and nothing is delivered. Messages
//! without a GSI (DMA writes to the interrupt range) are looked up as they are sent.
//!
//! A route that KVM refuses (for instance address bits 39:32 set under the x2APIC API,
//! which KVM reserves) never enters the table: the table stays as it was, the GSI's
//! messages are dropped (as hardware drops an MSI that reaches no local APIC) and
//! counted, and every other route keeps working. Delayed and duplicated interrupts
//! (fault injection) wait in one timer thread's queue, never in threads of their own.

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use devices::inject::{IrqAction, IrqFaults};
use devices::interrupt::{InterruptController, InterruptError, MsiMessage, MsiSource};
use devices::iommu::ir::{IrFault, IrFaultReason};
use devices::limits::{self, Cap};
use devices::sync::{lock, read, write};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_msi, KvmIrqRouting,
    KVM_IRQ_ROUTING_MSI,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// GSIs reserved for the IOAPIC pins.
pub const IOAPIC_GSIS: u32 = devices::ioapic::NUM_PINS as u32;

struct Routes {
    table: BTreeMap<u32, kvm_irq_routing_entry>,
    next_gsi: u32,
}

/// Interrupts waiting for their time (delayed or duplicated by fault injection).
struct Later {
    queue: Mutex<BinaryHeap<std::cmp::Reverse<(Instant, u64, u32)>>>,
    wake: Condvar,
    seq: AtomicU64,
    started: AtomicBool,
}

/// GSI routing and irqfds over a KVM VM.
pub struct KvmIrqController {
    vm: Arc<crate::KvmVm>,
    max_gsi: u32,
    routes: Mutex<Routes>,
    irqfds: Arc<RwLock<HashMap<u32, EventFd>>>,
    /// Per GSI: 0 when it routes; else why its messages are dropped: [`REFUSED`], or
    /// [`IR_FAULT`] with the lookup's fault encoded (see [`encode_fault`]).
    blocked: Vec<AtomicU64>,
    /// The interrupt remapping unit, when the VM has one.
    remapper: std::sync::OnceLock<Arc<devices::iommu::Vtd>>,
    /// Messages blocked by interrupt remapping.
    ir_blocked: AtomicU64,
    /// Messages dropped because their route was refused.
    refused_drops: AtomicU64,
    later: Arc<Later>,
    /// Who owns each routed GSI and what it sends (for fault injection and accounting).
    sources: RwLock<HashMap<u32, (MsiSource, MsiMessage)>>,
    faults: Arc<IrqFaults>,
    /// Per GSI: messages raised by their source, and written to KVM.
    raised: Vec<AtomicU64>,
    delivered: Arc<Vec<AtomicU64>>,
    /// One-off messages sent with KVM_SIGNAL_MSI (spurious interrupts, storms).
    signalled: AtomicU64,
    timeline: std::sync::OnceLock<Arc<devices::timeline::Timeline>>,
}

/// Counters of one routed GSI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GsiCounters {
    /// The GSI.
    pub gsi: u32,
    /// Who raises it.
    pub source: MsiSource,
    /// The message it sends now.
    pub msg: MsiMessage,
    /// Raised by the device / IOAPIC.
    pub raised: u64,
    /// Written to KVM (raised, minus dropped, plus duplicates).
    pub delivered: u64,
    /// Where its messages go now.
    pub route: RouteState,
}

/// What KVM's route of a GSI delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteState {
    /// The message as programmed (no interrupt remapping).
    Direct,
    /// Translated through IRTE `index` (cached in the route) into `msg`.
    Remapped {
        /// The interrupt remapping table index.
        index: u32,
        /// The message KVM delivers.
        msg: MsiMessage,
    },
    /// Blocked by interrupt remapping: each message raised records this fault.
    Blocked(IrFault),
    /// KVM refused the route; messages are dropped.
    Refused,
}

impl std::fmt::Debug for KvmIrqController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmIrqController")
            .field("max_gsi", &self.max_gsi)
            .finish()
    }
}

fn hv(e: impl std::fmt::Display) -> InterruptError {
    InterruptError::Hypervisor(e.to_string())
}

impl KvmIrqController {
    /// Creates the controller and the irqfds of the IOAPIC pins. `max_routes` is KVM's
    /// `KVM_CAP_IRQ_ROUTING` value.
    pub fn new(vm: Arc<crate::KvmVm>, max_routes: u32) -> Result<Self, InterruptError> {
        let c = Self {
            vm,
            max_gsi: max_routes.saturating_sub(1).max(IOAPIC_GSIS),
            routes: Mutex::new(Routes {
                table: BTreeMap::new(),
                next_gsi: IOAPIC_GSIS,
            }),
            irqfds: Arc::new(RwLock::new(HashMap::new())),
            blocked: (0..=max_routes.max(IOAPIC_GSIS))
                .map(|_| AtomicU64::new(0))
                .collect(),
            remapper: std::sync::OnceLock::new(),
            ir_blocked: AtomicU64::new(0),
            refused_drops: AtomicU64::new(0),
            later: Arc::new(Later::new()),
            sources: RwLock::new(HashMap::new()),
            faults: Arc::new(IrqFaults::new()),
            raised: (0..=max_routes.max(IOAPIC_GSIS))
                .map(|_| AtomicU64::new(0))
                .collect(),
            delivered: Arc::new(
                (0..=max_routes.max(IOAPIC_GSIS))
                    .map(|_| AtomicU64::new(0))
                    .collect(),
            ),
            signalled: AtomicU64::new(0),
            timeline: std::sync::OnceLock::new(),
        };
        for gsi in 0..IOAPIC_GSIS {
            c.add_irqfd(gsi)?;
        }
        c.commit(&c.lock_routes())?;
        Ok(c)
    }

    /// Counters of every GSI that has a route.
    pub fn gsi_counters(&self) -> Vec<GsiCounters> {
        let routes = self.lock_routes();
        let mut v: Vec<GsiCounters> = read(&self.sources)
            .iter()
            .map(|(&gsi, &(source, msg))| GsiCounters {
                gsi,
                source,
                msg,
                route: self.route_state(&routes, gsi, &msg),
                raised: self
                    .raised
                    .get(gsi as usize)
                    .map_or(0, |c| c.load(Ordering::Relaxed)),
                delivered: self
                    .delivered
                    .get(gsi as usize)
                    .map_or(0, |c| c.load(Ordering::Relaxed)),
            })
            .collect();
        v.sort_by_key(|c| c.gsi);
        v
    }

    fn route_state(&self, r: &Routes, gsi: u32, msg: &MsiMessage) -> RouteState {
        let b = self
            .blocked
            .get(gsi as usize)
            .map_or(0, |b| b.load(Ordering::Acquire));
        if b == REFUSED {
            return RouteState::Refused;
        }
        if let Some(f) = decode_fault(b) {
            return RouteState::Blocked(f);
        }
        let remapping = self.remapper.get().is_some_and(|v| v.remapping());
        match (
            remapping,
            devices::iommu::ir::index_of(msg),
            r.table.get(&gsi),
        ) {
            (true, Some(index), Some(e)) if e.type_ == KVM_IRQ_ROUTING_MSI => {
                // SAFETY: the entry's type is MSI, so `msi` is the union's live field.
                let m = unsafe { e.u.msi };
                RouteState::Remapped {
                    index,
                    msg: MsiMessage {
                        address: u64::from(m.address_lo) | (u64::from(m.address_hi) << 32),
                        data: m.data,
                    },
                }
            }
            _ => RouteState::Direct,
        }
    }

    /// Traces every interrupt into `t` from now on.
    pub fn attach_timeline(&self, t: Arc<devices::timeline::Timeline>) {
        let _ = self.timeline.set(t);
    }

    fn trace(&self, kind: impl FnOnce() -> devices::timeline::EventKind) {
        if let Some(t) = self.timeline.get() {
            t.record(kind);
        }
    }

    /// One-off messages sent (spurious interrupts and storms).
    pub fn signalled(&self) -> u64 {
        self.signalled.load(Ordering::Relaxed)
    }

    /// Messages dropped because KVM refused their route or message.
    pub fn refused_drops(&self) -> u64 {
        self.refused_drops.load(Ordering::Relaxed)
    }

    /// Delayed or duplicated interrupts waiting in the timer queue.
    pub fn scheduled(&self) -> usize {
        lock(&self.later.queue).len()
    }

    /// The interrupt fault-injection rules every message is checked against.
    pub fn faults(&self) -> Arc<IrqFaults> {
        self.faults.clone()
    }

    fn lock_routes(&self) -> MutexGuard<'_, Routes> {
        lock(&self.routes)
    }

    fn add_irqfd(&self, gsi: u32) -> Result<(), InterruptError> {
        let fd = EventFd::new(EFD_NONBLOCK).map_err(hv)?;
        self.vm.register_irqfd(&fd, gsi).map_err(hv)?;
        write(&self.irqfds).insert(gsi, fd);
        Ok(())
    }

    fn commit(&self, routes: &Routes) -> Result<(), InterruptError> {
        let entries: Vec<kvm_irq_routing_entry> = routes.table.values().copied().collect();
        let table = KvmIrqRouting::from_entries(&entries).map_err(|e| hv(format!("{e:?}")))?;
        self.vm.set_gsi_routing(&table).map_err(hv)
    }

    /// Routes messages through `vtd`'s interrupt remapping from now on.
    pub fn attach_remapper(&self, vtd: Arc<devices::iommu::Vtd>) {
        let _ = self.remapper.set(vtd);
    }

    /// Messages blocked by interrupt remapping (each one a fault attempt).
    pub fn ir_blocked(&self) -> u64 {
        self.ir_blocked.load(Ordering::Relaxed)
    }

    /// The one entry point of MSI messages into KVM: the message to deliver for `msg`
    /// from `source`, or the interrupt-remapping fault that blocks it. (Injected
    /// interrupt faults apply in `trigger`, to raised messages, not to routes.)
    pub fn program_msi(&self, source: MsiSource, msg: MsiMessage) -> Result<MsiMessage, IrFault> {
        match self.remapper.get() {
            Some(v) => v.remap(source, msg),
            None => Ok(msg),
        }
    }

    /// The remapping unit when it remaps in exact caching mode (uses of cached IRTEs are
    /// checked then).
    fn exact_remapper(&self) -> Option<&Arc<devices::iommu::Vtd>> {
        self.remapper
            .get()
            .filter(|v| v.caching() == devices::iommu::CachingMode::Exact && v.remapping())
    }

    /// Records `f` in the remapping unit (a blocked message was raised).
    fn record_ir(&self, f: IrFault) {
        self.ir_blocked.fetch_add(1, Ordering::Relaxed);
        if let Some(v) = self.remapper.get() {
            v.record_ir_fault(f);
        }
    }

    /// Sends a one-off MSI (no GSI), through the same remapping point.
    pub fn send_msi(&self, source: MsiSource, msg: MsiMessage) -> Result<(), InterruptError> {
        // Device messages without a GSI (DMA writes to the interrupt range) honour drop
        // and IRTE-fault rules; delays and duplicates apply to routed interrupts only
        // (a matching rule's use is spent, its budget given back).
        if source != MsiSource::Platform {
            match self.faults.decide(source, &msg) {
                Some(IrqAction::IrteFault(reason)) => {
                    self.record_ir(injected_fault(source, &msg, reason));
                    return Ok(());
                }
                Some(IrqAction::Drop) => return Ok(()),
                Some(IrqAction::Delay(_)) => self.faults.release(1),
                Some(IrqAction::Duplicate(n)) => self.faults.release(u64::from(n)),
                None => {}
            }
        }
        let m = match self.program_msi(source, msg) {
            Ok(m) => m,
            Err(f) => {
                self.record_ir(f);
                return Ok(());
            }
        };
        if let (Some(v), Some(i)) = (self.exact_remapper(), devices::iommu::ir::index_of(&msg)) {
            if source != MsiSource::Platform {
                v.irte_use(source_sid(source), i);
            }
        }
        self.signalled.fetch_add(1, Ordering::Relaxed);
        self.trace(|| devices::timeline::EventKind::Interrupt {
            gsi: u32::MAX,
            vector: msg.vector(),
            dest: msg.destination(),
            source: format!("{source:?}"),
        });
        let msi = kvm_bindings::kvm_msi {
            address_lo: m.address as u32,
            address_hi: (m.address >> 32) as u32,
            data: m.data,
            ..Default::default()
        };
        match self.vm.signal_msi(msi) {
            Ok(_) => Ok(()),
            Err(e) if e.errno() == libc::EINVAL => {
                // A message KVM cannot deliver (reserved address bits): hardware would
                // reach no local APIC, so it is lost; counted, not an error.
                self.refused_drops.fetch_add(1, Ordering::Relaxed);
                limits::hit(Cap::RefusedRoutes);
                log::warn!(
                    "interrupt message {:#x}/{:#x} from {source:?} refused by KVM ({e}); dropped",
                    m.address,
                    m.data
                );
                Ok(())
            }
            Err(e) => Err(hv(e)),
        }
    }

    /// Starts the thread that delivers delayed and duplicated interrupts; `on_start`
    /// runs first on it (its seccomp filter).
    pub fn start_timer(&self, on_start: Arc<dyn Fn() + Send + Sync>) -> std::io::Result<()> {
        let later = self.later.clone();
        let target = LaterTarget {
            irqfds: self.irqfds.clone(),
            delivered: self.delivered.clone(),
            faults: self.faults.clone(),
        };
        std::thread::Builder::new()
            .name("fv-irq-timer".into())
            .spawn(move || {
                on_start();
                later.run(target)
            })?;
        self.later.started.store(true, Ordering::Release);
        Ok(())
    }

    /// Queues a write of `gsi`'s irqfd at `when`, for the timer thread.
    fn later(&self, gsi: u32, when: Instant) -> Result<(), InterruptError> {
        let l = &self.later;
        if !l.started.load(Ordering::Acquire) {
            // No timer (no API, so no rule can be armed): deliver it now.
            if let Some(fd) = read(&self.irqfds).get(&gsi) {
                let _ = fd.write(1);
            }
            self.faults.release(1);
            return Ok(());
        }
        let seq = l.seq.fetch_add(1, Ordering::Relaxed);
        lock(&l.queue).push(std::cmp::Reverse((when, seq, gsi)));
        l.wake.notify_one();
        Ok(())
    }
}

/// `blocked` value: KVM refused the route.
const REFUSED: u64 = 1 << 63;
/// `blocked` flag: interrupt remapping blocks the message (fault in the low bits).
const IR_FAULT: u64 = 1 << 62;

/// Packs an interrupt-remapping fault into a `blocked` value.
fn encode_fault(f: &IrFault) -> u64 {
    IR_FAULT
        | u64::from(f.index)
        | (u64::from(f.sid) << 16)
        | (u64::from(f.reason as u8) << 32)
        | (u64::from(f.fpd) << 40)
}

/// The source ID messages from `src` carry.
fn source_sid(src: MsiSource) -> u16 {
    match src {
        MsiSource::Pci { bdf, .. } => bdf,
        MsiSource::Ioapic { .. } => devices::iommu::IOAPIC_SID,
        MsiSource::Platform => 0,
    }
}

/// The fault an injected IRTE fault records for `msg` from `src`.
fn injected_fault(src: MsiSource, msg: &MsiMessage, reason: IrFaultReason) -> IrFault {
    IrFault {
        sid: source_sid(src),
        index: devices::iommu::ir::index_of(msg).unwrap_or(0) as u16,
        reason,
        fpd: false,
    }
}

fn decode_fault(v: u64) -> Option<IrFault> {
    if v & IR_FAULT == 0 {
        return None;
    }
    Some(IrFault {
        index: v as u16,
        sid: (v >> 16) as u16,
        reason: IrFaultReason::from_code((v >> 32) as u8)?,
        fpd: v & (1 << 40) != 0,
    })
}

fn msi_entry(gsi: u32, m: MsiMessage) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: m.address as u32,
                address_hi: (m.address >> 32) as u32,
                data: m.data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

impl KvmIrqController {
    /// Puts `gsi`'s translated route in the table (not committed); returns its
    /// `blocked` state.
    fn route_entry(
        &self,
        r: &mut Routes,
        gsi: u32,
        source: MsiSource,
        msg: Option<MsiMessage>,
    ) -> u64 {
        match msg.map(|m| self.program_msi(source, m)) {
            Some(Ok(m)) => {
                r.table.insert(gsi, msi_entry(gsi, m));
                0
            }
            Some(Err(f)) => {
                r.table.remove(&gsi);
                encode_fault(&f)
            }
            None => {
                r.table.remove(&gsi);
                0
            }
        }
    }

    /// Looks every route up again (after an interrupt entry cache invalidation, or IRE,
    /// CFI or the table changed) and pushes the table once.
    fn retranslate(&self) {
        let mut r = self.lock_routes();
        let sources: Vec<(u32, (MsiSource, MsiMessage))> =
            read(&self.sources).iter().map(|(g, s)| (*g, *s)).collect();
        let mut states = Vec::with_capacity(sources.len());
        for (gsi, (source, msg)) in sources {
            let st = self.route_entry(&mut r, gsi, source, Some(msg));
            states.push((gsi, st));
        }
        if self.commit(&r).is_err() {
            // Some untranslated message KVM refuses (compatibility format with reserved
            // bits, let through by CFI): drop routes until the table is accepted.
            for (gsi, st) in states.iter_mut() {
                if *st == 0 && r.table.remove(gsi).is_some() {
                    *st = REFUSED;
                    if self.commit(&r).is_ok() {
                        break;
                    }
                }
            }
            limits::hit(Cap::RefusedRoutes);
        }
        for (gsi, st) in states {
            if let Some(b) = self.blocked.get(gsi as usize) {
                b.store(st, Ordering::Release);
            }
        }
    }
}

/// What the timer thread needs to deliver a queued interrupt.
struct LaterTarget {
    irqfds: Arc<RwLock<HashMap<u32, EventFd>>>,
    delivered: Arc<Vec<AtomicU64>>,
    faults: Arc<IrqFaults>,
}

impl Later {
    fn new() -> Self {
        Self {
            queue: Mutex::new(BinaryHeap::new()),
            wake: Condvar::new(),
            seq: AtomicU64::new(0),
            started: AtomicBool::new(false),
        }
    }

    fn run(&self, t: LaterTarget) {
        let mut q = lock(&self.queue);
        loop {
            let now = Instant::now();
            match q.peek().map(|r| r.0) {
                Some((when, _, gsi)) if when <= now => {
                    q.pop();
                    drop(q);
                    if let Some(fd) = read(&t.irqfds).get(&gsi) {
                        let _ = fd.write(1);
                    }
                    if let Some(c) = t.delivered.get(gsi as usize) {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    t.faults.release(1);
                    q = lock(&self.queue);
                }
                Some((when, _, _)) => {
                    q = match self.wake.wait_timeout(q, when - now) {
                        Ok((g, _)) => g,
                        Err(p) => p.into_inner().0,
                    };
                }
                None => {
                    q = match self.wake.wait(q) {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                }
            }
        }
    }
}

impl InterruptController for KvmIrqController {
    fn allocate_gsi(&self) -> Result<u32, InterruptError> {
        let gsi = {
            let mut r = self.lock_routes();
            if r.next_gsi > self.max_gsi {
                return Err(InterruptError::GsiExhausted);
            }
            let g = r.next_gsi;
            r.next_gsi += 1;
            g
        };
        self.add_irqfd(gsi)?;
        Ok(gsi)
    }

    fn set_msi_route(
        &self,
        gsi: u32,
        source: MsiSource,
        msg: Option<MsiMessage>,
    ) -> Result<(), InterruptError> {
        let mut r = self.lock_routes();
        if gsi >= r.next_gsi {
            return Err(InterruptError::UnknownGsi(gsi));
        }
        let previous = r.table.get(&gsi).copied();
        match msg {
            Some(m) => write(&self.sources).insert(gsi, (source, m)),
            None => write(&self.sources).remove(&gsi),
        };
        let state = self.route_entry(&mut r, gsi, source, msg);
        let state = match self.commit(&r) {
            Ok(()) => state,
            Err(e) => {
                // KVM refused the whole table because of this entry. Take it out (the
                // GSI then has no route and its messages are dropped, as hardware drops
                // an MSI that reaches no local APIC) and push the table without it, so
                // that every other route keeps working.
                r.table.remove(&gsi);
                limits::hit(Cap::RefusedRoutes);
                log::warn!(
                    "interrupt route of GSI {gsi} ({source:?}, {msg:x?}) refused by KVM ({e}); its messages are dropped until the guest reprograms it"
                );
                if let Err(e2) = self.commit(&r) {
                    // Cannot happen with a table KVM accepted before; restore it.
                    if let Some(p) = previous {
                        r.table.insert(gsi, p);
                    }
                    let _ = self.commit(&r);
                    return Err(e2);
                }
                REFUSED
            }
        };
        if let Some(b) = self.blocked.get(gsi as usize) {
            b.store(state, Ordering::Release);
        }
        Ok(())
    }

    fn signal_msi(&self, source: MsiSource, msg: MsiMessage) -> Result<(), InterruptError> {
        self.send_msi(source, msg)
    }

    fn remap_changed(&self) {
        self.retranslate();
    }

    fn trigger(&self, gsi: u32) -> Result<(), InterruptError> {
        let g = read(&self.irqfds);
        let fd = g.get(&gsi).ok_or(InterruptError::UnknownGsi(gsi))?;
        if let Some(c) = self.raised.get(gsi as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let blocked = self
            .blocked
            .get(gsi as usize)
            .map_or(0, |b| b.load(Ordering::Acquire));
        if blocked != 0 {
            drop(g);
            match decode_fault(blocked) {
                Some(f) => self.record_ir(f),
                None => {
                    self.refused_drops.fetch_add(1, Ordering::Relaxed);
                }
            }
            return Ok(());
        }
        let count = |delivered: &Vec<AtomicU64>| {
            if let Some(c) = delivered.get(gsi as usize) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        };
        // Who raised it matters only to armed fault rules and to the timeline; the
        // common path skips the lookup.
        let tracing = self.timeline.get().is_some_and(|t| t.enabled());
        let exact = self.exact_remapper();
        let source = if self.faults.armed() || tracing || exact.is_some() {
            read(&self.sources).get(&gsi).copied()
        } else {
            None
        };
        if let (Some(v), Some((src, msg))) = (exact, source) {
            // The route is the cached IRTE: this interrupt uses it.
            if let Some(i) = devices::iommu::ir::index_of(&msg) {
                v.irte_use(source_sid(src), i);
            }
        }
        let decision = source.and_then(|(src, msg)| self.faults.decide(src, &msg));
        if let Some((src, msg)) = source {
            self.trace(|| match decision {
                Some(a) => devices::timeline::EventKind::InterruptInjected {
                    gsi,
                    action: match a {
                        IrqAction::Drop => "dropped",
                        IrqAction::Delay(_) => "delayed",
                        IrqAction::Duplicate(_) => "duplicated",
                        IrqAction::IrteFault(_) => "IRTE fault",
                    },
                },
                None => devices::timeline::EventKind::Interrupt {
                    gsi,
                    vector: msg.vector(),
                    dest: msg.destination(),
                    source: format!("{src:?}"),
                },
            });
        }
        match decision {
            None => {
                count(&self.delivered);
                fd.write(1).map_err(hv)
            }
            Some(IrqAction::Drop) => {
                log::debug!("injected: interrupt on GSI {gsi} dropped");
                Ok(())
            }
            Some(IrqAction::IrteFault(reason)) => {
                drop(g);
                if let Some((src, msg)) = source {
                    self.record_ir(injected_fault(src, &msg, reason));
                }
                Ok(())
            }
            Some(IrqAction::Delay(d)) => {
                drop(g);
                self.later(gsi, Instant::now() + d)
            }
            Some(IrqAction::Duplicate(n)) => {
                count(&self.delivered);
                fd.write(1).map_err(hv)?;
                drop(g);
                // Copies a little apart, so that the local APIC sees separate messages
                // rather than one pending request.
                let now = Instant::now();
                for i in 1..=n {
                    self.later(gsi, now + Duration::from_millis(u64::from(i)))?;
                }
                Ok(())
            }
        }
    }
}
