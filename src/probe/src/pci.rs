//! PCI configuration access (ECAM from the MCFG, ports 0xCF8/0xCFC otherwise),
//! enumeration of bus 0, BARs, and MSI / MSI-X programming.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::cpu::{inl, mmio_read32, mmio_write32, outl};

/// ECAM base, or 0 for the legacy ports.
static ECAM: AtomicU64 = AtomicU64::new(0);

/// Capability IDs.
pub const CAP_MSI: u8 = 0x05;
/// MSI-X capability ID.
pub const CAP_MSIX: u8 = 0x11;

/// Uses ECAM at `base` (None: the 0xCF8 ports).
pub fn init(base: Option<u64>) {
    ECAM.store(base.unwrap_or(0), Ordering::SeqCst);
}

/// Whether configuration access goes through ECAM.
pub fn uses_ecam() -> bool {
    ECAM.load(Ordering::SeqCst) != 0
}

/// A function on bus 0..255.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bdf {
    /// Bus.
    pub bus: u8,
    /// Device.
    pub dev: u8,
    /// Function.
    pub func: u8,
}

impl core::fmt::Display for Bdf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

impl Bdf {
    fn ecam_offset(&self, off: u16) -> u64 {
        (u64::from(self.bus) << 20)
            | (u64::from(self.dev) << 15)
            | (u64::from(self.func) << 12)
            | u64::from(off & 0xffc)
    }

    fn cf8(&self, off: u16) -> u32 {
        0x8000_0000
            | (u32::from(self.bus) << 16)
            | (u32::from(self.dev) << 11)
            | (u32::from(self.func) << 8)
            | u32::from(off & 0xfc)
    }

    /// Reads a configuration dword (`off` is rounded down to 4).
    pub fn read32(&self, off: u16) -> u32 {
        let e = ECAM.load(Ordering::Relaxed);
        if e != 0 {
            mmio_read32(e + self.ecam_offset(off))
        } else {
            outl(0xcf8, self.cf8(off));
            inl(0xcfc)
        }
    }

    /// Writes a configuration dword.
    pub fn write32(&self, off: u16, v: u32) {
        let e = ECAM.load(Ordering::Relaxed);
        if e != 0 {
            mmio_write32(e + self.ecam_offset(off), v);
        } else {
            outl(0xcf8, self.cf8(off));
            outl(0xcfc, v);
        }
    }

    /// Reads a configuration word.
    pub fn read16(&self, off: u16) -> u16 {
        (self.read32(off) >> ((off & 2) * 8)) as u16
    }

    /// Writes a configuration word (read-modify-write of its dword).
    pub fn write16(&self, off: u16, v: u16) {
        let sh = (off & 2) * 8;
        let d = (self.read32(off) & !(0xffff << sh)) | (u32::from(v) << sh);
        self.write32(off, d);
    }

    /// Reads a configuration byte.
    pub fn read8(&self, off: u16) -> u8 {
        (self.read32(off) >> ((off & 3) * 8)) as u8
    }

    /// Vendor and device ID.
    pub fn ids(&self) -> (u16, u16) {
        let v = self.read32(0);
        (v as u16, (v >> 16) as u16)
    }

    /// Sets memory-space, I/O-space and bus-master enable; disables INTx if asked.
    pub fn enable(&self, intx_disable: bool) {
        let mut cmd = self.read16(4) | 0x7;
        if intx_disable {
            cmd |= 1 << 10;
        } else {
            cmd &= !(1 << 10);
        }
        self.write16(4, cmd);
    }

    /// The address of memory BAR `i` (64-bit BARs combined); None for I/O or empty BARs.
    pub fn mem_bar(&self, i: u16) -> Option<u64> {
        let lo = self.read32(0x10 + 4 * i);
        if lo & 1 != 0 {
            return None;
        }
        let mut a = u64::from(lo & !0xf);
        if (lo >> 1) & 3 == 2 {
            a |= u64::from(self.read32(0x14 + 4 * i)) << 32;
        }
        (a != 0).then_some(a)
    }

    /// Offsets of the capabilities with ID `id`.
    pub fn find_cap(&self, id: u8) -> Option<u16> {
        if self.read16(6) & (1 << 4) == 0 {
            return None;
        }
        let mut p = u16::from(self.read8(0x34) & 0xfc);
        for _ in 0..48 {
            if p < 0x40 {
                return None;
            }
            if self.read8(p) == id {
                return Some(p);
            }
            p = u16::from(self.read8(p + 1) & 0xfc);
        }
        None
    }
}

/// A function found on the bus.
#[derive(Clone, Copy, Debug)]
pub struct Function {
    /// Where.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code (class, subclass, prog-if).
    pub class: u32,
}

/// Enumerates bus `bus`.
pub fn enumerate(bus: u8) -> Vec<Function> {
    let mut out = Vec::new();
    for dev in 0..32 {
        for func in 0..8 {
            let bdf = Bdf { bus, dev, func };
            let (vendor, device) = bdf.ids();
            if vendor == 0xffff || vendor == 0 {
                if func == 0 {
                    break;
                }
                continue;
            }
            out.push(Function {
                bdf,
                vendor,
                device,
                class: bdf.read32(8) >> 8,
            });
            if func == 0 && bdf.read8(0x0e) & 0x80 == 0 {
                break;
            }
        }
    }
    out
}

/// MSI capability access.
#[derive(Clone, Copy, Debug)]
pub struct Msi {
    /// The function.
    pub bdf: Bdf,
    /// Capability offset.
    pub cap: u16,
}

impl Msi {
    /// Finds the MSI capability of `bdf`.
    pub fn find(bdf: Bdf) -> Option<Self> {
        bdf.find_cap(CAP_MSI).map(|cap| Self { bdf, cap })
    }

    fn control(&self) -> u16 {
        self.bdf.read16(self.cap + 2)
    }

    /// Whether the function has 64-bit addresses.
    pub fn is_64bit(&self) -> bool {
        self.control() & (1 << 7) != 0
    }

    /// Whether it has per-vector masking.
    pub fn has_mask(&self) -> bool {
        self.control() & (1 << 8) != 0
    }

    /// Vectors the function asks for (MMC).
    pub fn capable(&self) -> u32 {
        1 << ((self.control() >> 1) & 7)
    }

    fn data_off(&self) -> u16 {
        self.cap + if self.is_64bit() { 0x0c } else { 0x08 }
    }

    fn mask_off(&self) -> u16 {
        self.data_off() + 4
    }

    /// Programs address/data for `n` (power of two) vectors starting at `vector` and
    /// enables MSI.
    pub fn enable(&self, dest: u32, vector: u8, n: u32) {
        self.enable_raw(crate::apic::msi_address(dest), u16::from(vector), n);
    }

    /// Programs a raw message (e.g. remappable format) for `n` vectors and enables MSI.
    pub fn enable_raw(&self, addr: u64, data: u16, n: u32) {
        if self.has_mask() {
            self.set_mask(0);
        }
        self.bdf.write32(self.cap + 4, addr as u32);
        if self.is_64bit() {
            self.bdf.write32(self.cap + 8, (addr >> 32) as u32);
        }
        self.bdf.write16(self.data_off(), data);
        let mme = n.max(1).trailing_zeros() as u16;
        let ctl = (self.control() & !(0x7 << 4)) | (mme << 4) | 1;
        self.bdf.write16(self.cap + 2, ctl);
    }

    /// Disables MSI.
    pub fn disable(&self) {
        let ctl = self.control() & !1;
        self.bdf.write16(self.cap + 2, ctl);
    }

    /// Sets the per-vector mask bits.
    pub fn set_mask(&self, mask: u32) {
        self.bdf.write32(self.mask_off(), mask);
    }

    /// Reads the per-vector pending bits.
    pub fn pending(&self) -> u32 {
        self.bdf.read32(self.mask_off() + 4)
    }
}

/// MSI-X capability access.
#[derive(Clone, Copy, Debug)]
pub struct Msix {
    /// The function.
    pub bdf: Bdf,
    /// Capability offset.
    pub cap: u16,
    /// Table address.
    pub table: u64,
    /// PBA address.
    pub pba: u64,
    /// Table size.
    pub size: u16,
}

impl Msix {
    /// Finds the MSI-X capability of `bdf` and locates the table and PBA.
    pub fn find(bdf: Bdf) -> Option<Self> {
        let cap = bdf.find_cap(CAP_MSIX)?;
        let size = (bdf.read16(cap + 2) & 0x7ff) + 1;
        let t = bdf.read32(cap + 4);
        let p = bdf.read32(cap + 8);
        let table = bdf.mem_bar((t & 7) as u16)? + u64::from(t & !7);
        let pba = bdf.mem_bar((p & 7) as u16)? + u64::from(p & !7);
        Some(Self {
            bdf,
            cap,
            table,
            pba,
            size,
        })
    }

    /// Programs entry `i` and sets its mask bit to `masked`.
    pub fn program(&self, i: u16, dest: u32, vector: u8, masked: bool) {
        let e = self.table + 16 * u64::from(i);
        let a = crate::apic::msi_address(dest);
        mmio_write32(e, a as u32);
        mmio_write32(e + 4, (a >> 32) as u32);
        mmio_write32(e + 8, u32::from(vector));
        mmio_write32(e + 12, u32::from(masked));
    }

    /// Programs entry `i` with a raw message, unmasked.
    pub fn program_raw(&self, i: u16, addr: u64, data: u32) {
        let e = self.table + 16 * u64::from(i);
        mmio_write32(e, addr as u32);
        mmio_write32(e + 4, (addr >> 32) as u32);
        mmio_write32(e + 8, data);
        mmio_write32(e + 12, 0);
    }

    /// Sets entry `i`'s mask bit.
    pub fn mask(&self, i: u16, masked: bool) {
        mmio_write32(self.table + 16 * u64::from(i) + 12, u32::from(masked));
    }

    /// Whether entry `i`'s pending bit is set.
    pub fn pending(&self, i: u16) -> bool {
        let q = mmio_read32(self.pba + 4 * u64::from(i / 32));
        q & (1 << (i % 32)) != 0
    }

    /// Enables MSI-X (optionally with the function mask set).
    pub fn enable(&self, function_mask: bool) {
        let c = self.bdf.read16(self.cap + 2) & !(3 << 14);
        let c = c | 1 << 15 | if function_mask { 1 << 14 } else { 0 };
        self.bdf.write16(self.cap + 2, c);
    }

    /// Disables MSI-X.
    pub fn disable(&self) {
        let c = self.bdf.read16(self.cap + 2) & !(3 << 14);
        self.bdf.write16(self.cap + 2, c);
    }
}
