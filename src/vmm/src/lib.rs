//! faultvisor's VMM core, and the only crate that issues KVM ioctls.
//!
//! [`Vm::build`] creates a KVM VM with the split irqchip (local APICs in the kernel, the
//! IOAPIC in userspace, 24 reserved routes) and the x2APIC API, maps guest RAM around
//! the 32-bit MMIO hole, assembles the devices, loads the kernel, initrd, command line and
//! ACPI tables, and configures the vCPUs. [`Vm::run`] starts one thread per vCPU plus an
//! event loop (`event-manager`) for host input, and returns when the guest ends the VM.

pub mod api;
pub mod device_spec;
pub mod disk_spec;
pub mod introspect;
pub mod irq;
pub mod kvm_vm;
pub mod metrics;
pub mod ram;
pub mod seccomp;
mod seccomp_names;
mod stdin;
pub mod vcpu;
pub mod workers;

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arch::layout::{self, MemoryLayout};
use devices::exit::{ExitHandle, ExitRequest};
use devices::ioapic::IoapicLine;
use devices::ioapic::{IoApic, IOAPIC_BASE, IOAPIC_SIZE};
use devices::iommu::{DmaHandle, Vtd, VtdMmio, VTD_BASE, VTD_SIZE};
use devices::legacy::{acpi_pm, cmos, debug, i8042, i8259, qemu_test, serial};
use devices::legacy::{
    AcpiPmDevice, BootTimer, DebugExit, IoapicPinTrigger, SerialDevice, SerialOutput, I8042,
};
use devices::pci::bus::BarAllocator;
use devices::pci::edu::Edu;
use devices::pci::testdev::TestDevice;
use devices::pci::{BarKind, Bdf, HostBridge, PciBarWindow, PciConfigIo, PciEcam, PciRoot};
use devices::virtio::blk::{Blk, BlkFaults};
use devices::virtio::disk::{CacheMode, DiskImage};
use devices::virtio::{rng::Rng, VirtioPci};
use kvm_bindings::{
    kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_SPLIT_IRQCHIP, KVM_CAP_X2APIC_API,
    KVM_MAX_CPUID_ENTRIES, KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK, KVM_X2APIC_API_USE_32BIT_IDS,
};
use kvm_ioctls::{Cap, Kvm};
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

pub use device_spec::{Caching, DeviceKind, DeviceSpec, IommuConfig, IommuMode};
pub use disk_spec::{DiskSource, DiskSpec};
pub use irq::KvmIrqController;
pub use kvm_vm::KvmVm;

/// Exit code when the VMM itself fails (bad configuration, host errors).
pub const EXIT_VMM_ERROR: i32 = 2;
/// Exit code when the guest crashes (triple fault, KVM internal error).
pub const EXIT_GUEST_CRASH: i32 = 4;
/// Exit code: an injected power cut stopped the VM.
pub const EXIT_POWER_CUT: i32 = 6;
/// Smallest guest RAM accepted.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Events the timeline keeps (the oldest are overwritten).
pub const TIMELINE_EVENTS: usize = 65536;
/// Largest vCPU count faultvisor describes (APIC IDs of 255 and above get MADT x2APIC
/// entries; a guest addresses them through interrupt remapping with EIM). The host's
/// KVM limit applies too.
pub const MAX_VCPUS: u32 = 1024;

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    /// The VMM's stdout (and stdin for input).
    Stdio,
    /// The VMM's stdout, no input (stdin stays untouched).
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// Discarded.
    None,
}

/// Everything needed to start a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Serial console destination.
    pub serial: SerialConfig,
    /// PCI devices beyond the host bridge, in command-line order.
    pub devices: Vec<DeviceSpec>,
    /// virtio-blk disks, in command-line order (placed after `devices`).
    pub disks: Vec<DiskSpec>,
    /// Whether to emulate the VT-d unit.
    pub iommu: IommuConfig,
    /// Where to serve the control API (HTTP on a Unix socket), if anywhere.
    pub api_socket: Option<PathBuf>,
    /// Where to write every counter as JSON when the VM ends.
    pub metrics_file: Option<PathBuf>,
    /// Where to write the event timeline (Chrome trace JSON) when the VM ends.
    pub trace_file: Option<PathBuf>,
    /// When the VMM process started (for the boot timer and start-up logs).
    pub start: Instant,
    /// Per-thread seccomp filters.
    pub seccomp: seccomp::SeccompMode,
    /// CPUID features added to or removed from the host's set (`--cpu`).
    pub cpu: arch::cpuid::CpuFeatures,
    /// How the kernel and initrd reach guest RAM (`--load`).
    pub load: arch::mapload::LoadMode,
}

/// One virtio-blk disk as the API sees it.
#[derive(Clone)]
pub struct DiskHandle {
    /// Its PCI address.
    pub bdf: Bdf,
    /// The image (power cut, counters).
    pub image: Arc<Mutex<DiskImage>>,
    /// Storage-fault switches.
    pub faults: Arc<BlkFaults>,
}

/// Errors of building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The KVM device could not be opened (the message starts with its path).
    #[error("cannot open {0}")]
    KvmOpen(String),
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// The host KVM lacks something faultvisor needs.
    #[error("this host's KVM does not support {0}")]
    MissingCapability(&'static str),
    /// `--cpu` asks for a feature the host's KVM does not offer.
    #[error("this host's KVM does not offer the CPU feature '{0}' (--cpu)")]
    CpuFeature(&'static str),
    /// Guest memory could not be created.
    #[error("cannot allocate {size} MiB of guest memory: {reason}")]
    Memory {
        /// Requested size in MiB.
        size: u64,
        /// Why.
        reason: String,
    },
    /// A file could not be opened.
    #[error("cannot open {what} '{path}': {source}")]
    File {
        /// Which file.
        what: &'static str,
        /// Path given.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Loading the kernel or initrd failed.
    #[error(transparent)]
    Boot(#[from] arch::boot::BootError),
    /// Building the ACPI tables failed.
    #[error(transparent)]
    Acpi(#[from] arch::acpi::AcpiError),
    /// Interrupt plumbing failed.
    #[error("interrupt setup failed: {0}")]
    Interrupt(#[from] devices::interrupt::InterruptError),
    /// Too many vCPUs.
    #[error("{requested} vCPUs requested, but at most {max} are supported here")]
    TooManyVcpus {
        /// Requested.
        requested: u32,
        /// Limit.
        max: u32,
    },
    /// A `--device` could not be added.
    #[error("device {0}: {1}")]
    Device(&'static str, String),
    /// Anything else during setup.
    #[error("VM setup failed: {0}")]
    Setup(String),
}

/// The first of `cpu`'s additions that the host's KVM does not offer.
fn missing_cpu_feature(
    kvm: &Kvm,
    supported: &kvm_bindings::CpuId,
    cpu: &arch::cpuid::CpuFeatures,
) -> Option<&'static str> {
    cpu.add.iter().copied().find(|f| match *f {
        // KVM reports the TSC-deadline timer as a capability, not in the CPUID set.
        "tsc-deadline" => !kvm.check_extension(Cap::TscDeadlineTimer),
        _ => !arch::cpuid::has_feature(supported, f),
    })
}

/// Gives KVM guest RAM: one memory slot per region of `mem`.
fn register_ram(vm: &KvmVm, mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mmap of `mem`, a clone of the memory `vm` (a
        // `KvmVm`) holds and drops only after closing the VM fd; every vCPU thread
        // holds the `KvmVm` until its vCPU fd is closed. So the mapping outlives every
        // KVM object that can reach this slot, and the host range given is exactly
        // the mapping's.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| VmmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(())
}

/// Creates `nr` vCPUs of `vm` with the host's CPUID as `cpu` changes it, each prepared
/// by [`vcpu::prepare`] (the boot vCPU's registers are set later).
fn create_vcpus(
    kvm: &Kvm,
    vm: &KvmVm,
    nr: u32,
    cpu: &arch::cpuid::CpuFeatures,
) -> Result<Vec<kvm_ioctls::VcpuFd>, VmmError> {
    let mut base_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    missing_cpu_feature(kvm, &base_cpuid, cpu).map_or(Ok(()), |f| Err(VmmError::CpuFeature(f)))?;
    if let Some(f) = cpu.apply(&mut base_cpuid).first() {
        return Err(VmmError::CpuFeature(f));
    }
    let mut vcpus = Vec::with_capacity(nr as usize);
    for id in 0..nr {
        let v = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| VmmError::Kvm("KVM_CREATE_VCPU", e))?;
        vcpu::prepare(&v, id, nr, &base_cpuid)?;
        vcpus.push(v);
    }
    Ok(vcpus)
}

/// Whether the host's KVM offers every feature `cpu` adds (`Err` names the first it
/// does not; a host without KVM offers nothing beyond what it names).
pub fn host_offers(cpu: &arch::cpuid::CpuFeatures) -> Result<(), &'static str> {
    if cpu.add.is_empty() {
        return Ok(());
    }
    let Ok(kvm) = open_kvm() else {
        return Ok(()); // the VM itself will report that KVM is missing
    };
    match kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES) {
        Ok(c) => missing_cpu_feature(&kvm, &c, cpu).map_or(Ok(()), Err),
        Err(_) => Ok(()),
    }
}

/// The KVM device path: `/dev/kvm`, or `$FAULTVISOR_KVM_DEVICE` (for tests and
/// unusual hosts).
pub fn kvm_device_path() -> PathBuf {
    std::env::var_os("FAULTVISOR_KVM_DEVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/kvm"))
}

/// Opens the KVM device with an explanation of the usual failures.
pub fn open_kvm() -> Result<Kvm, VmmError> {
    use std::os::unix::ffi::OsStrExt;
    let path = kvm_device_path();
    let shown = path.display().to_string();
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| VmmError::KvmOpen(format!("{shown}: path contains a NUL byte")))?;
    Kvm::new_with_path(&cpath)
        .map_err(|e| VmmError::KvmOpen(format!("{shown}: {}", describe_open_error(&e))))
}

/// Explains why opening the KVM device failed, with what to do about it.
fn describe_open_error(e: &kvm_ioctls::Error) -> String {
    match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => "no such device (KVM is not available: \
             load the kvm module, or enable virtualization in the firmware or the outer \
             hypervisor)"
            .into(),
        libc::EACCES | libc::EPERM => {
            "permission denied (add your user to the 'kvm' group, or run as root)".into()
        }
        _ => e.to_string(),
    }
}

/// The largest vCPU count this host's KVM and faultvisor allow.
pub fn max_vcpus(kvm: &Kvm) -> u32 {
    (kvm.get_max_vcpus() as u32).min(MAX_VCPUS)
}

/// Whether the host KVM is `kvm_pvm`, a software KVM that cannot run a stock Linux guest.
pub fn host_kvm_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// A VM ready to run.
pub struct Vm {
    _kvm: Kvm,
    vm: Arc<KvmVm>,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    io: Arc<IoManager>,
    ioapic: Arc<Mutex<IoApic>>,
    /// The 8259A pair (`--device pic`), wired to vCPU 0.
    pic: Option<Arc<Mutex<i8259::Pic>>>,
    /// ACPI sleep state.
    power: Arc<acpi_pm::Power>,
    /// The RTC (`--device rtc`), whose alarm wakes from S3.
    rtc: Option<Arc<Mutex<cmos::Rtc>>>,
    serial: Arc<Mutex<SerialDevice>>,
    serial_stdio: bool,
    exit: Arc<ExitHandle>,
    irq: Arc<KvmIrqController>,
    start: Instant,
    vtd: Option<Arc<Vtd>>,
    api: Option<api::ApiServer>,
    api_path: Option<PathBuf>,
    vcpu_stats: Vec<Arc<vcpu::VcpuStats>>,
    vcpu_probes: Vec<Arc<vcpu::VcpuProbe>>,
    ctx: Arc<api::ApiContext>,
    metrics_file: Option<PathBuf>,
    trace_file: Option<PathBuf>,
    seccomp: seccomp::SeccompMode,
    /// Guest memory (also read at S3 resume: the FACS waking vector).
    mem: GuestMemoryMmap,
    /// `dir=` disk images, removed when the VM goes.
    _dir_images: Vec<disk_spec::DirImage>,
}

/// What every virtio device on PCI is built with.
struct VirtioCtx<'a> {
    mem: &'a GuestMemoryMmap,
    vtd: &'a Option<Arc<Vtd>>,
    irqc: &'a Arc<KvmIrqController>,
    vm: &'a Arc<KvmVm>,
    /// The worker thread's seccomp filter.
    filter: Arc<dyn Fn() + Send + Sync>,
}

/// Puts `device` on PCI at `bdf`: the virtio-pci transport with BAR0 at `bar0` and INTx
/// on `line`, queue notifications by ioeventfd, a worker thread named `worker-DD`.
fn attach_virtio<D: devices::virtio::VirtioDevice + 'static>(
    device: D,
    bdf: Bdf,
    bar0: u64,
    line: IoapicLine,
    c: &VirtioCtx<'_>,
    root: &mut PciRoot,
    worker: &str,
) -> Result<(), String> {
    let dev = VirtioPci::new(
        device,
        bdf,
        bar0,
        c.mem.clone(),
        c.vtd.clone(),
        c.irqc.clone(),
        Some(line),
    )
    .map_err(|e| e.to_string())?;
    let dev = if ioeventfds_enabled() {
        dev.with_ioeventfds(Arc::new(kvm_vm::IoeventfdRegistrar(c.vm.clone())))
            .map_err(|e| format!("cannot create its notification eventfds: {e}"))?
    } else {
        dev
    };
    let dev = Arc::new(Mutex::new(dev));
    VirtioPci::start_worker(
        dev.clone(),
        format!("{worker}-{:02x}", bdf.device),
        c.filter.clone(),
    )
    .map_err(|e| format!("cannot start its worker thread: {e}"))?;
    root.add(bdf, dev).map_err(|e| e.to_string())
}

/// Whether virtio queue notifications use ioeventfds (the default). With
/// `FAULTVISOR_IOEVENTFD=off` each one is an MMIO exit to the VMM instead, which then
/// wakes the worker: for measuring what ioeventfds save.
fn ioeventfds_enabled() -> bool {
    std::env::var_os("FAULTVISOR_IOEVENTFD").is_none_or(|v| v != "off")
}

fn open(what: &'static str, path: &PathBuf) -> Result<File, VmmError> {
    File::open(path).map_err(|source| VmmError::File {
        what,
        path: path.clone(),
        source,
    })
}

impl Vm {
    /// Builds the VM described by `cfg`.
    pub fn build(cfg: &VmConfig) -> Result<Self, VmmError> {
        // Disk images first: their errors (missing, odd size, locked) come before
        // anything else is set up or logged.
        let mut dir_images = Vec::new();
        let mut images = Vec::new();
        for spec in &cfg.disks {
            let disk_err = |e: String| VmmError::Device("virtio-blk", e);
            let path = match &spec.source {
                disk_spec::DiskSource::File(p) if spec.snapshot => {
                    let img = disk_spec::snapshot_image(p).map_err(disk_err)?;
                    let p = img.path.clone();
                    dir_images.push(img);
                    p
                }
                disk_spec::DiskSource::File(p) => p.clone(),
                disk_spec::DiskSource::Dir(d) => {
                    let img = disk_spec::build_dir_image(d).map_err(|e| disk_err(e.to_string()))?;
                    let p = img.path.clone();
                    dir_images.push(img);
                    p
                }
            };
            let image = DiskImage::open(&path, spec.readonly, spec.cache)
                .map_err(|e| disk_err(e.to_string()))?;
            images.push((spec, path, image));
        }
        let kvm = open_kvm()?;
        if cfg.vcpus == 0 || cfg.vcpus > max_vcpus(&kvm) {
            return Err(VmmError::TooManyVcpus {
                requested: cfg.vcpus,
                max: max_vcpus(&kvm),
            });
        }
        for (cap, name) in [
            (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
            (Cap::IrqRouting, "GSI routing (KVM_CAP_IRQ_ROUTING)"),
            (
                Cap::SplitIrqchip,
                "the split irqchip (KVM_CAP_SPLIT_IRQCHIP)",
            ),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmmError::MissingCapability(name));
            }
        }
        let max_routes = kvm.check_extension_int(Cap::IrqRouting).max(64) as u32;
        // Guest RAM around the MMIO hole.
        let mem_layout = MemoryLayout::new(cfg.mem_size);
        let ranges: Vec<(GuestAddress, usize)> = mem_layout
            .ram
            .iter()
            .map(|(a, s)| (GuestAddress(*a), *s as usize))
            .collect();
        let mem = ram::guest_ram(&ranges).map_err(|e| VmmError::Memory {
            size: cfg.mem_size >> 20,
            reason: e.to_string(),
        })?;
        let vm = Arc::new(KvmVm::new(
            kvm.create_vm()
                .map_err(|e| VmmError::Kvm("KVM_CREATE_VM", e))?,
            mem.clone(),
        ));
        vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(|e| VmmError::Kvm("KVM_SET_TSS_ADDR", e))?;

        // Split irqchip before any vCPU exists: LAPICs in KVM, 24 IOAPIC routes for us.
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = u64::from(irq::IOAPIC_GSIS);
        vm.enable_cap(&cap)
            .map_err(|e| VmmError::Kvm("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)", e))?;
        if kvm.check_extension(Cap::X2ApicApi) {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_X2APIC_API,
                ..Default::default()
            };
            cap.args[0] =
                u64::from(KVM_X2APIC_API_USE_32BIT_IDS | KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK);
            vm.enable_cap(&cap)
                .map_err(|e| VmmError::Kvm("KVM_ENABLE_CAP(KVM_CAP_X2APIC_API)", e))?;
        } else {
            log::warn!("host KVM lacks KVM_CAP_X2APIC_API; APIC IDs above 254 are unusable");
        }

        // On a thread of its own, while guest RAM, the devices and the kernel are set up
        // here: guest RAM's memory slots (half a millisecond on a software KVM), the
        // vCPUs (KVM_GET_SUPPORTED_CPUID, KVM_CREATE_VCPU, CPUID, MSRs, LAPIC: about a
        // millisecond). Only the boot vCPU's registers wait for the kernel. `kvm` comes
        // back with the result.
        let vcpu_setup = {
            let vm = vm.clone();
            let cpu = cfg.cpu.clone();
            let nr = cfg.vcpus;
            let ram = mem.clone();
            std::thread::Builder::new()
                .name("fv-setup".into())
                .spawn(move || {
                    let r =
                        register_ram(&vm, &ram).and_then(|()| create_vcpus(&kvm, &vm, nr, &cpu));
                    (kvm, r)
                })
                .map_err(|e| VmmError::Setup(format!("cannot start the vCPU set-up thread: {e}")))?
        };

        for region in mem.iter() {
            // Transparent huge pages: loading a 50 MB vmlinux then takes a few hundred
            // page faults instead of thousands, and the guest gets 2 MiB mappings.
            // SAFETY: advisory call on a range we own; it cannot change the contents.
            let rc = unsafe {
                libc::madvise(
                    region.as_ptr().cast(),
                    region.len() as usize,
                    libc::MADV_HUGEPAGE,
                )
            };
            if rc != 0 {
                log::debug!("madvise(MADV_HUGEPAGE) on guest memory failed; continuing");
            }
        }

        let irqc = Arc::new(KvmIrqController::new(vm.clone(), max_routes)?);
        let timeline = Arc::new(devices::timeline::Timeline::new(TIMELINE_EVENTS));
        if cfg.trace_file.is_some() {
            timeline.enable();
            irqc.attach_timeline(timeline.clone());
        }
        let exit = Arc::new(ExitHandle::new());

        // Devices.
        let mut io = IoManager::new();
        let ioapic = Arc::new(Mutex::new(IoApic::new(irqc.clone())));
        let vcpu_probes: Vec<Arc<vcpu::VcpuProbe>> = (0..cfg.vcpus)
            .map(|_| Arc::new(vcpu::VcpuProbe::default()))
            .collect();
        // ACPI S3: entering it gets every vCPU out of KVM_RUN.
        let power = Arc::new(acpi_pm::Power::new());
        {
            let probes = vcpu_probes.clone();
            power.set_kick(Box::new(move || {
                for p in &probes {
                    p.kick_unless_current();
                }
            }));
        }
        const _: () = assert!(
            acpi_pm::PM1A_EVT == arch::acpi::PM1A_EVT_OFFSET
                && acpi_pm::PM1A_CNT == arch::acpi::PM1A_CNT_OFFSET
        );
        let reg_err = |what: &str| {
            let what = what.to_string();
            move |e: vm_device::bus::Error| VmmError::Setup(format!("registering {what}: {e:?}"))
        };
        let mmio = |base: u64, size: u64| {
            MmioRange::new(MmioAddress(base), size)
                .map_err(|e| VmmError::Setup(format!("MMIO range {base:#x}: {e:?}")))
        };
        let pio = |base: u16, size: u16| {
            PioRange::new(PioAddress(base), size)
                .map_err(|e| VmmError::Setup(format!("port range {base:#x}: {e:?}")))
        };
        io.register_mmio(mmio(IOAPIC_BASE, IOAPIC_SIZE)?, ioapic.clone())
            .map_err(reg_err("the IOAPIC"))?;

        let serial_stdio = cfg.serial == SerialConfig::Stdio;
        let out: Box<dyn Write + Send> = match &cfg.serial {
            SerialConfig::Stdio | SerialConfig::Stdout => Box::new(std::io::stdout()),
            SerialConfig::File(p) => {
                Box::new(File::create(p).map_err(|source| VmmError::File {
                    what: "serial output file",
                    path: p.clone(),
                    source,
                })?)
            }
            SerialConfig::None => Box::new(std::io::sink()),
        };
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            IoapicPinTrigger::new(ioapic.clone(), serial::COM1_PIN),
            SerialOutput::new(out),
        )));
        io.register_pio(pio(serial::COM1_PORT, serial::COM1_PORTS)?, serial.clone())
            .map_err(reg_err("COM1"))?;
        io.register_pio(
            pio(i8042::I8042_PORT, i8042::I8042_PORTS)?,
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
        )
        .map_err(reg_err("the i8042"))?;
        io.register_pio(
            pio(debug::DEBUG_EXIT_PORT, debug::DEBUG_EXIT_PORTS)?,
            Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
        )
        .map_err(reg_err("the debug-exit port"))?;
        io.register_pio(
            pio(debug::BOOT_TIMER_PORT, 1)?,
            Arc::new(Mutex::new(BootTimer::new(cfg.start))),
        )
        .map_err(reg_err("the boot-timer port"))?;
        io.register_pio(
            pio(acpi_pm::ACPI_PM_PORT, acpi_pm::ACPI_PM_PORTS)?,
            Arc::new(Mutex::new(AcpiPmDevice::new(exit.clone(), power.clone()))),
        )
        .map_err(reg_err("the ACPI PM registers"))?;
        // fw_cfg, as every QEMU x86 machine has it (kvm-unit-tests reads the CPU count
        // and RAM size there).
        io.register_pio(
            pio(qemu_test::FW_CFG_PORT, qemu_test::FW_CFG_PORTS)?,
            Arc::new(Mutex::new(qemu_test::FwCfg::new(
                cfg.mem_size,
                u16::try_from(cfg.vcpus).unwrap_or(u16::MAX),
            ))),
        )
        .map_err(reg_err("fw_cfg"))?;
        let rtc = if cfg.devices.iter().any(|d| d.kind == DeviceKind::Rtc) {
            let rtc = Arc::new(Mutex::new(cmos::Rtc::new(Box::new(cmos::HostClock))));
            io.register_pio(pio(cmos::RTC_PORT, cmos::RTC_PORTS)?, rtc.clone())
                .map_err(reg_err("the RTC"))?;
            log::info!("device rtc: MC146818 RTC and CMOS RAM at ports 0x70-0x71");
            Some(rtc)
        } else {
            None
        };
        // The 8259A pair, on request: Linux is better off without one (see i8259.rs).
        let pic = if cfg.devices.iter().any(|d| d.kind == DeviceKind::Pic) {
            let pic = Arc::new(Mutex::new(i8259::Pic::new()));
            for base in [i8259::MASTER_PORT, i8259::SLAVE_PORT, i8259::ELCR_PORT] {
                io.register_pio(
                    pio(base, 2)?,
                    Arc::new(Mutex::new(i8259::PicPorts::new(pic.clone(), base))),
                )
                .map_err(reg_err("the 8259A PIC"))?;
            }
            log::info!(
                "device pic: 8259A pair at ports 0x20, 0xa0 and 0x4d0, INTR on vCPU 0's LINT0"
            );
            Some(pic)
        } else {
            None
        };
        if cfg.devices.iter().any(|d| d.kind == DeviceKind::PcTestdev) {
            io.register_pio(
                pio(qemu_test::TESTDEV_IOPORT, qemu_test::TESTDEV_PORTS)?,
                Arc::new(Mutex::new(qemu_test::PcTestDev::new(mem.clone()))),
            )
            .map_err(reg_err("pc-testdev"))?;
            io.register_pio(
                pio(
                    qemu_test::TESTDEV_IRQ_PORT,
                    devices::ioapic::NUM_PINS as u16,
                )?,
                Arc::new(Mutex::new(match &pic {
                    Some(pic) => {
                        // A line raised on another vCPU's thread must get vCPU 0 out of
                        // KVM_RUN (it looks at the PIC before each entry).
                        let bsp = vcpu_probes.first().cloned().unwrap_or_default();
                        qemu_test::PcTestDevIrq::new(ioapic.clone()).with_pic(
                            pic.clone(),
                            Box::new(move || {
                                bsp.kick_unless_current();
                            }),
                        )
                    }
                    None => qemu_test::PcTestDevIrq::new(ioapic.clone()),
                })),
            )
            .map_err(reg_err("pc-testdev's IRQ lines"))?;
            log::info!("device pc-testdev at ports 0xe0-0xeb and 0x2000-0x2017");
        }

        // The VT-d unit, before the devices whose DMA it translates.
        let vtd = if cfg.iommu.enabled(&cfg.devices)
            || (cfg.iommu.mode == IommuMode::Auto && !cfg.disks.is_empty())
        {
            let v = Arc::new(
                Vtd::new(mem.clone(), irqc.clone())
                    .with_interrupt_remapping(!cfg.iommu.no_intremap)
                    .with_eim(!cfg.iommu.no_eim)
                    .with_ioapic_sid_check(cfg.iommu.ioapic_sid)
                    .with_caching(cfg.iommu.caching),
            );
            irqc.attach_remapper(v.clone());
            if cfg.trace_file.is_some() {
                v.attach_timeline(timeline.clone());
            }
            io.register_mmio(mmio(VTD_BASE, VTD_SIZE)?, Arc::new(VtdMmio(v.clone())))
                .map_err(reg_err("the VT-d unit"))?;
            log::info!("Intel VT-d unit at {VTD_BASE:#x}");
            Some(v)
        } else {
            None
        };
        let dma_handle = |bdf: Bdf| match &vtd {
            Some(v) => v.handle(bdf.requester_id()),
            None => DmaHandle::direct(mem.clone(), bdf.requester_id(), Some(irqc.clone())),
        };

        // PCI: the host bridge, then the --device list (explicit addresses first, so
        // that automatic ones take the slots left over).
        let mut placed: Vec<(Bdf, DeviceKind)> = Vec::new();
        let mut virtio_corruption = Vec::new();
        // What every virtio device is attached with (the filter is built per device,
        // only where there is one).
        let virtio_ctx = |filter| VirtioCtx {
            mem: &mem,
            vtd: &vtd,
            irqc: &irqc,
            vm: &vm,
            filter,
        };
        let mmio64 = mem_layout.pci_mmio64();
        let mut root = PciRoot::new();
        root.add(Bdf::new(0), Arc::new(Mutex::new(HostBridge::new())))
            .map_err(|e| VmmError::Setup(e.to_string()))?;
        let mut bars =
            BarAllocator::new((layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE), mmio64)
                .map_err(|e| VmmError::Setup(format!("PCI windows: {e}")))?;
        let mut specs: Vec<&DeviceSpec> = cfg.devices.iter().filter(|d| d.bdf.is_some()).collect();
        specs.extend(
            cfg.devices
                .iter()
                .filter(|d| d.bdf.is_none() && d.kind.is_pci()),
        );
        for spec in specs {
            let bdf = match spec.bdf {
                Some(b) => b,
                None => root
                    .free_slot(1)
                    .map_err(|e| VmmError::Device(spec.kind.name(), e.to_string()))?,
            };
            let dev_err = |e: String| VmmError::Device(spec.kind.name(), e);
            placed.push((bdf, spec.kind));
            match spec.kind {
                DeviceKind::Test => {
                    let bar0 = bars
                        .allocate(BarKind::Mem32, 0x1000)
                        .map_err(|e| dev_err(e.to_string()))?;
                    let bar1 = bars
                        .allocate(BarKind::Mem32, 0x1000)
                        .map_err(|e| dev_err(e.to_string()))?;
                    // INTA of slot d goes to pin 16 + d % 8 (pins 16..23 are PCI's).
                    let pin = 16 + usize::from(bdf.device % 8);
                    let line = IoapicLine::new(ioapic.clone(), pin);
                    let dev = TestDevice::new(bdf, bar0, bar1, irqc.clone(), Some(line))
                        .map_err(|e| dev_err(e.to_string()))?;
                    root.add(bdf, Arc::new(Mutex::new(dev)))
                        .map_err(|e| dev_err(e.to_string()))?;
                    log::info!("device test (fv-test 1234:fa17) at {bdf}, BAR0 {bar0:#x}, INTA -> IOAPIC pin {pin}");
                }
                DeviceKind::Edu => {
                    let bar0 = bars
                        .allocate(BarKind::Mem32, devices::pci::edu::BAR0_SIZE)
                        .map_err(|e| dev_err(e.to_string()))?;
                    let pin = 16 + usize::from(bdf.device % 8);
                    let line = IoapicLine::new(ioapic.clone(), pin);
                    let dev = Edu::new(bdf, bar0, irqc.clone(), Some(line), dma_handle(bdf))
                        .map_err(|e| dev_err(e.to_string()))?;
                    root.add(bdf, Arc::new(Mutex::new(dev)))
                        .map_err(|e| dev_err(e.to_string()))?;
                    log::info!(
                        "device edu (1234:11e8) at {bdf}, BAR0 {bar0:#x}, INTA -> IOAPIC pin {pin}, DMA {}",
                        if vtd.is_some() { "through VT-d" } else { "direct" }
                    );
                }
                // Not on PCI: registered with the ports above.
                DeviceKind::PcTestdev | DeviceKind::Pic | DeviceKind::Rtc => {}
                // --device cannot name it (the parser refuses).
                DeviceKind::VirtioBlk => {}
                DeviceKind::VirtioRng => {
                    let bar0 = bars
                        .allocate(BarKind::Mem32, devices::virtio::BAR0_SIZE)
                        .map_err(|e| dev_err(e.to_string()))?;
                    let pin = 16 + usize::from(bdf.device % 8);
                    let line = IoapicLine::new(ioapic.clone(), pin);
                    let rng = Rng::new();
                    virtio_corruption.push((bdf, rng.corruption()));
                    let vctx = virtio_ctx(seccomp::thread_filter(
                        cfg.seccomp,
                        seccomp::ThreadKind::Worker,
                    )?);
                    attach_virtio(rng, bdf, bar0, line, &vctx, &mut root, "fv-virtio")
                        .map_err(dev_err)?;
                    log::info!(
                        "device virtio-rng (1af4:1044) at {bdf}, BAR0 {bar0:#x}, DMA {}",
                        if vtd.is_some() {
                            "through VT-d when the driver accepts ACCESS_PLATFORM"
                        } else {
                            "direct"
                        }
                    );
                }
            }
        }
        // Disks, after the --device list.
        let mut disks = Vec::new();
        for (spec, path, image) in images {
            let disk_err = |e: String| VmmError::Device("virtio-blk", e);
            let bdf = match spec.bdf {
                Some(b) => b,
                None => root.free_slot(1).map_err(|e| disk_err(e.to_string()))?,
            };
            let bar0 = bars
                .allocate(BarKind::Mem32, devices::virtio::BAR0_SIZE)
                .map_err(|e| disk_err(e.to_string()))?;
            let pin = 16 + usize::from(bdf.device % 8);
            let line = IoapicLine::new(ioapic.clone(), pin);
            let sectors = image.sectors();
            let image = Arc::new(Mutex::new(image));
            let serial = spec
                .serial
                .clone()
                .unwrap_or_else(|| format!("fv-{:02x}", bdf.device));
            let queues = (cfg.vcpus as usize).min(devices::virtio::blk::MAX_QUEUES);
            let blk = Blk::new(image.clone(), queues, &serial);
            disks.push(DiskHandle {
                bdf,
                image: image.clone(),
                faults: blk.faults(),
            });
            let vctx = virtio_ctx(seccomp::thread_filter(
                cfg.seccomp,
                seccomp::ThreadKind::Worker,
            )?);
            attach_virtio(blk, bdf, bar0, line, &vctx, &mut root, "fv-blk").map_err(disk_err)?;
            placed.push((bdf, DeviceKind::VirtioBlk));
            log::info!(
                "device virtio-blk (1af4:1042) at {bdf}: {} ({} MiB{}, {queues} queue(s), cache={}), DMA {}",
                path.display(),
                sectors >> 11,
                if spec.readonly { ", read-only" } else { "" },
                match spec.cache {
                    CacheMode::Volatile => "volatile",
                    CacheMode::Host => "host",
                },
                if vtd.is_some() {
                    "through VT-d when the driver accepts ACCESS_PLATFORM"
                } else {
                    "direct"
                }
            );
        }
        // As firmware leaves them: memory decoding on (BARs are assigned) and the
        // interrupt line naming the IOAPIC pin INTA drives. Bus mastering stays off
        // until the guest's driver asks for it.
        for (bdf, kind) in &placed {
            if kind.is_pci() {
                root.config_write(*bdf, 0x04, &0x0002u16.to_le_bytes());
                root.config_write(*bdf, 0x3c, &[16 + bdf.device % 8]);
            }
        }
        let root = Arc::new(root);
        io.register_mmio(
            mmio(layout::ECAM_START, layout::ECAM_SIZE)?,
            Arc::new(PciEcam::new(root.clone())),
        )
        .map_err(reg_err("the PCI ECAM window"))?;
        io.register_pio(
            pio(
                devices::pci::bus::CONFIG_ADDRESS_PORT,
                devices::pci::bus::CONFIG_IO_PORTS,
            )?,
            Arc::new(PciConfigIo::new(root.clone())),
        )
        .map_err(reg_err("the PCI config ports"))?;
        let window = Arc::new(PciBarWindow::new(root.clone()));
        io.register_mmio(
            mmio(layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE)?,
            window.clone(),
        )
        .map_err(reg_err("the 32-bit PCI window"))?;
        io.register_mmio(mmio(mmio64.0, mmio64.1)?, window)
            .map_err(reg_err("the 64-bit PCI window"))?;

        // Kernel, initrd, command line, ACPI, zero page (Linux) or Multiboot information.
        let mut kf = open("kernel", &cfg.kernel)?;
        let multiboot = arch::boot::detect_format(&mut kf)? == arch::boot::KernelFormat::Multiboot;
        let mut linux = None;
        let boot_entry = if multiboot {
            let mut initrd = match &cfg.initrd {
                Some(p) => Some((p.display().to_string(), open("initrd", p)?)),
                None => None,
            };
            arch::boot::load_multiboot(
                &mem,
                &mem_layout,
                &mut kf,
                &cfg.kernel.display().to_string(),
                &cfg.cmdline,
                initrd.as_mut().map(|(n, f)| (n.as_str(), f)),
            )?
        } else {
            let (kernel, ks) = arch::boot::load_kernel(&mem, &mut kf, cfg.load)?;
            let initrd = match &cfg.initrd {
                Some(p) => {
                    let mut f = open("initrd", p)?;
                    let (placed, is) =
                        arch::boot::load_initrd(&mem, &mem_layout, &kernel, &mut f, cfg.load)?;
                    log::debug!(
                        "initrd: {} KiB mapped from the file, {} KiB copied",
                        is.mapped >> 10,
                        is.copied >> 10
                    );
                    Some(placed)
                }
                None => None,
            };
            log::debug!(
                "kernel: {} KiB mapped from the file, {} KiB copied",
                ks.mapped >> 10,
                ks.copied >> 10
            );
            let cmdline_size = arch::boot::load_command_line(&mem, &cfg.cmdline)?;
            linux = Some((kernel, initrd, cmdline_size));
            arch::regs::BootEntry::Linux64(kernel.entry)
        };
        let acpi_cfg = arch::acpi::AcpiConfig {
            nr_vcpus: cfg.vcpus,
            ioapic_address: IOAPIC_BASE as u32,
            ecam_base: layout::ECAM_START,
            pci_mmio32: (layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE),
            pci_mmio64: mmio64,
            pm_port: acpi_pm::ACPI_PM_PORT,
            reset_value: acpi_pm::RESET_VALUE,
            s5_slp_typ: acpi_pm::S5_SLP_TYP,
            com1: (serial::COM1_PORT, serial::COM1_PIN as u32),
            extra_tables: match vtd {
                Some(_) => vec![arch::acpi::dmar(
                    devices::iommu::HAW_BITS,
                    VTD_BASE,
                    0,
                    !cfg.iommu.no_intremap,
                    cfg.iommu.no_eim,
                )],
                None => Vec::new(),
            },
        };
        let rsdp = arch::acpi::create_acpi_tables(&mem, &acpi_cfg)?;
        arch::boot::write_reset_vector_stub(
            &mem,
            acpi_pm::ACPI_PM_PORT + acpi_pm::RESET,
            acpi_pm::RESET_VALUE,
        )?;
        if let Some((kernel, initrd, cmdline_size)) = &linux {
            arch::boot::write_boot_params(&mem, &mem_layout, kernel, *cmdline_size, *initrd, rsdp)?;
        }
        log::debug!("boot entry {boot_entry:x?}, rsdp {rsdp:#x}");

        // The seccomp filters while the set-up thread finishes (it takes longer), then
        // the vCPUs it created.
        seccomp::precompile(cfg.seccomp);
        let (kvm, prepared) = vcpu_setup
            .join()
            .map_err(|_| VmmError::Setup("the vCPU set-up thread panicked".into()))?;
        let vcpus = prepared?;
        if let Some(boot_vcpu) = vcpus.first() {
            vcpu::set_boot_state(boot_vcpu, &mem, boot_entry)?;
        }

        let vcpu_stats: Vec<Arc<vcpu::VcpuStats>> = (0..cfg.vcpus)
            .map(|_| Arc::new(vcpu::VcpuStats::default()))
            .collect();
        let ctx = Arc::new(api::ApiContext {
            mem: mem.clone(),
            vtd: vtd.clone(),
            devices: placed,
            virtio_corruption,
            disks,
            exit: exit.clone(),
            irq: irqc.clone(),
            ioapic: ioapic.clone(),
            start: cfg.start,
            vcpus: cfg.vcpus,
            vcpu_stats: vcpu_stats.clone(),
            vcpu_probes: vcpu_probes.clone(),
            timeline,
            workers: std::sync::OnceLock::new(),
        });
        let api = match &cfg.api_socket {
            Some(path) => {
                let server = api::ApiServer::bind(path, ctx.clone())?;
                let pool = workers::Workers::start(seccomp::thread_filter(
                    cfg.seccomp,
                    seccomp::ThreadKind::Worker,
                )?)
                .map_err(|e| VmmError::Setup(format!("cannot start the API workers: {e}")))?;
                let _ = ctx.workers.set(pool);
                // Delayed and duplicated interrupts (armed only through the API).
                irqc.start_timer(seccomp::thread_filter(
                    cfg.seccomp,
                    seccomp::ThreadKind::Worker,
                )?)
                .map_err(|e| VmmError::Setup(format!("cannot start the interrupt timer: {e}")))?;
                Some(server)
            }
            None => None,
        };
        for (what, p) in [
            ("metrics file", &cfg.metrics_file),
            ("trace file", &cfg.trace_file),
        ] {
            if let Some(p) = p {
                // Fail now rather than after the guest ran.
                File::create(p).map_err(|source| VmmError::File {
                    what,
                    path: p.clone(),
                    source,
                })?;
            }
        }

        Ok(Self {
            _kvm: kvm,
            vm,
            vcpus,
            io: Arc::new(io),
            ioapic,
            pic,
            power,
            rtc,
            serial,
            serial_stdio,
            exit,
            irq: irqc,
            start: cfg.start,
            vtd,
            api,
            api_path: cfg.api_socket.clone(),
            vcpu_stats,
            vcpu_probes,
            ctx,
            metrics_file: cfg.metrics_file.clone(),
            trace_file: cfg.trace_file.clone(),
            seccomp: cfg.seccomp,
            mem,
            _dir_images: dir_images,
        })
    }

    /// The exit handle (to end the VM from outside).
    pub fn exit_handle(&self) -> Arc<ExitHandle> {
        self.exit.clone()
    }

    /// The interrupt controller.
    pub fn irq_controller(&self) -> Arc<KvmIrqController> {
        self.irq.clone()
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> Arc<KvmVm> {
        self.vm.clone()
    }

    /// Ends every vCPU thread (each sees the exit request after a kick out of KVM_RUN)
    /// and joins it. A thread that does not end within 2 s is reported and left to the
    /// process exit.
    fn stop_vcpus(&self, threads: Vec<std::thread::JoinHandle<()>>) {
        let deadline = Instant::now() + std::time::Duration::from_secs(2);
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            // A kick that lands outside KVM_RUN is lost; repeat until all are out.
            for p in &self.vcpu_probes {
                p.kick();
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        for (id, t) in threads.into_iter().enumerate() {
            if t.is_finished() {
                let _ = t.join();
            } else {
                log::warn!("vcpu{id} did not stop within 2 s; leaving it to the process exit");
            }
        }
    }

    /// Runs the VM until the guest ends it; returns why it ended.
    pub fn run(mut self) -> Result<ExitRequest, VmmError> {
        let mut subscribers: Vec<Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>> =
            Vec::new();
        if self.serial_stdio {
            subscribers.push(Arc::new(Mutex::new(stdin::input(
                self.serial.clone(),
                self.exit.clone(),
            ))));
        }
        if let Some(api) = self.api.take() {
            subscribers.push(Arc::new(Mutex::new(api)));
        }
        let filter = |k| seccomp::thread_filter(self.seccomp, k);
        let event_loop_filter = filter(seccomp::ThreadKind::EventLoop)?;
        vcpu::register_kick_signal()?;
        let vcpu_filter = filter(seccomp::ThreadKind::Vcpu)?;
        // From here on the guest drives the log: every call site is rate-limited.
        devices::ratelimit::set_guest_running();
        let mut threads = Vec::new();
        for (id, v) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let ctx = vcpu::VcpuContext {
                io: self.io.clone(),
                ioapic: self.ioapic.clone(),
                exit: self.exit.clone(),
                stats: self.vcpu_stats.get(id).cloned().unwrap_or_default(),
                probe: self.vcpu_probes.get(id).cloned().unwrap_or_default(),
                pic: if id == 0 { self.pic.clone() } else { None },
                power: self.power.clone(),
                rtc: self.rtc.clone(),
                mem: self.mem.clone(),
            };
            let start = self.start;
            // Holds the guest memory mapped until this thread's vCPU fd is closed.
            let vm = self.vm.clone();
            let install = vcpu_filter.clone();
            let handle = std::thread::Builder::new()
                .name(format!("fv-vcpu{id}"))
                .spawn(move || {
                    install();
                    if id == 0 {
                        log::info!(
                            "first KVM_RUN {} us after VMM start",
                            start.elapsed().as_micros()
                        );
                    }
                    vcpu::run(v, id as u32, ctx);
                    drop(vm);
                })
                .map_err(|e| VmmError::Setup(format!("cannot start a vCPU thread: {e}")))?;
            threads.push(handle);
        }
        // The console input and API thread after the vCPUs: the guest starts sooner.
        if let Err(e) = stdin::spawn_event_loop(subscribers, event_loop_filter) {
            self.stop_vcpus(threads);
            return Err(e);
        }
        // The main thread only waits and tears down from here on.
        filter(seccomp::ThreadKind::Main)?();
        let req = self.exit.wait(None).unwrap_or(ExitRequest {
            code: EXIT_VMM_ERROR,
            reason: "exit handle closed".into(),
        });
        self.stop_vcpus(threads);
        for d in &self.ctx.disks {
            let s = d.faults.stats();
            let i = devices::sync::lock(&d.image).stats();
            log::info!(
                "virtio-blk {}: {} requests ok, {} I/O errors, {} unsupported, {} without a status; {} B read, {} B written, {} flushes, {} cache write-backs, {} B lost to power cuts",
                d.bdf, s.ok, s.ioerr, s.unsupp, s.lost_status, i.read_bytes, i.written_bytes, i.flushes, i.writebacks, i.lost_bytes
            );
        }
        if let Some(v) = &self.vtd {
            log::info!("VT-d: {}", v.stats());
            if v.caching() == devices::iommu::CachingMode::Exact {
                let ([c, t, i], hist) = v.stale_uses();
                log::info!(
                    "VT-d exact caching: {} stale uses (context {c}, IOTLB {t}, IRTE {i}) of {} distinct entries",
                    c + t + i,
                    hist.len()
                );
            }
        }
        if let Some(p) = &self.api_path {
            let _ = std::fs::remove_file(p);
        }
        if let Some(p) = &self.trace_file {
            if let Err(e) = std::fs::write(p, self.ctx.timeline.chrome_trace()) {
                log::warn!("cannot write the trace file {}: {e}", p.display());
            }
        }
        if let Some(p) = &self.metrics_file {
            let mut m = metrics::json(&self.ctx);
            m["exit"] = serde_json::json!({"code": req.code, "reason": req.reason});
            if let Err(e) = std::fs::write(p, format!("{m:#}\n")) {
                log::warn!("cannot write the metrics file {}: {e}", p.display());
            }
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_open_errors_say_what_to_do() {
        let e = |n| describe_open_error(&kvm_ioctls::Error::new(n));
        assert!(e(libc::ENOENT).starts_with("no such device (KVM is not available"));
        assert!(e(libc::EACCES).contains("add your user to the 'kvm' group"));
        assert!(e(libc::EPERM).starts_with("permission denied"));
        assert!(!e(libc::EIO).is_empty());
    }

    #[test]
    fn missing_kvm_device_is_a_clean_error() {
        std::env::set_var("FAULTVISOR_KVM_DEVICE", "/nonexistent/kvm");
        let r = open_kvm();
        std::env::remove_var("FAULTVISOR_KVM_DEVICE");
        let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.starts_with("cannot open /nonexistent/kvm: no such device"),
            "{msg}"
        );
    }
}
