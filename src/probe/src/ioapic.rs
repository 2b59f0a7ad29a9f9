//! IOAPIC register access through IOREGSEL/IOWIN and the EOI register.

use crate::cpu::{mmio_read32, mmio_write32};

/// Redirection-entry bits.
pub mod rte {
    /// Active low.
    pub const ACTIVE_LOW: u64 = 1 << 13;
    /// Remote IRR (read-only).
    pub const REMOTE_IRR: u64 = 1 << 14;
    /// Level-triggered.
    pub const LEVEL: u64 = 1 << 15;
    /// Masked.
    pub const MASKED: u64 = 1 << 16;
}

/// One IOAPIC as found in the MADT.
#[derive(Clone, Copy, Debug)]
pub struct IoApic {
    /// MMIO base.
    pub base: u64,
    /// IOAPIC ID from the MADT.
    pub id: u8,
    /// First GSI it serves.
    pub gsi_base: u32,
}

impl IoApic {
    /// Reads register `r`.
    pub fn read(&self, r: u32) -> u32 {
        mmio_write32(self.base, r);
        mmio_read32(self.base + 0x10)
    }

    /// Writes register `r`.
    pub fn write(&self, r: u32, v: u32) {
        mmio_write32(self.base, r);
        mmio_write32(self.base + 0x10, v);
    }

    /// The version register: (version, number of pins).
    pub fn version(&self) -> (u8, u32) {
        let v = self.read(1);
        ((v & 0xff) as u8, ((v >> 16) & 0xff) + 1)
    }

    /// Reads the redirection entry of `pin`.
    pub fn rte(&self, pin: u32) -> u64 {
        let lo = self.read(0x10 + 2 * pin);
        let hi = self.read(0x11 + 2 * pin);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Writes the redirection entry of `pin` (high word first, so that an unmasking low
    /// word sees the final destination).
    pub fn set_rte(&self, pin: u32, v: u64) {
        self.write(0x11 + 2 * pin, (v >> 32) as u32);
        self.write(0x10 + 2 * pin, v as u32);
    }

    /// A fixed-delivery entry for `vector` on APIC `dest`.
    pub fn entry(vector: u8, dest: u32, level: bool, masked: bool) -> u64 {
        let mut v = u64::from(vector) | (u64::from(dest & 0xff) << 56);
        if level {
            v |= rte::LEVEL;
        }
        if masked {
            v |= rte::MASKED;
        }
        v
    }

    /// Masks `pin`.
    pub fn mask(&self, pin: u32) {
        let lo = self.read(0x10 + 2 * pin);
        self.write(0x10 + 2 * pin, lo | rte::MASKED as u32);
    }

    /// Unmasks `pin`.
    pub fn unmask(&self, pin: u32) {
        let lo = self.read(0x10 + 2 * pin);
        self.write(0x10 + 2 * pin, lo & !(rte::MASKED as u32));
    }

    /// Writes the EOI register (IOAPIC version 0x20 and later).
    pub fn eoi(&self, vector: u8) {
        mmio_write32(self.base + 0x40, u32::from(vector));
    }
}
