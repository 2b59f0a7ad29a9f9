//! Per-CPU stacks and application-processor start-up (INIT, SIPI, SIPI).

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::cpu::{cpu_index_from_rsp, delay, wait_until};
use crate::{apic, boot, idt};

/// CPUs the probe drives (x2APIC IDs beyond 255 included).
pub const MAX_CPUS: usize = 1024;
/// Stack bytes per CPU.
pub const STACK_SIZE: usize = 32 * 1024;

extern "C" {
    static cpu_stacks: u8;
    static mut ap_stack_top: u64;
}

/// Set by the BSP before each SIPI: the index the next AP takes.
static NEXT_INDEX: AtomicUsize = AtomicUsize::new(0);
/// CPUs online, BSP included.
static ONLINE: AtomicUsize = AtomicUsize::new(1);
/// APIC ID per CPU index.
static APIC_IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(u32::MAX) }; MAX_CPUS];

/// Index (0 = BSP) of the CPU running this code, derived from the stack pointer.
pub fn current_cpu() -> usize {
    let base = core::ptr::addr_of!(cpu_stacks) as u64;
    cpu_index_from_rsp(base, STACK_SIZE as u64).min(MAX_CPUS - 1)
}

/// CPUs online.
pub fn online() -> usize {
    ONLINE.load(Ordering::SeqCst)
}

/// APIC ID of CPU `i`.
pub fn apic_id(i: usize) -> Option<u32> {
    APIC_IDS
        .get(i)
        .map(|a| a.load(Ordering::SeqCst))
        .filter(|&a| a != u32::MAX)
}

/// Records the BSP's APIC ID.
pub fn set_bsp(id: u32) {
    APIC_IDS[0].store(id, Ordering::SeqCst);
}

/// Starts every processor of `ids` but the BSP; returns how many came up.
pub fn start_aps(ids: &[u32]) -> usize {
    let tramp = boot::trampoline();
    // SAFETY: the trampoline page is free RAM below 1 MiB on both faultvisor and QEMU
    // (documented in boot.rs); the probe owns all memory.
    unsafe {
        core::ptr::copy_nonoverlapping(
            tramp.as_ptr(),
            boot::TRAMPOLINE_ADDR as *mut u8,
            tramp.len(),
        )
    };
    let base = core::ptr::addr_of!(cpu_stacks) as u64;
    let bsp = apic::id();
    let mut started = 0;
    for &id in ids.iter().filter(|&&id| id != bsp) {
        let idx = ONLINE.load(Ordering::SeqCst);
        if idx >= MAX_CPUS {
            break;
        }
        NEXT_INDEX.store(idx, Ordering::SeqCst);
        // SAFETY: APs read this only after the SIPI below; the BSP is the only writer.
        unsafe {
            core::ptr::addr_of_mut!(ap_stack_top)
                .write_volatile(base + ((idx as u64 + 1) * STACK_SIZE as u64) - 16)
        };
        apic::send_ipi(id, 0x4500); // INIT, level assert
        delay(1_000_000);
        let sipi = 0x4600 | (boot::TRAMPOLINE_ADDR >> 12) as u32;
        apic::send_ipi(id, sipi);
        let mut up = wait_until(200_000_000, || ONLINE.load(Ordering::SeqCst) > idx);
        if !up {
            apic::send_ipi(id, sipi);
            up = wait_until(2_000_000_000, || ONLINE.load(Ordering::SeqCst) > idx);
        }
        if up {
            started += 1;
        } else {
            crate::println!("# AP with APIC ID {id} did not start");
        }
    }
    started
}

/// Work posted for each CPU: a `fn(u64)` as an address (0: none) and its argument.
static WORK: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static WORK_ARG: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static WORK_DONE: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// The vector that wakes an idle CPU to look at its work.
const WAKE_VECTOR: u8 = 0x2f;

/// Runs `f(arg)` on CPU `idx` (an AP), which is woken by an IPI; see [`wait_done`].
pub fn run_on(idx: usize, f: fn(u64), arg: u64) {
    let (Some(w), Some(a), Some(d)) = (WORK.get(idx), WORK_ARG.get(idx), WORK_DONE.get(idx)) else {
        return;
    };
    d.store(0, Ordering::SeqCst);
    a.store(arg, Ordering::SeqCst);
    w.store(f as usize as u64, Ordering::SeqCst);
    if let Some(id) = apic_id(idx) {
        idt::set_mode(WAKE_VECTOR, idt::Mode::Eoi);
        apic::send_ipi(id, u32::from(WAKE_VECTOR));
    }
}

/// Waits up to `cycles` for the work posted to CPU `idx` to finish.
pub fn wait_done(idx: usize, cycles: u64) -> bool {
    WORK_DONE
        .get(idx)
        .is_some_and(|d| wait_until(cycles, || d.load(Ordering::SeqCst) != 0))
}

/// Rust entry of an application processor (from boot.rs, on its own stack).
#[no_mangle]
extern "C" fn ap_main() -> ! {
    let idx = NEXT_INDEX.load(Ordering::SeqCst);
    idt::load();
    apic::enable();
    APIC_IDS[idx].store(apic::id(), Ordering::SeqCst);
    ONLINE.fetch_add(1, Ordering::SeqCst);
    loop {
        let f = WORK[idx].swap(0, Ordering::SeqCst);
        if f != 0 {
            // SAFETY: `run_on` stored the address of a `fn(u64)`, and nothing else is
            // ever stored in WORK.
            let f: fn(u64) = unsafe { core::mem::transmute::<usize, fn(u64)>(f as usize) };
            f(WORK_ARG[idx].load(Ordering::SeqCst));
            WORK_DONE[idx].store(1, Ordering::SeqCst);
        }
        crate::cpu::sti_hlt();
    }
}
