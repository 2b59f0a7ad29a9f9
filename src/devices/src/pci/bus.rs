//! The PCI root bus (segment 0, bus 0): configuration access through ECAM (the MCFG
//! window) and through the legacy ports 0xCF8/0xCFC, BAR dispatch for the PCI memory
//! windows, BAR allocation with `vm-allocator`, and the host bridge at 00:00.0.
//!
//! ECAM offset layout: bus 27:20, device 19:15, function 14:12, register 11:0.
//! CF8 layout: enable 31, bus 23:16, device 15:11, function 10:8, register 7:2.

use std::sync::{Arc, Mutex};

use vm_allocator::{AddressAllocator, AllocPolicy};
use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{DeviceMmio, DevicePio};

use super::config::{BarKind, PciConfig};
use super::{Bdf, PciDevice};
use crate::sync::lock;
use crate::GuestAnomalies;

/// Port of the CONFIG_ADDRESS register.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// Number of ports the config mechanism decodes (0xCF8..=0xCFF).
pub const CONFIG_IO_PORTS: u16 = 8;

/// A shared PCI function.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Errors of building the PCI topology (VMM side).
#[derive(Debug, thiserror::Error)]
pub enum PciBusError {
    /// Two devices asked for the same slot.
    #[error("PCI address {0} is already in use")]
    SlotTaken(Bdf),
    /// The bus has only bus 0.
    #[error("PCI address {0} is not on bus 00 (the only bus)")]
    BadBus(Bdf),
    /// No free device number.
    #[error("no free PCI slot left on bus 00")]
    NoFreeSlot,
    /// The BAR does not fit in the PCI window.
    #[error("cannot allocate a {size:#x}-byte BAR: {source}")]
    BarAllocation {
        /// BAR size.
        size: u64,
        /// Allocator error.
        source: vm_allocator::Error,
    },
}

/// Allocates guest-physical space for BARs from the 32- and 64-bit PCI windows.
#[derive(Debug)]
pub struct BarAllocator {
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
}

impl BarAllocator {
    /// Windows given as (base, size).
    pub fn new(mmio32: (u64, u64), mmio64: (u64, u64)) -> Result<Self, vm_allocator::Error> {
        Ok(Self {
            mmio32: AddressAllocator::new(mmio32.0, mmio32.1)?,
            mmio64: AddressAllocator::new(mmio64.0, mmio64.1)?,
        })
    }

    /// Allocates a naturally aligned region of `size` bytes for a BAR of `kind`.
    pub fn allocate(&mut self, kind: BarKind, size: u64) -> Result<u64, PciBusError> {
        let alloc = match kind {
            BarKind::Mem64 => &mut self.mmio64,
            _ => &mut self.mmio32,
        };
        let align = size.max(4096);
        alloc
            .allocate(size.max(4096), align, AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|source| PciBusError::BarAllocation { size, source })
    }
}

/// The root bus: devices by address.
#[derive(Default)]
pub struct PciRoot {
    devices: Vec<(Bdf, SharedPciDevice)>,
    anomalies: GuestAnomalies,
}

impl PciRoot {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a device at `bdf`.
    pub fn add(&mut self, bdf: Bdf, dev: SharedPciDevice) -> Result<(), PciBusError> {
        if bdf.bus != 0 {
            return Err(PciBusError::BadBus(bdf));
        }
        if self.devices.iter().any(|(b, _)| *b == bdf) {
            return Err(PciBusError::SlotTaken(bdf));
        }
        self.devices.push((bdf, dev));
        self.devices.sort_by_key(|(b, _)| *b);
        Ok(())
    }

    /// The lowest free device number (function 0), starting at `from`.
    pub fn free_slot(&self, from: u8) -> Result<Bdf, PciBusError> {
        (from..32)
            .map(Bdf::new)
            .find(|b| !self.devices.iter().any(|(d, _)| d.device == b.device))
            .ok_or(PciBusError::NoFreeSlot)
    }

    /// Devices on the bus, in address order.
    pub fn devices(&self) -> impl Iterator<Item = (Bdf, &SharedPciDevice)> {
        self.devices.iter().map(|(b, d)| (*b, d))
    }

    fn find(&self, bdf: Bdf) -> Option<&SharedPciDevice> {
        self.devices.iter().find(|(b, _)| *b == bdf).map(|(_, d)| d)
    }

    /// Guest configuration read; absent functions read as all ones.
    pub fn config_read(&self, bdf: Bdf, off: usize, data: &mut [u8]) {
        match self.find(bdf) {
            Some(d) => lock(d).config().read(off, data),
            None => data.fill(0xff),
        }
    }

    /// Guest configuration write; writes to absent functions are dropped.
    pub fn config_write(&self, bdf: Bdf, off: usize, data: &[u8]) {
        let len = data.len();
        if !PciConfig::valid_access(off, len) {
            self.anomalies.record(
                "pci",
                format_args!("{len}-byte config write at {bdf} offset {off:#x}"),
            );
            return;
        }
        if let Some(d) = self.find(bdf) {
            lock(d).config_write(off, data);
        }
    }

    /// Dispatches a memory access to whichever device BAR decodes `addr`.
    /// Returns false if no BAR does.
    pub fn bar_access(&self, addr: u64, data: &mut [u8], write: bool) -> bool {
        for (_, d) in &self.devices {
            let mut dev = lock(d);
            if let Some((bar, off)) = dev.config().find_mem_bar(addr) {
                if write {
                    dev.bar_write(bar, off, data);
                } else {
                    dev.bar_read(bar, off, data);
                }
                return true;
            }
        }
        false
    }

    /// Guest accesses refused so far.
    pub fn anomalies(&self) -> u64 {
        self.anomalies.count()
    }
}

/// ECAM decoding of an offset into the MCFG window (bus 0 only).
fn ecam_decode(offset: u64) -> Option<(Bdf, usize)> {
    let bus = (offset >> 20) & 0xff;
    if bus != 0 || offset >= 1 << 28 {
        return None;
    }
    Some((
        Bdf {
            bus: 0,
            device: ((offset >> 15) & 0x1f) as u8,
            function: ((offset >> 12) & 0x7) as u8,
        },
        (offset & 0xfff) as usize,
    ))
}

/// The ECAM window (registered on the MMIO bus at the MCFG base).
pub struct PciEcam {
    root: Arc<PciRoot>,
}

impl PciEcam {
    /// ECAM over `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self { root }
    }
}

impl DeviceMmio for PciEcam {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        match ecam_decode(offset) {
            Some((bdf, reg)) => self.root.config_read(bdf, reg, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if let Some((bdf, reg)) = ecam_decode(offset) {
            self.root.config_write(bdf, reg, data);
        }
    }
}

/// Configuration mechanism #1: CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at 0xCFC..0xCFF.
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: Mutex<u32>,
}

impl PciConfigIo {
    /// Port I/O config access over `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self {
            root,
            address: Mutex::new(0),
        }
    }

    fn target(&self, data_offset: u64) -> Option<(Bdf, usize)> {
        let a = *lock(&self.address);
        if a & (1 << 31) == 0 || (a >> 16) & 0xff != 0 {
            return None;
        }
        Some((
            Bdf {
                bus: 0,
                device: ((a >> 11) & 0x1f) as u8,
                function: ((a >> 8) & 0x7) as u8,
            },
            // As QEMU (and so as software written against it, like kvm-unit-tests'
            // pci_config_readw): CONFIG_ADDRESS bits 1:0 select a byte within the
            // dword too, ORed with the data port's offset.
            (a & 0xfc) as usize | ((a & 3) as usize | data_offset as usize),
        ))
    }

    fn set_address(&self, f: impl FnOnce(u32) -> u32) {
        let mut g = lock(&self.address);
        *g = f(*g);
    }
}

impl DevicePio for PciConfigIo {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let offset = u64::from(offset);
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                let a = *lock(&self.address);
                data.copy_from_slice(&a.to_le_bytes());
            } else {
                data.fill(0xff);
            }
            return;
        }
        match self.target(offset - 4) {
            Some((bdf, reg)) => self.root.config_read(bdf, reg, data),
            None => data.fill(0xff),
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let offset = u64::from(offset);
        if offset < 4 {
            if offset == 0 {
                if let Ok(b) = <[u8; 4]>::try_from(data) {
                    self.set_address(|_| u32::from_le_bytes(b) & 0x80ff_ffff);
                }
            }
            return;
        }
        if let Some((bdf, reg)) = self.target(offset - 4) {
            self.root.config_write(bdf, reg, data);
        }
    }
}

/// The PCI memory windows: dispatches accesses to device BARs.
pub struct PciBarWindow {
    root: Arc<PciRoot>,
    anomalies: GuestAnomalies,
}

impl PciBarWindow {
    /// BAR dispatch over `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self {
            root,
            anomalies: GuestAnomalies::new(),
        }
    }
}

impl DeviceMmio for PciBarWindow {
    fn mmio_read(&self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let addr = base.0.wrapping_add(offset);
        if !self.root.bar_access(addr, data, false) {
            data.fill(0xff);
            self.anomalies
                .record("pci-window", format_args!("read of unclaimed {addr:#x}"));
        }
    }

    fn mmio_write(&self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        let addr = base.0.wrapping_add(offset);
        let mut buf = data.to_vec();
        if !self.root.bar_access(addr, &mut buf, true) {
            self.anomalies
                .record("pci-window", format_args!("write to unclaimed {addr:#x}"));
        }
    }
}

/// The host bridge at 00:00.0 (class 06/00/00, no BARs).
pub struct HostBridge {
    config: PciConfig,
}

impl HostBridge {
    /// Red Hat's PCIe host bridge ID (1b36:0008), which Linux binds no quirks to.
    pub fn new() -> Self {
        let mut config = PciConfig::new(0x1b36, 0x0008, 0x06_00_00, 0);
        config.set_subsystem(0x1af4, 0x1100);
        Self { config }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_write(&mut self, off: usize, data: &[u8]) {
        self.config.write(off, data);
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::super::config::{Bar, CMD_BUS_MASTER, CMD_MEMORY};
    use super::super::msix::Msix;
    use super::super::{PciInterrupts, Signal};
    use super::*;
    use crate::interrupt::RecordingController;

    /// A test device: one 4 KiB scratch BAR0 and a 64-bit BAR2 holding the MSI-X table
    /// (4 vectors at 0) and PBA (at 0x800).
    struct TestDev {
        config: PciConfig,
        irqs: PciInterrupts,
        scratch: Vec<u8>,
    }

    impl TestDev {
        fn new(bdf: Bdf, alloc: &mut BarAllocator, irq: Arc<RecordingController>) -> Self {
            let mut config = PciConfig::new(0x1234, 0xbeef, 0xff_00_00, 1);
            let b0 = Bar {
                kind: BarKind::Mem32,
                size: 0x1000,
                prefetchable: false,
            };
            let b2 = Bar {
                kind: BarKind::Mem64,
                size: 0x1000,
                prefetchable: false,
            };
            let a0 = alloc.allocate(b0.kind, b0.size).expect("bar0");
            let a2 = alloc.allocate(b2.kind, b2.size).expect("bar2");
            config.add_bar(0, b0, a0).expect("bar0");
            config.add_bar(2, b2, a2).expect("bar2");
            let msi = super::super::msi::Msi::new(&mut config, bdf.requester_id(), 1, irq.clone())
                .expect("msi");
            let msix = Msix::new(&mut config, bdf.requester_id(), 4, (2, 0), (2, 0x800), irq)
                .expect("msix");
            Self {
                config,
                irqs: PciInterrupts {
                    msi: Some(msi),
                    msix: Some(msix),
                    blocked: 0,
                },
                scratch: vec![0; 0x1000],
            }
        }
    }

    impl PciDevice for TestDev {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn config_write(&mut self, off: usize, data: &[u8]) {
            self.irqs.config_write(&mut self.config, off, data);
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            if self.irqs.bar_read(bar, offset, data) {
                return;
            }
            let o = offset as usize;
            match self.scratch.get(o..o + data.len()) {
                Some(s) if bar == 0 => data.copy_from_slice(s),
                _ => data.fill(0),
            }
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            if self.irqs.bar_write(&self.config, bar, offset, data) {
                return;
            }
            let o = offset as usize;
            if bar == 0 {
                if let Some(s) = self.scratch.get_mut(o..o + data.len()) {
                    s.copy_from_slice(data);
                }
            }
        }
    }

    const W32: (u64, u64) = (0xc000_0000, 0x2000_0000);
    const W64: (u64, u64) = (0x1_0000_0000 * 64, 0x10_0000_0000);

    fn build() -> (Arc<PciRoot>, Arc<RecordingController>, Arc<Mutex<TestDev>>) {
        let rec = Arc::new(RecordingController::new(24, 1000));
        let mut alloc = BarAllocator::new(W32, W64).expect("alloc");
        let mut root = PciRoot::new();
        root.add(Bdf::new(0), Arc::new(Mutex::new(HostBridge::new())))
            .expect("host bridge");
        let bdf = root.free_slot(1).expect("slot");
        let dev = Arc::new(Mutex::new(TestDev::new(bdf, &mut alloc, rec.clone())));
        root.add(bdf, dev.clone()).expect("add");
        (Arc::new(root), rec, dev)
    }

    fn ecam_rd32(e: &PciEcam, dev: u8, reg: u64) -> u32 {
        let mut d = [0u8; 4];
        e.mmio_read(MmioAddress(0), (u64::from(dev) << 15) | reg, &mut d);
        u32::from_le_bytes(d)
    }

    fn ecam_wr32(e: &PciEcam, dev: u8, reg: u64, v: u32) {
        e.mmio_write(
            MmioAddress(0),
            (u64::from(dev) << 15) | reg,
            &v.to_le_bytes(),
        );
    }

    #[test]
    fn enumerate_through_ecam_and_cf8() {
        let (root, _, _) = build();
        let ecam = PciEcam::new(root.clone());
        assert_eq!(ecam_rd32(&ecam, 0, 0), 0x0008_1b36);
        assert_eq!(ecam_rd32(&ecam, 0, 8) >> 8, 0x06_00_00);
        assert_eq!(ecam_rd32(&ecam, 1, 0), 0xbeef_1234);
        assert_eq!(ecam_rd32(&ecam, 2, 0), 0xffff_ffff);
        let io = PciConfigIo::new(root);
        io.pio_write(PioAddress(0xcf8), 0, &(0x8000_0800u32).to_le_bytes());
        let mut d = [0u8; 4];
        io.pio_read(PioAddress(0xcf8), 4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xbeef_1234);
        // Byte access to the device ID's high byte through 0xCFF.
        let mut b = [0u8; 1];
        io.pio_read(PioAddress(0xcf8), 7, &mut b);
        assert_eq!(b[0], 0xbe);
        // Disabled address: all ones.
        io.pio_write(PioAddress(0xcf8), 0, &0x0000_0800u32.to_le_bytes());
        io.pio_read(PioAddress(0xcf8), 4, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn bar_sizing_through_ecam_and_dispatch() {
        let (root, _, _) = build();
        let ecam = PciEcam::new(root.clone());
        let bar0 = ecam_rd32(&ecam, 1, 0x10);
        assert_eq!(bar0, 0xc000_0000);
        ecam_wr32(&ecam, 1, 0x10, 0xffff_ffff);
        assert_eq!(ecam_rd32(&ecam, 1, 0x10), 0xffff_f000);
        ecam_wr32(&ecam, 1, 0x10, 0xc010_0000);
        let win = PciBarWindow::new(root.clone());
        // Memory decode off: unclaimed.
        let mut d = [0u8; 4];
        win.mmio_read(MmioAddress(0xc010_0000), 0, &mut d);
        assert_eq!(d, [0xff; 4]);
        ecam_wr32(&ecam, 1, 0x04, u32::from(CMD_MEMORY));
        win.mmio_write(
            MmioAddress(0xc010_0000),
            0x10,
            &0x1234_5678u32.to_le_bytes(),
        );
        win.mmio_read(MmioAddress(0xc010_0000), 0x10, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1234_5678);
    }

    #[test]
    fn msix_through_bar_and_signal() {
        let (root, rec, dev) = build();
        let ecam = PciEcam::new(root.clone());
        let caps = dev.lock().expect("dev").config.capabilities();
        let msix_cap = caps.iter().find(|(id, _)| *id == 0x11).expect("msix").1 as u64;
        let bar2 = u64::from(ecam_rd32(&ecam, 1, 0x18) & !0xf)
            | (u64::from(ecam_rd32(&ecam, 1, 0x1c)) << 32);
        ecam_wr32(&ecam, 1, 0x04, u32::from(CMD_MEMORY | CMD_BUS_MASTER));
        let win = PciBarWindow::new(root);
        win.mmio_write(MmioAddress(bar2), 0x10, &0xfee0_0000u32.to_le_bytes());
        win.mmio_write(MmioAddress(bar2), 0x18, &0x49u32.to_le_bytes());
        win.mmio_write(MmioAddress(bar2), 0x1c, &0u32.to_le_bytes());
        ecam_wr32(&ecam, 1, msix_cap, 0x8000_0000);
        let mut g = dev.lock().expect("dev");
        let TestDev { config, irqs, .. } = &mut *g;
        assert_eq!(irqs.signal(config, 1), Signal::Delivered);
        assert_eq!(irqs.signal(config, 0), Signal::Pending);
        assert_eq!(irqs.signal(config, 9), Signal::Dropped);
        assert_eq!(rec.delivered().last().map(|m| m.vector()), Some(0x49));
        // Without bus mastering the function sends nothing.
        let n = rec.delivered().len();
        assert!(config.write(0x04, &CMD_MEMORY.to_le_bytes()));
        assert_eq!(irqs.signal(config, 1), Signal::Blocked);
        assert_eq!((rec.delivered().len(), irqs.blocked), (n, 1));
    }

    #[test]
    fn slots_and_errors() {
        let (root, _, _) = build();
        assert_eq!(root.free_slot(0).expect("slot"), Bdf::new(2));
        let mut r = PciRoot::new();
        r.add(Bdf::new(3), Arc::new(Mutex::new(HostBridge::new())))
            .expect("add");
        assert!(matches!(
            r.add(Bdf::new(3), Arc::new(Mutex::new(HostBridge::new()))),
            Err(PciBusError::SlotTaken(_))
        ));
        let b = Bdf {
            bus: 1,
            device: 0,
            function: 0,
        };
        assert!(matches!(
            r.add(b, Arc::new(Mutex::new(HostBridge::new()))),
            Err(PciBusError::BadBus(_))
        ));
    }

    #[test]
    fn random_config_and_bar_traffic_never_panics() {
        let (root, _, _) = build();
        let ecam = PciEcam::new(root.clone());
        let io = PciConfigIo::new(root.clone());
        let win = PciBarWindow::new(root.clone());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = [1usize, 2, 4, 8, 3][(x % 5) as usize];
            let mut buf = vec![(x >> 8) as u8; len];
            let off = (x >> 16) & 0x1_ffff;
            match (x >> 40) % 6 {
                0 => ecam.mmio_write(MmioAddress(0), off, &buf),
                1 => ecam.mmio_read(MmioAddress(0), off, &mut buf),
                2 => io.pio_write(PioAddress(0xcf8), (x >> 48) as u16 % 8, &buf),
                3 => io.pio_read(PioAddress(0xcf8), (x >> 48) as u16 % 8, &mut buf),
                4 => win.mmio_write(MmioAddress(W32.0), off, &buf),
                _ => win.mmio_read(MmioAddress(W64.0), off, &mut buf),
            }
        }
        // Identity registers are read-only whatever the guest wrote.
        assert_eq!(ecam_rd32(&ecam, 0, 0), 0x0008_1b36);
        assert_eq!(ecam_rd32(&ecam, 1, 0), 0xbeef_1234);
    }

    #[test]
    fn hostile_config_accesses() {
        let (root, _, _) = build();
        let ecam = PciEcam::new(root.clone());
        for off in [
            0u64,
            1,
            2,
            3,
            0xffc,
            0xfff,
            0x1000,
            0x8000,
            0x10_0000,
            u64::MAX,
        ] {
            for len in [0usize, 1, 2, 3, 4, 8] {
                let mut buf = vec![0xffu8; len];
                ecam.mmio_read(MmioAddress(0), off, &mut buf);
                ecam.mmio_write(MmioAddress(0), off, &buf);
            }
        }
        let io = PciConfigIo::new(root.clone());
        for port in 0..8u16 {
            for len in [1usize, 2, 3, 4, 8] {
                let mut buf = vec![0xffu8; len];
                io.pio_write(PioAddress(0xcf8), port, &buf);
                io.pio_read(PioAddress(0xcf8), port, &mut buf);
            }
        }
        assert!(root.anomalies() > 0);
        // The device survives and still answers.
        assert_eq!(ecam_rd32(&ecam, 1, 0), 0xbeef_1234);
    }
}
