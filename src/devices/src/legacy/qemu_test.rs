//! What kvm-unit-tests' x86 library and tests touch besides the platform: QEMU's
//! fw_cfg legacy I/O interface and pc-testdev.
//!
//! - [`FwCfg`] at 0x510 (16-bit selector) / 0x511 (data, one byte per read): the
//!   signature, the interface ID (traditional interface only), the RAM size and the
//!   CPU counts, and an empty file directory. Unknown keys read as zeros, as QEMU's.
//! - [`PcTestDev`]: a 32-bit scratch register at 0xe0-0xe3 (any width, any byte
//!   offset) and its byte-wide alias at 0xe8-0xeb; the flush-page port 0xe4 (a 32-bit
//!   write of a guest-physical address makes KVM drop its mapping of that page, so the
//!   guest's next access faults into the hypervisor again, as QEMU's does); and the
//!   IRQ lines at 0x2000 + n (n < 24): a byte written sets IOAPIC pin n's level
//!   (non-zero: asserted) before the vCPU re-enters the guest, and IRQ n of the 8259A
//!   pair where the VM has one (n < 16), as QEMU's ISA interrupts drive both.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::i8259::{self, Pic};
use crate::ioapic::{IoApic, NUM_PINS};
use crate::sync::lock;

/// fw_cfg selector port (data at +1).
pub const FW_CFG_PORT: u16 = 0x510;
/// fw_cfg ports: selector (2 bytes) and data.
pub const FW_CFG_PORTS: u16 = 2;
/// pc-testdev scratch register.
pub const TESTDEV_IOPORT: u16 = 0xe0;
/// pc-testdev flush-page port.
pub const TESTDEV_FLUSH_PAGE: u16 = 0xe4;
/// pc-testdev byte-wide alias of the scratch register.
pub const TESTDEV_IOPORT_BYTE: u16 = 0xe8;
/// pc-testdev ports from 0xe0: scratch, flush page, byte scratch.
pub const TESTDEV_PORTS: u16 = 12;
/// pc-testdev IRQ lines (0x2000 + pin).
pub const TESTDEV_IRQ_PORT: u16 = 0x2000;

const KEY_SIGNATURE: u16 = 0x00;
const KEY_ID: u16 = 0x01;
const KEY_RAM_SIZE: u16 = 0x03;
const KEY_NB_CPUS: u16 = 0x05;
const KEY_MAX_CPUS: u16 = 0x0f;
const KEY_FILE_DIR: u16 = 0x19;

/// The fw_cfg device (traditional I/O interface).
pub struct FwCfg {
    ram_size: u64,
    cpus: u16,
    key: u16,
    offset: usize,
}

impl FwCfg {
    /// fw_cfg describing `ram_size` bytes of RAM and `cpus` vCPUs.
    pub fn new(ram_size: u64, cpus: u16) -> Self {
        Self {
            ram_size,
            cpus,
            key: 0,
            offset: 0,
        }
    }

    fn item(&self) -> Vec<u8> {
        match self.key & 0x3fff {
            KEY_SIGNATURE => b"QEMU".to_vec(),
            KEY_ID => 1u32.to_le_bytes().to_vec(),
            KEY_RAM_SIZE => self.ram_size.to_le_bytes().to_vec(),
            KEY_NB_CPUS | KEY_MAX_CPUS => self.cpus.to_le_bytes().to_vec(),
            // An empty directory: the count is big-endian.
            KEY_FILE_DIR => 0u32.to_be_bytes().to_vec(),
            _ => Vec::new(),
        }
    }
}

impl MutDevicePio for FwCfg {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if offset != 1 {
            data.fill(0);
            return;
        }
        let item = self.item();
        for b in data.iter_mut() {
            *b = item.get(self.offset).copied().unwrap_or(0);
            self.offset = self.offset.saturating_add(1);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset == 0 && data.len() == 2 {
            self.key = u16::from_le_bytes([data[0], data[1]]);
            self.offset = 0;
        }
    }
}

/// Flush-page requests served, and refused (the address is not RAM, or the host
/// refused the protection change).
#[derive(Debug, Default)]
pub struct FlushCounters {
    /// Pages whose KVM mapping was dropped.
    pub flushed: AtomicU64,
    /// Requests that did nothing.
    pub refused: AtomicU64,
}

/// QEMU's pc-testdev (the ports; the IRQ lines are [`PcTestDevIrq`]).
pub struct PcTestDev {
    scratch: u32,
    mem: GuestMemoryMmap,
    counters: Arc<FlushCounters>,
}

impl PcTestDev {
    /// The test device over guest memory `mem`.
    pub fn new(mem: GuestMemoryMmap) -> Self {
        Self {
            scratch: 0,
            mem,
            counters: Arc::new(FlushCounters::default()),
        }
    }

    /// Its flush-page counters.
    pub fn counters(&self) -> Arc<FlushCounters> {
        self.counters.clone()
    }

    /// Makes KVM drop its mapping of the guest page at `gpa`: its protection is changed
    /// (execute added) and restored, which the kernel reports to KVM as an invalidation
    /// of the range. Unlike QEMU's PROT_NONE, the page stays readable and writable for
    /// the VMM's own threads throughout, so a device touching it meanwhile cannot fault.
    fn flush_page(&self, gpa: u64) {
        let page = gpa & !0xfff;
        let host = self
            .mem
            .get_host_address(GuestAddress(page))
            .ok()
            .filter(|_| self.mem.check_range(GuestAddress(page), 4096));
        let Some(host) = host else {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: `host` is the start of a 4 KiB page of guest RAM inside the VMM's own
        // anonymous mapping (checked above); adding PROT_EXEC and restoring RW never
        // removes access, so no thread touching the page can fault, and no Rust
        // reference's validity depends on the execute permission.
        let ok = unsafe {
            libc::mprotect(host.cast(), 4096, rw | libc::PROT_EXEC) == 0
                && libc::mprotect(host.cast(), 4096, rw) == 0
        };
        if ok {
            self.counters.flushed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "pc-testdev: the host refused to change the protection of the page at {page:#x} ({}); not flushed",
                std::io::Error::last_os_error()
            );
        }
    }

    fn scratch_mask(offset: u64, len: usize) -> (u32, u32) {
        let shift = ((offset & 3) * 8) as u32;
        let bits = (len.min(4) * 8) as u32;
        let mask = if bits >= 32 {
            u32::MAX
        } else {
            (1u32 << bits) - 1
        };
        (mask.checked_shl(shift).unwrap_or(0), shift)
    }
}

impl MutDevicePio for PcTestDev {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let port = TESTDEV_IOPORT.wrapping_add(offset);
        match port {
            0xe0..=0xe3 | 0xe8..=0xeb => {
                // The byte alias serves wider accesses a byte at a time, as QEMU's.
                let mut v = 0u32;
                for (i, _) in data.iter().enumerate().take(4) {
                    let (mask, shift) = Self::scratch_mask(u64::from(offset) + i as u64, 1);
                    v |= ((self.scratch & mask) >> shift) << (8 * i);
                }
                let b = v.to_le_bytes();
                for (i, d) in data.iter_mut().enumerate() {
                    *d = b.get(i).copied().unwrap_or(0);
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let port = TESTDEV_IOPORT.wrapping_add(offset);
        let mut b = [0u8; 4];
        for (d, s) in b.iter_mut().zip(data) {
            *d = *s;
        }
        match port {
            0xe0..=0xe3 | 0xe8..=0xeb => {
                for (i, byte) in b.iter().enumerate().take(data.len().min(4)) {
                    let (mask, shift) = Self::scratch_mask(u64::from(offset) + i as u64, 1);
                    self.scratch = (self.scratch & !mask) | ((u32::from(*byte) << shift) & mask);
                }
            }
            TESTDEV_FLUSH_PAGE if data.len() == 4 => {
                self.flush_page(u64::from(u32::from_le_bytes(b)))
            }
            _ => {}
        }
    }
}

/// Called after pc-testdev changed a PIC line (to get vCPU 0 to look at the PIC).
pub type PicNotify = Box<dyn Fn() + Send>;

/// pc-testdev's IRQ lines: a write to 0x2000 + n sets IOAPIC pin n (and PIC IRQ n).
pub struct PcTestDevIrq {
    ioapic: Arc<Mutex<IoApic>>,
    pic: Option<(Arc<Mutex<Pic>>, PicNotify)>,
}

impl PcTestDevIrq {
    /// The lines into `ioapic`.
    pub fn new(ioapic: Arc<Mutex<IoApic>>) -> Self {
        Self { ioapic, pic: None }
    }

    /// Also drives `pic`'s IRQs 0–15; `notify` runs after each change.
    pub fn with_pic(mut self, pic: Arc<Mutex<Pic>>, notify: PicNotify) -> Self {
        self.pic = Some((pic, notify));
        self
    }
}

impl MutDevicePio for PcTestDevIrq {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let pin = offset as usize;
        if pin < NUM_PINS {
            let level = data.iter().any(|b| *b != 0);
            lock(&self.ioapic).set_level(pin, level);
            if let Some((pic, notify)) = &self.pic {
                if pin < i8259::NUM_IRQS {
                    lock(pic).set_irq(pin, level);
                    notify();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::RecordingController;

    #[test]
    fn fw_cfg_items() {
        let mut f = FwCfg::new(128 << 20, 4);
        let mut read = |key: u16, n: usize| {
            f.pio_write(PioAddress(0x510), 0, &key.to_le_bytes());
            let mut v = vec![0u8; n];
            for b in v.iter_mut() {
                let mut x = [0u8];
                f.pio_read(PioAddress(0x510), 1, &mut x);
                *b = x[0];
            }
            v
        };
        assert_eq!(read(KEY_SIGNATURE, 4), b"QEMU");
        assert_eq!(read(KEY_NB_CPUS, 2), vec![4, 0]);
        assert_eq!(read(KEY_RAM_SIZE, 8), (128u64 << 20).to_le_bytes());
        assert_eq!(read(0x11, 8), vec![0; 8], "unknown keys read zeros");
        assert_eq!(read(KEY_SIGNATURE, 6)[4..], [0, 0], "past the end: zeros");
    }

    #[test]
    fn scratch_register_any_width_any_offset() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let mut t = PcTestDev::new(mem);
        t.pio_write(PioAddress(0xe0), 0, &0x1122_3344u32.to_le_bytes());
        let mut b = [0u8; 2];
        t.pio_read(PioAddress(0xe0), 1, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x2233);
        t.pio_write(PioAddress(0xe0), 2, &[0xaa]);
        let mut w = [0u8; 4];
        t.pio_read(PioAddress(0xe0), 8, &mut w);
        assert_eq!(u32::from_le_bytes(w), 0x11aa_3344, "byte alias at 0xe8");
        t.pio_write(PioAddress(0xe0), 4, &0x3000u32.to_le_bytes());
        t.pio_write(PioAddress(0xe0), 4, &0x7fff_f000u32.to_le_bytes());
        let c = t.counters();
        assert_eq!(
            (
                c.flushed.load(Ordering::Relaxed),
                c.refused.load(Ordering::Relaxed)
            ),
            (1, 1),
            "RAM page flushed, a page beyond RAM refused"
        );
    }

    #[test]
    fn irq_lines_drive_ioapic_pins() {
        let rec = Arc::new(RecordingController::new(24, 10));
        let io = Arc::new(Mutex::new(IoApic::new(rec)));
        let mut l = PcTestDevIrq::new(io);
        l.pio_write(PioAddress(0x2000), 14, &[1]);
        l.pio_write(PioAddress(0x2000), 99, &[1]);
        l.pio_write(PioAddress(0x2000), 14, &[0]);
    }
}
