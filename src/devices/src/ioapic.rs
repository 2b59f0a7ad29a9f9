//! Userspace IOAPIC (Intel 82093AA, version 0x20 with the EOI register), 24 pins.
//!
//! Spec: the 82093AA datasheet (registers, redirection table) and the ICH/PCH datasheets
//! for the version-0x20 directed-EOI register at offset 0x40. With KVM's split irqchip the
//! local APICs live in the kernel and this model turns every unmasked redirection entry
//! into an MSI route on GSI == pin; a pin is raised by writing that GSI's irqfd.
//! Level-triggered entries get remote-IRR and re-assert after EOI, which arrives either
//! through `KVM_EXIT_IOAPIC_EOI` ([`IoApic::end_of_interrupt`]) or the EOI register.
//!
//! Redirection entry layout (64 bits):
//!
//! | bits  | field                      | access |
//! |-------|----------------------------|--------|
//! | 7:0   | vector                     | RW     |
//! | 10:8  | delivery mode              | RW     |
//! | 11    | destination mode (1 = log.)| RW     |
//! | 12    | delivery status            | RO     |
//! | 13    | polarity (1 = active low)  | RW     |
//! | 14    | remote IRR                 | RO     |
//! | 15    | trigger mode (1 = level)   | RW     |
//! | 16    | mask                       | RW     |
//! | 48    | format (1 = remappable)    | RW     |
//! | 55:49 | extended destination ID    | RW     |
//! | 63:56 | destination                | RW     |
//!
//! In remappable format (bit 48, VT-d §5.1.5.1) bits 63:49 are the interrupt index
//! bits 14:0 and bit 11 is index bit 15; the vector field holds what Linux puts there
//! (the pin number), which the EOI register matches, and the trigger mode bit keeps its
//! meaning for remote IRR.

use std::sync::{Arc, Mutex};

use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

use crate::interrupt::{InterruptController, MsiMessage, MsiSource, MSI_ADDRESS_BASE};
use crate::GuestAnomalies;

/// Guest-physical base of the IOAPIC register window.
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// Size of the register window.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Number of pins (and of GSIs reserved for them in KVM's split irqchip).
pub const NUM_PINS: usize = 24;
/// The version register's value: version 0x20, maximum redirection entry 23.
pub const IOAPIC_VERSION: u32 = 0x20 | (((NUM_PINS as u32) - 1) << 16);

/// MMIO offset of the index register.
pub const IOREGSEL: u64 = 0x00;
/// MMIO offset of the data window.
pub const IOWIN: u64 = 0x10;
/// MMIO offset of the EOI register (version 0x20).
pub const IOEOI: u64 = 0x40;

/// Indirect register: IOAPIC ID.
const REG_ID: u32 = 0x00;
/// Indirect register: version.
const REG_VERSION: u32 = 0x01;
/// Indirect register: arbitration ID.
const REG_ARB: u32 = 0x02;
/// Indirect register: first redirection-table register.
const REG_REDTBL: u32 = 0x10;

const VECTOR_MASK: u64 = 0xff;
const DELIVERY_MODE_SHIFT: u32 = 8;
const DEST_MODE_BIT: u64 = 1 << 11;
const DELIVERY_STATUS_BIT: u64 = 1 << 12;
const POLARITY_BIT: u64 = 1 << 13;
const REMOTE_IRR_BIT: u64 = 1 << 14;
const TRIGGER_LEVEL_BIT: u64 = 1 << 15;
const MASK_BIT: u64 = 1 << 16;
const EXT_DEST_SHIFT: u32 = 49;
const REMAPPABLE_BIT: u64 = 1 << 48;
const DEST_SHIFT: u32 = 56;
/// Bits the guest may write (everything but delivery status and remote IRR).
const RTE_WRITABLE: u64 = !(DELIVERY_STATUS_BIT | REMOTE_IRR_BIT) & 0xffff_0000_0001_ffff;

/// One decoded redirection entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectionEntry(pub u64);

impl RedirectionEntry {
    /// The vector delivered.
    pub fn vector(self) -> u8 {
        (self.0 & VECTOR_MASK) as u8
    }
    /// The delivery mode (0 fixed, 1 lowest priority, 2 SMI, 4 NMI, 5 INIT, 7 ExtINT).
    pub fn delivery_mode(self) -> u8 {
        ((self.0 >> DELIVERY_MODE_SHIFT) & 0x7) as u8
    }
    /// Logical (true) or physical destination mode.
    pub fn dest_logical(self) -> bool {
        self.0 & DEST_MODE_BIT != 0
    }
    /// Delivery status (set while a message is pending).
    pub fn delivery_status(self) -> bool {
        self.0 & DELIVERY_STATUS_BIT != 0
    }
    /// Active-low polarity.
    pub fn active_low(self) -> bool {
        self.0 & POLARITY_BIT != 0
    }
    /// Remote IRR (level-triggered interrupt accepted, EOI outstanding).
    pub fn remote_irr(self) -> bool {
        self.0 & REMOTE_IRR_BIT != 0
    }
    /// Level (true) or edge trigger mode.
    pub fn level_triggered(self) -> bool {
        self.0 & TRIGGER_LEVEL_BIT != 0
    }
    /// Masked.
    pub fn masked(self) -> bool {
        self.0 & MASK_BIT != 0
    }
    /// Whether the entry is in remappable format (bit 48).
    pub fn remappable(self) -> bool {
        self.0 & REMAPPABLE_BIT != 0
    }

    /// The interrupt index of a remappable-format entry.
    pub fn index(self) -> u16 {
        (((self.0 >> 49) & 0x7fff) as u16) | ((((self.0 >> 11) & 1) as u16) << 15)
    }

    /// Destination APIC ID, with the extended destination ID bits Linux uses on KVM
    /// (`KVM_FEATURE_MSI_EXT_DEST_ID`, bits 55:49) as bits 14:8.
    pub fn destination(self) -> u32 {
        let low = ((self.0 >> DEST_SHIFT) & 0xff) as u32;
        let ext = ((self.0 >> EXT_DEST_SHIFT) & 0x7f) as u32;
        low | (ext << 8)
    }

    /// The MSI message this entry sends: compatibility format (Intel SDM vol. 3
    /// §11.11), or in remappable format the request VT-d looks up (index in address
    /// bits 19:5 and 2, format bit 4, no sub-handle), with the entry's low half as data.
    pub fn to_msi(self) -> MsiMessage {
        if self.remappable() {
            let i = u64::from(self.index());
            return MsiMessage {
                address: MSI_ADDRESS_BASE | ((i & 0x7fff) << 5) | (1 << 4) | ((i >> 15) << 2),
                data: (self.0 & 0xffff & !(DELIVERY_STATUS_BIT | REMOTE_IRR_BIT)) as u32,
            };
        }
        let dest = self.destination();
        // Address bits 19:12 destination ID, bits 11:5 extended destination ID,
        // bit 2 destination mode. Data bits 7:0 vector, 10:8 delivery mode,
        // bit 14 level assert, bit 15 trigger mode.
        let address = MSI_ADDRESS_BASE
            | (u64::from(dest & 0xff) << 12)
            | (u64::from((dest >> 8) & 0x7f) << 5)
            | (u64::from(self.dest_logical()) << 2);
        let mut data = u32::from(self.vector()) | (u32::from(self.delivery_mode()) << 8);
        if self.level_triggered() {
            data |= (1 << 15) | (1 << 14);
        }
        MsiMessage { address, data }
    }
}

/// Counters of one pin.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinStats {
    /// Times a device raised the pin.
    pub raised: u64,
    /// Messages sent to the local APICs.
    pub delivered: u64,
    /// Raises that found the pin masked (an edge is lost; a level line stays asserted).
    pub masked: u64,
    /// Raises of a level pin whose previous interrupt was not yet EOI'd (coalesced).
    pub coalesced: u64,
}

/// One IOAPIC input pin as a device sees it: an interrupt line it drives.
#[derive(Clone)]
pub struct IoapicLine {
    ioapic: Arc<Mutex<IoApic>>,
    pin: usize,
}

impl IoapicLine {
    /// The line into `pin` of `ioapic`.
    pub fn new(ioapic: Arc<Mutex<IoApic>>, pin: usize) -> Self {
        Self { ioapic, pin }
    }

    /// The pin (= GSI) number.
    pub fn pin(&self) -> usize {
        self.pin
    }

    /// Drives the line level (level-triggered sources).
    pub fn set_level(&self, asserted: bool) {
        crate::sync::lock(&self.ioapic).set_level(self.pin, asserted);
    }

    /// Raises an edge (edge-triggered sources).
    pub fn pulse(&self) {
        crate::sync::lock(&self.ioapic).pulse(self.pin);
    }
}

/// The userspace IOAPIC.
pub struct IoApic {
    id: u32,
    ioregsel: u32,
    entries: [RedirectionEntry; NUM_PINS],
    /// Logical line level of each pin as the devices drive it (asserted = true).
    lines: [bool; NUM_PINS],
    /// Route changes held back until the pin's in-flight level interrupt is EOI'd.
    route_deferred: [bool; NUM_PINS],
    stats: [PinStats; NUM_PINS],
    irq: Arc<dyn InterruptController>,
    anomalies: GuestAnomalies,
}

impl IoApic {
    /// Creates an IOAPIC with every entry masked (its reset state). GSI `n` is pin `n`.
    pub fn new(irq: Arc<dyn InterruptController>) -> Self {
        Self {
            id: 0,
            ioregsel: 0,
            entries: [RedirectionEntry(MASK_BIT); NUM_PINS],
            lines: [false; NUM_PINS],
            route_deferred: [false; NUM_PINS],
            stats: [PinStats::default(); NUM_PINS],
            irq,
            anomalies: GuestAnomalies::new(),
        }
    }

    /// The redirection entry of `pin`.
    pub fn entry(&self, pin: usize) -> Option<RedirectionEntry> {
        self.entries.get(pin).copied()
    }

    /// Counters of `pin`.
    pub fn stats(&self, pin: usize) -> Option<PinStats> {
        self.stats.get(pin).copied()
    }

    /// Guest accesses refused so far.
    pub fn anomalies(&self) -> u64 {
        self.anomalies.count()
    }

    /// Pulses an edge-triggered pin (a device's interrupt event).
    pub fn pulse(&mut self, pin: usize) {
        if pin >= NUM_PINS {
            return;
        }
        self.stats[pin].raised += 1;
        let e = self.entries[pin];
        if e.level_triggered() {
            // A pulse on a level-configured pin acts as assert + deassert.
            self.set_level(pin, true);
            self.lines[pin] = false;
            return;
        }
        if e.masked() {
            // 82093AA: "Edge-sensitive interrupts signaled on a masked interrupt pin
            // are ignored (i.e., not delivered or held pending)".
            self.stats[pin].masked += 1;
            return;
        }
        self.deliver(pin);
    }

    /// Drives a pin's line level (for level-triggered sources).
    pub fn set_level(&mut self, pin: usize, asserted: bool) {
        if pin >= NUM_PINS {
            return;
        }
        let was = self.lines[pin];
        self.lines[pin] = asserted;
        if !asserted {
            return;
        }
        if !was {
            self.stats[pin].raised += 1;
        }
        let e = self.entries[pin];
        if !e.level_triggered() {
            if !was {
                // Rising edge on an edge-triggered entry (ignored while masked).
                if e.masked() {
                    self.stats[pin].masked += 1;
                } else {
                    self.deliver(pin);
                }
            }
            return;
        }
        if e.masked() {
            self.stats[pin].masked += 1;
            return;
        }
        if e.remote_irr() {
            self.stats[pin].coalesced += 1;
            return;
        }
        self.deliver(pin);
    }

    /// Handles an EOI for `vector` (from `KVM_EXIT_IOAPIC_EOI` or the EOI register):
    /// clears remote IRR of matching level entries and re-delivers lines still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..NUM_PINS {
            let e = self.entries[pin];
            if e.vector() != vector || !e.level_triggered() || !e.remote_irr() {
                continue;
            }
            self.entries[pin].0 &= !REMOTE_IRR_BIT;
            if std::mem::take(&mut self.route_deferred[pin]) {
                self.update_route(pin);
            }
            if self.lines[pin] && !e.masked() {
                self.deliver(pin);
            }
        }
    }

    fn deliver(&mut self, pin: usize) {
        let e = self.entries[pin];
        if e.level_triggered() {
            self.entries[pin].0 |= REMOTE_IRR_BIT;
        }
        // Delivery status is set while the message is in flight; the irqfd write is the
        // whole flight, so it is clear again when the MMIO exit or device call returns.
        match self.irq.trigger(pin as u32) {
            Ok(()) => self.stats[pin].delivered += 1,
            Err(e) => log::warn!("ioapic: pin {pin}: cannot raise interrupt: {e}"),
        }
    }

    /// Programs the pin's route. A masked entry keeps its route: the mask is applied
    /// here, before anything is raised, while KVM uses the route of a level entry to
    /// forward the EOI of a vector still in service (a guest may mask the pin in its
    /// handler before the EOI: kvm-unit-tests' ioapic "retriggered level interrupts
    /// with mask").
    fn update_route(&mut self, pin: usize) {
        let e = self.entries[pin];
        let msg = Some(e.to_msi());
        if let Err(err) =
            self.irq
                .set_msi_route(pin as u32, MsiSource::Ioapic { pin: pin as u8 }, msg)
        {
            log::warn!("ioapic: pin {pin}: cannot update route: {err}");
        }
    }

    fn write_entry(&mut self, pin: usize, value: u64) {
        let old = self.entries[pin];
        let new = RedirectionEntry((old.0 & !RTE_WRITABLE) | (value & RTE_WRITABLE));
        // Switching a pin to edge drops a stale remote IRR, as hardware does.
        let new = if new.level_triggered() {
            new
        } else {
            RedirectionEntry(new.0 & !REMOTE_IRR_BIT)
        };
        self.entries[pin] = new;
        if (old.0 & RTE_WRITABLE) != (new.0 & RTE_WRITABLE) {
            if new.level_triggered() && new.remote_irr() {
                // A level interrupt of this pin is in flight. Its EOI reaches us only
                // while KVM's route still points at the vCPU that took it: KVMs before
                // Linux 6.2 drop the vector from that vCPU's EOI-exit set as soon as the
                // route moves elsewhere (fixed upstream by "KVM: x86: ioapic: Fix
                // level-triggered EOI and userspace IOAPIC reconfigure race"), and the
                // pin would stay blocked forever (kvm-unit-tests' ioapic "Reconfigure
                // self"). Nothing is delivered through the route until that EOI, so
                // keeping the old one in KVM until then is invisible to the guest.
                self.route_deferred[pin] = true;
            } else {
                self.route_deferred[pin] = false;
                self.update_route(pin);
            }
        }
        // Unmasking a level entry whose line is asserted delivers it; edges that came
        // while masked are gone.
        if old.masked()
            && !new.masked()
            && new.level_triggered()
            && self.lines[pin]
            && !new.remote_irr()
        {
            self.deliver(pin);
        }
    }

    fn read_indirect(&self) -> u32 {
        match self.ioregsel {
            REG_ID | REG_ARB => self.id << 24,
            REG_VERSION => IOAPIC_VERSION,
            r if (REG_REDTBL..REG_REDTBL + 2 * NUM_PINS as u32).contains(&r) => {
                let pin = ((r - REG_REDTBL) / 2) as usize;
                let v = self.entries[pin].0;
                if r % 2 == 0 {
                    v as u32
                } else {
                    (v >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_indirect(&mut self, value: u32) {
        match self.ioregsel {
            REG_ID => self.id = (value >> 24) & 0xf,
            REG_VERSION | REG_ARB => {}
            r if (REG_REDTBL..REG_REDTBL + 2 * NUM_PINS as u32).contains(&r) => {
                let pin = ((r - REG_REDTBL) / 2) as usize;
                let old = self.entries[pin].0;
                let v = if r % 2 == 0 {
                    (old & 0xffff_ffff_0000_0000) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                self.write_entry(pin, v);
            }
            r => self
                .anomalies
                .record("ioapic", format_args!("write to unknown register {r:#x}")),
        }
    }

    /// Reads the register window (offset within the 4 KiB page).
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 4 {
            self.anomalies.record(
                "ioapic",
                format_args!("{}-byte read at {offset:#x}", data.len()),
            );
            return;
        }
        let v = match offset {
            IOREGSEL => self.ioregsel,
            IOWIN => self.read_indirect(),
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Writes the register window (offset within the 4 KiB page).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.anomalies.record(
                "ioapic",
                format_args!("{}-byte write at {offset:#x}", data.len()),
            );
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.ioregsel = v & 0xff,
            IOWIN => self.write_indirect(v),
            IOEOI => self.end_of_interrupt((v & 0xff) as u8),
            _ => self
                .anomalies
                .record("ioapic", format_args!("write to offset {offset:#x}")),
        }
    }
}

impl MutDeviceMmio for IoApic {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.read(offset, data);
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::{Recorded, RecordingController};

    fn setup() -> (Arc<RecordingController>, IoApic) {
        let rec = Arc::new(RecordingController::new(24, 100));
        let io = IoApic::new(rec.clone());
        (rec, io)
    }

    fn write_reg(io: &mut IoApic, reg: u32, v: u32) {
        io.write(IOREGSEL, &reg.to_le_bytes());
        io.write(IOWIN, &v.to_le_bytes());
    }

    fn read_reg(io: &mut IoApic, reg: u32) -> u32 {
        io.write(IOREGSEL, &reg.to_le_bytes());
        let mut d = [0u8; 4];
        io.read(IOWIN, &mut d);
        u32::from_le_bytes(d)
    }

    fn program(io: &mut IoApic, pin: u32, lo: u32, hi: u32) {
        write_reg(io, REG_REDTBL + 2 * pin + 1, hi);
        write_reg(io, REG_REDTBL + 2 * pin, lo);
    }

    #[test]
    fn version_and_reset_state() {
        let (_, mut io) = setup();
        assert_eq!(read_reg(&mut io, REG_VERSION), 0x0017_0020);
        for pin in 0..NUM_PINS as u32 {
            assert_eq!(read_reg(&mut io, REG_REDTBL + 2 * pin) & (1 << 16), 1 << 16);
        }
        write_reg(&mut io, REG_ID, 0x0500_0000);
        assert_eq!(read_reg(&mut io, REG_ID), 0x0500_0000);
    }

    #[test]
    fn unmasked_entry_becomes_msi_route() {
        let (rec, mut io) = setup();
        // Pin 4, vector 0x24, fixed, physical, edge, destination APIC 1.
        program(&mut io, 4, 0x24, 1 << 24);
        let route = rec.route(4).expect("route installed");
        assert_eq!(route.vector(), 0x24);
        assert_eq!(route.destination(), 1);
        assert!(!route.level_triggered());
        assert_eq!(route.address, 0xFEE0_1000);
        // Masking keeps the route (KVM forwards the EOI of a level vector in service
        // through it); the mask stops raises before they reach it.
        program(&mut io, 4, 0x24 | (1 << 16), 1 << 24);
        assert_eq!(rec.route(4).map(|m| m.vector()), Some(0x24));
        rec.take();
        io.pulse(4);
        assert!(rec.delivered().is_empty());
    }

    #[test]
    fn level_entry_route_has_trigger_bit() {
        let (rec, mut io) = setup();
        program(&mut io, 9, 0x31 | (1 << 15) | (1 << 13), 0);
        let m = rec.route(9).expect("route");
        assert!(m.level_triggered());
        assert_eq!(m.data & 0xc000, 0xc000);
    }

    #[test]
    fn edge_delivers_each_pulse() {
        let (rec, mut io) = setup();
        program(&mut io, 4, 0x24, 0);
        rec.take();
        io.pulse(4);
        io.pulse(4);
        let d = rec.delivered();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].vector(), 0x24);
        assert_eq!(io.stats(4).map(|s| s.delivered), Some(2));
    }

    #[test]
    fn level_remote_irr_and_eoi_through_lapic() {
        let (rec, mut io) = setup();
        program(&mut io, 10, 0x40 | (1 << 15), 0);
        rec.take();
        io.set_level(10, true);
        assert_eq!(rec.delivered().len(), 1);
        assert!(io.entry(10).is_some_and(|e| e.remote_irr()));
        // Still asserted, remote IRR set: no second message.
        io.set_level(10, true);
        assert_eq!(rec.delivered().len(), 1);
        // EOI while the line is still asserted: re-delivered, remote IRR set again.
        io.end_of_interrupt(0x40);
        assert_eq!(rec.delivered().len(), 2);
        assert!(io.entry(10).is_some_and(|e| e.remote_irr()));
        // Deassert then EOI: remote IRR clears, nothing more.
        io.set_level(10, false);
        io.end_of_interrupt(0x40);
        assert_eq!(rec.delivered().len(), 2);
        assert!(io.entry(10).is_some_and(|e| !e.remote_irr()));
        // EOI for another vector does nothing.
        io.set_level(10, true);
        io.end_of_interrupt(0x41);
        assert!(io.entry(10).is_some_and(|e| e.remote_irr()));
    }

    #[test]
    fn route_of_an_in_flight_level_entry_moves_at_its_eoi() {
        let (rec, mut io) = setup();
        program(&mut io, 13, 0x64 | (1 << 15), 0);
        io.set_level(13, true);
        assert_eq!(rec.delivered().len(), 1);
        // The handler moves the pin to CPU 1 before its EOI (kvm-unit-tests' ioapic
        // "Reconfigure self"): KVM keeps the old route, so the EOI still comes back.
        io.set_level(13, false);
        write_reg(&mut io, 0x10 + 13 * 2 + 1, 1 << 24);
        assert_eq!(rec.route(13).map(|m| m.destination()), Some(0));
        assert_eq!(io.entry(13).map(|e| e.destination()), Some(1));
        io.end_of_interrupt(0x64);
        assert_eq!(rec.route(13).map(|m| m.destination()), Some(1));
        // The next interrupt goes to the new destination.
        io.set_level(13, true);
        let d = rec.delivered();
        assert_eq!(d.last().map(|m| m.destination()), Some(1));
        // A change with no interrupt in flight applies at once.
        io.set_level(13, false);
        io.end_of_interrupt(0x64);
        write_reg(&mut io, 0x10 + 13 * 2 + 1, 2 << 24);
        assert_eq!(rec.route(13).map(|m| m.destination()), Some(2));
    }

    #[test]
    fn eoi_register_clears_remote_irr() {
        let (rec, mut io) = setup();
        program(&mut io, 11, 0x50 | (1 << 15), 0);
        io.set_level(11, true);
        io.set_level(11, false);
        io.write(IOEOI, &0x50u32.to_le_bytes());
        assert!(io.entry(11).is_some_and(|e| !e.remote_irr()));
        assert_eq!(rec.delivered().len(), 1);
    }

    #[test]
    fn remote_irr_and_delivery_status_are_read_only() {
        let (_, mut io) = setup();
        program(
            &mut io,
            3,
            0x33 | REMOTE_IRR_BIT as u32 | DELIVERY_STATUS_BIT as u32,
            0,
        );
        let lo = read_reg(&mut io, REG_REDTBL + 6);
        assert_eq!(lo & (REMOTE_IRR_BIT | DELIVERY_STATUS_BIT) as u32, 0);
    }

    #[test]
    fn masked_edge_is_ignored_as_the_82093aa_says() {
        let (rec, mut io) = setup();
        program(&mut io, 5, 0x35 | (1 << 16), 0);
        rec.take();
        io.pulse(5);
        io.set_level(5, true);
        io.set_level(5, false);
        assert!(rec.delivered().is_empty());
        program(&mut io, 5, 0x35, 0);
        assert!(rec.delivered().is_empty(), "not held pending");
        assert_eq!(io.stats(5).map(|s| s.masked), Some(2));
        io.set_level(5, true);
        assert_eq!(
            rec.delivered().len(),
            1,
            "a new edge after unmask is delivered"
        );
    }

    #[test]
    fn masked_level_fires_on_unmask_if_still_asserted() {
        let (rec, mut io) = setup();
        program(&mut io, 6, 0x36 | (1 << 15) | (1 << 16), 0);
        io.set_level(6, true);
        assert!(rec.delivered().is_empty());
        program(&mut io, 6, 0x36 | (1 << 15), 0);
        assert_eq!(rec.delivered().len(), 1);
    }

    #[test]
    fn route_is_installed_before_unmask_delivery() {
        let (rec, mut io) = setup();
        program(&mut io, 7, 0x37 | (1 << 15) | (1 << 16), 0);
        io.set_level(7, true);
        rec.take();
        program(&mut io, 7, 0x37 | (1 << 15), 2 << 24);
        let log = rec.take();
        let route_pos = log
            .iter()
            .position(|r| matches!(r, Recorded::Route(7, _, Some(_))));
        let trig_pos = log
            .iter()
            .position(|r| matches!(r, Recorded::Trigger(7, Some(_))));
        assert!(route_pos.is_some() && trig_pos.is_some() && route_pos < trig_pos);
    }

    #[test]
    fn hostile_accesses_do_not_panic() {
        let (_, mut io) = setup();
        for off in [0u64, 1, 3, 0x10, 0x11, 0x20, 0x40, 0xfff, 0x1000, u64::MAX] {
            for len in [0usize, 1, 2, 3, 4, 8] {
                let mut buf = vec![0xffu8; len];
                io.read(off, &mut buf);
                io.write(off, &buf);
            }
        }
        for reg in 0..=255u32 {
            write_reg(&mut io, reg, 0xffff_ffff);
            let _ = read_reg(&mut io, reg);
        }
        io.pulse(NUM_PINS);
        io.set_level(usize::MAX, true);
        assert!(io.anomalies() > 0);
    }
}

#[cfg(test)]
mod random_tests {
    use super::*;
    use crate::interrupt::RecordingController;

    /// xorshift64*: a tiny deterministic generator, so failures reproduce.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed | 1;
        move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn random_guest_and_device_traffic_keeps_invariants() {
        for seed in 1..=20u64 {
            let rec = Arc::new(RecordingController::new(24, 64));
            let mut io = IoApic::new(rec.clone());
            let mut next = rng(seed);
            for _ in 0..5000 {
                let r = next();
                let pin = (r >> 8) as usize % (NUM_PINS + 2);
                match r % 7 {
                    0 => io.write(IOREGSEL, &((r >> 16) as u32 & 0x3f).to_le_bytes()),
                    1 => io.write(IOWIN, &((r >> 16) as u32).to_le_bytes()),
                    2 => io.write(IOEOI, &((r >> 16) as u32).to_le_bytes()),
                    3 => io.pulse(pin),
                    4 => io.set_level(pin, r & (1 << 40) != 0),
                    5 => io.end_of_interrupt((r >> 16) as u8),
                    _ => {
                        let mut d = [0u8; 4];
                        io.read((r >> 16) & 0x7f, &mut d);
                    }
                }
                for p in 0..NUM_PINS {
                    let e = io.entry(p).expect("pin");
                    // Remote IRR only ever stands on level-triggered entries.
                    assert!(
                        !e.remote_irr() || e.level_triggered(),
                        "seed {seed} pin {p}"
                    );
                    // A programmed pin routes its own entry, masked or not, except
                    // while a level interrupt is in flight (the route moves at its EOI).
                    if let Some(r) = rec.route(p as u32) {
                        if !e.remote_irr() {
                            assert_eq!(r, e.to_msi(), "seed {seed} pin {p}");
                        }
                    }
                }
            }
        }
    }
}
