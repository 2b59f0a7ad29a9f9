//! virtio over PCI (virtio 1.x "modern" transport, §4.1) and the devices behind it.
//!
//! [`VirtioPci`] is one PCI function: vendor 0x1af4, device 0x1040 + type, BAR0 (16 KiB,
//! 32-bit) holding the common configuration at 0x0000, the ISR at 0x1000, the queue
//! notifications at 0x2000 (4 bytes per queue), the MSI-X table at 0x3000 and its PBA at
//! 0x3800; the vendor-specific capabilities point there. It offers VIRTIO_F_VERSION_1
//! and VIRTIO_F_ACCESS_PLATFORM: when the driver accepts the latter and the VM has the
//! VT-d unit, every ring and buffer address is an IOVA translated by the unit
//! ([`crate::iommu::DeviceIommu`]), so a driver's DMA mapping bugs become guest-visible
//! faults. With the VT-d unit present, a driver that does not accept
//! VIRTIO_F_ACCESS_PLATFORM is refused at FEATURES_OK (as QEMU's `iommu_platform=on`
//! does), so no virtio DMA ever bypasses the unit; and no DMA or MSI-X message goes
//! out while the command register's bus-master bit is clear.
//!
//! Queues are `virtio-queue` split queues. A notification only marks its queue and
//! wakes the device's worker thread ([`VirtioPci::start_worker`]), which serves the
//! queue under the device lock in bounded passes (each device caps what one pass
//! does), so a vCPU never does a device's long work. With a [`NotifyRegistrar`] (KVM
//! ioeventfds) each queue's notification address is registered while the driver runs
//! (DRIVER_OK, memory decoding on) at BAR0's current address, and re-registered when
//! the guest moves BAR0: a notification then wakes the worker without an exit to
//! userspace at all. The device-specific configuration, when the device has one, is at
//! BAR0 + 0x800.

pub mod blk;
pub mod disk;
pub mod rng;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::interrupt::InterruptController;
use crate::ioapic::IoapicLine;
use crate::iommu::{DeviceIommu, DeviceMemory, Vtd};
use crate::pci::config::{cap_id, ConfigError, PciConfig};
use crate::pci::msix::Msix;
use crate::pci::{Bdf, PciDevice, PciInterrupts};
use crate::GuestAnomalies;

/// BAR0 size.
pub const BAR0_SIZE: u64 = 0x4000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
/// The device-specific configuration (when the device has one).
const DEVICE: u64 = 0x0800;
const DEVICE_MAX: u64 = 0x0800;
const ISR: u64 = 0x1000;
pub(crate) const NOTIFY: u64 = 0x2000;
const NOTIFY_MULTIPLIER: u32 = 4;
pub(crate) const MSIX_TABLE: u64 = 0x3000;
const MSIX_PBA: u64 = 0x3800;

/// Feature bits of the transport.
pub const F_VERSION_1: u64 = 1 << 32;
/// The device's DMA goes through the platform IOMMU.
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
/// No MSI-X vector.
pub const NO_VECTOR: u16 = 0xffff;

const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_FAILED: u8 = 0x80;

/// What one pass over a queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Processed {
    /// Buffers were put in the used ring.
    pub used: bool,
    /// The pass stopped at the device's budget with buffers still available.
    pub more: bool,
}

/// What a device behind the transport does.
pub trait VirtioDevice: Send {
    /// virtio device type (4: entropy).
    fn device_type(&self) -> u16;
    /// Largest size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device-specific feature bits (the transport adds its own).
    fn features(&self) -> u64;
    /// Handles available buffers of queue `idx`, at most the device's budget per call.
    fn process_queue(&mut self, idx: usize, queue: &mut Queue, mem: &DeviceMemory) -> Processed;
    /// Length of the device-specific configuration (0: none).
    fn config_len(&self) -> usize {
        0
    }
    /// Reads the device-specific configuration at `offset` (within `config_len`).
    fn read_config(&self, _offset: usize, data: &mut [u8]) {
        data.fill(0);
    }
    /// Writes the device-specific configuration (read-only fields ignore it).
    fn write_config(&mut self, _offset: usize, _data: &[u8]) {}
    /// The driver reset the device (status 0).
    fn reset(&mut self) {}
    /// When the device next has work without a notification (completions it holds
    /// back), and on which queues (bit per queue).
    fn next_due(&self) -> Option<(std::time::Instant, u32)> {
        None
    }
}

/// Registers queue-notification addresses with the hypervisor (KVM ioeventfds), so a
/// driver's notification signals an eventfd without an exit to userspace.
pub trait NotifyRegistrar: Send + Sync {
    /// Signal `fd` on every write to the guest-physical `addr`.
    fn register(&self, addr: u64, fd: &EventFd) -> Result<(), String>;
    /// Stop doing so.
    fn unregister(&self, addr: u64, fd: &EventFd) -> Result<(), String>;
}

/// A virtio device on PCI.
pub struct VirtioPci<D: VirtioDevice> {
    device: D,
    config: PciConfig,
    irqs: PciInterrupts,
    intx: Option<IoapicLine>,
    mem: GuestMemoryMmap,
    vtd: Option<Arc<Vtd>>,
    sid: u16,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    msix_config: u16,
    status: u8,
    queue_select: u16,
    queues: Vec<Queue>,
    queue_vectors: Vec<u16>,
    isr: u8,
    dma: Option<DeviceMemory>,
    anomalies: GuestAnomalies,
    /// Queues notified and not yet fully served (bit per queue).
    pending: Arc<AtomicU32>,
    /// Wakes the worker thread, once it runs.
    kick: Option<Arc<EventFd>>,
    /// Drivers refused at FEATURES_OK for lack of ACCESS_PLATFORM.
    refused_features: u64,
    /// One eventfd per queue that the hypervisor signals on notifications.
    notify_fds: Vec<Arc<EventFd>>,
    registrar: Option<Arc<dyn NotifyRegistrar>>,
    /// BAR0's address when the notification eventfds were registered.
    registered_base: Option<u64>,
}

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    // struct virtio_pci_cap after (cap_vndr, cap_next): cap_len, cfg_type, bar, id,
    // padding[2], offset, length [, notify_off_multiplier].
    let cap_len = if extra.is_some() { 20u8 } else { 16 };
    let mut b = vec![cap_len, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

impl<D: VirtioDevice> VirtioPci<D> {
    /// Puts `device` at `bdf` with BAR0 at `bar0`; DMA through `vtd` when the driver
    /// accepts VIRTIO_F_ACCESS_PLATFORM.
    pub fn new(
        device: D,
        bdf: Bdf,
        bar0: u64,
        mem: GuestMemoryMmap,
        vtd: Option<Arc<Vtd>>,
        irq: Arc<dyn InterruptController>,
        intx: Option<IoapicLine>,
    ) -> Result<Self, ConfigError> {
        let ty = device.device_type();
        let mut config = PciConfig::new(0x1af4, 0x1040 + ty, 0xff_00_00, 1);
        config.set_subsystem(0x1af4, 0x1100);
        config.add_mem32_bar(0, BAR0_SIZE, bar0)?;
        if let Some(line) = &intx {
            config.set_intx_pin(line.pin() as u8);
        }
        let nq = device.queue_max_sizes().len() as u64;
        let mut caps = vec![
            vendor_cap(1, COMMON, COMMON_LEN, None),
            vendor_cap(
                2,
                NOTIFY,
                nq * u64::from(NOTIFY_MULTIPLIER),
                Some(NOTIFY_MULTIPLIER),
            ),
            vendor_cap(3, ISR, 1, None),
        ];
        let cfg_len = (device.config_len() as u64).min(DEVICE_MAX);
        if cfg_len > 0 {
            caps.push(vendor_cap(4, DEVICE, cfg_len, None));
        }
        for body in caps {
            config.add_capability(cap_id::VENDOR, &body, &[])?;
        }
        let nvec = 1 + nq as u16;
        let msix = Msix::new(
            &mut config,
            bdf.requester_id(),
            nvec,
            (0, MSIX_TABLE),
            (0, MSIX_PBA),
            irq,
        )?;
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| Queue::new(m))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| ConfigError::BadBar(0))?;
        let n = queues.len();
        Ok(Self {
            device,
            config,
            irqs: PciInterrupts {
                msi: None,
                msix: Some(msix),
                blocked: 0,
            },
            intx,
            mem,
            vtd,
            sid: bdf.requester_id(),
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            msix_config: NO_VECTOR,
            status: 0,
            queue_select: 0,
            queues,
            queue_vectors: vec![NO_VECTOR; n],
            isr: 0,
            dma: None,
            anomalies: GuestAnomalies::new(),
            pending: Arc::new(AtomicU32::new(0)),
            kick: None,
            refused_features: 0,
            notify_fds: Vec::new(),
            registrar: None,
            registered_base: None,
        })
    }

    /// Takes queue notifications through `registrar` (KVM ioeventfds) from now on.
    pub fn with_ioeventfds(mut self, registrar: Arc<dyn NotifyRegistrar>) -> std::io::Result<Self> {
        let n = self.queues.len().min(32);
        self.notify_fds = (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map(Arc::new))
            .collect::<std::io::Result<_>>()?;
        self.registrar = Some(registrar);
        Ok(self)
    }

    /// Whether queue notifications arrive by ioeventfd now.
    pub fn ioeventfds_registered(&self) -> bool {
        self.registered_base.is_some()
    }

    /// Registers, moves or removes the notification eventfds to match the driver's
    /// state and BAR0's address.
    fn sync_notifiers(&mut self) {
        let Some(r) = self.registrar.clone() else {
            return;
        };
        let decoding = self.config.command() & crate::pci::config::CMD_MEMORY != 0;
        let want = if self.status & STATUS_DRIVER_OK != 0 && decoding {
            self.config.bar_address(0)
        } else {
            None
        };
        if want == self.registered_base {
            return;
        }
        let addr = |base: u64, q: usize| base + NOTIFY + q as u64 * u64::from(NOTIFY_MULTIPLIER);
        if let Some(old) = self.registered_base.take() {
            for (q, fd) in self.notify_fds.iter().enumerate() {
                if let Err(e) = r.unregister(addr(old, q), fd) {
                    log::warn!(
                        "virtio-pci {:04x}: cannot remove queue {q}'s ioeventfd: {e}",
                        self.sid
                    );
                }
            }
        }
        let Some(base) = want else {
            return;
        };
        for (q, fd) in self.notify_fds.iter().enumerate() {
            if let Err(e) = r.register(addr(base, q), fd) {
                // Notifications keep working through MMIO exits.
                log::warn!(
                    "virtio-pci {:04x}: cannot register queue {q}'s ioeventfd: {e}",
                    self.sid
                );
                for (p, fd) in self.notify_fds.iter().enumerate().take(q) {
                    let _ = r.unregister(addr(base, p), fd);
                }
                return;
            }
        }
        self.registered_base = Some(base);
    }

    /// Starts the device's worker thread: it serves notified queues in bounded passes
    /// under the device lock, releasing it between passes. `on_start` runs first on
    /// the new thread (the seccomp filter).
    pub fn start_worker(
        dev: Arc<Mutex<Self>>,
        name: String,
        on_start: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<()>
    where
        D: 'static,
    {
        let efd = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let (notify, pending) = {
            let mut d = crate::sync::lock(&dev);
            d.kick = Some(efd.clone());
            (d.notify_fds.clone(), d.pending.clone())
        };
        std::thread::Builder::new().name(name).spawn(move || {
            on_start();
            use std::os::fd::AsRawFd;
            let mut fds: Vec<libc::pollfd> = std::iter::once(efd.as_raw_fd())
                .chain(notify.iter().map(|f| f.as_raw_fd()))
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            loop {
                // Work the device holds back (delayed completions) wakes it on time.
                let due = crate::sync::lock(&dev).device.next_due();
                let timeout = due.map_or(-1, |(at, _)| {
                    let ms = at
                        .saturating_duration_since(std::time::Instant::now())
                        .as_millis();
                    ms.min(60_000) as libc::c_int
                });
                // SAFETY: `fds` is a live, correctly sized array of pollfd whose file
                // descriptors stay open for this thread's life (it holds their Arcs).
                let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
                if let Some((at, queues)) = due {
                    if std::time::Instant::now() >= at {
                        pending.fetch_or(queues, Ordering::AcqRel);
                    }
                }
                if n < 0 {
                    if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return;
                }
                let _ = efd.read();
                for (q, f) in notify.iter().enumerate() {
                    if f.read().is_ok() {
                        pending.fetch_or(1 << q, Ordering::AcqRel);
                    }
                }
                while crate::sync::lock(&dev).service() {
                    std::thread::yield_now();
                }
            }
        })?;
        Ok(())
    }

    /// One bounded pass over every notified queue; true if some queue has more.
    pub fn service(&mut self) -> bool {
        let bits = self.pending.swap(0, Ordering::AcqRel);
        let mut more = 0;
        for idx in 0..self.queues.len().min(32) {
            if bits & (1 << idx) != 0 && self.notify(idx) {
                more |= 1 << idx;
            }
        }
        self.pending.fetch_or(more, Ordering::AcqRel);
        self.pending.load(Ordering::Acquire) != 0
    }

    /// Drivers refused at FEATURES_OK because they did not accept ACCESS_PLATFORM.
    pub fn refused_features(&self) -> u64 {
        self.refused_features
    }

    fn bus_master(&self) -> bool {
        self.config.command() & crate::pci::config::CMD_BUS_MASTER != 0
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    fn device_features(&self) -> u64 {
        self.device.features() | F_VERSION_1 | F_ACCESS_PLATFORM
    }

    fn reset(&mut self) {
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.msix_config = NO_VECTOR;
        self.status = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_vectors.fill(NO_VECTOR);
        self.isr = 0;
        self.dma = None;
        self.device.reset();
        if let Some(l) = &self.intx {
            l.set_level(false);
        }
    }

    fn set_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // With an IOMMU, DMA must go through it: a driver that does not accept
            // ACCESS_PLATFORM would otherwise reach guest memory untranslated.
            let platform_ok = self.vtd.is_none() || self.driver_features & F_ACCESS_PLATFORM != 0;
            let ok = self.driver_features & !self.device_features() == 0
                && self.driver_features & F_VERSION_1 != 0
                && platform_ok;
            if !platform_ok {
                self.refused_features += 1;
                log::warn!(
                    "virtio-pci {:04x}: driver did not accept VIRTIO_F_ACCESS_PLATFORM, which this VM's IOMMU requires; FEATURES_OK refused",
                    self.sid
                );
            }
            if !ok {
                v &= !STATUS_FEATURES_OK;
            }
            let event_idx = self.driver_features & (1 << 29) != 0;
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
            }
        }
        if v & STATUS_FEATURES_OK != 0 && self.dma.is_none() {
            let through_iommu = self.driver_features & F_ACCESS_PLATFORM != 0;
            self.dma = Some(DeviceIommu::memory(
                &self.mem,
                self.vtd.as_ref(),
                self.sid,
                through_iommu,
            ));
        }
        self.status = v;
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn common_read(&self, off: u64) -> u64 {
        let q = self.queues.get(usize::from(self.queue_select));
        let qv = self.queue_vectors.get(usize::from(self.queue_select));
        match off {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.device_features() & 0xffff_ffff,
                1 => self.device_features() >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.msix_config),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => 0, // config generation: no device configuration changes
            0x16 => u64::from(self.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size())),
            0x1a => qv.map_or(u64::from(NO_VECTOR), |v| u64::from(*v)),
            0x1c => q.map_or(0, |q| u64::from(q.ready())),
            0x1e => u64::from(self.queue_select), // notify offset = queue index
            0x20 => q.map_or(0, |q| q.desc_table()),
            0x24 => q.map_or(0, |q| q.desc_table() >> 32),
            0x28 => q.map_or(0, |q| q.avail_ring()),
            0x2c => q.map_or(0, |q| q.avail_ring() >> 32),
            0x30 => q.map_or(0, |q| q.used_ring()),
            0x34 => q.map_or(0, |q| q.used_ring() >> 32),
            _ => 0,
        }
    }

    fn common_write(&mut self, off: u64, v: u32) {
        let ready = self.queue().is_some_and(|q| q.ready());
        let lo = Some(v);
        match off {
            0x00 => self.device_feature_select = v,
            0x08 => self.driver_feature_select = v,
            0x0c if self.status & STATUS_FEATURES_OK == 0 => match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x10 => self.msix_config = v as u16,
            0x14 => {
                self.set_status(v as u8);
                self.sync_notifiers();
            }
            0x16 => self.queue_select = v as u16,
            0x18 if !ready => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            0x1a => {
                if let Some(qv) = self.queue_vectors.get_mut(usize::from(self.queue_select)) {
                    *qv = v as u16;
                }
            }
            0x1c => {
                let mem = self.dma.clone();
                if let Some(q) = self.queue() {
                    if v == 1 {
                        // Rings the device cannot reach leave the queue disabled
                        // (virtio-queue validates only ready queues).
                        q.set_ready(true);
                        let valid = mem.as_ref().is_some_and(|m| q.is_valid(m));
                        if !valid {
                            log::warn!("virtio-pci: queue rings unreachable; queue stays disabled");
                        }
                        q.set_ready(valid);
                    }
                }
            }
            0x20 if !ready => self.with_queue(|q| q.set_desc_table_address(lo, None)),
            0x24 if !ready => self.with_queue(|q| q.set_desc_table_address(None, lo)),
            0x28 if !ready => self.with_queue(|q| q.set_avail_ring_address(lo, None)),
            0x2c if !ready => self.with_queue(|q| q.set_avail_ring_address(None, lo)),
            0x30 if !ready => self.with_queue(|q| q.set_used_ring_address(lo, None)),
            0x34 if !ready => self.with_queue(|q| q.set_used_ring_address(None, lo)),
            _ => self.anomalies.record(
                "virtio-pci",
                format_args!("write {v:#x} to common config {off:#x} ignored"),
            ),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.queue() {
            f(q);
        }
    }

    /// Serves queue `idx` once (bounded by the device); true if it has more.
    fn notify(&mut self, idx: usize) -> bool {
        if self.status & STATUS_DRIVER_OK == 0 || self.status & STATUS_FAILED != 0 {
            return false;
        }
        // Without bus mastering the device cannot read its rings.
        if !self.bus_master() {
            return false;
        }
        let Some(mem) = self.dma.clone() else {
            return false;
        };
        let Some(q) = self.queues.get_mut(idx) else {
            return false;
        };
        if !q.ready() {
            return false;
        }
        let done = self.device.process_queue(idx, q, &mem);
        if done.used && q.needs_notification(&mem).unwrap_or(true) {
            self.interrupt(self.queue_vectors.get(idx).copied().unwrap_or(NO_VECTOR));
        }
        done.more
    }

    fn interrupt(&mut self, vector: u16) {
        let msix_on = self
            .irqs
            .msix
            .as_ref()
            .is_some_and(|m| m.enabled(&self.config));
        if msix_on {
            if vector != NO_VECTOR {
                let _ = self.irqs.signal(&mut self.config, vector);
            }
            return;
        }
        self.isr |= 1;
        if let Some(l) = &self.intx {
            l.set_level(true);
        }
    }
}

impl<D: VirtioDevice> PciDevice for VirtioPci<D> {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_write(&mut self, off: usize, data: &[u8]) {
        self.irqs.config_write(&mut self.config, off, data);
        // BAR0 moved or memory decoding changed: move the notification eventfds.
        self.sync_notifiers();
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if self.irqs.bar_read(bar, offset, data) {
            return;
        }
        data.fill(0);
        if bar != 0 {
            return;
        }
        let len = data.len();
        if (COMMON..COMMON + COMMON_LEN).contains(&offset) {
            // Fields are read at their own offsets with their own widths.
            let bytes = self.common_read(offset).to_le_bytes();
            data.copy_from_slice(&bytes[..len.min(8)]);
        } else if (DEVICE..DEVICE + self.device.config_len() as u64).contains(&offset) {
            let off = (offset - DEVICE) as usize;
            let end = (off + len).min(self.device.config_len());
            self.device.read_config(off, &mut data[..end - off]);
        } else if offset == ISR && len == 1 {
            data[0] = self.isr;
            self.isr = 0;
            if let Some(l) = &self.intx {
                l.set_level(false);
            }
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if self.irqs.bar_write(&self.config, bar, offset, data) {
            return;
        }
        if bar != 0 {
            return;
        }
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        if (COMMON..COMMON + COMMON_LEN).contains(&offset) {
            // Byte and word registers are written with their own width; 64-bit ones as
            // two dwords (the driver's two-part write).
            self.common_write(offset, v);
        } else if (DEVICE..DEVICE + self.device.config_len() as u64).contains(&offset) {
            let off = (offset - DEVICE) as usize;
            let end = (off + data.len()).min(self.device.config_len());
            self.device.write_config(off, &data[..end - off]);
        } else if (NOTIFY..NOTIFY + self.queues.len() as u64 * u64::from(NOTIFY_MULTIPLIER))
            .contains(&offset)
        {
            let idx = ((offset - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as usize;
            match &self.kick {
                // The worker serves it; the vCPU returns at once.
                Some(k) if idx < 32 => {
                    self.pending.fetch_or(1 << idx, Ordering::AcqRel);
                    let _ = k.write(1);
                }
                // No worker (unit tests): serve it here, to the end.
                _ => while self.notify(idx) {},
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::rng::Rng;
    use super::*;
    use crate::interrupt::{Recorded, RecordingController};
    use vm_memory::{Bytes, GuestAddress};

    const DESC: u64 = 0x10_0000;
    const AVAIL: u64 = 0x10_1000;
    const USED: u64 = 0x10_2000;
    const BUF: u64 = 0x20_0000;

    struct Rig {
        mem: GuestMemoryMmap,
        rec: Arc<RecordingController>,
        dev: VirtioPci<Rng>,
    }

    fn rig(vtd: bool) -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("mem");
        let rec = Arc::new(RecordingController::new(24, 100));
        let vtd = vtd.then(|| Arc::new(Vtd::new(mem.clone(), rec.clone())));
        let dev = VirtioPci::new(
            Rng::new(),
            Bdf::new(3),
            0xc000_0000,
            mem.clone(),
            vtd,
            rec.clone(),
            None,
        )
        .expect("device");
        Rig { mem, rec, dev }
    }

    impl Rig {
        fn w(&mut self, off: u64, v: u32, len: usize) {
            self.dev.bar_write(0, off, &v.to_le_bytes()[..len]);
        }

        fn r(&mut self, off: u64, len: usize) -> u32 {
            let mut b = [0u8; 4];
            self.dev.bar_read(0, off, &mut b[..len]);
            u32::from_le_bytes(b)
        }

        /// The Linux driver's sequence: reset, ACK, DRIVER, features, FEATURES_OK,
        /// queue 0 (size 8, rings, vector 1), enable, DRIVER_OK; MSI-X on.
        fn bring_up(&mut self, features_hi: u32) {
            self.dev.config_write(
                crate::pci::config::reg::COMMAND,
                &(crate::pci::config::CMD_MEMORY | crate::pci::config::CMD_BUS_MASTER)
                    .to_le_bytes(),
            );
            self.w(0x14, 0, 1);
            self.w(0x14, 1 | 2, 1);
            self.w(0x00, 1, 4);
            assert_eq!(self.r(0x04, 4), 3, "VERSION_1 and ACCESS_PLATFORM offered");
            self.w(0x08, 1, 4);
            self.w(0x0c, features_hi, 4);
            self.w(0x14, 1 | 2 | 8, 1);
            if self.r(0x14, 1) & 8 == 0 {
                return;
            }
            self.w(0x16, 0, 2);
            assert_eq!(self.r(0x18, 2), 256, "max size");
            self.w(0x18, 8, 2);
            for (off, a) in [(0x20, DESC), (0x28, AVAIL), (0x30, USED)] {
                self.w(off, a as u32, 4);
                self.w(off + 4, (a >> 32) as u32, 4);
            }
            self.w(0x1a, 1, 2);
            self.w(0x1c, 1, 2);
            self.w(0x14, 1 | 2 | 8 | 4, 1);
            // MSI-X: entry 1 → vector 0x33, then enable.
            let t = MSIX_TABLE + 16;
            for (o, v) in [(0, 0xfee0_0000u32), (4, 0), (8, 0x33), (12, 0)] {
                self.w(t + o, v, 4);
            }
            let cap = self
                .dev
                .irqs
                .msix
                .as_ref()
                .map(|m| m.offset())
                .expect("msix");
            self.dev.config_write(cap + 2, &0x8000u16.to_le_bytes());
        }

        /// Offers one 64-byte writable buffer at `addr` and notifies.
        fn request(&mut self, addr: u64) {
            let m = &self.mem;
            m.write_obj(addr, GuestAddress(DESC)).expect("w");
            m.write_obj(64u32, GuestAddress(DESC + 8)).expect("w");
            m.write_obj(2u16, GuestAddress(DESC + 12)).expect("w"); // WRITE
            m.write_obj(0u16, GuestAddress(AVAIL + 4)).expect("w");
            let idx: u16 = m.read_obj(GuestAddress(AVAIL + 2)).expect("r");
            m.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % 8)))
                .expect("w");
            m.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
                .expect("w");
            self.w(NOTIFY, 0, 2);
        }
    }

    #[test]
    fn fills_buffers_and_interrupts_without_iommu() {
        let mut r = rig(false);
        r.bring_up(1);
        assert_eq!(r.r(0x1c, 2), 1, "queue enabled");
        r.request(BUF);
        let used_idx: u16 = r.mem.read_obj(GuestAddress(USED + 2)).expect("r");
        let used_len: u32 = r.mem.read_obj(GuestAddress(USED + 8)).expect("r");
        assert_eq!((used_idx, used_len), (1, 64));
        let mut b = [0u8; 64];
        r.mem.read_slice(&mut b, GuestAddress(BUF)).expect("r");
        assert!(b.iter().any(|&x| x != 0), "random bytes written");
        let vectors: Vec<u8> = r
            .rec
            .take()
            .iter()
            .filter_map(|e| match e {
                Recorded::Trigger(_, Some(m)) => Some(m.vector()),
                _ => None,
            })
            .collect();
        assert_eq!(vectors, vec![0x33], "the queue's MSI-X vector");
        assert_eq!(r.dev.device().counts(), (64, 0));
    }

    #[derive(Default)]
    struct FakeRegistrar(Mutex<Vec<(bool, u64)>>);

    impl NotifyRegistrar for FakeRegistrar {
        fn register(&self, addr: u64, _fd: &EventFd) -> Result<(), String> {
            crate::sync::lock(&self.0).push((true, addr));
            Ok(())
        }
        fn unregister(&self, addr: u64, _fd: &EventFd) -> Result<(), String> {
            crate::sync::lock(&self.0).push((false, addr));
            Ok(())
        }
    }

    #[test]
    fn notification_eventfds_follow_driver_ok_and_bar0() {
        let reg = Arc::new(FakeRegistrar::default());
        let mut r = rig(false);
        r.dev = std::mem::replace(
            &mut r.dev,
            VirtioPci::new(
                Rng::new(),
                Bdf::new(3),
                0xc000_0000,
                r.mem.clone(),
                None,
                r.rec.clone(),
                None,
            )
            .expect("device"),
        )
        .with_ioeventfds(reg.clone())
        .expect("eventfds");
        assert!(
            crate::sync::lock(&reg.0).is_empty(),
            "nothing before DRIVER_OK"
        );
        r.bring_up(1);
        assert!(r.dev.ioeventfds_registered());
        assert_eq!(*crate::sync::lock(&reg.0), vec![(true, 0xc000_2000)]);
        // The guest moves BAR0: the eventfd moves with it.
        r.dev.config_write(0x10, &0xd000_0000u32.to_le_bytes());
        assert_eq!(
            crate::sync::lock(&reg.0)[1..].to_vec(),
            vec![(false, 0xc000_2000), (true, 0xd000_2000)]
        );
        // Memory decoding off, then reset: nothing stays registered.
        r.dev.config_write(
            crate::pci::config::reg::COMMAND,
            &crate::pci::config::CMD_BUS_MASTER.to_le_bytes(),
        );
        assert!(!r.dev.ioeventfds_registered());
        r.w(0x14, 0, 1);
        let log = crate::sync::lock(&reg.0).clone();
        assert_eq!(log.last(), Some(&(false, 0xd000_2000)));
        assert_eq!(
            log.iter().filter(|e| e.0).count(),
            log.iter().filter(|e| !e.0).count()
        );
    }

    #[test]
    fn rings_and_buffers_go_through_the_unit() {
        let mut r = rig(true);
        // Translation on with an empty root table: every DMA faults.
        let vtd = r.dev.vtd.clone().expect("vtd");
        vtd.write(crate::iommu::reg::RTADDR, &0x30_0000u64.to_le_bytes());
        vtd.write(crate::iommu::reg::GCMD, &(1u32 << 30).to_le_bytes());
        vtd.write(crate::iommu::reg::GCMD, &(1u32 << 31).to_le_bytes());
        r.bring_up(3);
        assert_eq!(
            r.r(0x1c, 2),
            0,
            "rings the unit refuses leave the queue disabled"
        );
        let faults = vtd.stats().faults_recorded;
        assert!(faults >= 1, "the refused ring access was recorded");
        // A driver without ACCESS_PLATFORM is refused: it would bypass the unit.
        let mut r = rig(true);
        r.bring_up(1);
        assert_eq!(r.r(0x14, 1) & 8, 0, "FEATURES_OK refused");
        assert_eq!(r.dev.refused_features(), 1);
        r.request(BUF);
        let used_idx: u16 = r.mem.read_obj(GuestAddress(USED + 2)).expect("r");
        assert_eq!(used_idx, 0, "nothing served");
        // Without an IOMMU the same driver is fine.
        let mut r = rig(false);
        r.bring_up(1);
        assert_eq!(r.r(0x14, 1) & 8, 8, "FEATURES_OK kept");
    }

    #[test]
    fn no_dma_without_bus_mastering() {
        let mut r = rig(false);
        r.bring_up(1);
        r.dev.config_write(
            crate::pci::config::reg::COMMAND,
            &crate::pci::config::CMD_MEMORY.to_le_bytes(),
        );
        r.request(BUF);
        let used_idx: u16 = r.mem.read_obj(GuestAddress(USED + 2)).expect("r");
        assert_eq!(used_idx, 0, "rings untouched while bus mastering is off");
        assert!(r.rec.delivered().is_empty());
    }

    #[test]
    fn the_worker_serves_notifications_off_the_notifying_thread() {
        let r = rig(false);
        let dev = Arc::new(Mutex::new(r.dev));
        VirtioPci::start_worker(dev.clone(), "test-virtio".into(), Arc::new(|| {}))
            .expect("worker");
        let mut rig = Rig {
            mem: r.mem,
            rec: r.rec,
            dev: VirtioPci::new(
                Rng::new(),
                Bdf::new(4),
                0xc000_0000,
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem"),
                None,
                Arc::new(RecordingController::new(24, 30)),
                None,
            )
            .expect("device"),
        };
        // Drive the shared device through the lock, as the bus does.
        std::mem::swap(&mut rig.dev, &mut *crate::sync::lock(&dev));
        rig.bring_up(1);
        std::mem::swap(&mut rig.dev, &mut *crate::sync::lock(&dev));
        let m = &rig.mem;
        m.write_obj(BUF, GuestAddress(DESC)).expect("w");
        m.write_obj(64u32, GuestAddress(DESC + 8)).expect("w");
        m.write_obj(2u16, GuestAddress(DESC + 12)).expect("w");
        m.write_obj(0u16, GuestAddress(AVAIL + 4)).expect("w");
        m.write_obj(1u16, GuestAddress(AVAIL + 2)).expect("w");
        crate::sync::lock(&dev).bar_write(0, NOTIFY, &0u16.to_le_bytes());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let used: u16 = m.read_obj(GuestAddress(USED + 2)).expect("r");
            if used == 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the worker served nothing"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn corrupted_descriptor_faults_and_completes_empty() {
        let mut r = rig(true);
        let vtd = r.dev.vtd.clone().expect("vtd");
        // Translation on, the rings and the buffer identity-mapped (4 KiB pages).
        let w = |m: &GuestMemoryMmap, a: u64, v: u64| m.write_obj(v, GuestAddress(a)).expect("w");
        let (root, ctx, l3, l2, l1) = (0x30_0000, 0x30_1000, 0x30_2000, 0x30_3000, 0x30_4000);
        w(&r.mem, root, ctx | 1);
        w(&r.mem, ctx + 3 * 8 * 16, l3 | 1);
        w(&r.mem, ctx + 3 * 8 * 16 + 8, 1 | (1 << 8));
        w(&r.mem, l3, l2 | 3);
        w(&r.mem, l2, l1 | 3);
        for page in [DESC, AVAIL, USED, BUF] {
            w(&r.mem, l1 + 8 * (page >> 12 & 0x1ff), page | 3);
        }
        // The 2 MiB region of BUF is a separate L2 slot.
        let l1b = 0x30_5000;
        w(&r.mem, l2 + 8, l1b | 3);
        w(&r.mem, l1b, BUF | 3);
        vtd.write(crate::iommu::reg::RTADDR, &root.to_le_bytes());
        vtd.write(crate::iommu::reg::GCMD, &(1u32 << 30).to_le_bytes());
        vtd.write(crate::iommu::reg::GCMD, &(1u32 << 31).to_le_bytes());
        r.bring_up(3);
        assert_eq!(r.r(0x1c, 2), 1, "queue enabled through the unit");
        r.dev
            .device()
            .corruption()
            .store(1, std::sync::atomic::Ordering::SeqCst);
        r.request(BUF);
        let used_len: u32 = r.mem.read_obj(GuestAddress(USED + 8)).expect("r");
        assert_eq!(used_len, 0, "the corrupted request completes empty");
        let f = vtd
            .fault_records()
            .into_iter()
            .find(|f| f.pending)
            .expect("a fault");
        assert_eq!(
            (f.reason, f.sid, f.page),
            (4, 0x18, BUF | rng::CORRUPT_ADDRESS_BIT)
        );
        r.request(BUF);
        let used_len: u32 = r.mem.read_obj(GuestAddress(USED + 8 + 8)).expect("r");
        assert_eq!(used_len, 64, "the next request is served");
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let mut r = rig(false);
        r.w(0x14, 1 | 2, 1);
        r.w(0x08, 1, 4);
        r.w(0x0c, 0, 4);
        r.w(0x14, 1 | 2 | 8, 1);
        assert_eq!(r.r(0x14, 1) & 8, 0, "FEATURES_OK not kept");
    }

    #[test]
    fn reset_cycles_do_not_grow_the_unit() {
        let mut r = rig(true);
        let vtd = r.dev.vtd.clone().expect("vtd");
        for _ in 0..10_000 {
            r.bring_up(3);
        }
        let n = crate::sync::lock(&vtd.request_counters).len();
        assert!(n <= 1, "{n} request counters after 10000 reset cycles");
        assert_eq!(vtd.stats().dma_requests, 0);
    }

    #[test]
    fn hostile_driver_never_panics() {
        let mut r = rig(true);
        r.bring_up(1);
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..20_000 {
            let off = next() % BAR0_SIZE;
            let len = [1usize, 2, 4, 8][(next() % 4) as usize];
            let v = next();
            if next() % 2 == 0 {
                let mut b = vec![0u8; len];
                r.dev.bar_read(0, off, &mut b);
            } else {
                r.dev.bar_write(0, off, &v.to_le_bytes()[..len]);
            }
            if next() % 16 == 0 {
                // Garbage descriptors and rings, then a notification.
                let a = DESC + (next() % 0x3000);
                let _ = r.mem.write_obj(next(), GuestAddress(a & !7));
                r.w(NOTIFY, 0, 2);
            }
        }
    }
}
