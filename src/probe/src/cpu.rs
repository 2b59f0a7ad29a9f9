//! Port I/O, MMIO, MSRs, the TSC and other single instructions.

use core::arch::asm;

/// Reads a byte from an I/O port.
#[inline]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port input has no memory effects visible to Rust; the probe owns the machine.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a byte to an I/O port.
#[inline]
pub fn outb(port: u16, v: u8) {
    // SAFETY: as for `inb`; device side effects are the point.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a word from an I/O port.
#[inline]
pub fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: as for `inb`.
    unsafe {
        asm!("in ax, dx", out("ax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a word to an I/O port.
#[inline]
pub fn outw(port: u16, v: u16) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a dword from an I/O port.
#[inline]
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `inb`.
    unsafe {
        asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a dword to an I/O port.
#[inline]
pub fn outl(port: u16, v: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a 32-bit MMIO register at physical (= virtual, identity-mapped) `addr`.
#[inline]
pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: the first 4 GiB are identity-mapped; callers pass device register addresses
    // discovered from ACPI or PCI BARs. A wrong address reads RAM or faults visibly.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes a 32-bit MMIO register.
#[inline]
pub fn mmio_write32(addr: u64, v: u32) {
    // SAFETY: as for `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

/// Reads a model-specific register.
#[inline]
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading an MSR has no memory effects; a missing MSR raises #GP, which the
    // IDT reports.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register.
#[inline]
pub fn wrmsr(msr: u32, v: u64) {
    // SAFETY: as for `rdmsr`; the probe only writes APIC and EFER-class MSRs it owns.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nomem, nostack, preserves_flags))
    };
}

/// Reads the time-stamp counter (ordered after earlier loads by `lfence`).
#[inline]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc/lfence have no memory effects.
    unsafe {
        asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// CPUID leaf/subleaf: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Enables interrupts.
#[inline]
pub fn sti() {
    // SAFETY: the IDT is loaded before anything calls this.
    unsafe { asm!("sti", options(nomem, nostack)) };
}

/// Disables interrupts.
#[inline]
pub fn cli() {
    // SAFETY: masking interrupts cannot break memory safety.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// Enables interrupts and halts until the next one (atomically: `sti; hlt`).
#[inline]
pub fn sti_hlt() {
    // SAFETY: as for `sti`.
    unsafe { asm!("sti", "hlt", options(nomem, nostack)) };
}

/// Halts forever with interrupts off.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stopping the CPU is always allowed.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// CR2 (the faulting address of the last page fault).
pub fn cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// The current stack pointer.
#[inline]
pub fn rsp() -> u64 {
    let v: u64;
    // SAFETY: reading RSP has no side effects.
    unsafe { asm!("mov {}, rsp", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Spins until `cond` holds or `cycles` TSC cycles pass; returns whether it held.
pub fn wait_until(cycles: u64, mut cond: impl FnMut() -> bool) -> bool {
    let start = rdtsc();
    loop {
        if cond() {
            return true;
        }
        if rdtsc().wrapping_sub(start) > cycles {
            return cond();
        }
        core::hint::spin_loop();
    }
}

/// Spins for `cycles` TSC cycles.
pub fn delay(cycles: u64) {
    let start = rdtsc();
    while rdtsc().wrapping_sub(start) < cycles {
        core::hint::spin_loop();
    }
}

/// Which `stack_size`-sized slot of the stack array at `base` holds the current RSP.
pub fn cpu_index_from_rsp(base: u64, stack_size: u64) -> usize {
    (rsp().wrapping_sub(base) / stack_size) as usize
}
