//! An edu-compatible PCI device (QEMU's educational device, 1234:11e8), whose DMA goes
//! through the VT-d unit like any device's.
//!
//! BAR0 (1 MiB MMIO): 0x00 ID `0x010000ed`; 0x04 liveness (reads back the inverse of
//! what was written); 0x08 factorial; 0x20 status (bit 0 computing, bit 7 raise an
//! interrupt after the factorial); 0x24 interrupt status; 0x60 raise / 0x64 acknowledge
//! interrupt bits; 0x80/0x88/0x90/0x98 DMA source, destination, count and command (bit 0
//! run, bit 1 direction: 0 RAM → device, 1 device → RAM, bit 2 interrupt 0x100 when
//! done). The device side of a transfer is its 4 KiB buffer at 0x40000. Interrupts use
//! MSI when enabled, INTA otherwise. Registers below 0x80 take 4-byte accesses; the DMA
//! registers 4- or 8-byte ones.
//!
//! Differences from QEMU, all about errors: QEMU aborts the whole VM when a transfer's
//! buffer range falls outside 0x40000..0x41000. Here a failed transfer — that, or a DMA
//! the IOMMU refuses (the unit records the fault and the guest sees it), or an address
//! that is not RAM — moves no byte, clears the run bit, sets command bit 8 (error) and
//! interrupt bit 0x200 alongside 0x100, and register 0xa0 says why (1 buffer range,
//! 2 IOMMU fault with the reason in bits 15:8, 3 not RAM, 4 bus mastering off: like
//! QEMU, no DMA without the command register's bus-master bit). Transfers complete before the
//! command write returns. DMA addresses are not clamped to QEMU's default 28-bit mask.

use std::sync::Arc;

use super::config::{ConfigError, PciConfig, CMD_BUS_MASTER};
use super::msi::Msi;
use super::{Bdf, PciDevice, PciInterrupts};
use crate::interrupt::InterruptController;
use crate::ioapic::IoapicLine;
use crate::iommu::{DmaError, DmaHandle};

/// Vendor ID (QEMU).
pub const VENDOR_ID: u16 = 0x1234;
/// Device ID.
pub const DEVICE_ID: u16 = 0x11e8;
/// BAR0 size.
pub const BAR0_SIZE: u64 = 1 << 20;
/// Device-side address of the DMA buffer.
pub const DMA_START: u64 = 0x40000;
/// DMA buffer size.
pub const DMA_SIZE: u64 = 4096;

/// Command bits.
pub mod cmd {
    /// Start / running.
    pub const RUN: u64 = 1 << 0;
    /// Direction: device buffer → RAM.
    pub const TO_RAM: u64 = 1 << 1;
    /// Raise interrupt 0x100 when done.
    pub const IRQ: u64 = 1 << 2;
    /// The last transfer failed (faultvisor extension).
    pub const ERROR: u64 = 1 << 8;
}

/// Interrupt status bits.
pub mod irq {
    /// Factorial done.
    pub const FACT: u32 = 0x1;
    /// DMA done.
    pub const DMA: u32 = 0x100;
    /// DMA failed (faultvisor extension).
    pub const DMA_ERROR: u32 = 0x200;
}

/// Status bit 7: raise interrupt 0x1 when a factorial is done. (Bit 0, "computing",
/// never reads 1: the factorial completes during the register write.)
const STATUS_IRQFACT: u32 = 0x80;

/// Why the last DMA failed (register 0xa0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaFailure {
    /// The device-side range left the 4 KiB buffer.
    BufferRange,
    /// The IOMMU refused it.
    Iommu(u8),
    /// The address is not RAM.
    NotRam,
    /// Bus mastering is off in the command register.
    NoBusMaster,
}

/// The device.
pub struct Edu {
    config: PciConfig,
    irqs: PciInterrupts,
    intx: Option<IoapicLine>,
    dma: DmaHandle,
    liveness: u32,
    fact: u32,
    status: u32,
    irq_status: u32,
    src: u64,
    dst: u64,
    cnt: u64,
    cmd: u64,
    error: u32,
    buf: Vec<u8>,
    transfers: u64,
    failures: u64,
}

impl Edu {
    /// Builds the device at `bdf`, BAR0 at `bar0`, DMA through `dma`.
    pub fn new(
        bdf: Bdf,
        bar0: u64,
        irq: Arc<dyn InterruptController>,
        intx: Option<IoapicLine>,
        dma: DmaHandle,
    ) -> Result<Self, ConfigError> {
        let mut config = PciConfig::new(VENDOR_ID, DEVICE_ID, 0xff_00_00, 0x10);
        config.add_mem32_bar(0, BAR0_SIZE, bar0)?;
        if let Some(line) = &intx {
            config.set_intx_pin(line.pin() as u8);
        }
        let msi = Msi::new(&mut config, bdf.requester_id(), 1, irq)?;
        Ok(Self {
            config,
            irqs: PciInterrupts {
                msi: Some(msi),
                msix: None,
                blocked: 0,
            },
            intx,
            dma,
            liveness: 0,
            fact: 0,
            status: 0,
            irq_status: 0,
            src: 0,
            dst: 0,
            cnt: 0,
            cmd: 0,
            error: 0,
            buf: vec![0; DMA_SIZE as usize],
            transfers: 0,
            failures: 0,
        })
    }

    /// (transfers done, transfers failed).
    pub fn dma_counts(&self) -> (u64, u64) {
        (self.transfers, self.failures)
    }

    fn msi_enabled(&self) -> bool {
        self.irqs
            .msi
            .as_ref()
            .is_some_and(|m| m.enabled(&self.config))
    }

    fn raise(&mut self, bits: u32) {
        self.irq_status |= bits;
        if self.irq_status == 0 {
            return;
        }
        if self.msi_enabled() {
            let _ = self.irqs.signal(&mut self.config, 0);
        } else if let Some(l) = &self.intx {
            l.set_level(true);
        }
    }

    fn lower(&mut self, bits: u32) {
        self.irq_status &= !bits;
        if self.irq_status == 0 && !self.msi_enabled() {
            if let Some(l) = &self.intx {
                l.set_level(false);
            }
        }
    }

    fn buffer_range(&self, at: u64) -> Option<std::ops::Range<usize>> {
        let end = at.checked_add(self.cnt)?;
        if at < DMA_START || end > DMA_START + DMA_SIZE || end <= at {
            return None;
        }
        Some((at - DMA_START) as usize..(end - DMA_START) as usize)
    }

    fn run_dma(&mut self) {
        let result = if self.config.command() & CMD_BUS_MASTER == 0 {
            Err(DmaFailure::NoBusMaster)
        } else if self.cmd & cmd::TO_RAM == 0 {
            match self.buffer_range(self.dst) {
                None => Err(DmaFailure::BufferRange),
                Some(r) => {
                    let mut tmp = vec![0u8; r.len()];
                    self.dma
                        .read(self.src, &mut tmp)
                        .map(|()| self.buf[r].copy_from_slice(&tmp))
                        .map_err(failure)
                }
            }
        } else {
            match self.buffer_range(self.src) {
                None => Err(DmaFailure::BufferRange),
                Some(r) => self.dma.write(self.dst, &self.buf[r]).map_err(failure),
            }
        };
        self.cmd &= !cmd::RUN;
        match result {
            Ok(()) => {
                self.transfers += 1;
                self.cmd &= !cmd::ERROR;
                self.error = 0;
                if self.cmd & cmd::IRQ != 0 {
                    self.raise(irq::DMA);
                }
            }
            Err(f) => {
                self.failures += 1;
                self.cmd |= cmd::ERROR;
                self.error = match f {
                    DmaFailure::BufferRange => 1,
                    DmaFailure::Iommu(r) => 2 | (u32::from(r) << 8),
                    DmaFailure::NotRam => 3,
                    DmaFailure::NoBusMaster => 4,
                };
                log::debug!(
                    "edu {:04x}: DMA {:#x} -> {:#x} ({} bytes) failed: {f:?}",
                    self.dma.sid(),
                    self.src,
                    self.dst,
                    self.cnt
                );
                if self.cmd & cmd::IRQ != 0 {
                    self.raise(irq::DMA | irq::DMA_ERROR);
                }
            }
        }
    }

    fn read_reg(&self, off: u64) -> u64 {
        match off {
            0x00 => 0x0100_00ed,
            0x04 => u64::from(self.liveness),
            0x08 => u64::from(self.fact),
            0x20 => u64::from(self.status),
            0x24 => u64::from(self.irq_status),
            0x80 => self.src,
            0x88 => self.dst,
            0x90 => self.cnt,
            0x98 => self.cmd,
            0xa0 => u64::from(self.error),
            _ => 0,
        }
    }

    fn write_reg(&mut self, off: u64, v: u64) {
        let v32 = v as u32;
        match off {
            0x04 => self.liveness = !v32,
            0x08 => {
                // n! mod 2^32 is 0 from n = 34 on (it has 32 factors of two), so a
                // hostile n costs at most 34 multiplications.
                self.fact = if v32 >= 34 {
                    0
                } else {
                    (1..=v32).fold(1u32, |a, n| a.wrapping_mul(n))
                };
                if self.status & STATUS_IRQFACT != 0 {
                    self.raise(irq::FACT);
                }
            }
            0x20 => self.status = v32 & STATUS_IRQFACT,
            0x60 => self.raise(v32),
            0x64 => self.lower(v32),
            0x80 => self.src = v,
            0x88 => self.dst = v,
            0x90 => self.cnt = v,
            0x98 if self.cmd & cmd::RUN == 0 => {
                self.cmd = v & (cmd::RUN | cmd::TO_RAM | cmd::IRQ) | (self.cmd & cmd::ERROR);
                if self.cmd & cmd::RUN != 0 {
                    self.run_dma();
                }
            }
            _ => {}
        }
    }
}

fn failure(e: DmaError) -> DmaFailure {
    match e {
        DmaError::Fault { reason, .. } => DmaFailure::Iommu(reason as u8),
        // edu's DMA engine moves whole buffers, never a lone dword: a transfer that
        // touches the interrupt range is blocked like one that reaches no RAM.
        DmaError::NotRam { .. } | DmaError::Interrupt { .. } => DmaFailure::NotRam,
    }
}

impl PciDevice for Edu {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_write(&mut self, off: usize, data: &[u8]) {
        self.irqs.config_write(&mut self.config, off, data);
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let ok = bar == 0
            && offset.is_multiple_of(data.len() as u64)
            && (data.len() == 4 || (data.len() == 8 && offset >= 0x80));
        if ok {
            let v = self.read_reg(offset);
            data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let ok = bar == 0
            && offset.is_multiple_of(data.len() as u64)
            && (data.len() == 4 || (data.len() == 8 && offset >= 0x80));
        if ok {
            let mut b = [0u8; 8];
            b[..data.len()].copy_from_slice(data);
            self.write_reg(offset, u64::from_le_bytes(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{reg, CMD_MEMORY};
    use super::*;
    use crate::interrupt::{Recorded, RecordingController};
    use crate::iommu::Vtd;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn edu(dma: DmaHandle, rec: Arc<RecordingController>) -> Edu {
        let mut d = Edu::new(Bdf::new(4), 0xc000_0000, rec, None, dma).expect("edu");
        d.config_write(reg::COMMAND, &(CMD_MEMORY | CMD_BUS_MASTER).to_le_bytes());
        d
    }

    fn wr(d: &mut Edu, off: u64, v: u64, len: usize) {
        d.bar_write(0, off, &v.to_le_bytes()[..len]);
    }

    fn rd(d: &mut Edu, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("mem")
    }

    #[test]
    fn id_liveness_factorial_and_interrupt_bits() {
        let m = mem();
        let rec = Arc::new(RecordingController::new(24, 100));
        let mut d = edu(DmaHandle::direct(m, 0x20, None), rec.clone());
        assert_eq!(rd(&mut d, 0x00), 0x0100_00ed);
        wr(&mut d, 0x04, 0x1234_5678, 4);
        assert_eq!(rd(&mut d, 0x04), !0x1234_5678u32);
        wr(&mut d, 0x08, 10, 4);
        assert_eq!(rd(&mut d, 0x08), 3_628_800);
        wr(&mut d, 0x08, 33, 4);
        assert_eq!(rd(&mut d, 0x08), 0x8000_0000, "33! mod 2^32");
        wr(&mut d, 0x08, u64::from(u32::MAX), 4);
        assert_eq!(rd(&mut d, 0x08), 0, "instant, however large n is");
        wr(&mut d, 0x60, 0x30, 4);
        assert_eq!(rd(&mut d, 0x24), 0x30);
        wr(&mut d, 0x64, 0x10, 4);
        assert_eq!(rd(&mut d, 0x24), 0x20);
        // Narrow accesses below 0x80 are ignored (read as all ones), as on QEMU.
        let mut b = [0u8; 2];
        d.bar_read(0, 0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        assert!(
            rec.take()
                .iter()
                .all(|r| !matches!(r, Recorded::Trigger(..))),
            "no MSI without enable"
        );
    }

    #[test]
    fn dma_both_ways_without_iommu() {
        let m = mem();
        m.write_slice(b"hello edu", GuestAddress(0x1000))
            .expect("w");
        let rec = Arc::new(RecordingController::new(24, 100));
        let mut d = edu(DmaHandle::direct(m.clone(), 0x20, None), rec);
        wr(&mut d, 0x80, 0x1000, 8);
        wr(&mut d, 0x88, DMA_START, 8);
        wr(&mut d, 0x90, 9, 8);
        wr(&mut d, 0x98, cmd::RUN | cmd::IRQ, 4);
        assert_eq!(rd(&mut d, 0x98) & 1, 0, "done before the write returned");
        assert_eq!(rd(&mut d, 0x24), irq::DMA);
        wr(&mut d, 0x80, DMA_START, 8);
        wr(&mut d, 0x88, 0x2000, 8);
        wr(&mut d, 0x98, cmd::RUN | cmd::TO_RAM, 4);
        let mut b = [0u8; 9];
        m.read_slice(&mut b, GuestAddress(0x2000)).expect("r");
        assert_eq!(&b, b"hello edu");
        assert_eq!(d.dma_counts(), (2, 0));
    }

    #[test]
    fn no_dma_without_bus_mastering() {
        let m = mem();
        let rec = Arc::new(RecordingController::new(24, 100));
        let mut d = edu(DmaHandle::direct(m, 0x20, None), rec);
        d.config_write(reg::COMMAND, &CMD_MEMORY.to_le_bytes());
        wr(&mut d, 0x80, 0x1000, 8);
        wr(&mut d, 0x88, DMA_START, 8);
        wr(&mut d, 0x90, 8, 8);
        wr(&mut d, 0x98, cmd::RUN, 4);
        assert_eq!(rd(&mut d, 0xa0), 4);
        assert_eq!(d.dma_counts(), (0, 1));
    }

    #[test]
    fn out_of_range_buffer_is_an_error_not_an_abort() {
        let m = mem();
        let rec = Arc::new(RecordingController::new(24, 100));
        let mut d = edu(DmaHandle::direct(m.clone(), 0x20, None), rec);
        for (dst, cnt) in [
            (DMA_START + 4000, 200),
            (0, 10),
            (DMA_START, 0),
            (u64::MAX - 2, 5),
        ] {
            wr(&mut d, 0x80, 0x1000, 8);
            wr(&mut d, 0x88, dst, 8);
            wr(&mut d, 0x90, cnt, 8);
            wr(&mut d, 0x98, cmd::RUN | cmd::IRQ, 4);
            assert_eq!(rd(&mut d, 0x98) & 0x101, 0x100, "error bit, not running");
            assert_eq!(rd(&mut d, 0xa0), 1);
            assert_eq!(rd(&mut d, 0x24) & irq::DMA_ERROR, irq::DMA_ERROR);
        }
    }

    #[test]
    fn iommu_fault_reaches_the_guest_and_moves_nothing() {
        let m = mem();
        m.write_slice(&[0x77; 64], GuestAddress(0x3000)).expect("w");
        let rec = Arc::new(RecordingController::new(24, 100));
        let vtd = Arc::new(Vtd::new(m.clone(), rec.clone()));
        // Root table with no entries, translation on.
        vtd.write(crate::iommu::reg::RTADDR, &0x10_0000u64.to_le_bytes());
        vtd.write(crate::iommu::reg::GCMD, &(1u32 << 30).to_le_bytes());
        vtd.write(crate::iommu::reg::GCMD, &(1u32 << 31).to_le_bytes());
        let mut d = edu(vtd.handle(0x20), rec);
        d.buf.fill(0xab);
        wr(&mut d, 0x80, DMA_START, 8);
        wr(&mut d, 0x88, 0x3000, 8);
        wr(&mut d, 0x90, 64, 8);
        wr(&mut d, 0x98, cmd::RUN | cmd::TO_RAM, 4);
        assert_eq!(
            rd(&mut d, 0xa0),
            2 | (1 << 8),
            "IOMMU fault, root entry not present"
        );
        let mut b = [0u8; 64];
        m.read_slice(&mut b, GuestAddress(0x3000)).expect("r");
        assert!(b.iter().all(|&x| x == 0x77));
        let recs: Vec<_> = vtd
            .fault_records()
            .into_iter()
            .filter(|f| f.pending)
            .collect();
        assert_eq!(recs.len(), 1);
        assert_eq!(
            (recs[0].sid, recs[0].reason, recs[0].read),
            (0x20, 1, false)
        );
    }
}
