//! The IDT: 256 gates, one stub per vector, a counter per CPU and vector, the TSC at
//! handler entry, and expected-exception recovery.
//!
//! Every stub pushes a dummy error code when the CPU does not (all but vectors 8,
//! 10-14, 17, 21, 29 and 30), then the vector, and jumps
//! to a common path that saves the registers, reads the TSC and calls
//! [`interrupt_dispatch`]. Stubs are 16 bytes apart, so gate `n` points at
//! `isr_stubs + 16 * n`.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use crate::{apic, println, smp};

global_asm!(
    r#"
    .section .text
    .p2align 4
    .globl isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .p2align 4
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

    .p2align 4
isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    subq $8, %rsp
    pushq %rax
    movq %rsp, %rdi
    cld
    call interrupt_dispatch
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq
"#,
    options(att_syntax)
);

extern "C" {
    static isr_stubs: u8;
}

/// What the stubs leave on the stack.
#[repr(C)]
#[derive(Debug)]
pub struct Frame {
    /// TSC read at the start of the common path.
    pub tsc: u64,
    _pad: u64,
    /// Saved general registers (r15 first).
    pub regs: [u64; 15],
    /// Vector number.
    pub vector: u64,
    /// Error code (0 when the CPU pushes none).
    pub error: u64,
    /// Interrupted RIP.
    pub rip: u64,
    /// Interrupted CS.
    pub cs: u64,
    /// Interrupted RFLAGS.
    pub rflags: u64,
    /// Interrupted RSP.
    pub rsp: u64,
    /// Interrupted SS.
    pub ss: u64,
}

#[repr(C, align(16))]
struct Idt([u64; 512]);

static mut IDT: Idt = Idt([0; 512]);

/// Counters: per CPU, per vector.
static COUNTS: [[AtomicU32; 256]; smp::MAX_CPUS] =
    [const { [const { AtomicU32::new(0) }; 256] }; smp::MAX_CPUS];
/// TSC at the handler entry of the latest interrupt per vector.
static LAST_TSC: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
/// CPU index of the latest interrupt per vector.
static LAST_CPU: [AtomicU8; 256] = [const { AtomicU8::new(0) }; 256];
/// Per-vector handling mode (see [`Mode`]).
static MODES: [AtomicU8; 256] = [const { AtomicU8::new(0) }; 256];

/// How the handler finishes an interrupt on a vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Write the local APIC EOI register.
    Eoi = 0,
    /// Leave the interrupt in service (a test finishes it).
    NoEoi = 1,
    /// Read COM1's IIR (acknowledge a UART interrupt), then EOI.
    SerialAck = 2,
    /// Clear the fv-test/edu device's interrupt via a registered callback, then EOI.
    Callback = 3,
}

static CALLBACKS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

/// Sets how the handler finishes vector `v`.
pub fn set_mode(v: u8, m: Mode) {
    MODES[usize::from(v)].store(m as u8, Ordering::SeqCst);
}

/// Runs `f` in the handler of vector `v` before the EOI.
pub fn set_callback(v: u8, f: fn()) {
    CALLBACKS[usize::from(v)].store(f as usize as u64, Ordering::SeqCst);
    set_mode(v, Mode::Callback);
}

/// Interrupts counted on `cpu` for vector `v`.
pub fn count(cpu: usize, v: u8) -> u32 {
    COUNTS
        .get(cpu)
        .map_or(0, |c| c[usize::from(v)].load(Ordering::SeqCst))
}

/// Interrupts counted on all CPUs for vector `v` (the CPUs online: with room for
/// 1024, summing idle slots would slow every polling loop).
pub fn total(v: u8) -> u32 {
    (0..smp::online().min(smp::MAX_CPUS))
        .map(|c| count(c, v))
        .sum()
}

/// TSC at handler entry and the CPU of the latest interrupt on vector `v`.
pub fn last(v: u8) -> (u64, usize) {
    (
        LAST_TSC[usize::from(v)].load(Ordering::SeqCst),
        usize::from(LAST_CPU[usize::from(v)].load(Ordering::SeqCst)),
    )
}

/// The address of the handler stub of vector `v`.
pub fn stub_address(v: u8) -> u64 {
    core::ptr::addr_of!(isr_stubs) as u64 + 16 * u64::from(v)
}

/// Fills the IDT (once, on the BSP).
pub fn init() {
    for v in 0..=255u8 {
        let h = stub_address(v);
        let lo = (h & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | ((h >> 16) & 0xffff) << 48;
        let hi = h >> 32;
        // SAFETY: single-threaded set-up before any CPU loads the IDT.
        unsafe {
            let idt = &mut *core::ptr::addr_of_mut!(IDT);
            idt.0[2 * usize::from(v)] = lo;
            idt.0[2 * usize::from(v) + 1] = hi;
        }
    }
    load();
}

/// Loads the IDT on the calling CPU.
pub fn load() {
    #[repr(C, packed)]
    struct Idtr {
        limit: u16,
        base: u64,
    }
    let idtr = Idtr {
        limit: (16 * 256 - 1) as u16,
        base: core::ptr::addr_of!(IDT) as u64,
    };
    // SAFETY: the IDT is static and fully initialised by `init`.
    unsafe { asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags)) };
}

/// An exception a test provokes on purpose.
struct Expected {
    vector: AtomicU64,
    recover: AtomicU64,
    hit: AtomicU64,
    error: AtomicU64,
    rip: AtomicU64,
    cr2: AtomicU64,
}

static EXPECT: Expected = Expected {
    vector: AtomicU64::new(u64::MAX),
    recover: AtomicU64::new(0),
    hit: AtomicU64::new(0),
    error: AtomicU64::new(0),
    rip: AtomicU64::new(0),
    cr2: AtomicU64::new(0),
};

/// What an expected exception looked like.
#[derive(Clone, Copy, Debug)]
pub struct Caught {
    /// Error code.
    pub error: u64,
    /// Faulting RIP.
    pub rip: u64,
    /// CR2 at the time (page faults).
    pub cr2: u64,
}

/// Arms recovery: the next exception `vector` resumes at `recover`.
pub fn expect(vector: u8, recover: u64) {
    EXPECT.hit.store(0, Ordering::SeqCst);
    EXPECT.recover.store(recover, Ordering::SeqCst);
    EXPECT.vector.store(u64::from(vector), Ordering::SeqCst);
}

/// Disarms recovery; returns what was caught, if anything.
pub fn caught() -> Option<Caught> {
    EXPECT.vector.store(u64::MAX, Ordering::SeqCst);
    (EXPECT.hit.load(Ordering::SeqCst) != 0).then(|| Caught {
        error: EXPECT.error.load(Ordering::SeqCst),
        rip: EXPECT.rip.load(Ordering::SeqCst),
        cr2: EXPECT.cr2.load(Ordering::SeqCst),
    })
}

const NAMES: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
    "#GP", "#PF", "res", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "res", "res", "res", "res",
    "res", "res", "#HV", "#VC", "#SX", "res",
];

/// Entry from the common stub path.
#[no_mangle]
extern "C" fn interrupt_dispatch(f: &mut Frame) {
    let v = (f.vector & 0xff) as usize;
    let cpu = smp::current_cpu();
    if let Some(c) = COUNTS.get(cpu) {
        c[v].fetch_add(1, Ordering::SeqCst);
    }
    LAST_TSC[v].store(f.tsc, Ordering::SeqCst);
    LAST_CPU[v].store(cpu as u8, Ordering::SeqCst);
    if v < 32 {
        if EXPECT.vector.load(Ordering::SeqCst) == v as u64 {
            EXPECT.error.store(f.error, Ordering::SeqCst);
            EXPECT.rip.store(f.rip, Ordering::SeqCst);
            EXPECT.cr2.store(crate::cpu::cr2(), Ordering::SeqCst);
            EXPECT.hit.store(1, Ordering::SeqCst);
            EXPECT.vector.store(u64::MAX, Ordering::SeqCst);
            f.rip = EXPECT.recover.load(Ordering::SeqCst);
            return;
        }
        if v == 2 {
            return; // NMIs are counted, not fatal
        }
        println!(
            "# FATAL: unexpected exception {} ({}) on cpu {}: error {:#x} rip {:#x} cr2 {:#x} rsp {:#x}",
            v,
            NAMES[v],
            cpu,
            f.error,
            f.rip,
            crate::cpu::cr2(),
            f.rsp
        );
        println!(
            "Bail out! unexpected exception {} at {:#x}",
            NAMES[v], f.rip
        );
        crate::finish(crate::Verdict::Fail);
    }
    if v == usize::from(apic::SPURIOUS_VECTOR) {
        return; // spurious interrupts take no EOI
    }
    match MODES[v].load(Ordering::SeqCst) {
        1 => return,
        2 => {
            let _ = crate::cpu::inb(crate::serial::COM1 + crate::serial::IIR);
        }
        3 => {
            let cb = CALLBACKS[v].load(Ordering::SeqCst);
            if cb != 0 {
                // SAFETY: only `set_callback` stores here, and it stores a `fn()`.
                let f: fn() = unsafe { core::mem::transmute::<usize, fn()>(cb as usize) };
                f();
            }
        }
        _ => {}
    }
    apic::eoi();
}

/// Where provoking code stores its recovery address.
pub fn recover_slot() -> *mut u64 {
    EXPECT.recover.as_ptr()
}
