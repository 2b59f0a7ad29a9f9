//! The local APIC in x2APIC (MSR) or xAPIC (MMIO) mode.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::cpu::{cpuid, mmio_read32, mmio_write32, rdmsr, wait_until, wrmsr};

/// The spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// IA32_APIC_BASE.
const MSR_APIC_BASE: u32 = 0x1b;

/// Register offsets (xAPIC MMIO offsets; x2APIC MSR = 0x800 + offset / 16).
pub mod reg {
    /// APIC ID.
    pub const ID: u32 = 0x20;
    /// Version.
    pub const VERSION: u32 = 0x30;
    /// Task priority.
    pub const TPR: u32 = 0x80;
    /// End of interrupt.
    pub const EOI: u32 = 0xb0;
    /// Spurious-interrupt vector register.
    pub const SVR: u32 = 0xf0;
    /// In-service register (8 x 32 bits, 16 bytes apart).
    pub const ISR: u32 = 0x100;
    /// Trigger-mode register.
    pub const TMR: u32 = 0x180;
    /// Interrupt request register.
    pub const IRR: u32 = 0x200;
    /// Interrupt command register (low).
    pub const ICR: u32 = 0x300;
    /// Interrupt command register (high, xAPIC only).
    pub const ICR_HIGH: u32 = 0x310;
    /// LVT timer.
    pub const LVT_TIMER: u32 = 0x320;
    /// LVT LINT0.
    pub const LVT_LINT0: u32 = 0x350;
    /// LVT error.
    pub const LVT_ERROR: u32 = 0x370;
}

static X2APIC: AtomicBool = AtomicBool::new(false);
static BASE: AtomicU64 = AtomicU64::new(0xfee0_0000);

/// Whether the CPU offers x2APIC.
pub fn x2apic_supported() -> bool {
    cpuid(1, 0).2 & (1 << 21) != 0
}

/// Whether the probe runs the APIC in x2APIC mode.
pub fn is_x2apic() -> bool {
    X2APIC.load(Ordering::SeqCst)
}

/// Chooses the mode and MMIO base for all CPUs (BSP, before `enable`).
pub fn configure(x2apic: bool, base: u64) {
    X2APIC.store(x2apic, Ordering::SeqCst);
    BASE.store(base, Ordering::SeqCst);
}

/// Reads a register.
pub fn read(off: u32) -> u32 {
    if is_x2apic() {
        rdmsr(0x800 + (off >> 4)) as u32
    } else {
        mmio_read32(BASE.load(Ordering::Relaxed) + u64::from(off))
    }
}

/// Writes a register.
pub fn write(off: u32, v: u32) {
    if is_x2apic() {
        wrmsr(0x800 + (off >> 4), u64::from(v));
    } else {
        mmio_write32(BASE.load(Ordering::Relaxed) + u64::from(off), v);
    }
}

/// Enables the calling CPU's APIC in the configured mode, spurious vector 0xff, TPR 0,
/// LINT0 (the 8259's ExtINT line) and the timer masked.
pub fn enable() {
    let mut b = rdmsr(MSR_APIC_BASE) | (1 << 11);
    if is_x2apic() {
        b |= 1 << 10;
    }
    wrmsr(MSR_APIC_BASE, b);
    write(reg::SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    write(reg::TPR, 0);
    write(reg::LVT_LINT0, 1 << 16);
    write(reg::LVT_TIMER, 1 << 16);
    write(reg::LVT_ERROR, 1 << 16);
}

/// The calling CPU's APIC ID.
pub fn id() -> u32 {
    if is_x2apic() {
        read(reg::ID)
    } else {
        read(reg::ID) >> 24
    }
}

/// Signals end of interrupt.
pub fn eoi() {
    write(reg::EOI, 0);
}

/// Whether vector `v` is in service on this CPU.
pub fn in_service(v: u8) -> bool {
    bit(reg::ISR, v)
}

/// Whether vector `v` is pending (IRR) on this CPU.
pub fn requested(v: u8) -> bool {
    bit(reg::IRR, v)
}

/// Whether vector `v` was accepted as level-triggered (TMR) on this CPU.
pub fn level_triggered(v: u8) -> bool {
    bit(reg::TMR, v)
}

fn bit(base: u32, v: u8) -> bool {
    read(base + 0x10 * (u32::from(v) / 32)) & (1 << (v % 32)) != 0
}

/// Whether the APIC can suppress EOI broadcasts (directed EOI, LVR bit 24).
pub fn directed_eoi_supported() -> bool {
    read(reg::VERSION) & (1 << 24) != 0
}

/// Sets or clears SVR bit 12 (suppress EOI broadcast).
pub fn set_eoi_broadcast_suppression(on: bool) {
    let svr = read(reg::SVR);
    write(reg::SVR, if on { svr | 1 << 12 } else { svr & !(1 << 12) });
}

/// Sends an IPI: `low` is the ICR low word (vector, delivery mode, level...).
pub fn send_ipi(dest: u32, low: u32) {
    if is_x2apic() {
        wrmsr(0x830, (u64::from(dest) << 32) | u64::from(low));
    } else {
        write(reg::ICR_HIGH, dest << 24);
        write(reg::ICR, low);
        wait_until(10_000_000, || read(reg::ICR) & (1 << 12) == 0);
    }
}

/// The MSI address that targets APIC `dest` (physical destination mode).
pub fn msi_address(dest: u32) -> u64 {
    0xfee0_0000 | (u64::from(dest & 0xff) << 12)
}
