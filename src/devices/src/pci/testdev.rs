//! `fv-test`: faultvisor's PCI test device (1234:fa17), the probe guest's handle on the
//! interrupt paths: it raises MSI or MSI-X vectors and drives its INTx line (level or a
//! pulse) into an IOAPIC pin when the guest asks through BAR0.
//!
//! BAR0 (4 KiB MMIO, 32-bit accesses):
//!
//! | offset | name       | access | meaning                                              |
//! |--------|------------|--------|------------------------------------------------------|
//! | 0x00   | ID         | R      | `0xfa17_0001`                                        |
//! | 0x04   | SCRATCH    | RW     | a register to read back (MMIO round trips)           |
//! | 0x08   | RAISE      | W / R  | signal vector n via MSI-X if enabled, else MSI; reads the last result: 0 delivered, 1 pending (masked), 2 dropped, 3 blocked (bus mastering off) |
//! | 0x0c   | INTX       | RW     | 1 asserts, 0 deasserts the INTx line; reads its level |
//! | 0x10   | INTX_PULSE | W      | asserts then deasserts the line (an edge)            |
//! | 0x14   | RAISES     | R      | RAISE writes so far                                  |
//!
//! BAR1 (4 KiB MMIO) holds the MSI-X table (8 entries at 0) and PBA (at 0x800). The
//! function also has an MSI capability (4 vectors, 64-bit, per-vector mask). Interrupt
//! Line in configuration space holds the IOAPIC pin of INTA. Guest accesses of other
//! sizes or offsets read as zero and are ignored, never fatal.

use std::sync::Arc;

use super::config::{reg, ConfigError, PciConfig, CMD_INTX_DISABLE};
use super::msi::Msi;
use super::msix::Msix;
use super::{Bdf, PciDevice, PciInterrupts, Signal};
use crate::interrupt::InterruptController;
use crate::ioapic::IoapicLine;

/// Vendor ID.
pub const VENDOR_ID: u16 = 0x1234;
/// Device ID.
pub const DEVICE_ID: u16 = 0xfa17;
/// Value of the ID register.
pub const ID_VALUE: u32 = 0xfa17_0001;
/// MSI vectors offered.
pub const MSI_VECTORS: u32 = 4;
/// MSI-X vectors offered.
pub const MSIX_VECTORS: u16 = 8;

/// BAR0 register offsets.
pub mod regs {
    /// Identification.
    pub const ID: u64 = 0x00;
    /// Scratch.
    pub const SCRATCH: u64 = 0x04;
    /// Raise a vector / result of the last raise.
    pub const RAISE: u64 = 0x08;
    /// INTx level.
    pub const INTX: u64 = 0x0c;
    /// INTx pulse.
    pub const INTX_PULSE: u64 = 0x10;
    /// Raise counter.
    pub const RAISES: u64 = 0x14;
}

/// The device.
pub struct TestDevice {
    config: PciConfig,
    irqs: PciInterrupts,
    intx: Option<IoapicLine>,
    intx_level: bool,
    scratch: u32,
    last: u32,
    raises: u32,
}

impl TestDevice {
    /// Builds the device at `bdf` with BARs at `bar0` and `bar1` (4 KiB each, 32-bit),
    /// MSI/MSI-X through `irq`, and INTA wired to `intx`.
    pub fn new(
        bdf: Bdf,
        bar0: u64,
        bar1: u64,
        irq: Arc<dyn InterruptController>,
        intx: Option<IoapicLine>,
    ) -> Result<Self, ConfigError> {
        let mut config = PciConfig::new(VENDOR_ID, DEVICE_ID, 0xff_00_00, 1);
        config.set_subsystem(VENDOR_ID, DEVICE_ID);
        config.add_mem32_bar(0, 0x1000, bar0)?;
        config.add_mem32_bar(1, 0x1000, bar1)?;
        if let Some(line) = &intx {
            config.set_intx_pin(line.pin() as u8);
        }
        let rid = bdf.requester_id();
        let msi = Msi::new(&mut config, rid, MSI_VECTORS, irq.clone())?;
        let msix = Msix::new(&mut config, rid, MSIX_VECTORS, (1, 0), (1, 0x800), irq)?;
        Ok(Self {
            config,
            irqs: PciInterrupts {
                msi: Some(msi),
                msix: Some(msix),
                blocked: 0,
            },
            intx,
            intx_level: false,
            scratch: 0,
            last: 2,
            raises: 0,
        })
    }

    fn set_intx(&mut self, level: bool) {
        self.intx_level = level;
        let enabled = self.config.command() & CMD_INTX_DISABLE == 0;
        if let Some(line) = &self.intx {
            line.set_level(level && enabled);
        }
    }

    fn read_reg(&self, off: u64) -> u32 {
        match off {
            regs::ID => ID_VALUE,
            regs::SCRATCH => self.scratch,
            regs::RAISE => self.last,
            regs::INTX => u32::from(self.intx_level),
            regs::RAISES => self.raises,
            _ => 0,
        }
    }

    fn write_reg(&mut self, off: u64, v: u32) {
        match off {
            regs::SCRATCH => self.scratch = v,
            regs::RAISE => {
                self.raises = self.raises.wrapping_add(1);
                let vector = u16::try_from(v).unwrap_or(u16::MAX);
                self.last = match self.irqs.signal(&mut self.config, vector) {
                    Signal::Delivered => 0,
                    Signal::Pending => 1,
                    Signal::Dropped => 2,
                    Signal::Blocked => 3,
                };
            }
            regs::INTX => self.set_intx(v & 1 != 0),
            regs::INTX_PULSE => {
                self.set_intx(true);
                self.set_intx(false);
            }
            _ => {}
        }
    }
}

impl PciDevice for TestDevice {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_write(&mut self, off: usize, data: &[u8]) {
        self.irqs.config_write(&mut self.config, off, data);
        // INTx disable gates the line.
        if off <= reg::COMMAND + 1 && off + data.len() > reg::COMMAND {
            let level = self.intx_level;
            self.set_intx(level);
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if self.irqs.bar_read(bar, offset, data) {
            return;
        }
        data.fill(0);
        if bar == 0 && data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if self.irqs.bar_write(&self.config, bar, offset, data) {
            return;
        }
        if bar == 0 && offset.is_multiple_of(4) {
            if let Ok(b) = <[u8; 4]>::try_from(data) {
                self.write_reg(offset, u32::from_le_bytes(b));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::RecordingController;
    use crate::ioapic::IoApic;
    use std::sync::Mutex;

    fn dev() -> (TestDevice, Arc<RecordingController>, Arc<Mutex<IoApic>>) {
        let rec = Arc::new(RecordingController::new(24, 100));
        let ioapic = Arc::new(Mutex::new(IoApic::new(rec.clone())));
        let line = IoapicLine::new(ioapic.clone(), 17);
        let d = TestDevice::new(
            Bdf::new(3),
            0xc000_0000,
            0xc000_1000,
            rec.clone(),
            Some(line),
        )
        .expect("device");
        (d, rec, ioapic)
    }

    fn wr(d: &mut TestDevice, off: u64, v: u32) {
        d.bar_write(0, off, &v.to_le_bytes());
    }

    fn rd(d: &mut TestDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn registers_and_raise_without_msi_drop() {
        let (mut d, rec, _) = dev();
        assert_eq!(rd(&mut d, regs::ID), ID_VALUE);
        wr(&mut d, regs::SCRATCH, 0x5a5a);
        assert_eq!(rd(&mut d, regs::SCRATCH), 0x5a5a);
        wr(&mut d, regs::RAISE, 0);
        assert_eq!(
            rd(&mut d, regs::RAISE),
            2,
            "dropped: neither MSI nor MSI-X on"
        );
        assert_eq!(rd(&mut d, regs::RAISES), 1);
        assert!(rec.delivered().is_empty());
        assert_eq!(d.config().byte(reg::INTERRUPT), 17);
    }

    #[test]
    fn hostile_accesses_are_harmless() {
        let (mut d, _, _) = dev();
        for off in [0u64, 1, 3, 0xffc, 0xfff, u64::MAX - 3] {
            for len in [1usize, 2, 3, 4, 8] {
                let mut b = vec![0xa5u8; len];
                d.bar_read(0, off, &mut b);
                d.bar_write(0, off, &b);
                d.bar_read(1, off, &mut b);
                d.bar_write(1, off, &b);
                d.bar_read(5, off, &mut b);
            }
        }
        wr(&mut d, regs::RAISE, u32::MAX);
        assert_eq!(rd(&mut d, regs::RAISE), 2);
    }

    #[test]
    fn intx_drives_the_ioapic_line_unless_disabled() {
        let (mut d, _, ioapic) = dev();
        wr(&mut d, regs::INTX, 1);
        assert_eq!(rd(&mut d, regs::INTX), 1);
        let raised = |io: &Arc<Mutex<IoApic>>| crate::sync::lock(io).stats(17).map(|s| s.raised);
        assert_eq!(raised(&ioapic), Some(1));
        wr(&mut d, regs::INTX, 0);
        // INTx disable: a new assertion does not reach the pin.
        let cmd = (CMD_INTX_DISABLE | 0x2).to_le_bytes();
        d.config_write(reg::COMMAND, &cmd);
        wr(&mut d, regs::INTX_PULSE, 1);
        assert_eq!(raised(&ioapic), Some(1));
    }
}
