//! KVM implementation of [`InterruptController`]: a GSI routing table pushed with
//! `KVM_SET_GSI_ROUTING` and one irqfd per GSI. GSIs 0..24 are the IOAPIC pins (KVM's
//! split irqchip reserves them, and scans their level-triggered routes to produce
//! `KVM_EXIT_IOAPIC_EOI`); MSI and MSI-X vectors get GSIs from 24 up.
//!
//! Every MSI message enters KVM through [`KvmIrqController::program_msi`], the single
//! place where interrupt remapping will translate or block it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use devices::inject::{IrqAction, IrqFaults};
use devices::interrupt::{InterruptController, InterruptError, MsiMessage, MsiSource};
use devices::sync::{lock, read, write};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_msi, KvmIrqRouting,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// GSIs reserved for the IOAPIC pins.
pub const IOAPIC_GSIS: u32 = devices::ioapic::NUM_PINS as u32;

struct Routes {
    table: BTreeMap<u32, kvm_irq_routing_entry>,
    next_gsi: u32,
}

/// GSI routing and irqfds over a KVM VM.
pub struct KvmIrqController {
    vm: Arc<VmFd>,
    max_gsi: u32,
    routes: Mutex<Routes>,
    irqfds: RwLock<HashMap<u32, EventFd>>,
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
    pub fn new(vm: Arc<VmFd>, max_routes: u32) -> Result<Self, InterruptError> {
        let c = Self {
            vm,
            max_gsi: max_routes.saturating_sub(1).max(IOAPIC_GSIS),
            routes: Mutex::new(Routes {
                table: BTreeMap::new(),
                next_gsi: IOAPIC_GSIS,
            }),
            irqfds: RwLock::new(HashMap::new()),
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
        let mut v: Vec<GsiCounters> = read(&self.sources)
            .iter()
            .map(|(&gsi, &(source, msg))| GsiCounters {
                gsi,
                source,
                msg,
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

    /// The one entry point of MSI messages into KVM. Interrupt remapping will sit here;
    /// today the message passes unchanged. (Injected interrupt faults apply in
    /// `trigger`, to raised messages, not to routes.)
    pub fn program_msi(&self, _source: MsiSource, msg: MsiMessage) -> Option<MsiMessage> {
        Some(msg)
    }

    /// Sends a one-off MSI (no GSI), through the same remapping point.
    pub fn signal_msi(&self, source: MsiSource, msg: MsiMessage) -> Result<(), InterruptError> {
        let Some(m) = self.program_msi(source, msg) else {
            return Ok(());
        };
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
        self.vm.signal_msi(msi).map(|_| ()).map_err(hv)
    }
}

fn spawn_later(f: impl FnOnce() + Send + 'static) -> Result<(), InterruptError> {
    std::thread::Builder::new()
        .name("fv-irq-inject".into())
        .spawn(f)
        .map(|_| ())
        .map_err(hv)
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
        match msg.and_then(|m| self.program_msi(source, m)) {
            Some(m) => {
                let entry = kvm_irq_routing_entry {
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
                };
                r.table.insert(gsi, entry);
            }
            None => {
                r.table.remove(&gsi);
            }
        }
        match msg {
            Some(m) => write(&self.sources).insert(gsi, (source, m)),
            None => write(&self.sources).remove(&gsi),
        };
        self.commit(&r)
    }

    fn trigger(&self, gsi: u32) -> Result<(), InterruptError> {
        let g = read(&self.irqfds);
        let fd = g.get(&gsi).ok_or(InterruptError::UnknownGsi(gsi))?;
        if let Some(c) = self.raised.get(gsi as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let count = move |delivered: &Vec<AtomicU64>| {
            if let Some(c) = delivered.get(gsi as usize) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        };
        // Who raised it matters only to armed fault rules and to the timeline; the
        // common path skips the lookup.
        let tracing = self.timeline.get().is_some_and(|t| t.enabled());
        let source = if self.faults.armed() || tracing {
            read(&self.sources).get(&gsi).copied()
        } else {
            None
        };
        let decision = source.and_then(|(src, msg)| self.faults.decide(src, &msg));
        if let Some((src, msg)) = source {
            self.trace(|| match decision {
                Some(a) => devices::timeline::EventKind::InterruptInjected {
                    gsi,
                    action: match a {
                        IrqAction::Drop => "dropped",
                        IrqAction::Delay(_) => "delayed",
                        IrqAction::Duplicate(_) => "duplicated",
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
            Some(IrqAction::Delay(d)) => {
                let fd = fd.try_clone().map_err(hv)?;
                let delivered = self.delivered.clone();
                spawn_later(move || {
                    std::thread::sleep(d);
                    count(&delivered);
                    let _ = fd.write(1);
                })
            }
            Some(IrqAction::Duplicate(n)) => {
                count(&self.delivered);
                fd.write(1).map_err(hv)?;
                // Copies a little apart, so that the local APIC sees separate messages
                // rather than one pending request.
                let fd = fd.try_clone().map_err(hv)?;
                let delivered = self.delivered.clone();
                spawn_later(move || {
                    for _ in 0..n {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        count(&delivered);
                        let _ = fd.write(1);
                    }
                })
            }
        }
    }
}
