//! VT-d translation and fault-recording costs (criterion).
//!
//! `cargo bench -p devices --bench iommu`
//!
//! - `translate/hit`: an IOTLB hit in the requester's own cache (the DMA hot path);
//! - `translate/miss`: a fresh handle, so a context-entry read and a 3-level walk;
//! - `translate/hit_2_threads`: two threads, two devices, hits in parallel (no shared
//!   lock: the time per hit should stay that of one thread);
//! - `fault/record_and_clear`: a faulting translation recorded in an FRCD, then cleared
//!   the way a guest's handler does;
//! - `dma_write_4k/{direct,translated}`: a 4 KiB device write to guest memory;
//! - `translate/hit_exact`: an IOTLB hit under `caching=exact`, whose stale-use
//!   detector walks the tables in guest memory to compare;
//! - `ir/remap_cached`: an interrupt message looked up through a cached IRTE (what
//!   every remapped MSI route and DMA interrupt request costs);
//! - `ir/irte_use_exact`: the exact-mode detector's check of one interrupt's IRTE.
//! - `virtio_read_1m/{identity,translated_hit,translated_miss}`: what a 1 MiB
//!   virtio-blk data buffer costs to read through vm-memory's IOMMU interface, its 256
//!   pages scattered in guest memory: translation off, an IOTLB that holds them, and a
//!   fresh IOTLB that fills from the page tables (the request after an invalidation).

#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use devices::interrupt::{MsiMessage, MsiSource};
use devices::iommu::{reg, CachingMode, DeviceIommu, DmaHandle, Vtd};
use vm_memory::{Bytes, GuestAddress};

#[path = "support/vtd_rig.rs"]
mod vtd_rig;
use vtd_rig::{rig, rig_with, L2};

fn translate(c: &mut Criterion) {
    let (_mem, vtd) = rig();
    let h = vtd.handle(0x20);
    h.translate(0x1000, true).expect("warm");
    let mut g = c.benchmark_group("translate");
    // The address only (a Result would be spilled and reloaded byte by byte by
    // black_box, which then dominates).
    g.bench_function("hit", |b| {
        b.iter(|| h.translate(black_box(0x1234), true).unwrap_or(0))
    });
    g.bench_function("miss", |b| {
        b.iter(|| {
            let fresh = vtd.handle(0x20);
            fresh.translate(black_box(0x1234), true)
        })
    });
    // Pages 1 and 65 share an IOTLB slot: each access evicts the other and walks the
    // tables again (the context entry stays cached) — the miss path of a running
    // device, without a handle's set-up.
    let hm = vtd.handle(0x20);
    let mut flip = 0u64;
    g.bench_function("miss_walk", |b| {
        b.iter(|| {
            flip ^= 64;
            hm.translate(black_box((1 + flip) << 12), true)
        })
    });
    let (_mem2, exact) = rig_with(CachingMode::Exact);
    let he = exact.handle(0x20);
    he.translate(0x1000, true).expect("warm");
    g.bench_function("hit_exact", |b| {
        b.iter(|| he.translate(black_box(0x1234), true))
    });
    g.bench_function("hit_2_threads", |b| {
        b.iter_custom(|iters| {
            let handles = [vtd.handle(0x20), vtd.handle(0x28)];
            for h in &handles {
                h.translate(0x1000, true).expect("warm");
            }
            let start = Instant::now();
            std::thread::scope(|s| {
                for h in &handles {
                    s.spawn(move || {
                        for i in 0..iters {
                            black_box(h.translate(0x1000 + (i & 0x3f) * 8, true).ok());
                        }
                    });
                }
            });
            // Time per hit per thread: equal to `hit` when the threads do not contend.
            start.elapsed()
        })
    });
    g.finish();
}

fn fault(c: &mut Criterion) {
    let (_mem, vtd) = rig();
    let h = vtd.handle(0x20);
    let frcd = 0x200u64;
    c.bench_function("fault/record_and_clear", |b| {
        b.iter(|| {
            let r = h.translate(black_box(0x10_0000), true);
            // The guest's handler: read the record, clear F.
            let mut hi = [0u8; 4];
            vtd.read(frcd + 12, &mut hi);
            for i in 0..16u64 {
                vtd.write(frcd + 16 * i + 12, &(1u32 << 31).to_le_bytes());
            }
            r.is_err()
        })
    });
}

fn dma(c: &mut Criterion) {
    let (mem, vtd) = rig();
    let direct = DmaHandle::direct(mem.clone(), 0x20, None);
    let translated = vtd.handle(0x20);
    let data = vec![0x5au8; 4096];
    let mut g = c.benchmark_group("dma_write_4k");
    g.bench_function("direct", |b| {
        b.iter(|| direct.write(black_box(0x50_0000), &data))
    });
    g.bench_function("translated", |b| {
        b.iter(|| translated.write(black_box(0x1000), &data))
    });
    g.finish();
}

/// IOVA 0x20_0000.. (one level-1 table, 256 pages) mapped to scattered pages at
/// 8 MiB + 8 KiB * (255 - n), for devfn 0x20 of `rig`.
fn virtio_read(c: &mut Criterion) {
    let (mem, vtd) = rig();
    let w = |a: u64, v: u64| mem.write_obj(v, GuestAddress(a)).expect("w");
    let l1b = 0x10_5000u64;
    w(L2 + 8, l1b | 3);
    for n in 0..256u64 {
        w(l1b + 8 * n, ((8 << 20) + (255 - n) * 0x2000) | 3);
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut g = c.benchmark_group("virtio_read_1m");
    let ident = DeviceIommu::memory(&mem, None, 0x20, false);
    g.bench_function("identity", |b| {
        b.iter(|| ident.read_slice(&mut buf, black_box(GuestAddress(8 << 20))))
    });
    let hit = DeviceIommu::memory(&mem, Some(&vtd), 0x20, true);
    hit.read_slice(&mut buf, GuestAddress(0x20_0000))
        .expect("warm");
    g.bench_function("translated_hit", |b| {
        b.iter(|| hit.read_slice(&mut buf, black_box(GuestAddress(0x20_0000))))
    });
    g.bench_function("translated_miss", |b| {
        b.iter(|| {
            let fresh = DeviceIommu::memory(&mem, Some(&vtd), 0x20, true);
            fresh
                .read_slice(&mut buf, black_box(GuestAddress(0x20_0000)))
                .expect("mapped")
        })
    });
    g.finish();
}

/// Interrupt remapping on (256-entry x2APIC table at 0x20_0000) with IRTE 5 sending
/// vector 0x41 to APIC 3 for requester 0x20 (source-ID verified).
fn ir_rig(caching: CachingMode) -> (Arc<Vtd>, MsiSource, MsiMessage) {
    let (mem, vtd) = rig_with(caching);
    let table = 0x20_0000u64;
    mem.write_obj(
        1u64 | (0x41 << 16) | (3u64 << 32),
        GuestAddress(table + 5 * 16),
    )
    .expect("irte");
    mem.write_obj(0x20u64 | (1 << 18), GuestAddress(table + 5 * 16 + 8))
        .expect("irte");
    vtd.write(reg::IRTA, &(table | (1 << 11) | 7).to_le_bytes());
    vtd.write(reg::GCMD, &((1u32 << 31) | (1 << 24)).to_le_bytes());
    vtd.write(reg::GCMD, &((1u32 << 31) | (1 << 25)).to_le_bytes());
    assert!(vtd.remapping());
    let src = MsiSource::Pci {
        bdf: 0x20,
        vector: 0,
    };
    let msg = MsiMessage {
        address: 0xfee0_0000 | (5 << 5) | (1 << 4),
        data: 0,
    };
    let m = vtd.remap(src, msg).expect("remapped");
    assert_eq!((m.vector(), m.destination()), (0x41, 3));
    (vtd, src, msg)
}

fn ir(c: &mut Criterion) {
    let mut g = c.benchmark_group("ir");
    let (vtd, src, msg) = ir_rig(CachingMode::Simple);
    g.bench_function("remap_cached", |b| {
        b.iter(|| vtd.remap(black_box(src), black_box(msg)))
    });
    let (exact, _, _) = ir_rig(CachingMode::Exact);
    g.bench_function("irte_use_exact", |b| {
        b.iter(|| exact.irte_use(black_box(0x20), black_box(5)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = translate, fault, dma, ir, virtio_read
}
criterion_main!(benches);
