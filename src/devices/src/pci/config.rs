//! PCI configuration space of one function: registers, write masks, BARs and the
//! capability list (PCI Local Bus 3.0 §6, PCIe 4.0 §7.5 for the 4 KiB extended space).
//!
//! Semantics live in masks rather than scattered `if`s: `wmask` says which bits the guest
//! may write, `w1c` which bits it clears by writing 1. BAR sizing falls out of the mask:
//! after the guest writes all ones, a BAR reads back `!(size - 1) | flags`.

/// Size of the configuration space (PCIe extended, reachable through ECAM).
pub const CONFIG_SIZE: usize = 4096;
const NUM_REGS: usize = CONFIG_SIZE / 4;

/// Register offsets of the type-0 header.
pub mod reg {
    /// Vendor ID (15:0) and device ID (31:16).
    pub const ID: usize = 0x00;
    /// Command (15:0) and status (31:16).
    pub const COMMAND: usize = 0x04;
    /// Revision (7:0) and class code (31:8).
    pub const CLASS: usize = 0x08;
    /// Cache line, latency, header type (23:16), BIST.
    pub const HEADER: usize = 0x0c;
    /// First BAR.
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor and subsystem ID.
    pub const SUBSYSTEM: usize = 0x2c;
    /// Capability pointer (7:0).
    pub const CAP_PTR: usize = 0x34;
    /// Interrupt line (7:0) and pin (15:8).
    pub const INTERRUPT: usize = 0x3c;
}

/// Command register: I/O space decode.
pub const CMD_IO: u16 = 1 << 0;
/// Command register: memory space decode.
pub const CMD_MEMORY: u16 = 1 << 1;
/// Command register: bus master.
pub const CMD_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx disable.
pub const CMD_INTX_DISABLE: u16 = 1 << 10;
/// Status register: capabilities list present.
pub const STATUS_CAP_LIST: u16 = 1 << 4;

/// First byte of the capability area.
pub const CAP_START: usize = 0x40;
/// End of the legacy configuration space (capabilities must fit below).
pub const CAP_END: usize = 0x100;

/// Capability IDs used here.
pub mod cap_id {
    /// MSI.
    pub const MSI: u8 = 0x05;
    /// Vendor specific (virtio uses it).
    pub const VENDOR: u8 = 0x09;
    /// PCI Express.
    pub const PCIE: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// What a BAR maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Mem32,
    /// 64-bit memory BAR (uses two BAR registers).
    Mem64,
    /// I/O port BAR.
    Io,
}

/// A BAR the device declared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// Kind of region.
    pub kind: BarKind,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// Prefetchable (memory BARs only).
    pub prefetchable: bool,
}

/// Errors of building a configuration space (VMM-side mistakes, not guest input).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// BAR index out of range or already used.
    #[error("BAR {0} is out of range or already in use")]
    BadBar(usize),
    /// BAR size not a power of two or too small.
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes")]
    BadBarSize(u64),
    /// The capability does not fit in the legacy configuration space.
    #[error("capability of {0} bytes does not fit in configuration space")]
    NoCapabilitySpace(usize),
}

/// Configuration space of one PCI function.
#[derive(Clone)]
pub struct PciConfig {
    regs: [u32; NUM_REGS],
    wmask: [u32; NUM_REGS],
    w1c: [u32; NUM_REGS],
    bars: [Option<Bar>; 6],
    /// BAR registers in use (a 64-bit BAR takes two).
    taken: [bool; 6],
    next_cap: usize,
    last_cap: Option<usize>,
}

impl std::fmt::Debug for PciConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfig")
            .field("id", &format_args!("{:#010x}", self.regs[0]))
            .field("bars", &self.bars)
            .finish()
    }
}

impl PciConfig {
    /// A type-0 header with the given identity. Command bits for memory, I/O, bus master
    /// and INTx disable are writable; everything else starts read-only.
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut c = Self {
            regs: [0; NUM_REGS],
            wmask: [0; NUM_REGS],
            w1c: [0; NUM_REGS],
            bars: [None; 6],
            taken: [false; 6],
            next_cap: CAP_START,
            last_cap: None,
        };
        c.regs[reg::ID / 4] = u32::from(vendor) | (u32::from(device) << 16);
        c.regs[reg::CLASS / 4] = (class << 8) | u32::from(revision);
        c.wmask[reg::COMMAND / 4] =
            u32::from(CMD_IO | CMD_MEMORY | CMD_BUS_MASTER | CMD_INTX_DISABLE);
        // Status error bits are write-1-to-clear.
        c.w1c[reg::COMMAND / 4] = 0xf900_0000;
        // Cache line size and latency timer are plain storage.
        c.wmask[reg::HEADER / 4] = 0x0000_ffff;
        // Interrupt line is scratch storage for the OS.
        c.wmask[reg::INTERRUPT / 4] = 0xff;
        c
    }

    /// Sets the subsystem vendor and ID.
    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.regs[reg::SUBSYSTEM / 4] = u32::from(vendor) | (u32::from(id) << 16);
    }

    /// Sets the header type byte (0 for endpoints; bit 7 multi-function).
    pub fn set_header_type(&mut self, t: u8) {
        let r = &mut self.regs[reg::HEADER / 4];
        *r = (*r & !0x00ff_0000) | (u32::from(t) << 16);
    }

    /// Vendor ID.
    pub fn vendor_id(&self) -> u16 {
        self.regs[0] as u16
    }

    /// Device ID.
    pub fn device_id(&self) -> u16 {
        (self.regs[0] >> 16) as u16
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[reg::COMMAND / 4] as u16
    }

    /// Declares BAR `idx` and programs its initial address (the firmware's job, done by
    /// the VMM since there is no firmware).
    pub fn add_bar(&mut self, idx: usize, bar: Bar, address: u64) -> Result<(), ConfigError> {
        let regs_needed = if bar.kind == BarKind::Mem64 { 2 } else { 1 };
        if idx + regs_needed > 6 || self.taken[idx..idx + regs_needed].iter().any(|t| *t) {
            return Err(ConfigError::BadBar(idx));
        }
        if !bar.size.is_power_of_two() || bar.size < 16 {
            return Err(ConfigError::BadBarSize(bar.size));
        }
        let r = reg::BAR0 / 4 + idx;
        let mask = !(bar.size - 1);
        match bar.kind {
            BarKind::Io => {
                self.regs[r] = (address as u32 & mask as u32) | 1;
                self.wmask[r] = mask as u32 & 0xffff_fffc;
            }
            BarKind::Mem32 => {
                let pf = if bar.prefetchable { 1 << 3 } else { 0 };
                self.regs[r] = (address as u32 & mask as u32) | pf;
                self.wmask[r] = mask as u32 & 0xffff_fff0;
            }
            BarKind::Mem64 => {
                let pf = if bar.prefetchable { 1 << 3 } else { 0 };
                self.regs[r] = (address as u32 & mask as u32) | pf | (2 << 1);
                self.wmask[r] = mask as u32 & 0xffff_fff0;
                self.regs[r + 1] = (address >> 32) as u32;
                self.wmask[r + 1] = (mask >> 32) as u32;
            }
        }
        self.bars[idx] = Some(bar);
        self.taken[idx..idx + regs_needed].fill(true);
        Ok(())
    }

    /// Declares a 32-bit, non-prefetchable memory BAR `idx` of `size` bytes at `address`.
    pub fn add_mem32_bar(
        &mut self,
        idx: usize,
        size: u64,
        address: u64,
    ) -> Result<(), ConfigError> {
        let bar = Bar {
            kind: BarKind::Mem32,
            size,
            prefetchable: false,
        };
        self.add_bar(idx, bar, address)
    }

    /// Wires INTA to IOAPIC pin `pin` (Interrupt Pin = 1, Interrupt Line = the pin).
    pub fn set_intx_pin(&mut self, pin: u8) {
        self.set_byte(reg::INTERRUPT, pin);
        self.set_byte(reg::INTERRUPT + 1, 1);
    }

    /// The BAR declared at `idx`.
    pub fn bar(&self, idx: usize) -> Option<Bar> {
        self.bars.get(idx).copied().flatten()
    }

    /// The address BAR `idx` currently decodes (as the guest programmed it).
    pub fn bar_address(&self, idx: usize) -> Option<u64> {
        let bar = self.bar(idx)?;
        let r = reg::BAR0 / 4 + idx;
        Some(match bar.kind {
            BarKind::Io => u64::from(self.regs[r] & !0x3),
            BarKind::Mem32 => u64::from(self.regs[r] & !0xf),
            BarKind::Mem64 => u64::from(self.regs[r] & !0xf) | (u64::from(self.regs[r + 1]) << 32),
        })
    }

    /// Finds which BAR of this function decodes guest-physical `addr` (memory space),
    /// returning the BAR index and the offset into it. Honours the memory-decode bit.
    pub fn find_mem_bar(&self, addr: u64) -> Option<(usize, u64)> {
        if self.command() & CMD_MEMORY == 0 {
            return None;
        }
        (0..6).find_map(|i| {
            let bar = self.bar(i)?;
            if bar.kind == BarKind::Io {
                return None;
            }
            let base = self.bar_address(i)?;
            let off = addr.checked_sub(base)?;
            (off < bar.size).then_some((i, off))
        })
    }

    /// Appends a capability (`id`, then `body` after the next pointer); returns its
    /// offset. `body_wmask` gives the writable bits of the body, byte by byte.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        body_wmask: &[u8],
    ) -> Result<usize, ConfigError> {
        let len = 2 + body.len();
        let off = self.next_cap;
        let end = off + len;
        if end > CAP_END {
            return Err(ConfigError::NoCapabilitySpace(len));
        }
        self.set_byte(off, id);
        self.set_byte(off + 1, 0);
        for (i, b) in body.iter().enumerate() {
            self.set_byte(off + 2 + i, *b);
        }
        for (i, m) in body_wmask.iter().take(body.len()).enumerate() {
            self.set_wmask_byte(off + 2 + i, *m);
        }
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, off as u8),
            None => {
                self.set_byte(reg::CAP_PTR, off as u8);
                let st = &mut self.regs[reg::COMMAND / 4];
                *st |= u32::from(STATUS_CAP_LIST) << 16;
            }
        }
        self.last_cap = Some(off);
        // Keep capabilities dword aligned.
        self.next_cap = (end + 3) & !3;
        Ok(off)
    }

    /// Walks the capability list as a guest would: (id, offset) pairs. Bounded, so a
    /// corrupt list (a loop) ends.
    pub fn capabilities(&self) -> Vec<(u8, usize)> {
        let mut out = Vec::new();
        if (self.regs[reg::COMMAND / 4] >> 16) as u16 & STATUS_CAP_LIST == 0 {
            return out;
        }
        let mut ptr = usize::from(self.byte(reg::CAP_PTR) & 0xfc);
        while ptr >= CAP_START && out.len() < 48 {
            out.push((self.byte(ptr), ptr));
            ptr = usize::from(self.byte(ptr + 1) & 0xfc);
        }
        out
    }

    /// Reads a byte (VMM side).
    pub fn byte(&self, off: usize) -> u8 {
        self.regs
            .get(off / 4)
            .map_or(0, |r| (r >> ((off % 4) * 8)) as u8)
    }

    /// Reads a 16-bit value (VMM side).
    pub fn word(&self, off: usize) -> u16 {
        u16::from(self.byte(off)) | (u16::from(self.byte(off + 1)) << 8)
    }

    /// Reads a 32-bit register (VMM side); `off` is rounded down to a dword.
    pub fn dword(&self, off: usize) -> u32 {
        self.regs.get(off / 4).copied().unwrap_or(0)
    }

    /// Sets a byte regardless of the write mask (VMM side).
    pub fn set_byte(&mut self, off: usize, v: u8) {
        if let Some(r) = self.regs.get_mut(off / 4) {
            let sh = (off % 4) * 8;
            *r = (*r & !(0xff << sh)) | (u32::from(v) << sh);
        }
    }

    /// Sets a 16-bit value regardless of the write mask (VMM side).
    pub fn set_word(&mut self, off: usize, v: u16) {
        self.set_byte(off, v as u8);
        self.set_byte(off + 1, (v >> 8) as u8);
    }

    /// Sets a dword regardless of the write mask (VMM side).
    pub fn set_dword(&mut self, off: usize, v: u32) {
        if let Some(r) = self.regs.get_mut(off / 4) {
            *r = v;
        }
    }

    fn set_wmask_byte(&mut self, off: usize, m: u8) {
        if let Some(r) = self.wmask.get_mut(off / 4) {
            let sh = (off % 4) * 8;
            *r = (*r & !(0xff << sh)) | (u32::from(m) << sh);
        }
    }

    /// Makes bits of a dword writable by the guest (VMM side).
    pub fn set_wmask(&mut self, off: usize, mask: u32) {
        if let Some(r) = self.wmask.get_mut(off / 4) {
            *r = mask;
        }
    }

    /// Whether a guest access of `len` bytes at `off` is well formed: 1, 2 or 4 bytes,
    /// naturally aligned, inside the configuration space.
    pub fn valid_access(off: usize, len: usize) -> bool {
        matches!(len, 1 | 2 | 4) && off.is_multiple_of(len) && off + len <= CONFIG_SIZE
    }

    /// Guest read of `data.len()` bytes at byte `off`. Accesses that are not 1, 2 or 4
    /// bytes, straddle a dword or fall outside the space read as all ones.
    pub fn read(&self, off: usize, data: &mut [u8]) {
        if !Self::valid_access(off, data.len()) {
            data.fill(0xff);
            return;
        }
        let v = self.regs[off / 4] >> ((off % 4) * 8);
        for (i, b) in data.iter_mut().enumerate() {
            *b = (v >> (i * 8)) as u8;
        }
    }

    /// Guest write; returns false (and changes nothing) for malformed accesses.
    pub fn write(&mut self, off: usize, data: &[u8]) -> bool {
        if !Self::valid_access(off, data.len()) {
            return false;
        }
        let sh = (off % 4) * 8;
        let mut val = 0u32;
        let mut lane = 0u32;
        for (i, b) in data.iter().enumerate() {
            val |= u32::from(*b) << (sh + i * 8);
            lane |= 0xff << (sh + i * 8);
        }
        let r = off / 4;
        let wm = self.wmask[r] & lane;
        let w1c = self.w1c[r] & lane;
        let mut cur = self.regs[r];
        cur = (cur & !wm) | (val & wm);
        cur &= !(val & w1c);
        self.regs[r] = cur;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd32(c: &PciConfig, off: usize) -> u32 {
        let mut d = [0u8; 4];
        c.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn wr32(c: &mut PciConfig, off: usize, v: u32) {
        c.write(off, &v.to_le_bytes());
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = PciConfig::new(0x1234, 0x11e8, 0x00ff00, 0x10);
        wr32(&mut c, 0, 0xffff_ffff);
        assert_eq!(rd32(&c, 0), 0x11e8_1234);
        assert_eq!(rd32(&c, 8), 0x00ff_0010);
    }

    #[test]
    fn bar32_sizing() {
        let mut c = PciConfig::new(1, 2, 0, 0);
        let bar = Bar {
            kind: BarKind::Mem32,
            size: 0x1000,
            prefetchable: false,
        };
        c.add_bar(0, bar, 0xc000_0000).expect("bar");
        assert_eq!(rd32(&c, 0x10), 0xc000_0000);
        wr32(&mut c, 0x10, 0xffff_ffff);
        assert_eq!(rd32(&c, 0x10), 0xffff_f000);
        wr32(&mut c, 0x10, 0xd000_0123);
        assert_eq!(c.bar_address(0), Some(0xd000_0000));
    }

    #[test]
    fn bar64_sizing_and_flags() {
        let mut c = PciConfig::new(1, 2, 0, 0);
        let bar = Bar {
            kind: BarKind::Mem64,
            size: 0x10_0000,
            prefetchable: true,
        };
        c.add_bar(2, bar, 0x1_0000_0000).expect("bar");
        assert_eq!(rd32(&c, 0x18), 0x0000_000c);
        assert_eq!(rd32(&c, 0x1c), 1);
        wr32(&mut c, 0x18, 0xffff_ffff);
        wr32(&mut c, 0x1c, 0xffff_ffff);
        assert_eq!(rd32(&c, 0x18), 0xfff0_000c);
        assert_eq!(rd32(&c, 0x1c), 0xffff_ffff);
        // Taking BAR 3 too is refused: it is the upper half.
        assert_eq!(c.add_bar(3, bar, 0), Err(ConfigError::BadBar(3)));
        assert_eq!(c.add_bar(5, bar, 0), Err(ConfigError::BadBar(5)));
    }

    #[test]
    fn io_bar_sizing() {
        let mut c = PciConfig::new(1, 2, 0, 0);
        let bar = Bar {
            kind: BarKind::Io,
            size: 0x20,
            prefetchable: false,
        };
        c.add_bar(1, bar, 0x1000).expect("bar");
        wr32(&mut c, 0x14, 0xffff_ffff);
        assert_eq!(rd32(&c, 0x14), 0xffff_ffe1);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = PciConfig::new(1, 2, 0, 0);
        let odd = Bar {
            kind: BarKind::Mem32,
            size: 0x1800,
            prefetchable: false,
        };
        assert_eq!(c.add_bar(0, odd, 0), Err(ConfigError::BadBarSize(0x1800)));
        assert_eq!(c.add_bar(6, odd, 0), Err(ConfigError::BadBar(6)));
    }

    #[test]
    fn bar_decode_honours_command_register() {
        let mut c = PciConfig::new(1, 2, 0, 0);
        let bar = Bar {
            kind: BarKind::Mem32,
            size: 0x1000,
            prefetchable: false,
        };
        c.add_bar(0, bar, 0xc000_0000).expect("bar");
        assert_eq!(c.find_mem_bar(0xc000_0010), None);
        c.write(4, &[CMD_MEMORY as u8]);
        assert_eq!(c.find_mem_bar(0xc000_0010), Some((0, 0x10)));
        assert_eq!(c.find_mem_bar(0xc000_1000), None);
    }

    #[test]
    fn capability_walk() {
        let mut c = PciConfig::new(1, 2, 0, 0);
        let a = c.add_capability(cap_id::MSI, &[0; 12], &[]).expect("cap");
        let b = c.add_capability(cap_id::MSIX, &[0; 10], &[]).expect("cap");
        let v = c.add_capability(cap_id::VENDOR, &[5; 3], &[]).expect("cap");
        assert_eq!(a, 0x40);
        assert_eq!(
            c.capabilities(),
            vec![(cap_id::MSI, a), (cap_id::MSIX, b), (cap_id::VENDOR, v)]
        );
        assert_ne!(rd32(&c, 4) & (u32::from(STATUS_CAP_LIST) << 16), 0);
        // Guest writes cannot alter the list.
        wr32(&mut c, 0x34, 0);
        wr32(&mut c, a, 0xffff_ffff);
        assert_eq!(c.capabilities().len(), 3);
    }

    #[test]
    fn capability_space_runs_out_cleanly() {
        let mut c = PciConfig::new(1, 2, 0, 0);
        let mut n = 0;
        while c.add_capability(cap_id::VENDOR, &[0; 30], &[]).is_ok() {
            n += 1;
        }
        assert_eq!(n, 6);
        assert_eq!(c.capabilities().len(), 6);
    }

    #[test]
    fn status_bits_are_write_one_to_clear() {
        let mut c = PciConfig::new(1, 2, 0, 0);
        c.set_dword(4, 0x8000_0000);
        wr32(&mut c, 4, 0x0000_0006);
        assert_eq!(rd32(&c, 4), 0x8000_0006);
        wr32(&mut c, 4, 0x8000_0006);
        assert_eq!(rd32(&c, 4), 0x0000_0006);
    }

    #[test]
    fn malformed_accesses() {
        let mut c = PciConfig::new(1, 2, 0, 0);
        let mut d = [0u8; 3];
        c.read(0, &mut d);
        assert_eq!(d, [0xff; 3]);
        let mut d = [0u8; 4];
        c.read(2, &mut d);
        assert_eq!(d, [0xff; 4]);
        c.read(CONFIG_SIZE, &mut d);
        assert!(!c.write(CONFIG_SIZE - 2, &[1, 2, 3, 4]));
        assert!(!c.write(1, &[1, 2]));
        assert!(c.write(2, &[1, 2]));
    }
}
