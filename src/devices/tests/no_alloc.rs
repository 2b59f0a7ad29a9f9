//! The DMA translation path allocates nothing, hit or miss: a counting global
//! allocator (per thread, so other tests' threads do not count) around translations
//! of a warmed-up handle.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

#[path = "../benches/support/vtd_rig.rs"]
mod vtd_rig;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is passed to the system allocator unchanged; the counter is a
// thread-local Cell, which allocates nothing and cannot re-enter the allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|a| a.set(a.get() + 1));
        // SAFETY: the caller's contract for `alloc` is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above, that is from the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|a| a.set(a.get() + 1));
        // SAFETY: as for `alloc`; `ptr` came from this allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(|a| a.get())
}

#[test]
fn translation_hits_and_misses_do_not_allocate() {
    let (_mem, vtd) = vtd_rig::rig();
    let h = vtd.handle(0x20);
    // Warm up: the context entry is cached, the invalidation log has its slots.
    h.translate(0x1000, true).expect("mapped");
    let before = allocations();
    for i in 0..10_000u64 {
        // Pages 1 and 65 evict each other (misses that walk); page 2 stays (hits).
        let page = if i % 2 == 0 { 1 } else { 65 };
        assert_eq!(
            h.translate(page << 12 | 0x10, true),
            Ok(0x50_0000 + ((page - 1) << 12) + 0x10)
        );
        h.translate(0x2000, false).expect("hit");
    }
    assert_eq!(
        allocations() - before,
        0,
        "allocations on the translation path"
    );
    assert!(
        vtd.stats().walks >= 10_000,
        "the misses walked: {:?}",
        vtd.stats()
    );
}
