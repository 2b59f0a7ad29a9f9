//! A bump allocator over a static arena (the probe allocates little and frees nothing
//! that matters).

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicUsize, Ordering};

const ARENA_SIZE: usize = 4 << 20;

#[repr(C, align(4096))]
struct Arena([u8; ARENA_SIZE]);

static mut ARENA: Arena = Arena([0; ARENA_SIZE]);
static NEXT: AtomicUsize = AtomicUsize::new(0);

struct Bump;

// SAFETY: allocations are disjoint, aligned slices of the arena handed out by an atomic
// bump pointer; `dealloc` never reuses memory, so no two live allocations overlap.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = core::ptr::addr_of_mut!(ARENA) as usize;
        let mut cur = NEXT.load(Ordering::Relaxed);
        loop {
            let start = (base + cur).next_multiple_of(layout.align()) - base;
            let end = match start.checked_add(layout.size()) {
                Some(e) if e <= ARENA_SIZE => e,
                _ => return core::ptr::null_mut(),
            };
            match NEXT.compare_exchange_weak(cur, end, Ordering::SeqCst, Ordering::Relaxed) {
                Ok(_) => return (base + start) as *mut u8,
                Err(now) => cur = now,
            }
        }
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

#[global_allocator]
static ALLOCATOR: Bump = Bump;
