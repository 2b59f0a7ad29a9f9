//! The scenario runner and the scenarios.
//!
//! Each scenario gets a [`Ctx`] (platform, PCI functions, options), leaves the machine
//! as it found it (pins masked, MSI/MSI-X off) and returns an [`Outcome`].

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::acpi::{self, Platform};
use crate::cpu::{self, rdtsc, wait_until};
use crate::idt::{self, Mode};
use crate::ioapic::{rte, IoApic};
use crate::pci::{self, Bdf, Function, Msi, Msix};
use crate::tap::{matches, Outcome};
use crate::{apic, check, fail, finish, println, skip, smp, Options, Verdict};

/// Cycles to wait for something that should happen (it normally takes microseconds).
pub const SOON: u64 = 1_000_000_000;
/// Cycles to watch for something that must not happen.
pub const QUIET: u64 = 20_000_000;

struct Global<T>(core::cell::UnsafeCell<Option<T>>, AtomicBool);
// SAFETY: written once by the BSP before any other CPU runs (`set`), read-only after.
unsafe impl<T: Sync> Sync for Global<T> {}

impl<T> Global<T> {
    const fn new() -> Self {
        Self(core::cell::UnsafeCell::new(None), AtomicBool::new(false))
    }
    fn set(&self, v: T) {
        if !self.1.swap(true, Ordering::SeqCst) {
            // SAFETY: the swap above admits exactly one writer, before any reader.
            unsafe { *self.0.get() = Some(v) };
        }
    }
    fn get(&self) -> Option<&T> {
        // SAFETY: after `set` the value is never written again.
        self.1
            .load(Ordering::SeqCst)
            .then(|| unsafe { (*self.0.get()).as_ref() })
            .flatten()
    }
}

static PLATFORM: Global<Platform> = Global::new();

/// Whether the local APIC keeps an interrupt in service until EOI (see
/// [`lapic_keeps_isr`]).
static ISR_KEPT: AtomicBool = AtomicBool::new(true);

/// Sends a self-IPI that the handler does not EOI and checks that it stays in service.
/// A software KVM (kvm_pvm) ends interrupts on delivery, which makes level-triggered
/// semantics (remote IRR held until EOI) unobservable; those scenarios then skip.
fn lapic_keeps_isr() -> bool {
    const V: u8 = 0x3f;
    idt::set_mode(V, Mode::NoEoi);
    let before = idt::total(V);
    apic::send_ipi(apic::id(), u32::from(V));
    cpu::sti();
    let got = wait_until(SOON, || idt::total(V) > before);
    cpu::cli();
    let kept = got && apic::in_service(V);
    if got {
        apic::eoi();
    }
    if !kept {
        println!("# note: this hypervisor's local APIC ends interrupts on delivery (ISR not kept); in-service scenarios skip");
    }
    kept
}

macro_rules! need_isr {
    () => {
        if !ISR_KEPT.load(Ordering::SeqCst) {
            skip!("the local APIC ends interrupts on delivery here (software KVM such as kvm_pvm), so in-service semantics are unobservable");
        }
    };
}

/// The discovered platform (after start-up).
pub fn platform() -> Option<&'static Platform> {
    PLATFORM.get()
}

/// What a scenario sees.
pub struct Ctx<'a> {
    /// ACPI view of the machine.
    pub p: &'a Platform,
    /// Functions on bus 0.
    pub devs: Vec<Function>,
    /// Command-line options.
    pub opts: &'a Options,
    /// Cycles from entry to the first scenario.
    pub boot_cycles: u64,
}

impl Ctx<'_> {
    /// The first function with these IDs.
    pub fn find(&self, vendor: u16, device: u16) -> Option<Bdf> {
        self.devs
            .iter()
            .find(|f| f.vendor == vendor && f.device == device)
            .map(|f| f.bdf)
    }
}

type Scenario = fn(&Ctx) -> Outcome;

/// Every scenario, in run order. Those whose names start with `bench.` or `opt.` run
/// only when `probe.tests=` names them.
pub const SCENARIOS: &[(&str, Scenario)] = &[
    ("boot.acpi", boot_acpi),
    ("boot.smp", boot_smp),
    ("apic.mode", apic_mode),
    ("apic.ipi", apic_ipi),
    ("exc.de", exc_de),
    ("exc.ud", exc_ud),
    ("exc.gp", exc_gp),
    ("exc.pf", exc_pf),
    ("exc.nmi", exc_nmi),
    ("pci.enum", pci_enum),
    ("ioapic.version", ioapic_version),
    ("serial.irq", serial_irq),
    ("ioapic.edge", ioapic_edge),
    ("ioapic.level", ioapic_level),
    ("ioapic.level_refire", ioapic_level_refire),
    ("ioapic.eoi_register", ioapic_eoi_register),
    ("ioapic.masked_edge", ioapic_masked_edge),
    ("ioapic.masked_level", ioapic_masked_level),
    ("msi.dest", msi_dest),
    ("msi.multi", msi_multi),
    ("msi.mask", msi_mask),
    ("msix.dest", msix_dest),
    ("msix.mask", msix_mask),
    ("msix.function_mask", msix_function_mask),
    ("msi.bus_master", msi_bus_master),
    ("msix.refused_route", msix_refused_route),
    ("iommu.discover", crate::iommu::discover),
    ("iommu.gcmd", crate::iommu::gcmd),
    ("iommu.translate", crate::iommu::translate),
    ("iommu.fault_reasons", crate::iommu::fault_reasons),
    ("iommu.partial_fault", crate::iommu::partial_fault),
    ("iommu.fault_event", crate::iommu::fault_event),
    ("iommu.frcd_overflow", crate::iommu::frcd_overflow),
    (
        "iommu.queued_invalidation",
        crate::iommu::queued_invalidation,
    ),
    ("iommu.completion_event", crate::iommu::completion_event),
    ("iommu.interrupt_range", crate::iommu::interrupt_range),
    ("iommu.root_mode", crate::iommu::root_mode),
    ("stale.iotlb", crate::stale::iotlb),
    ("stale.context", crate::stale::context),
    ("ir.msi", crate::ir::msi),
    ("ir.msix", crate::ir::msix),
    ("ir.ioapic", crate::ir::ioapic),
    ("ir.dma_request", crate::ir::dma_request),
    ("ir.faults", crate::ir::faults),
    ("ir.stale", crate::ir::stale),
    ("ir.sid", crate::ir::sid),
    ("ir.cfi", crate::ir::cfi),
    ("ir.x2apic", crate::ir::x2apic),
    // `int n` traps to the hypervisor's instruction emulator on some software KVMs
    // (kvm_pvm cannot emulate it), so it runs only on request.
    ("opt.soft_int", exc_int),
    // Waits for the host's injected faults (tests/inject.rs drives it).
    ("opt.watch", crate::iommu::watch),
    ("opt.watch_ir", crate::ir::watch),
    // The hostile guest: seeded random actions against every device (probe.seed=).
    ("hostile.chaos", crate::hostile::chaos),
    ("hostile.growth", crate::hostile::growth),
    // Always fails: checks that a failure reaches the report and the exit status.
    ("opt.selftest_fail", selftest_fail),
    ("bench.mmio", bench_mmio),
    ("bench.pio", bench_pio),
    ("bench.msi_latency", bench_msi_latency),
    ("bench.irq_rate", bench_irq_rate),
    ("bench.ir_msi_latency", crate::ir::bench_msi_latency),
    ("bench.ir_irq_rate", crate::ir::bench_irq_rate),
    ("bench.dma", crate::iommu::bench_dma),
    ("bench.fault_latency", crate::iommu::bench_fault_latency),
];

/// Starts the platform, runs the selected scenarios and ends the VM.
pub fn run(opts: &Options, rsdp_hint: u64, t0: u64) -> ! {
    let Some(rsdp) = acpi::find_rsdp(rsdp_hint) else {
        println!("Bail out! no ACPI RSDP found");
        finish(Verdict::Fail)
    };
    let p = match acpi::discover(rsdp) {
        Ok(p) => p,
        Err(e) => {
            println!("Bail out! ACPI: {e}");
            finish(Verdict::Fail)
        }
    };
    PLATFORM.set(p);
    let Some(p) = PLATFORM.get() else {
        finish(Verdict::Fail)
    };
    let x2 = !opts.xapic && apic::x2apic_supported();
    apic::configure(x2, p.lapic_base);
    apic::enable();
    smp::set_bsp(apic::id());
    pci::init(p.ecam.map(|e| e.0));
    let devs = pci::enumerate(0);
    smp::start_aps(&p.cpus);
    ISR_KEPT.store(lapic_keeps_isr(), Ordering::SeqCst);
    let ctx = Ctx {
        p,
        devs,
        opts,
        boot_cycles: rdtsc().wrapping_sub(t0),
    };
    println!(
        "# platform: {} CPU(s) online of {} in the MADT, {} IOAPIC(s), {} APIC, PCI via {}, {} function(s) on bus 0",
        smp::online(),
        p.cpus.len(),
        p.ioapics.len(),
        if apic::is_x2apic() { "x2APIC" } else { "xAPIC" },
        if pci::uses_ecam() { "ECAM" } else { "ports 0xCF8/0xCFC" },
        ctx.devs.len()
    );
    if opts.list {
        for (name, _) in SCENARIOS {
            println!("# scenario {name}");
        }
        finish(Verdict::Pass)
    }
    let selected: Vec<&(&str, Scenario)> = SCENARIOS
        .iter()
        .filter(|(name, _)| {
            if opts.tests.is_empty() {
                !name.starts_with("bench.")
                    && !name.starts_with("opt.")
                    && !name.starts_with("hostile.")
            } else {
                opts.tests.iter().any(|pat| matches(pat, name))
            }
        })
        .collect();
    if selected.is_empty() {
        println!("Bail out! probe.tests selects no scenario (probe.list shows them)");
        finish(Verdict::Usage)
    }
    println!("TAP version 13");
    println!("1..{}", selected.len());
    let (mut pass, mut failed, mut skipped) = (0, 0, 0);
    let t_run = rdtsc();
    for (i, (name, f)) in selected.iter().enumerate() {
        let t = rdtsc();
        let out = f(&ctx);
        let dt = rdtsc().wrapping_sub(t);
        match out {
            Outcome::Pass(None) => {
                pass += 1;
                println!("ok {} - {name} # {dt} cycles", i + 1)
            }
            Outcome::Pass(Some(note)) => {
                pass += 1;
                println!("ok {} - {name} # {note}", i + 1)
            }
            Outcome::Fail(why) => {
                failed += 1;
                println!("not ok {} - {name} # {why}", i + 1)
            }
            Outcome::Skip(why) => {
                skipped += 1;
                println!("ok {} - {name} # SKIP {why}", i + 1)
            }
        }
    }
    println!(
        "# probe: {pass} passed, {failed} failed, {skipped} skipped; boot {} cycles, scenarios {} cycles",
        ctx.boot_cycles,
        rdtsc().wrapping_sub(t_run)
    );
    finish(if failed == 0 {
        Verdict::Pass
    } else {
        Verdict::Fail
    })
}

// ---------------------------------------------------------------- boot / APIC

fn boot_acpi(c: &Ctx) -> Outcome {
    let sigs: Vec<String> =
        c.p.tables
            .iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
    check!(
        !c.p.ioapics.is_empty(),
        "MADT lists no IOAPIC (tables: {})",
        sigs.join(" ")
    );
    check!(c.p.poweroff.is_some(), "no FADT power-off method");
    let ecam = match c.p.ecam {
        Some((base, first, last)) => format!("ECAM {base:#x} buses {first}-{last}"),
        None => "no MCFG".into(),
    };
    let off = match c.p.poweroff {
        Some(acpi::PowerOff::SleepControl { port, typ }) => {
            format!("S5 via sleep control {port:#x} typ {typ}")
        }
        Some(acpi::PowerOff::Pm1a { port, typ, .. }) => {
            format!("S5 via PM1a_CNT {port:#x} typ {typ}")
        }
        None => String::new(),
    };
    Outcome::Pass(Some(format!(
        "RSDP {:#x}, tables {}, LAPIC {:#x}, IOAPIC {:#x}, {ecam}, {off}",
        c.p.rsdp,
        sigs.join(" "),
        c.p.lapic_base,
        c.p.ioapics[0].base,
    )))
}

fn boot_smp(c: &Ctx) -> Outcome {
    let want = c.p.cpus.len().min(smp::MAX_CPUS);
    check!(
        smp::online() == want,
        "{} of {want} CPUs online",
        smp::online()
    );
    let ids: Vec<u32> = (0..want).filter_map(smp::apic_id).collect();
    for id in &ids {
        check!(
            c.p.cpus.contains(id),
            "APIC ID {id} is not in the MADT {:?}",
            c.p.cpus
        );
    }
    Outcome::Pass(Some(format!("{want} CPU(s), APIC IDs {ids:?}")))
}

fn apic_mode(c: &Ctx) -> Outcome {
    let want_x2 = !c.opts.xapic && apic::x2apic_supported();
    check!(apic::is_x2apic() == want_x2, "APIC mode mismatch");
    let base = cpu::rdmsr(0x1b);
    check!(
        base & (1 << 11) != 0,
        "APIC globally disabled (IA32_APIC_BASE {base:#x})"
    );
    check!(
        ((base >> 10) & 1 != 0) == want_x2,
        "IA32_APIC_BASE.EXTD wrong ({base:#x})"
    );
    let id = apic::id();
    check!(c.p.cpus.contains(&id), "BSP APIC ID {id} not in MADT");
    Outcome::Pass(Some(format!(
        "{} mode, BSP APIC ID {id}, version {:#x}",
        if want_x2 { "x2APIC" } else { "xAPIC" },
        apic::read(apic::reg::VERSION)
    )))
}

fn apic_ipi(_: &Ctx) -> Outcome {
    const V: u8 = 0x40;
    for cpu in 0..smp::online() {
        let Some(dest) = smp::apic_id(cpu) else {
            fail!("CPU {cpu} has no APIC ID")
        };
        let before = idt::count(cpu, V);
        apic::send_ipi(dest, u32::from(V));
        cpu::sti();
        let ok = wait_until(SOON, || idt::count(cpu, V) == before + 1);
        cpu::cli();
        check!(
            ok,
            "fixed IPI vector {V:#x} to APIC {dest} not received by CPU {cpu}"
        );
    }
    Outcome::Pass(Some(format!(
        "fixed IPI {V:#x} received by each of {} CPU(s)",
        smp::online()
    )))
}

// ---------------------------------------------------------------- exceptions

macro_rules! provoke {
    ($vec:expr, $($insn:literal),+) => {{
        idt::expect($vec, 0);
        let slot = idt::recover_slot();
        // SAFETY: the instructions fault on purpose; the handler resumes at label 2,
        // and every register they touch is declared clobbered.
        unsafe {
            asm!("lea rax, [rip + 2f]", "mov [{slot}], rax", $($insn,)+ "2:",
                slot = in(reg) slot, out("rax") _, out("rcx") _, out("rdx") _)
        };
        idt::caught()
    }};
}

fn exc_de(_: &Ctx) -> Outcome {
    let c = provoke!(0, "xor edx, edx", "xor eax, eax", "xor ecx, ecx", "div ecx");
    let Some(c) = c else {
        fail!("dividing by zero raised no #DE")
    };
    Outcome::Pass(Some(format!("#DE at {:#x}, resumed", c.rip)))
}

fn exc_ud(_: &Ctx) -> Outcome {
    let c = provoke!(6, "ud2");
    let Some(c) = c else {
        fail!("ud2 raised no #UD")
    };
    Outcome::Pass(Some(format!("#UD at {:#x}, resumed", c.rip)))
}

fn exc_gp(_: &Ctx) -> Outcome {
    let c = provoke!(13, "mov rcx, 0x8000000000000000", "mov rax, [rcx]");
    let Some(c) = c else {
        fail!("a non-canonical load raised no #GP")
    };
    check!(c.error == 0, "#GP error code {:#x}, expected 0", c.error);
    Outcome::Pass(Some(format!("#GP(0) at {:#x}, resumed", c.rip)))
}

fn exc_pf(_: &Ctx) -> Outcome {
    let c = provoke!(14, "mov rcx, 0x140000000", "mov rax, [rcx]");
    let Some(c) = c else {
        fail!("a load from an unmapped page raised no #PF")
    };
    check!(
        c.cr2 == 0x1_4000_0000,
        "#PF CR2 {:#x}, expected 0x140000000",
        c.cr2
    );
    check!(c.error & 0x3 == 0, "read fault error code {:#x}", c.error);
    let w = provoke!(14, "mov rcx, 0x140000008", "mov [rcx], rax");
    let Some(w) = w else {
        fail!("a store to an unmapped page raised no #PF")
    };
    check!(
        w.error & 0x3 == 0x2,
        "write fault error code {:#x}, expected W=1 P=0",
        w.error
    );
    Outcome::Pass(Some(format!(
        "read err {:#x} write err {:#x} cr2 {:#x}",
        c.error, w.error, c.cr2
    )))
}

fn exc_int(_: &Ctx) -> Outcome {
    let before = idt::count(0, 0x80);
    idt::set_mode(0x80, Mode::NoEoi);
    // SAFETY: vector 0x80 has a handler that only counts.
    unsafe { asm!("int 0x80") };
    check!(idt::count(0, 0x80) == before + 1, "int 0x80 not counted");
    Outcome::Pass(Some("int 0x80 counted".into()))
}

fn exc_nmi(_: &Ctx) -> Outcome {
    let before = idt::count(0, 2);
    apic::send_ipi(apic::id(), 0x400 | (1 << 18)); // NMI, shorthand self
    let ok = wait_until(SOON, || idt::count(0, 2) > before);
    check!(ok, "self-NMI not received");
    Outcome::Pass(Some("self-NMI counted on vector 2".into()))
}

fn selftest_fail(_: &Ctx) -> Outcome {
    fail!("this scenario fails on purpose (harness self-test)")
}

// ---------------------------------------------------------------- PCI / IOAPIC

fn pci_enum(c: &Ctx) -> Outcome {
    check!(!c.devs.is_empty(), "no function on bus 0");
    let host = c.devs.iter().find(|f| f.bdf.dev == 0);
    check!(
        host.is_some_and(|h| h.class >> 8 == 0x0600),
        "no host bridge at 00:00.0"
    );
    let list: Vec<String> = c
        .devs
        .iter()
        .map(|f| format!("{} {:04x}:{:04x}", f.bdf, f.vendor, f.device))
        .collect();
    Outcome::Pass(Some(list.join(", ")))
}

fn ioapic_version(c: &Ctx) -> Outcome {
    let io = c.p.ioapics[0];
    let (ver, pins) = io.version();
    check!(ver == 0x11 || ver == 0x20, "IOAPIC version {ver:#x}");
    check!(pins >= 24, "{pins} pins");
    let id = (io.read(0) >> 24) & 0xf;
    check!(
        id == u32::from(io.id) & 0xf,
        "IOAPIC ID {id} but MADT says {}",
        io.id
    );
    for pin in 0..pins {
        check!(
            io.rte(pin) & rte::MASKED != 0,
            "pin {pin} unmasked at boot ({:#x})",
            io.rte(pin)
        );
    }
    Outcome::Pass(Some(format!(
        "version {ver:#x}, {pins} pins, all masked at boot"
    )))
}

fn serial_irq(c: &Ctx) -> Outcome {
    const V: u8 = 0x44;
    let (gsi, level, low) = c.p.isa_gsi(4);
    let Some((io, pin)) = c.p.pin(gsi) else {
        fail!("no IOAPIC serves GSI {gsi}")
    };
    let mut e = IoApic::entry(V, apic::id(), level, false);
    if low {
        e |= rte::ACTIVE_LOW;
    }
    idt::set_mode(V, Mode::SerialAck);
    io.set_rte(pin, e);
    let before = idt::total(V);
    // THR is empty: enabling the THRE interrupt raises it.
    cpu::outb(crate::serial::COM1 + crate::serial::IER, 0x02);
    cpu::sti();
    let ok = wait_until(SOON, || idt::total(V) > before);
    cpu::cli();
    cpu::outb(crate::serial::COM1 + crate::serial::IER, 0);
    io.mask(pin);
    check!(
        ok,
        "no COM1 THRE interrupt on GSI {gsi} (vector {V:#x}, rte {:#x})",
        io.rte(pin)
    );
    Outcome::Pass(Some(format!(
        "GSI {gsi}, {} interrupt(s)",
        idt::total(V) - before
    )))
}

// ---------------------------------------------------------------- devices

/// The interrupt source a scenario drives: faultvisor's fv-test, or QEMU's edu.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// fv-test (1234:fa17) with its BAR0.
    FvTest(Bdf, u64),
    /// edu (1234:11e8) with its BAR0.
    Edu(Bdf, u64),
}

mod fvt {
    pub const SCRATCH: u64 = 0x04;
    pub const RAISE: u64 = 0x08;
    pub const INTX: u64 = 0x0c;
    pub const INTX_PULSE: u64 = 0x10;
}

impl Source {
    fn bdf(&self) -> Bdf {
        match *self {
            Self::FvTest(b, _) | Self::Edu(b, _) => b,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::FvTest(..) => "fv-test",
            Self::Edu(..) => "edu",
        }
    }

    /// A register that a read round-trips to the device model.
    fn round_trip_reg(&self) -> u64 {
        match *self {
            Self::FvTest(_, b) => b + fvt::SCRATCH,
            Self::Edu(_, b) => b + 0x04, // liveness check
        }
    }

    /// Signals MSI/MSI-X vector `n`.
    fn raise(&self, n: u32) {
        match *self {
            Self::FvTest(_, b) => cpu::mmio_write32(b + fvt::RAISE, n),
            Self::Edu(_, b) => cpu::mmio_write32(b + 0x60, 1),
        }
    }

    /// Result of the last raise (fv-test only): 0 delivered, 1 pending, 2 dropped.
    fn last_raise(&self) -> u32 {
        match *self {
            Self::FvTest(_, b) => cpu::mmio_read32(b + fvt::RAISE),
            Self::Edu(..) => 0,
        }
    }
}

fn fvtest(c: &Ctx) -> Option<Source> {
    let bdf = c.find(0x1234, 0xfa17)?;
    let bar = bdf.mem_bar(0)?;
    Some(Source::FvTest(bdf, bar))
}

fn any_source(c: &Ctx) -> Option<Source> {
    fvtest(c).or_else(|| {
        let bdf = c.find(0x1234, 0x11e8)?;
        Some(Source::Edu(bdf, bdf.mem_bar(0)?))
    })
}

macro_rules! need_fvtest {
    ($c:expr) => {
        match fvtest($c) {
            Some(s) => s,
            None => skip!("no fv-test device (faultvisor run --device test)"),
        }
    };
}

/// The fv-test INTx pin as (IOAPIC, pin, BAR0), or skip / fail the scenario.
macro_rules! need_intx {
    ($c:expr) => {{
        let s = need_fvtest!($c);
        match intx($c, s) {
            Ok(x) => x,
            Err(e) => fail!("{e}"),
        }
    }};
}

/// The fv-test INTx pin: (IOAPIC, pin, bar0).
fn intx(c: &Ctx, s: Source) -> Result<(IoApic, u32, u64), String> {
    let Source::FvTest(bdf, bar) = s else {
        return Err("INTx needs fv-test".into());
    };
    bdf.enable(false);
    let gsi = u32::from(bdf.read8(0x3c));
    let (io, pin) =
        c.p.pin(gsi)
            .ok_or_else(|| format!("no IOAPIC serves GSI {gsi}"))?;
    Ok((io, pin, bar))
}

fn bsp() -> u32 {
    smp::apic_id(0).unwrap_or(0)
}

/// The boot CPU's APIC ID.
pub fn bsp_apic() -> u32 {
    bsp()
}

/// Waits (interrupts on) until vector `v` has been counted `n` times in all.
fn wait_total(v: u8, n: u32, cycles: u64) -> bool {
    cpu::sti();
    let ok = wait_until(cycles, || idt::total(v) >= n);
    cpu::cli();
    ok && idt::total(v) == n
}

fn ioapic_edge(c: &Ctx) -> Outcome {
    const V: u8 = 0x50;
    let (io, pin, bar) = need_intx!(c);
    idt::set_mode(V, Mode::Eoi);
    let base = idt::total(V);
    let mut seen = Vec::new();
    for cpu_idx in 0..smp::online() {
        // Compatibility-format entries name 8-bit APIC IDs; higher ones need interrupt
        // remapping (ir.ioapic reaches them).
        let Some(dest) = smp::apic_id(cpu_idx).filter(|d| *d <= 255) else {
            continue;
        };
        io.set_rte(pin, IoApic::entry(V, dest, false, false));
        let before = idt::count(cpu_idx, V);
        cpu::mmio_write32(bar + fvt::INTX_PULSE, 1);
        let n = base + seen.len() as u32 + 1;
        check!(
            wait_total(V, n, SOON),
            "edge on pin {pin} to APIC {dest}: {} interrupts, expected {n}",
            idt::total(V)
        );
        check!(
            idt::count(cpu_idx, V) == before + 1,
            "edge to APIC {dest} arrived on another CPU"
        );
        seen.push(dest);
    }
    // A second edge while nothing is in service arrives again; no remote IRR for edge.
    check!(
        io.rte(pin) & rte::REMOTE_IRR == 0,
        "remote IRR set on an edge entry"
    );
    io.mask(pin);
    Outcome::Pass(Some(format!(
        "pin {pin} vector {V:#x} delivered to APIC IDs {seen:?}"
    )))
}

fn ioapic_level(c: &Ctx) -> Outcome {
    need_isr!();
    const V: u8 = 0x58;
    let (io, pin, bar) = need_intx!(c);
    idt::set_mode(V, Mode::NoEoi);
    let base = idt::total(V);
    io.set_rte(pin, IoApic::entry(V, bsp(), true, false));
    cpu::mmio_write32(bar + fvt::INTX, 1);
    check!(
        wait_total(V, base + 1, SOON),
        "asserted level pin {pin}: no interrupt"
    );
    let e = io.rte(pin);
    check!(
        e & rte::REMOTE_IRR != 0,
        "remote IRR clear while the interrupt is in service (rte {e:#x})"
    );
    check!(apic::in_service(V), "vector {V:#x} not in service");
    let tmr = apic::level_triggered(V);
    // Still asserted and in service: the IOAPIC must not send it again.
    cpu::delay(QUIET);
    check!(
        !apic::requested(V),
        "IOAPIC re-sent vector {V:#x} while remote IRR was set"
    );
    cpu::mmio_write32(bar + fvt::INTX, 0);
    apic::eoi();
    let e = io.rte(pin);
    check!(
        e & rte::REMOTE_IRR == 0,
        "remote IRR still set after the LAPIC EOI (rte {e:#x})"
    );
    check!(
        !wait_total(V, base + 2, QUIET),
        "interrupt after deassert + EOI"
    );
    io.mask(pin);
    idt::set_mode(V, Mode::Eoi);
    Outcome::Pass(Some(format!(
        "remote IRR set until the LAPIC EOI; TMR bit {}",
        u8::from(tmr)
    )))
}

fn ioapic_level_refire(c: &Ctx) -> Outcome {
    need_isr!();
    const V: u8 = 0x59;
    let (io, pin, bar) = need_intx!(c);
    idt::set_mode(V, Mode::NoEoi);
    let base = idt::total(V);
    io.set_rte(pin, IoApic::entry(V, bsp(), true, false));
    cpu::mmio_write32(bar + fvt::INTX, 1);
    check!(
        wait_total(V, base + 1, SOON),
        "asserted level pin {pin}: no interrupt"
    );
    // EOI with the line still asserted: the IOAPIC delivers it again.
    apic::eoi();
    check!(
        wait_total(V, base + 2, SOON),
        "line still asserted after EOI but no second interrupt"
    );
    cpu::mmio_write32(bar + fvt::INTX, 0);
    apic::eoi();
    check!(io.rte(pin) & rte::REMOTE_IRR == 0, "remote IRR stuck");
    check!(
        !wait_total(V, base + 3, QUIET),
        "third interrupt after deassert"
    );
    io.mask(pin);
    idt::set_mode(V, Mode::Eoi);
    Outcome::Pass(Some(
        "EOI with the line still asserted re-delivers; after deassert it does not".into(),
    ))
}

fn ioapic_eoi_register(c: &Ctx) -> Outcome {
    need_isr!();
    const V: u8 = 0x5a;
    let (io, pin, bar) = need_intx!(c);
    if io.version().0 < 0x20 {
        skip!("IOAPIC version {:#x} has no EOI register", io.version().0);
    }
    if !apic::directed_eoi_supported() {
        skip!("the local APIC cannot suppress EOI broadcasts (LVR bit 24 clear)");
    }
    apic::set_eoi_broadcast_suppression(true);
    idt::set_mode(V, Mode::NoEoi);
    let base = idt::total(V);
    io.set_rte(pin, IoApic::entry(V, bsp(), true, false));
    cpu::mmio_write32(bar + fvt::INTX, 1);
    let got = wait_total(V, base + 1, SOON);
    cpu::mmio_write32(bar + fvt::INTX, 0);
    apic::eoi();
    let after_lapic = io.rte(pin) & rte::REMOTE_IRR != 0;
    io.eoi(V);
    let after_reg = io.rte(pin) & rte::REMOTE_IRR != 0;
    apic::set_eoi_broadcast_suppression(false);
    io.mask(pin);
    idt::set_mode(V, Mode::Eoi);
    check!(got, "asserted level pin {pin}: no interrupt");
    check!(
        after_lapic,
        "remote IRR cleared by a suppressed LAPIC EOI broadcast"
    );
    check!(
        !after_reg,
        "remote IRR still set after the IOAPIC EOI register write"
    );
    Outcome::Pass(Some(
        "directed EOI: remote IRR cleared only by the EOI register".into(),
    ))
}

fn ioapic_masked_edge(c: &Ctx) -> Outcome {
    masked_pin(c, 0x5c, false)
}

fn ioapic_masked_level(c: &Ctx) -> Outcome {
    masked_pin(c, 0x5d, true)
}

/// A masked pin delivers nothing. Unmasking delivers a level interrupt whose line is
/// still asserted, exactly once; an edge that arrived while masked is lost (82093AA:
/// "Edge-sensitive interrupts signaled on a masked interrupt pin are ignored"), and the
/// next edge after unmask is delivered.
fn masked_pin(c: &Ctx, v: u8, level: bool) -> Outcome {
    let (io, pin, bar) = need_intx!(c);
    let kind = if level { "level" } else { "edge" };
    idt::set_mode(v, if level { Mode::NoEoi } else { Mode::Eoi });
    let base = idt::total(v);
    io.set_rte(pin, IoApic::entry(v, bsp(), level, true));
    let raise = if level { fvt::INTX } else { fvt::INTX_PULSE };
    cpu::mmio_write32(bar + raise, 1);
    let quiet = !wait_total(v, base + 1, QUIET);
    io.unmask(pin);
    if !level {
        let lost = !wait_total(v, base + 1, QUIET);
        cpu::mmio_write32(bar + fvt::INTX_PULSE, 1);
        let next = wait_total(v, base + 1, SOON);
        io.mask(pin);
        check!(quiet, "a masked edge pin delivered");
        check!(
            lost,
            "an edge that came while masked was delivered on unmask"
        );
        check!(next, "the first edge after unmask was not delivered");
        return Outcome::Pass(Some(
            "edge on a masked pin ignored (82093AA); the next edge after unmask delivered".into(),
        ));
    }
    // Where the local APIC ends interrupts on delivery (kvm_pvm), every delivery of a
    // level interrupt is also its EOI, so an asserted line is delivered again and again
    // until it drops: "at least once" is what can be seen there.
    let repeats = !ISR_KEPT.load(Ordering::SeqCst);
    let fired = if repeats {
        cpu::sti();
        let ok = wait_until(SOON, || idt::total(v) > base);
        cpu::cli();
        ok
    } else {
        wait_total(v, base + 1, SOON)
    };
    cpu::mmio_write32(bar + fvt::INTX, 0);
    apic::eoi();
    let after = idt::total(v);
    let once = if repeats {
        !wait_total(v, after + 1, QUIET)
    } else {
        !wait_total(v, base + 2, QUIET)
    };
    io.mask(pin);
    idt::set_mode(v, Mode::Eoi);
    check!(quiet, "a masked {kind} pin delivered");
    check!(
        fired,
        "the {kind} interrupt held while masked did not fire on unmask"
    );
    check!(once, "the pending {kind} interrupt fired twice");
    Outcome::Pass(Some(format!(
        "{kind} on a masked pin held by its asserted line, delivered once on unmask"
    )))
}

fn msi_dest(c: &Ctx) -> Outcome {
    const V: u8 = 0x70;
    let s = need_fvtest!(c);
    let Some(msi) = Msi::find(s.bdf()) else {
        fail!("fv-test has no MSI capability")
    };
    s.bdf().enable(true);
    idt::set_mode(V, Mode::Eoi);
    let mut seen = Vec::new();
    for cpu_idx in 0..smp::online() {
        // A compatibility-format MSI names 8-bit APIC IDs; higher ones need interrupt
        // remapping (ir.x2apic).
        let Some(dest) = smp::apic_id(cpu_idx).filter(|d| *d <= 255) else {
            continue;
        };
        msi.enable(dest, V, 1);
        let before = idt::count(cpu_idx, V);
        let total = idt::total(V);
        s.raise(0);
        let ok = wait_total(V, total + 1, SOON);
        msi.disable();
        check!(
            ok,
            "MSI to APIC {dest} vector {V:#x} not received (raise result {})",
            s.last_raise()
        );
        check!(
            idt::count(cpu_idx, V) == before + 1,
            "MSI to APIC {dest} arrived on another CPU"
        );
        seen.push(dest);
    }
    Outcome::Pass(Some(format!("vector {V:#x} reached APIC IDs {seen:?}")))
}

fn msi_multi(c: &Ctx) -> Outcome {
    const V: u8 = 0x74; // aligned to 4: the device ORs the vector number in
    let s = need_fvtest!(c);
    let Some(msi) = Msi::find(s.bdf()) else {
        fail!("fv-test has no MSI capability")
    };
    check!(
        msi.capable() >= 4,
        "MSI offers {} vectors, expected 4",
        msi.capable()
    );
    s.bdf().enable(true);
    msi.enable(bsp(), V, 4);
    for n in 0..4u8 {
        let before = idt::total(V + n);
        s.raise(u32::from(n));
        let ok = wait_total(V + n, before + 1, SOON);
        if !ok {
            msi.disable();
            fail!("multi-message vector {n} did not arrive as {:#x}", V + n);
        }
    }
    s.raise(4); // beyond the enabled count: dropped
    let dropped = s.last_raise() == 2;
    msi.disable();
    check!(dropped, "raise of vector 4 with 4 enabled was not dropped");
    Outcome::Pass(Some(format!(
        "4 messages as vectors {V:#x}..{:#x}; a 5th dropped",
        V + 3
    )))
}

fn msi_mask(c: &Ctx) -> Outcome {
    const V: u8 = 0x78;
    let s = need_fvtest!(c);
    let Some(msi) = Msi::find(s.bdf()) else {
        fail!("fv-test has no MSI capability")
    };
    check!(msi.has_mask(), "MSI without per-vector masking");
    s.bdf().enable(true);
    msi.enable(bsp(), V, 1);
    msi.set_mask(1);
    let mut last = 0;
    let Held {
        quiet,
        pending,
        fired,
    } = held_then_released(
        V,
        || {
            s.raise(0);
            last = s.last_raise();
        },
        || msi.pending() & 1 != 0,
        || msi.set_mask(0),
    );
    let cleared = msi.pending() & 1 == 0;
    msi.disable();
    check!(
        last == 1,
        "raise while masked reported {last}, expected 1 (pending)"
    );
    check!(quiet, "a masked MSI was delivered");
    check!(pending, "pending bit not set while masked");
    check!(fired, "pending MSI not delivered on unmask");
    check!(cleared, "pending bit not cleared after delivery");
    Outcome::Pass(Some(
        "masked: pending bit set, nothing delivered; unmask delivered it".into(),
    ))
}

/// What a message held back by a mask did.
struct Held {
    /// Nothing arrived while it was held.
    quiet: bool,
    /// The pending bit was set while it was held.
    pending: bool,
    /// It arrived once released.
    fired: bool,
}

/// Raises vector `v` while a mask holds it back, watches, then releases the mask.
fn held_then_released(
    v: u8,
    raise: impl FnOnce(),
    pending: impl FnOnce() -> bool,
    release: impl FnOnce(),
) -> Held {
    let before = idt::total(v);
    raise();
    let quiet = !wait_total(v, before + 1, QUIET);
    let pending = pending();
    release();
    let fired = wait_total(v, before + 1, SOON);
    Held {
        quiet,
        pending,
        fired,
    }
}

fn msix_setup(c: &Ctx) -> Result<(Source, Msix), Outcome> {
    let s = fvtest(c)
        .ok_or_else(|| Outcome::Skip("no fv-test device (faultvisor run --device test)".into()))?;
    let m = Msix::find(s.bdf())
        .ok_or_else(|| Outcome::Fail("fv-test has no MSI-X capability".into()))?;
    s.bdf().enable(true);
    Ok((s, m))
}

fn msix_dest(c: &Ctx) -> Outcome {
    const V: u8 = 0x80;
    let (s, m) = match msix_setup(c) {
        Ok(x) => x,
        Err(o) => return o,
    };
    let n = smp::online().min(usize::from(m.size));
    for i in 0..n {
        let dest = smp::apic_id(i).unwrap_or(0);
        m.program(i as u16, dest, V + i as u8, false);
    }
    m.enable(false);
    let mut seen = Vec::new();
    for i in 0..n {
        let v = V + i as u8;
        let before = idt::count(i, v);
        let total = idt::total(v);
        s.raise(i as u32);
        let ok = wait_total(v, total + 1, SOON);
        if !ok || idt::count(i, v) != before + 1 {
            m.disable();
            fail!("MSI-X entry {i} (vector {v:#x}) did not reach CPU {i}");
        }
        seen.push((i, v));
    }
    m.disable();
    Outcome::Pass(Some(format!("{} entries, (cpu, vector) {seen:x?}", m.size)))
}

fn msix_mask(c: &Ctx) -> Outcome {
    const V: u8 = 0x88;
    let (s, m) = match msix_setup(c) {
        Ok(x) => x,
        Err(o) => return o,
    };
    m.program(2, bsp(), V, true);
    m.enable(false);
    let Held {
        quiet,
        pending,
        fired,
    } = held_then_released(V, || s.raise(2), || m.pending(2), || m.mask(2, false));
    let cleared = !m.pending(2);
    m.disable();
    check!(quiet, "a masked MSI-X entry was delivered");
    check!(pending, "PBA bit not set while masked");
    check!(fired, "pending MSI-X entry not delivered on unmask");
    check!(cleared, "PBA bit not cleared after delivery");
    Outcome::Pass(Some(
        "masked entry: PBA bit set, nothing delivered; unmask delivered it".into(),
    ))
}

fn msix_function_mask(c: &Ctx) -> Outcome {
    const V: u8 = 0x8c;
    let (s, m) = match msix_setup(c) {
        Ok(x) => x,
        Err(o) => return o,
    };
    m.program(3, bsp(), V, false);
    m.enable(true);
    let Held {
        quiet,
        pending,
        fired,
    } = held_then_released(V, || s.raise(3), || m.pending(3), || m.enable(false));
    m.disable();
    check!(quiet, "delivered despite the function mask");
    check!(pending, "PBA bit not set under the function mask");
    check!(
        fired,
        "pending entry not delivered when the function mask cleared"
    );
    Outcome::Pass(Some(
        "function mask held the message pending; clearing it delivered".into(),
    ))
}

fn msi_bus_master(c: &Ctx) -> Outcome {
    const V: u8 = 0x8e;
    let s = need_fvtest!(c);
    let Some(m) = Msi::find(s.bdf()) else {
        fail!("fv-test has no MSI capability");
    };
    s.bdf().enable(true);
    m.enable(bsp(), V, 1);
    let total = idt::total(V);
    let cmd = s.bdf().read16(4);
    // Bus mastering off: the function may not send its message (it is a DMA write).
    s.bdf().write16(4, cmd & !(1 << 2));
    s.raise(0);
    let blocked = s.last_raise();
    let quiet = !wait_until(QUIET, || idt::total(V) > total);
    s.bdf().write16(4, cmd);
    s.raise(0);
    let fired = wait_total(V, total + 1, SOON);
    m.disable();
    check!(
        blocked == 3,
        "fv-test reported {blocked} for a raise without bus mastering, want 3 (blocked)"
    );
    check!(quiet, "an MSI went out with bus mastering off");
    check!(fired, "no MSI once bus mastering was back on");
    Outcome::Pass(Some(
        "no message without bus mastering; delivered once it was back on".into(),
    ))
}

/// A route that the hypervisor refuses (address bits 39:32 set under KVM's x2APIC API)
/// must cost only that entry: later routes, and the entry itself once reprogrammed,
/// still work.
fn msix_refused_route(c: &Ctx) -> Outcome {
    const V0: u8 = 0x84;
    const V1: u8 = 0x85;
    let (s, m) = match msix_setup(c) {
        Ok(x) => x,
        Err(o) => return o,
    };
    let entry = |i: u64, lo: u32, hi: u32, data: u32, masked: bool| {
        let e = m.table + 16 * i;
        cpu::mmio_write32(e, lo);
        cpu::mmio_write32(e + 4, hi);
        cpu::mmio_write32(e + 8, data);
        cpu::mmio_write32(e + 12, u32::from(masked));
    };
    let dest = crate::apic::msi_address(bsp()) as u32;
    m.enable(false);
    // Entry 0: a message with address high bits 1 (not an interrupt address).
    entry(0, dest, 1, u32::from(V0), false);
    let t0 = idt::total(V0);
    s.raise(0);
    let quiet = !wait_until(QUIET, || idt::total(V0) > t0);
    // Entry 1, programmed after the refused one.
    m.program(1, bsp(), V1, false);
    let t1 = idt::total(V1);
    s.raise(1);
    let later_ok = wait_total(V1, t1 + 1, SOON);
    // Entry 0 reprogrammed with a good message.
    entry(0, dest, 0, u32::from(V0), false);
    s.raise(0);
    let recovered = wait_total(V0, t0 + 1, SOON);
    m.disable();
    check!(quiet, "a message with address bits 63:32 = 1 was delivered");
    check!(
        later_ok,
        "a route programmed after a refused one does not work"
    );
    check!(recovered, "the entry did not recover once reprogrammed");
    Outcome::Pass(Some(
        "refused entry dropped; later routes and the reprogrammed entry delivered".into(),
    ))
}

// ---------------------------------------------------------------- benchmarks

/// Summary of cycle samples.
pub fn summarize(name: &str, what: &str, samples: &mut [u64]) -> Outcome {
    if samples.is_empty() {
        fail!("no samples");
    }
    samples.sort_unstable();
    let pick = |q: usize| samples[(samples.len() - 1) * q / 100];
    let (min, med, p90, p99) = (samples[0], pick(50), pick(90), pick(99));
    println!(
        "# bench {name} median={med} min={min} p90={p90} p99={p99} n={} unit=cycles what=\"{what}\"",
        samples.len()
    );
    Outcome::Pass(Some(format!(
        "median {med} cycles, min {min}, p90 {p90} ({what}, n={})",
        samples.len()
    )))
}

fn bench_mmio(c: &Ctx) -> Outcome {
    let Some(s) = any_source(c) else {
        skip!("no fv-test or edu device")
    };
    s.bdf().enable(true);
    let reg = s.round_trip_reg();
    let mut v = Vec::with_capacity(c.opts.iters as usize);
    for _ in 0..c.opts.iters {
        let t = rdtsc();
        let _ = cpu::mmio_read32(reg);
        v.push(rdtsc().wrapping_sub(t));
    }
    let what = format!("32-bit MMIO read of a {} register", s.name());
    summarize("mmio", &what, &mut v)
}

fn bench_pio(c: &Ctx) -> Outcome {
    let mut v = Vec::with_capacity(c.opts.iters as usize);
    for _ in 0..c.opts.iters {
        let t = rdtsc();
        let _ = cpu::inb(crate::serial::COM1 + crate::serial::LSR);
        v.push(rdtsc().wrapping_sub(t));
    }
    summarize("pio", "inb of the COM1 line status register", &mut v)
}

fn bench_msi_latency(c: &Ctx) -> Outcome {
    msi_bench(
        c,
        "msi_latency",
        &|m| m.enable(bsp(), BENCH_VECTOR, 1),
        false,
    )
}

fn bench_irq_rate(c: &Ctx) -> Outcome {
    msi_bench(c, "irq_rate", &|m| m.enable(bsp(), BENCH_VECTOR, 1), true)
}

/// The vector the MSI benchmarks' handler counts.
pub(crate) const BENCH_VECTOR: u8 = 0x90;
/// MSIs raised back to back per rate sample.
const RATE_BATCH: u32 = 64;

/// An MSI benchmark on fv-test or edu, the MSI programmed by `program` to arrive on
/// [`BENCH_VECTOR`] at the BSP. Latency: from the write that raises the MSI to the
/// handler's first instruction. Rate (`rate`): cycles per interrupt handled while the
/// device raises batches of MSIs back to back (the inverse of the sustained rate).
pub(crate) fn msi_bench(c: &Ctx, name: &str, program: &dyn Fn(&Msi), rate: bool) -> Outcome {
    const V: u8 = BENCH_VECTOR;
    let Some(s) = any_source(c) else {
        skip!("no fv-test or edu device")
    };
    let Some(msi) = Msi::find(s.bdf()) else {
        fail!("{} has no MSI capability", s.name())
    };
    s.bdf().enable(true);
    if let Source::Edu(_, bar) = s {
        // edu keeps a status word; its handler must acknowledge it.
        EDU_BAR.store(bar, Ordering::SeqCst);
        idt::set_callback(V, edu_ack);
    } else {
        idt::set_mode(V, Mode::Eoi);
    }
    program(&msi);
    let mut v = Vec::with_capacity(c.opts.iters as usize);
    cpu::sti();
    if rate {
        for _ in 0..c.opts.iters.div_ceil(RATE_BATCH).max(8) {
            let before = idt::total(V);
            let t = rdtsc();
            for _ in 0..RATE_BATCH {
                s.raise(0);
            }
            wait_until(SOON, || idt::total(V) >= before + RATE_BATCH);
            let handled = u64::from(idt::total(V) - before);
            if handled == 0 {
                cpu::cli();
                msi.disable();
                fail!("no MSI {V:#x} handled in a batch of {RATE_BATCH}");
            }
            v.push((rdtsc() - t) / handled);
        }
    } else {
        for _ in 0..c.opts.iters {
            let before = idt::total(V);
            let t = rdtsc();
            s.raise(0);
            if !wait_until(SOON, || idt::total(V) > before) {
                cpu::cli();
                msi.disable();
                fail!("MSI {V:#x} lost after {} samples", v.len());
            }
            v.push(idt::last(V).0.wrapping_sub(t));
        }
    }
    cpu::cli();
    msi.disable();
    let what = if rate {
        format!(
            "{} MSIs raised {RATE_BATCH} back to back: cycles per interrupt handled",
            s.name()
        )
    } else {
        format!("{} MSI: raise register write to handler entry", s.name())
    };
    summarize(name, &what, &mut v)
}

static EDU_BAR: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

fn edu_ack() {
    let bar = EDU_BAR.load(Ordering::SeqCst);
    if bar != 0 {
        let st = cpu::mmio_read32(bar + 0x24);
        cpu::mmio_write32(bar + 0x64, st);
    }
}
