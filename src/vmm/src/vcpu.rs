//! vCPU setup (CPUID, MSRs, LAPIC LINT1, long-mode registers for the boot vCPU) and the
//! run loop that dispatches exits: port and MMIO accesses to the `vm-device` I/O
//! manager, `KVM_EXIT_IOAPIC_EOI` to the userspace IOAPIC, and VM-ending exits to the
//! [`ExitHandle`]. vCPU 0 also takes the 8259A's ExtINT interrupts (`KVM_INTERRUPT`)
//! where the VM has one.

use std::sync::{Arc, Mutex};

use devices::exit::ExitHandle;
use devices::ioapic::IoApic;
use devices::legacy::acpi_pm::Power;
use devices::legacy::cmos::Rtc;
use devices::legacy::i8259::Pic;
use devices::sync::lock;
use kvm_bindings::{kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{VmmError, EXIT_GUEST_CRASH};

/// LVT LINT1 register offset in the LAPIC page.
const APIC_LVT_LINT1: usize = 0x360;
/// Delivery mode NMI in an LVT entry.
const APIC_MODE_NMI: u32 = 0x4 << 8;
/// `KVM_SYSTEM_EVENT_SHUTDOWN`, `_RESET`, `_CRASH`.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;

/// Gives a freshly created vCPU its CPUID, boot MSRs and LAPIC LINT1: everything that
/// does not depend on guest RAM's contents, so it can run while the kernel loads. The
/// boot vCPU then gets [`set_boot_state`]; the others wait for INIT/SIPI in the
/// in-kernel LAPIC.
pub fn prepare(vcpu: &VcpuFd, id: u32, nr_vcpus: u32, base_cpuid: &CpuId) -> Result<(), VmmError> {
    let kvm_err = |what: &'static str| move |e: kvm_ioctls::Error| VmmError::Kvm(what, e);
    let mut cpuid = base_cpuid.clone();
    arch::cpuid::configure(&mut cpuid, id, nr_vcpus);
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;

    // MSRs one at a time: a host that refuses one must not stop the VM.
    for (index, data) in arch::msr::boot_msrs() {
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }])
        .map_err(|e| VmmError::Setup(format!("MSR list: {e:?}")))?;
        match vcpu.set_msrs(&msrs) {
            Ok(1) => {}
            Ok(_) => log::debug!("vcpu{id}: host refused MSR {index:#x}; continuing"),
            Err(e) => log::debug!("vcpu{id}: setting MSR {index:#x} failed ({e}); continuing"),
        }
    }

    // LINT1 delivers NMIs (as firmware would leave it).
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let reg = &mut lapic.regs[APIC_LVT_LINT1..APIC_LVT_LINT1 + 4];
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(reg.iter()) {
        *d = *s as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | APIC_MODE_NMI;
    for (d, s) in reg.iter_mut().zip(v.to_le_bytes()) {
        *d = s as _;
    }
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    Ok(())
}

/// Puts the boot vCPU at `boot`: long mode (Linux) or protected mode (Multiboot), with
/// the page tables or descriptors written into `mem`, so after the kernel is loaded.
pub fn set_boot_state(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    boot: arch::regs::BootEntry,
) -> Result<(), VmmError> {
    let kvm_err = |what: &'static str| move |e: kvm_ioctls::Error| VmmError::Kvm(what, e);
    let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let setup = |e: arch::regs::RegsError| VmmError::Setup(e.to_string());
    let (sregs, regs) = match boot {
        arch::regs::BootEntry::Linux64(entry) => (
            arch::regs::setup_long_mode(mem, sregs).map_err(setup)?,
            arch::regs::boot_regs(entry),
        ),
        arch::regs::BootEntry::Multiboot { entry, info } => (
            arch::regs::setup_protected_mode(mem, sregs).map_err(setup)?,
            arch::regs::multiboot_regs(entry, info),
        ),
    };
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_fpu(&arch::regs::boot_fpu())
        .map_err(kvm_err("KVM_SET_FPU"))?;
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    Ok(())
}

/// Exit reasons counted per vCPU.
pub const EXIT_REASONS: [&str; 11] = [
    "io_in",
    "io_out",
    "mmio_read",
    "mmio_write",
    "ioapic_eoi",
    "hlt",
    "shutdown",
    "system_event",
    "internal_error",
    "intr",
    "other",
];

/// VM exits of one vCPU, by reason (indexes of [`EXIT_REASONS`]); each vCPU has its own
/// so the counting threads do not share cache lines.
#[derive(Debug, Default)]
pub struct VcpuStats {
    exits: [std::sync::atomic::AtomicU64; 11],
}

impl VcpuStats {
    fn count(&self, i: usize) {
        self.exits[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// (reason, count) pairs.
    pub fn exits(&self) -> Vec<(&'static str, u64)> {
        EXIT_REASONS
            .iter()
            .zip(&self.exits)
            .map(|(r, c)| (*r, c.load(std::sync::atomic::Ordering::Relaxed)))
            .collect()
    }
}

/// Special registers of a vCPU, as introspection needs them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuSnapshot {
    /// IDT base (a guest-virtual address) and limit.
    pub idt_base: u64,
    /// IDT limit.
    pub idt_limit: u16,
    /// CR0, CR3, CR4 and EFER (paging mode and page-table root).
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
    /// RIP at the moment of the snapshot.
    pub rip: u64,
}

/// Asks a running vCPU thread for its registers: the requester sets `pending` and
/// signals the thread out of KVM_RUN; the thread answers between two runs, so the vCPU
/// pauses only for that.
#[derive(Debug, Default)]
pub struct VcpuProbe {
    pending: std::sync::atomic::AtomicBool,
    reply: Mutex<Option<VcpuSnapshot>>,
    ready: std::sync::Condvar,
    /// The vCPU's thread while it runs: set by the thread itself first thing, cleared
    /// by it last thing, both under this lock, so a holder of the lock that sees
    /// `Some` knows the thread is alive.
    thread: Mutex<Option<libc::pthread_t>>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of the signal that kicks vCPU threads out of KVM_RUN.
pub fn register_kick_signal() -> Result<(), VmmError> {
    vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN(), kick_handler)
        .map_err(|e| VmmError::Setup(format!("cannot install the vCPU kick signal: {e}")))
}

impl VcpuProbe {
    /// Called by the vCPU thread when it starts.
    fn thread_started(&self) {
        // SAFETY: pthread_self has no preconditions.
        *lock(&self.thread) = Some(unsafe { libc::pthread_self() });
    }

    /// Called by the vCPU thread as its last act.
    fn thread_exited(&self) {
        *lock(&self.thread) = None;
    }

    /// Kicks the vCPU thread out of KVM_RUN; false when it no longer runs.
    pub fn kick(&self) -> bool {
        let t = lock(&self.thread);
        let Some(thread) = *t else {
            return false;
        };
        // SAFETY: `thread` is alive: it clears this field, under the lock we hold,
        // before it ends. The kick signal has a handler that does nothing, so the
        // only effect is that a blocking KVM_RUN returns EINTR.
        unsafe { libc::pthread_kill(thread, vmm_sys_util::signal::SIGRTMIN()) };
        true
    }

    /// Kicks the vCPU thread unless the caller is that thread (which looks at what
    /// changed before it re-enters anyway). A kick that lands between two KVM_RUNs is
    /// lost; the thread then sees the change at its next exit.
    pub fn kick_unless_current(&self) {
        let current = lock(&self.thread).is_some_and(|t| {
            // SAFETY: pthread_self and pthread_equal have no preconditions.
            unsafe { libc::pthread_equal(t, libc::pthread_self()) != 0 }
        });
        if !current {
            self.kick();
        }
    }

    /// The vCPU's registers, or None if its thread does not answer within `timeout`.
    pub fn snapshot(&self, timeout: std::time::Duration) -> Option<VcpuSnapshot> {
        lock(&self.thread).as_ref()?;
        *lock(&self.reply) = None;
        self.pending
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = std::time::Instant::now() + timeout;
        let mut reply = lock(&self.reply);
        loop {
            if let Some(r) = reply.take() {
                return Some(r);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                self.pending
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                return None;
            }
            // A signal that lands outside KVM_RUN is lost; kick again until answered.
            if !self.kick() {
                self.pending
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                return None;
            }
            let wait = (deadline - now).min(std::time::Duration::from_millis(5));
            reply = match self.ready.wait_timeout(reply, wait) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    fn serve(&self, vcpu: &VcpuFd) {
        if !self
            .pending
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let snap = vcpu.get_sregs().ok().map(|s| VcpuSnapshot {
            idt_base: s.idt.base,
            idt_limit: s.idt.limit,
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            rip: vcpu.get_regs().map(|r| r.rip).unwrap_or(0),
        });
        *lock(&self.reply) = snap;
        self.ready.notify_all();
    }
}

/// What a vCPU thread needs.
pub struct VcpuContext {
    /// Port and MMIO devices.
    pub io: Arc<IoManager>,
    /// The IOAPIC (for EOI exits).
    pub ioapic: Arc<Mutex<IoApic>>,
    /// Where VM-ending events go.
    pub exit: Arc<ExitHandle>,
    /// This vCPU's exit counters.
    pub stats: Arc<VcpuStats>,
    /// Register requests from the API.
    pub probe: Arc<VcpuProbe>,
    /// The 8259A pair whose INTR this vCPU takes (vCPU 0 only).
    pub pic: Option<Arc<Mutex<Pic>>>,
    /// ACPI sleep state (S3).
    pub power: Arc<Power>,
    /// The RTC, whose alarm wakes the VM from S3.
    pub rtc: Option<Arc<Mutex<Rtc>>>,
    /// Guest memory (the FACS waking vector).
    pub mem: GuestMemoryMmap,
}

/// How often a sleeping vCPU thread looks for the end of the VM.
const SLEEP_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// ACPI S3 on this vCPU: the thread stops running the guest until the VM wakes. vCPU 0
/// waits for the wake event (the RTC alarm, if its PM1 enable bit is set; nothing else
/// wakes this VM) and resumes at the FACS waking vector in real mode, as firmware
/// would; the other vCPUs come back waiting for INIT/SIPI, as after a reset.
fn suspend(vcpu: &mut VcpuFd, id: u32, ctx: &VcpuContext) {
    let p = &ctx.power;
    if id == 0 {
        log::debug!("vcpu0: asleep (S3)");
        if !p.rtc_wake_enabled() || ctx.rtc.is_none() {
            log::warn!(
                "acpi: the guest entered S3 with no wake source (the RTC alarm with PM1 RTC_EN is the only one): it sleeps until the VM is stopped"
            );
        }
        loop {
            if ctx.exit.get().is_some() {
                return;
            }
            let alarm = if p.rtc_wake_enabled() {
                ctx.rtc.as_ref().and_then(|r| lock(r).next_alarm_in())
            } else {
                None
            };
            match alarm {
                Some(d) if d <= SLEEP_POLL => {
                    std::thread::sleep(d);
                    p.wake(devices::legacy::acpi_pm::PM1_RTC);
                    break;
                }
                _ => std::thread::sleep(SLEEP_POLL),
            }
        }
        let mut v = [0u8; 4];
        let vector = match ctx.mem.read_slice(
            &mut v,
            GuestAddress(arch::acpi::FACS_ADDRESS + arch::acpi::FACS_WAKING_VECTOR),
        ) {
            Ok(()) => u32::from_le_bytes(v),
            Err(_) => 0,
        };
        if vector == 0 {
            // Firmware would boot afresh; faultvisor has no firmware to boot into.
            ctx.exit.request(
                0,
                "guest woke from S3 with no FACS waking vector (a reboot): the VM ends",
            );
            return;
        }
        let resumed = vcpu
            .get_sregs()
            .and_then(|s| vcpu.set_sregs(&arch::regs::waking_sregs(s, vector)))
            .and_then(|()| vcpu.set_regs(&arch::regs::waking_regs(vector)));
        match resumed {
            Ok(()) => log::info!("acpi: woke from S3 (RTC alarm), resuming at {vector:#x}"),
            Err(e) => ctx.exit.request(
                EXIT_GUEST_CRASH,
                format!("vcpu0: cannot resume from S3: {e}"),
            ),
        }
    } else {
        while !p.wait_awake(SLEEP_POLL) {
            if ctx.exit.get().is_some() {
                return;
            }
        }
        let init = kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_INIT_RECEIVED,
        };
        if let Err(e) = vcpu.set_mp_state(init) {
            log::warn!("vcpu{id}: cannot put the vCPU back into wait-for-SIPI after S3: {e}");
        }
    }
}

// KVM_INTERRUPT (kvm-ioctls does not wrap it): queue an external interrupt vector.
#[allow(missing_docs)]
mod ioctls {
    vmm_sys_util::ioctl_iow_nr!(
        KVM_INTERRUPT,
        kvm_bindings::KVMIO,
        0x86,
        kvm_bindings::kvm_interrupt
    );
}
use ioctls::KVM_INTERRUPT;

/// Hands the PIC's interrupt to the vCPU when it can take one, else asks KVM to exit
/// as soon as it can (`request_interrupt_window`). With the split irqchip, KVM accepts
/// a userspace ExtINT only while LINT0 is unmasked in ExtINT mode (or the local APIC
/// is off) and reports that in `ready_for_interrupt_injection`.
fn pic_to_vcpu(vcpu: &mut VcpuFd, pic: &Mutex<Pic>) {
    let mut p = lock(pic);
    let run = vcpu.get_kvm_run();
    if !p.pending() {
        run.request_interrupt_window = 0;
        return;
    }
    if run.ready_for_interrupt_injection == 0 || run.if_flag == 0 {
        run.request_interrupt_window = 1;
        return;
    }
    run.request_interrupt_window = 0;
    let irq = kvm_bindings::kvm_interrupt {
        irq: u32::from(p.acknowledge()),
    };
    drop(p);
    // SAFETY: KVM_INTERRUPT reads one `kvm_interrupt` from the pointer, which refers to
    // a live, correctly sized value; the fd is a vCPU fd KVM created.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vcpu, KVM_INTERRUPT(), &irq) };
    if rc != 0 {
        // Logged through the per-call-site limiter, like every guest-driven line.
        log::warn!(
            "pic: KVM_INTERRUPT {:#x} refused: {}",
            irq.irq,
            std::io::Error::last_os_error()
        );
    }
}

fn internal_error_detail(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    // SAFETY: this is called only right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR,
    // so the `internal` member of the exit union is the one KVM filled in.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let what = match internal.suberror {
        1 => "emulation failure (an instruction KVM cannot emulate)",
        2 => "simultaneous #PF",
        3 => "delivery event failure",
        _ => "unknown",
    };
    let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
    format!(
        "KVM internal error {} ({what}) at guest RIP {rip:#x}",
        internal.suberror
    )
}

/// Spurious-interrupt vector register offset in the LAPIC page.
const APIC_SVR: usize = 0xf0;
/// SVR bit 12: suppress EOI broadcast.
const APIC_SVR_SUPPRESS_EOI_BROADCAST: u32 = 1 << 12;

/// Whether this vCPU's local APIC has EOI-broadcast suppression on.
fn eoi_broadcast_suppressed(vcpu: &VcpuFd) -> bool {
    let Ok(lapic) = vcpu.get_lapic() else {
        return false;
    };
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(&lapic.regs[APIC_SVR..APIC_SVR + 4]) {
        *d = *s as u8;
    }
    u32::from_le_bytes(b) & APIC_SVR_SUPPRESS_EOI_BROADCAST != 0
}

/// Runs vCPU `id` until the VM ends; the vCPU fd is closed when this returns.
pub fn run(vcpu: VcpuFd, id: u32, ctx: VcpuContext) {
    ctx.probe.thread_started();
    run_loop(vcpu, id, &ctx);
    ctx.probe.thread_exited();
}

fn run_loop(mut vcpu: VcpuFd, id: u32, ctx: &VcpuContext) {
    let mut epoch = ctx.power.epoch();
    loop {
        if ctx.exit.get().is_some() {
            return;
        }
        // A sleep this thread missed (it was woken before it looked) still resets it.
        if ctx.power.asleep() || ctx.power.epoch() != epoch {
            suspend(&mut vcpu, id, ctx);
            epoch = ctx.power.epoch();
            continue;
        }
        ctx.probe.serve(&vcpu);
        if let Some(pic) = &ctx.pic {
            pic_to_vcpu(&mut vcpu, pic);
        }
        match vcpu.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    ctx.stats.count(0);
                    if ctx.io.pio_read(PioAddress(port), data).is_err() {
                        data.fill(0xff);
                    }
                    log::trace!("vcpu{id}: in {port:#x} -> {data:x?}");
                }
                VcpuExit::IoOut(port, data) => {
                    ctx.stats.count(1);
                    log::trace!("vcpu{id}: out {port:#x} <- {data:x?}");
                    let _ = ctx.io.pio_write(PioAddress(port), data);
                }
                VcpuExit::MmioRead(addr, data) => {
                    ctx.stats.count(2);
                    if ctx.io.mmio_read(MmioAddress(addr), data).is_err() {
                        data.fill(0xff);
                    }
                    log::trace!("vcpu{id}: mmio {addr:#x} -> {data:x?}");
                }
                VcpuExit::MmioWrite(addr, data) => {
                    ctx.stats.count(3);
                    log::trace!("vcpu{id}: mmio {addr:#x} <- {data:x?}");
                    let _ = ctx.io.mmio_write(MmioAddress(addr), data);
                }
                VcpuExit::IoapicEoi(vector) => {
                    ctx.stats.count(4);
                    // KVM forwards every EOI of a level-triggered IOAPIC vector, even
                    // when the guest asked its local APIC to suppress EOI broadcasts
                    // (directed EOI: SVR bit 12); the guest then ends the interrupt
                    // through the IOAPIC's EOI register instead.
                    if eoi_broadcast_suppressed(&vcpu) {
                        log::trace!("vcpu{id}: EOI {vector:#x} not broadcast (directed EOI)");
                    } else {
                        lock(&ctx.ioapic).end_of_interrupt(vector);
                    }
                }
                VcpuExit::Hlt => {
                    ctx.stats.count(5);
                    log::debug!("vcpu{id}: HLT exit");
                }
                VcpuExit::Shutdown => {
                    ctx.stats.count(6);
                    ctx.exit.request(
                        EXIT_GUEST_CRASH,
                        format!("vcpu{id}: guest triple-faulted (KVM_EXIT_SHUTDOWN)"),
                    );
                }
                VcpuExit::SystemEvent(kind, _) => {
                    ctx.stats.count(7);
                    let (code, what) = match kind {
                        SYSTEM_EVENT_SHUTDOWN => (0, "shutdown"),
                        SYSTEM_EVENT_RESET => (0, "reset"),
                        _ => (EXIT_GUEST_CRASH, "crash"),
                    };
                    ctx.exit
                        .request(code, format!("vcpu{id}: guest system event: {what}"));
                }
                VcpuExit::InternalError => {
                    ctx.stats.count(8);
                    let detail = internal_error_detail(&mut vcpu);
                    ctx.exit
                        .request(EXIT_GUEST_CRASH, format!("vcpu{id}: {detail}"));
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    ctx.exit.request(
                        EXIT_GUEST_CRASH,
                        format!("vcpu{id}: VM entry failed (reason {reason:#x}, host cpu {cpu})"),
                    );
                }
                VcpuExit::Intr => ctx.stats.count(9),
                // The PIC's interrupt can go in now: the loop's next turn injects it.
                VcpuExit::IrqWindowOpen => ctx.stats.count(9),
                other => {
                    ctx.stats.count(10);
                    ctx.exit.request(
                        EXIT_GUEST_CRASH,
                        format!("vcpu{id}: unexpected exit {other:?}"),
                    );
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                ctx.exit
                    .request(EXIT_GUEST_CRASH, format!("vcpu{id}: KVM_RUN failed: {e}"));
            }
        }
    }
}
