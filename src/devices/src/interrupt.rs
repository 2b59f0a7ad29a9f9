//! How device models raise interrupts without knowing about KVM.
//!
//! Every interrupt in faultvisor is an MSI in the end: IOAPIC redirection entries, PCI
//! MSI and MSI-X vectors all become MSI routes on a GSI, and each GSI is raised by writing
//! its irqfd; messages without a GSI (a DMA write to the interrupt range, the IOMMU's
//! completion event) are signalled directly. The VMM implements [`InterruptController`]
//! over KVM (and passes every message through one function, where interrupt remapping
//! sits); unit tests use [`RecordingController`].

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Base address of MSI messages on x86 (the local APIC window).
pub const MSI_ADDRESS_BASE: u64 = 0xFEE0_0000;

/// An MSI message: what the device writes, where.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// The 64-bit message address.
    pub address: u64,
    /// The 32-bit message data.
    pub data: u32,
}

impl MsiMessage {
    /// The interrupt vector (data bits 7:0).
    pub fn vector(&self) -> u8 {
        (self.data & 0xff) as u8
    }

    /// The destination APIC ID (address bits 19:12, plus the x2APIC high bits 63:40).
    pub fn destination(&self) -> u32 {
        (((self.address >> 12) & 0xff) | ((self.address >> 32) & 0xffff_ff00)) as u32
    }

    /// Whether the message is level-triggered (data bit 15).
    pub fn level_triggered(&self) -> bool {
        self.data & (1 << 15) != 0
    }
}

/// Who sends an MSI: the key that interrupt remapping and accounting will use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsiSource {
    /// An IOAPIC redirection entry.
    Ioapic {
        /// Pin number.
        pin: u8,
    },
    /// A PCI function's MSI or MSI-X vector.
    Pci {
        /// Bus/device/function as a 16-bit requester ID.
        bdf: u16,
        /// Vector index within the function.
        vector: u16,
    },
    /// A platform device (e.g. the IOMMU's own fault event).
    Platform,
}

/// Errors of the interrupt plumbing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InterruptError {
    /// No GSI is left for a new MSI vector.
    #[error("no free GSI left for a new interrupt vector")]
    GsiExhausted,
    /// The GSI was never allocated.
    #[error("GSI {0} is not allocated")]
    UnknownGsi(u32),
    /// The hypervisor refused the operation.
    #[error("hypervisor refused the interrupt operation: {0}")]
    Hypervisor(String),
}

/// The VMM side of interrupt delivery, as device models see it.
pub trait InterruptController: Send + Sync {
    /// Allocates a GSI (above the IOAPIC's reserved pins) with its irqfd.
    fn allocate_gsi(&self) -> Result<u32, InterruptError>;
    /// Points `gsi` at `msg`, or removes its route when `msg` is `None` (masked).
    fn set_msi_route(
        &self,
        gsi: u32,
        source: MsiSource,
        msg: Option<MsiMessage>,
    ) -> Result<(), InterruptError>;
    /// Raises `gsi` (writes its irqfd).
    fn trigger(&self, gsi: u32) -> Result<(), InterruptError>;
    /// Sends one message that has no GSI (a device's DMA write to the interrupt range,
    /// the IOMMU's invalidation completion event, injected interrupts).
    fn signal_msi(&self, source: MsiSource, msg: MsiMessage) -> Result<(), InterruptError>;
    /// The interrupt remapping unit changed what messages translate to (an interrupt
    /// entry cache invalidation, IRE, CFI or a new table): routes are looked up again.
    fn remap_changed(&self) {}
}

/// What [`RecordingController`] saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// A route change.
    Route(u32, MsiSource, Option<MsiMessage>),
    /// A trigger of a GSI, with the route in force at that moment.
    Trigger(u32, Option<MsiMessage>),
    /// A one-off message.
    Signal(MsiSource, MsiMessage),
}

/// An [`InterruptController`] that records everything (for tests and dry runs).
#[derive(Debug)]
pub struct RecordingController {
    inner: Mutex<RecInner>,
}

#[derive(Debug)]
struct RecInner {
    next_gsi: u32,
    max_gsi: u32,
    routes: BTreeMap<u32, MsiMessage>,
    log: Vec<Recorded>,
}

impl RecordingController {
    /// A recorder whose allocatable GSIs are `first..=last`.
    pub fn new(first: u32, last: u32) -> Self {
        Self {
            inner: Mutex::new(RecInner {
                next_gsi: first,
                max_gsi: last,
                routes: BTreeMap::new(),
                log: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecInner> {
        crate::sync::lock(&self.inner)
    }

    /// Takes the recorded events, leaving the log empty.
    pub fn take(&self) -> Vec<Recorded> {
        std::mem::take(&mut self.lock().log)
    }

    /// Messages delivered so far (triggers that had a route), in order.
    pub fn delivered(&self) -> Vec<MsiMessage> {
        self.lock()
            .log
            .iter()
            .filter_map(|r| match r {
                Recorded::Trigger(_, Some(m)) | Recorded::Signal(_, m) => Some(*m),
                _ => None,
            })
            .collect()
    }

    /// The route currently in force on `gsi`.
    pub fn route(&self, gsi: u32) -> Option<MsiMessage> {
        self.lock().routes.get(&gsi).copied()
    }
}

impl InterruptController for RecordingController {
    fn allocate_gsi(&self) -> Result<u32, InterruptError> {
        let mut g = self.lock();
        if g.next_gsi > g.max_gsi {
            return Err(InterruptError::GsiExhausted);
        }
        let gsi = g.next_gsi;
        g.next_gsi += 1;
        Ok(gsi)
    }

    fn set_msi_route(
        &self,
        gsi: u32,
        source: MsiSource,
        msg: Option<MsiMessage>,
    ) -> Result<(), InterruptError> {
        let mut g = self.lock();
        match msg {
            Some(m) => g.routes.insert(gsi, m),
            None => g.routes.remove(&gsi),
        };
        if g.log.len() < RECORD_CAP {
            g.log.push(Recorded::Route(gsi, source, msg));
        }
        Ok(())
    }

    fn trigger(&self, gsi: u32) -> Result<(), InterruptError> {
        let mut g = self.lock();
        let r = g.routes.get(&gsi).copied();
        if g.log.len() < RECORD_CAP {
            g.log.push(Recorded::Trigger(gsi, r));
        }
        Ok(())
    }

    fn signal_msi(&self, source: MsiSource, msg: MsiMessage) -> Result<(), InterruptError> {
        let mut g = self.lock();
        if g.log.len() < RECORD_CAP {
            g.log.push(Recorded::Signal(source, msg));
        }
        Ok(())
    }
}

/// Events a recorder keeps (fuzzing and long tests must not grow it without bound).
const RECORD_CAP: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_fields() {
        let m = MsiMessage {
            address: MSI_ADDRESS_BASE | (3 << 12),
            data: 0x8031,
        };
        assert_eq!(m.vector(), 0x31);
        assert_eq!(m.destination(), 3);
        assert!(m.level_triggered());
    }

    #[test]
    fn recorder_allocates_until_exhausted() {
        let r = RecordingController::new(24, 25);
        assert_eq!(r.allocate_gsi(), Ok(24));
        assert_eq!(r.allocate_gsi(), Ok(25));
        assert_eq!(r.allocate_gsi(), Err(InterruptError::GsiExhausted));
    }
}
