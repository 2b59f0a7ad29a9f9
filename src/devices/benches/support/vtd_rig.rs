//! The VT-d set-up the benchmarks and the allocation test share (included with
//! `#[path]`): a unit with translation on and two requesters mapped.

#![allow(dead_code)]

use std::sync::Arc;

use devices::interrupt::RecordingController;
use devices::iommu::{reg, CachingMode, Vtd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const ROOT: u64 = 0x10_0000;
pub const CTX: u64 = 0x10_1000;
pub const L3: u64 = 0x10_2000;
pub const L2: u64 = 0x10_3000;
pub const L1: u64 = 0x10_4000;

/// Guest memory with devfn 0x20 and 0x28 mapped: IOVA 0x1000 + n*0x1000 → 0x50_0000 +
/// n*0x1000 for 128 pages, read/write, 3 levels; translation on.
pub fn rig() -> (GuestMemoryMmap, Arc<Vtd>) {
    rig_with(CachingMode::Simple)
}

pub fn rig_with(caching: CachingMode) -> (GuestMemoryMmap, Arc<Vtd>) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("mem");
    let w = |a: u64, v: u64| mem.write_obj(v, GuestAddress(a)).expect("w");
    w(ROOT, CTX | 1);
    for devfn in [0x20u64, 0x28] {
        w(CTX + devfn * 16, L3 | 1);
        w(CTX + devfn * 16 + 8, 1 | (1 << 8));
    }
    w(L3, L2 | 3);
    w(L2, L1 | 3);
    for n in 0..128u64 {
        w(L1 + 8 * (n + 1), (0x50_0000 + n * 0x1000) | 3);
    }
    let vtd = Arc::new(
        Vtd::new(mem.clone(), Arc::new(RecordingController::new(24, 1000))).with_caching(caching),
    );
    vtd.write(reg::RTADDR, &ROOT.to_le_bytes());
    vtd.write(reg::GCMD, &(1u32 << 30).to_le_bytes());
    vtd.write(reg::GCMD, &(1u32 << 31).to_le_bytes());
    (mem, vtd)
}
