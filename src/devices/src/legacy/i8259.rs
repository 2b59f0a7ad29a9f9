//! The PC's two cascaded 8259A programmable interrupt controllers (`--device pic`).
//!
//! faultvisor's platform routes every interrupt through the IOAPIC, and Linux guests
//! are better off without a PIC (it then skips the legacy timer checks). Real-mode
//! code has only the PIC: kvm-unit-tests' `realmode` test raises IRQ 11 through
//! pc-testdev and waits for vector 0x73 in real mode. This model is what such code
//! needs, after the 8259A datasheet:
//!
//! - ICW1–ICW4 initialisation (single or cascade, ICW4 auto-EOI), OCW1 masks, OCW2
//!   non-specific, specific and rotating EOIs and priority setting, OCW3 IRR/ISR
//!   reads, poll mode and special mask mode; the edge/level control registers (ELCR,
//!   0x4d0/0x4d1) of PIIX-class chipsets;
//! - the slave cascaded on the master's IR2;
//! - the reset state is what PC firmware leaves: master vectors at 0x08, slave at 0x70
//!   (the BIOS's), every line edge-triggered and, as after an ICW sequence, unmasked.
//!
//! The output (INTR) goes to vCPU 0's LINT0 as ExtINT: the vCPU loop asks
//! [`Pic::pending`], and when the vCPU can take an interrupt it calls
//! [`Pic::acknowledge`] (the INTA cycle) and injects the vector. Lines are driven by
//! pc-testdev's IRQ ports; platform devices stay on the IOAPIC.

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

/// Master command/data ports.
pub const MASTER_PORT: u16 = 0x20;
/// Slave command/data ports.
pub const SLAVE_PORT: u16 = 0xa0;
/// Edge/level control registers (master, slave).
pub const ELCR_PORT: u16 = 0x4d0;
/// Lines of the pair.
pub const NUM_IRQS: usize = 16;
/// The IRQ of the master the slave is cascaded on.
const CASCADE: u8 = 2;

/// One 8259A.
#[derive(Clone, Debug, Default)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Lines as driven (for edge detection and level mode).
    lines: u8,
    /// Edge (0) or level (1) per line.
    elcr: u8,
    /// ELCR bits that may be set.
    elcr_mask: u8,
    vector_base: u8,
    /// Which initialisation word comes next on the data port (0: none, 2–4).
    next_icw: u8,
    icw4_wanted: bool,
    single: bool,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    /// The line with the lowest priority is `priority_add + 7` (mod 8).
    priority_add: u8,
    read_isr: bool,
    poll: bool,
    special_mask: bool,
}

impl Chip {
    fn firmware_state(base: u8, elcr_mask: u8) -> Self {
        Self {
            vector_base: base,
            elcr_mask,
            ..Default::default()
        }
    }

    /// The highest-priority line set in `bits`, as 0–7.
    fn highest(&self, bits: u8) -> Option<u8> {
        (0..8)
            .map(|i| (i + self.priority_add) & 7)
            .find(|l| bits & (1 << l) != 0)
    }

    /// The line that would interrupt the CPU now.
    fn pending(&self) -> Option<u8> {
        let candidate = self.highest(self.irr & !self.imr)?;
        // In special mask mode, in-service lines block only themselves.
        let isr = if self.special_mask {
            self.isr & !self.imr
        } else {
            self.isr
        };
        match self.highest(isr) {
            // A line in service blocks lines of equal and lower priority.
            Some(s) if self.rank(s) <= self.rank(candidate) => None,
            _ => Some(candidate),
        }
    }

    fn rank(&self, line: u8) -> u8 {
        line.wrapping_sub(self.priority_add) & 7
    }

    fn set_line(&mut self, line: u8, high: bool) {
        let bit = 1 << line;
        if self.elcr & bit != 0 {
            if high {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if high && self.lines & bit == 0 {
            self.irr |= bit;
        }
        if high {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// The INTA cycle for `line`.
    fn ack(&mut self, line: u8) {
        let bit = 1 << line;
        if self.elcr & bit == 0 {
            self.irr &= !bit;
        }
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (line + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
    }

    fn write_command(&mut self, v: u8) {
        if v & 0x10 != 0 {
            // ICW1: the datasheet's initialisation sequence resets the chip's state.
            let (base, elcr, elcr_mask, lines) =
                (self.vector_base, self.elcr, self.elcr_mask, self.lines);
            *self = Self {
                vector_base: base,
                elcr,
                elcr_mask,
                lines,
                icw4_wanted: v & 1 != 0,
                single: v & 2 != 0,
                next_icw: 2,
                ..Default::default()
            };
            return;
        }
        if v & 0x08 != 0 {
            // OCW3.
            if v & 0x04 != 0 {
                self.poll = true;
            }
            if v & 0x02 != 0 {
                self.read_isr = v & 0x01 != 0;
            }
            match (v >> 5) & 3 {
                2 => self.special_mask = false,
                3 => self.special_mask = true,
                _ => {}
            }
            return;
        }
        // OCW2.
        let level = v & 7;
        match v >> 5 {
            0b001 | 0b101 => {
                // Non-specific EOI (and rotate).
                if let Some(l) = self.highest(self.isr) {
                    self.isr &= !(1 << l);
                    if v >> 5 == 0b101 {
                        self.priority_add = (l + 1) & 7;
                    }
                }
            }
            0b011 => self.isr &= !(1 << level),
            0b111 => {
                self.isr &= !(1 << level);
                self.priority_add = (level + 1) & 7;
            }
            0b110 => self.priority_add = (level + 1) & 7,
            0b100 => self.rotate_on_auto_eoi = true,
            0b000 => self.rotate_on_auto_eoi = false,
            _ => {}
        }
    }

    fn write_data(&mut self, v: u8) {
        match self.next_icw {
            2 => {
                self.vector_base = v & 0xf8;
                self.next_icw = match (self.single, self.icw4_wanted) {
                    (false, _) => 3,
                    (true, true) => 4,
                    (true, false) => 0,
                };
            }
            3 => self.next_icw = if self.icw4_wanted { 4 } else { 0 },
            4 => {
                self.auto_eoi = v & 2 != 0;
                self.next_icw = 0;
            }
            _ => self.imr = v,
        }
    }

    /// Poll mode's read: bit 7 set and the line, acknowledged, or 0.
    fn poll_read(&mut self) -> u8 {
        self.poll = false;
        match self.pending() {
            Some(l) => {
                self.ack(l);
                0x80 | l
            }
            None => 0,
        }
    }

    fn read_command(&mut self) -> u8 {
        if self.poll {
            return self.poll_read();
        }
        if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }
}

/// Counters of the pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PicStats {
    /// Vectors handed to the CPU.
    pub acknowledged: u64,
    /// Acknowledge cycles that found nothing (the spurious IRQ 7 / 15 vector).
    pub spurious: u64,
}

/// The master/slave pair.
#[derive(Clone, Debug)]
pub struct Pic {
    chips: [Chip; 2],
    stats: PicStats,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// The pair as PC firmware leaves it (see the module documentation).
    pub fn new() -> Self {
        Self {
            // IRQ 0, 1 and 2 are always edge-triggered; so are 8 and 13 on PIIX.
            chips: [
                Chip::firmware_state(0x08, 0xf8),
                Chip::firmware_state(0x70, 0xde),
            ],
            stats: PicStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> PicStats {
        self.stats
    }

    fn cascade(&mut self) {
        let slave = self.chips[1].pending().is_some();
        self.chips[0].set_line(CASCADE, slave);
    }

    /// Drives IRQ `irq` (0–15) high or low; others are ignored.
    pub fn set_irq(&mut self, irq: usize, high: bool) {
        if irq >= NUM_IRQS {
            return;
        }
        self.chips[irq / 8].set_line((irq % 8) as u8, high);
        self.cascade();
    }

    /// Whether INTR is asserted (an unmasked request not blocked by one in service).
    pub fn pending(&self) -> bool {
        self.chips[0].pending().is_some()
    }

    /// The INTA cycle: the vector for the CPU (the spurious IRQ 7 vector when the
    /// request went away, as on the chip).
    pub fn acknowledge(&mut self) -> u8 {
        let Some(line) = self.chips[0].pending() else {
            self.stats.spurious += 1;
            return self.chips[0].vector_base | 7;
        };
        self.chips[0].ack(line);
        let vector = if line == CASCADE && !self.chips[0].single {
            match self.chips[1].pending() {
                Some(l) => {
                    self.chips[1].ack(l);
                    self.chips[1].vector_base | l
                }
                None => {
                    self.stats.spurious += 1;
                    self.chips[1].vector_base | 7
                }
            }
        } else {
            self.chips[0].vector_base | line
        };
        self.cascade();
        self.stats.acknowledged += 1;
        vector
    }

    fn read_port(&mut self, port: u16) -> u8 {
        let v = match port {
            0x20 => self.chips[0].read_command(),
            0x21 => self.chips[0].imr,
            0xa0 => self.chips[1].read_command(),
            0xa1 => self.chips[1].imr,
            0x4d0 => self.chips[0].elcr,
            0x4d1 => self.chips[1].elcr,
            _ => 0xff,
        };
        self.cascade();
        v
    }

    fn write_port(&mut self, port: u16, v: u8) {
        match port {
            0x20 => self.chips[0].write_command(v),
            0x21 => self.chips[0].write_data(v),
            0xa0 => self.chips[1].write_command(v),
            0xa1 => self.chips[1].write_data(v),
            0x4d0 | 0x4d1 => {
                let c = &mut self.chips[usize::from(port - 0x4d0)];
                c.elcr = v & c.elcr_mask;
            }
            _ => {}
        }
        self.cascade();
    }
}

/// The PIC's three port ranges (0x20, 0xa0 and the ELCR) on the port bus.
pub struct PicPorts {
    pic: std::sync::Arc<std::sync::Mutex<Pic>>,
    base: u16,
}

impl PicPorts {
    /// The port range starting at `base` (one of [`MASTER_PORT`], [`SLAVE_PORT`],
    /// [`ELCR_PORT`]), each two ports wide.
    pub fn new(pic: std::sync::Arc<std::sync::Mutex<Pic>>, base: u16) -> Self {
        Self { pic, base }
    }
}

impl MutDevicePio for PicPorts {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
        if let Some(b) = data.first_mut() {
            *b = crate::sync::lock(&self.pic).read_port(self.base.wrapping_add(offset));
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let Some(&b) = data.first() {
            crate::sync::lock(&self.pic).write_port(self.base.wrapping_add(offset), b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init(p: &mut Pic, master: u8, slave: u8, auto_eoi: bool) {
        let icw4 = if auto_eoi { 0x03 } else { 0x01 };
        for (port, base, icw3) in [(0x20u16, master, 0x04u8), (0xa0, slave, 0x02)] {
            p.write_port(port, 0x11);
            p.write_port(port + 1, base);
            p.write_port(port + 1, icw3);
            p.write_port(port + 1, icw4);
        }
    }

    #[test]
    fn firmware_state_delivers_irq11_at_0x73() {
        let mut p = Pic::new();
        assert!(!p.pending());
        p.set_irq(11, true);
        p.set_irq(11, false);
        // An edge latches in IRR even after the line drops.
        assert!(p.pending());
        assert_eq!(p.acknowledge(), 0x73);
        assert!(!p.pending());
        // In service on both chips until the EOIs.
        assert_eq!(p.chips[1].isr, 1 << 3);
        assert_eq!(p.chips[0].isr, 1 << 2);
        p.write_port(0xa0, 0x20);
        p.write_port(0x20, 0x20);
        assert_eq!((p.chips[0].isr, p.chips[1].isr), (0, 0));
        assert_eq!(p.stats().acknowledged, 1);
    }

    #[test]
    fn masks_priorities_and_eoi() {
        let mut p = Pic::new();
        init(&mut p, 0x20, 0x28, false);
        p.write_port(0x21, 0xff);
        p.set_irq(4, true);
        assert!(!p.pending(), "masked");
        p.write_port(0x21, 0x00);
        assert!(p.pending());
        assert_eq!(p.acknowledge(), 0x24);
        // IRQ 1 has higher priority than IRQ 4 in service: it interrupts; IRQ 6 does not.
        p.set_irq(6, true);
        assert!(!p.pending());
        p.set_irq(1, true);
        assert_eq!(p.acknowledge(), 0x21);
        // Non-specific EOI ends the highest in service (IRQ 1), then IRQ 4.
        p.write_port(0x20, 0x20);
        assert_eq!(p.chips[0].isr, 1 << 4);
        p.write_port(0x20, 0x64); // specific EOI, level 4
        assert_eq!(p.chips[0].isr, 0);
        assert_eq!(p.acknowledge(), 0x26);
    }

    #[test]
    fn level_mode_follows_the_line_and_reads_irr_isr() {
        let mut p = Pic::new();
        init(&mut p, 0x08, 0x70, false);
        p.write_port(0x4d1, 0xff);
        assert_eq!(p.read_port(0x4d1), 0xde);
        p.set_irq(9, true);
        assert!(p.pending());
        p.set_irq(9, false);
        assert!(
            p.chips[1].pending().is_none(),
            "a level request goes away with its line"
        );
        // The master latched the slave's edge on IR2: its INTA finds nothing on the
        // slave and gets the slave's spurious vector, as on the chips.
        assert_eq!(p.acknowledge(), 0x77);
        p.write_port(0x20, 0x20);
        p.set_irq(9, true);
        assert_eq!(p.acknowledge(), 0x71);
        p.write_port(0xa0, 0x0a); // OCW3: read IRR
        assert_eq!(p.read_port(0xa0), 1 << 1, "level line still asserted");
        p.write_port(0xa0, 0x0b); // read ISR
        assert_eq!(p.read_port(0xa0), 1 << 1);
    }

    #[test]
    fn auto_eoi_poll_and_spurious() {
        let mut p = Pic::new();
        init(&mut p, 0x08, 0x70, true);
        p.set_irq(3, true);
        assert_eq!(p.acknowledge(), 0x0b);
        assert_eq!(p.chips[0].isr, 0, "auto-EOI");
        // Nothing pending: the spurious IRQ 7 vector.
        assert_eq!(p.acknowledge(), 0x0f);
        assert_eq!(p.stats().spurious, 1);
        p.set_irq(5, true);
        p.write_port(0x20, 0x0c); // OCW3 poll
        assert_eq!(p.read_port(0x20), 0x85);
        assert!(!p.pending());
    }

    #[test]
    fn hostile_port_traffic_never_panics() {
        let mut p = Pic::new();
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let port = [0x20u16, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1][(x % 6) as usize];
            match (x >> 8) % 4 {
                0 => {
                    let _ = p.read_port(port);
                }
                1 => p.set_irq(((x >> 16) % 20) as usize, x & (1 << 30) != 0),
                2 => {
                    if p.pending() {
                        let _ = p.acknowledge();
                    }
                }
                _ => p.write_port(port, (x >> 24) as u8),
            }
        }
    }
}
