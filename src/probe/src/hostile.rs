//! The hostile guest (`probe.tests=hostile.chaos probe.seed=S probe.actions=N`): every
//! CPU performs seeded random actions against every device at once — MMIO of every
//! size at every offset of every BAR, configuration-space writes (BARs, command
//! registers, MSI and MSI-X included), port I/O, IOAPIC redirection entries, VT-d
//! registers with random root, context and page tables and invalidation queues,
//! interrupt remapping (IRTA of every size, IRTEs rewritten while interrupts fly,
//! SIRTP/IRE/CFI toggled, interrupt entry cache invalidations), virtqueues with random
//! descriptors and rings, DMA, and interrupt storms. Then it
//! puts the machine back in order and checks that the VMM still routes interrupts and
//! answers, and reports its own verdict.
//!
//! The guest must survive its own attack, so what could destroy it is shaped, never
//! what the VMM sees as well-formed: message data and IRTEs always ask for fixed or
//! lowest-priority delivery of a vector ≥ 0x30 (never INIT, NMI, SMI or an exception
//! vector), the remapping table stays inside its scratch area, every address the guest writes for a device to use points into its scratch
//! area or far beyond RAM, the ports that end the VM are left alone, and the ECAM,
//! IOAPIC select/window and CF8 pairs are taken under one lock so the two CPUs do not
//! interleave their halves. Everything else — reserved bits, sizes, offsets, modes,
//! orders, races between CPUs — is as random as the seed makes it.

use alloc::format;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::cpu::{self, inb, mmio_read32, mmio_write32, outb, outl, outw, wait_until};
use crate::idt::{self, Mode};
use crate::pci::{Bdf, Msi, Msix};
use crate::tap::Outcome;
use crate::tests::{bsp_apic, Ctx, SOON};
use crate::{check, smp};

/// Scratch memory the devices may be pointed at.
#[repr(C, align(4096))]
struct Scratch([u8; SCRATCH]);
const SCRATCH: usize = 2 << 20;
static mut AREA: Scratch = Scratch([0; SCRATCH]);

/// Layout of the scratch area (offsets).
const RINGS: u64 = 0;
const RINGS_SIZE: u64 = 64 << 10;
const QUEUE: u64 = RINGS + RINGS_SIZE;
/// The interrupt remapping table area: 4096 entries at most.
const IRT: u64 = QUEUE + 0x1000;
const IRT_SIZE: u64 = 64 << 10;
const TABLES: u64 = IRT + IRT_SIZE;
const TABLES_SIZE: u64 = 256 << 10;
const DATA: u64 = TABLES + TABLES_SIZE;
const DATA_SIZE: u64 = SCRATCH as u64 - DATA;

fn base() -> u64 {
    core::ptr::addr_of!(AREA) as u64
}

/// xorshift64*.
#[derive(Clone, Copy)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, per256: u64) -> bool {
        self.below(256) < per256
    }
    fn size(&mut self) -> u32 {
        [1, 2, 4, 4][self.below(4) as usize]
    }
}

/// An address for a device to DMA to or from: mostly the data area, sometimes far
/// beyond RAM (never guest code or data).
fn dma_addr(r: &mut Rng) -> u64 {
    match r.below(16) {
        0 => 0x1_0000_0000_0000 | (r.next() & 0xffff_ffff_fff8),
        1 => r.next() | (1 << 63),
        _ => base() + DATA + r.below(DATA_SIZE - 0x2000),
    }
}

/// A value for a descriptor, table entry or pattern: random, but with the two low bits
/// clear so that, read as a page-table entry, it is never present.
fn filler(r: &mut Rng) -> u64 {
    r.next() & !3
}

/// Message data that asks for fixed or lowest-priority delivery of a vector ≥ 0x30,
/// with everything else random.
fn msi_data(v: u32) -> u32 {
    let vector = 0x30 + (v & 0xff) % 0xcf;
    (v & !0x7ff) | (v & 0x100) | vector
}

static LOCK: AtomicBool = AtomicBool::new(false);

/// Runs `f` with the select/data register pairs to itself.
fn locked<T>(f: impl FnOnce() -> T) -> T {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    let r = f();
    LOCK.store(false, Ordering::Release);
    r
}

/// What the guest attacks.
#[derive(Clone, Copy, Default)]
struct Targets {
    fvt: Option<(Bdf, u64, u64)>,
    edu: Option<(Bdf, u64)>,
    virtio: Option<(Bdf, u64)>,
    vtd: Option<u64>,
    ioapic: u64,
    funcs: [Option<Bdf>; 8],
}

static TARGETS: AtomicU64 = AtomicU64::new(0);
static ACTIONS: AtomicU64 = AtomicU64::new(0);
/// Per action kind, how often it ran (both CPUs).
static KINDS: [AtomicU32; KIND_NAMES.len()] = [const { AtomicU32::new(0) }; KIND_NAMES.len()];
const KIND_NAMES: [&str; 13] = [
    "bar-write",
    "bar-read",
    "config-write",
    "config-read",
    "port",
    "ioapic",
    "vtd-reg",
    "tables",
    "virtqueue",
    "dma",
    "storm",
    "notify",
    "ir",
];

fn targets() -> &'static Targets {
    // SAFETY: set once by the BSP (`chaos`) before any CPU acts, never written again.
    unsafe { &*(TARGETS.load(Ordering::Acquire) as *const Targets) }
}

fn mmio_write(addr: u64, size: u32, v: u64) {
    // SAFETY: `addr` is inside a BAR, the IOAPIC or the VT-d page (identity-mapped MMIO),
    // aligned to `size` by the callers.
    unsafe {
        match size {
            1 => core::ptr::write_volatile(addr as *mut u8, v as u8),
            2 => core::ptr::write_volatile(addr as *mut u16, v as u16),
            8 => core::ptr::write_volatile(addr as *mut u64, v),
            _ => core::ptr::write_volatile(addr as *mut u32, v as u32),
        }
    }
}

fn mmio_read(addr: u64, size: u32) -> u64 {
    // SAFETY: as for `mmio_write`.
    unsafe {
        match size {
            1 => u64::from(core::ptr::read_volatile(addr as *const u8)),
            2 => u64::from(core::ptr::read_volatile(addr as *const u16)),
            8 => core::ptr::read_volatile(addr as *const u64),
            _ => u64::from(core::ptr::read_volatile(addr as *const u32)),
        }
    }
}

fn scratch_write(off: u64, v: u64) {
    if off + 8 <= SCRATCH as u64 {
        // SAFETY: inside the static scratch area, which only this module uses.
        unsafe { core::ptr::write_volatile((base() + (off & !7)) as *mut u64, v) }
    }
}

/// One random action.
fn act(r: &mut Rng) {
    let t = targets();
    let kind = r.below(KIND_NAMES.len() as u64) as usize;
    KINDS[kind].fetch_add(1, Ordering::Relaxed);
    ACTIONS.fetch_add(1, Ordering::Relaxed);
    match kind {
        0 => bar_write(r, t),
        1 => {
            let (addr, size) = match r.below(5) {
                0 => t.fvt.map(|(_, b, _)| (b + r.below(0x1000), 4)),
                1 => t.fvt.map(|(_, _, b)| (b + r.below(0x1000), r.size())),
                2 => t.edu.map(|(_, b)| (b + r.below(0x100), r.size())),
                3 => t.virtio.map(|(_, b)| (b + r.below(0x4000), r.size())),
                _ => t
                    .vtd
                    .map(|b| (b + r.below(0x1000), [4, 8][r.below(2) as usize])),
            }
            .unwrap_or((t.ioapic, 4));
            let size = size.min(8);
            let _ = mmio_read(addr & !(u64::from(size) - 1), size);
        }
        2 => config_write(r, t),
        3 => {
            if let Some(f) = t.funcs[r.below(8) as usize] {
                let off = r.below(0x1000) as u16;
                locked(|| f.read32(off));
            }
        }
        4 => port(r),
        5 => ioapic(r, t),
        6 => vtd_reg(r, t),
        7 => tables(r),
        8 => virtqueue(r, t),
        9 => dma(r, t),
        10 => storm(r, t),
        12 => ir(r, t),
        _ => {
            if let Some((_, b)) = t.virtio {
                for _ in 0..1 + r.below(8) {
                    mmio_write32(b + 0x2000, 0);
                }
            }
        }
    }
}

fn bar_write(r: &mut Rng, t: &Targets) {
    let v = r.next();
    match r.below(4) {
        0 => {
            if let Some((_, b, _)) = t.fvt {
                // fv-test registers: never leave INTx asserted (a level line that
                // stays up is an endless storm on any machine).
                let off = r.below(0x20) & !3;
                let v = if off == 0x0c { v & !1 } else { v };
                mmio_write32(b + off, v as u32);
            }
        }
        1 => {
            if let Some((_, _, b)) = t.fvt {
                msix_table_write(r, b, 0x1000);
            }
        }
        2 => {
            if let Some((_, b)) = t.edu {
                let off = r.below(0x100) & !3;
                let size = if off >= 0x80 && r.chance(128) { 8 } else { 4 };
                let v = match off {
                    0x80 | 0x88 => dma_addr(r),
                    0x90 => r.below(0x2000),
                    0x98 => v & 0x7,
                    _ => v,
                };
                mmio_write(b + (off & !(u64::from(size) - 1)), size, v);
            }
        }
        _ => {
            if let Some((_, b)) = t.virtio {
                match r.below(4) {
                    0 => msix_table_write(r, b + 0x3000, 0x800),
                    1 => {
                        // Ring addresses, into the ring area.
                        let off = 0x20 + 8 * r.below(3);
                        let a = base() + RINGS + (r.below(RINGS_SIZE - 0x1000) & !0xf);
                        mmio_write32(b + off, a as u32);
                        mmio_write32(b + off + 4, (a >> 32) as u32);
                    }
                    2 => {
                        let off = r.below(0x38);
                        let size = r.size();
                        let off = off & !(u64::from(size) - 1);
                        // Never the ring addresses at random.
                        if !(0x20..0x38).contains(&off) {
                            mmio_write(b + off, size, v);
                        }
                    }
                    _ => {
                        let off = 0x1000 + r.below(0x1000);
                        mmio_write(b + off, 1, v);
                    }
                }
            }
        }
    }
}

/// A write into an MSI-X table (or its PBA) of `len` bytes at `b`, with any message
/// data shaped.
fn msix_table_write(r: &mut Rng, b: u64, len: u64) {
    let off = r.below(len) & !3;
    let v = r.next() as u32;
    let v = if off % 16 == 8 && off < 0x800 {
        msi_data(v)
    } else {
        v
    };
    mmio_write32(b + off, v);
}

fn config_write(r: &mut Rng, t: &Targets) {
    let Some(f) = t.funcs[r.below(8) as usize] else {
        return;
    };
    let off = if r.chance(200) {
        r.below(0x100)
    } else {
        r.below(0x1000)
    } as u16
        & !3;
    let v = r.next() as u32;
    // BARs: only the sizing probe (all ones), then the address back, so that no BAR
    // moves onto another device's registers (which the guest would then write at
    // random).
    if (0x10..0x28).contains(&off) || off == 0x30 {
        locked(|| {
            let old = f.read32(off);
            f.write32(off, u32::MAX);
            let _ = f.read32(off);
            f.write32(off, old);
        });
        return;
    }
    // MSI message data lives in config space: shape it wherever the capability is.
    let msi = Msi::find(f);
    let v = match msi {
        Some(m) if off == (m.cap + 12) & !3 || off == (m.cap + 8) & !3 => {
            // The data word is at +8 (32-bit MSI) or +12 (64-bit); +8 of a 64-bit
            // capability is the address high dword, left random.
            let is_data = (off == m.cap + 8 && !m.is_64bit()) || off == (m.cap + 12) & !3;
            if is_data {
                (v & 0xffff_0000) | (msi_data(v) & 0xffff)
            } else {
                v
            }
        }
        _ => v,
    };
    locked(|| f.write32(off, v));
}

fn port(r: &mut Rng) {
    const PORTS: [u16; 10] = [
        0x440, 0x601, 0x80, 0x70, 0x71, 0x40, 0x43, 0x61, 0x3fc, 0x3f9,
    ];
    let p = if r.chance(192) {
        PORTS[r.below(PORTS.len() as u64) as usize]
    } else {
        r.below(0x10000) as u16
    };
    // Ports that end the VM by design (debug-exit, ACPI sleep and reset, i8042 reset),
    // COM1's data and line registers (the report goes there) and the CF8/CFC pair
    // (taken under the lock below) are left alone.
    let deadly = matches!(p, 0xf4..=0xf7 | 0x600 | 0x602 | 0x60..=0x64 | 0x3f8 | 0x3fb);
    if deadly {
        return;
    }
    let v = r.next();
    match (p, r.below(3)) {
        (0xcf8..=0xcff, _) => {
            locked(|| {
                outl(0xcf8, 0x8000_0000 | (r.next() as u32 & 0x00ff_fffc));
                if r.chance(128) {
                    let _ = cpu::inl(0xcfc);
                } else {
                    // Never the MSI data of a device through the back door: only
                    // reads of functions beyond bus 0, writes to offsets below 0x40.
                    let bus = 1 + r.below(255) as u32;
                    outl(
                        0xcf8,
                        0x8000_0000 | bus << 16 | (r.below(0x100) as u32 & !3),
                    );
                    outl(0xcfc, v as u32);
                }
            });
        }
        (0x3fc | 0x3f9, _) => outb(p, (v as u8) & 0x0b),
        (_, 0) => outb(p, v as u8),
        (_, 1) => outw(p, v as u16),
        _ => {
            let _ = inb(p);
        }
    }
}

fn ioapic(r: &mut Rng, t: &Targets) {
    let b = t.ioapic;
    locked(|| {
        if r.chance(32) {
            // The EOI register (version 0x20), any vector.
            mmio_write32(b + 0x40, r.next() as u32);
            return;
        }
        let sel = if r.chance(224) {
            0x10 + r.below(48)
        } else {
            r.below(256)
        } as u32;
        mmio_write32(b, sel);
        if r.chance(64) {
            let _ = mmio_read32(b + 0x10);
            return;
        }
        let v = r.next() as u32;
        let v = if (0x10..0x40).contains(&sel) && sel.is_multiple_of(2) {
            // A redirection entry's low half: fixed or lowest priority, vector >= 0x30.
            msi_data(v)
        } else {
            v
        };
        mmio_write32(b + 0x10, v);
    });
}

fn vtd_reg(r: &mut Rng, t: &Targets) {
    let Some(b) = t.vtd else {
        return;
    };
    let v = r.next();
    match r.below(8) {
        0 => {
            // A root table in the table area, with random mode bits and reserved bits.
            let a = base() + TABLES + (r.below(TABLES_SIZE) & !0xfff);
            let a = a
                | (v & 0xc00)
                | if r.chance(16) {
                    v & 0xfff0_0000_0000_0000
                } else {
                    0
                };
            mmio_write(b + 0x20, 8, a);
        }
        1 => {
            // GCMD: any combination of commands.
            mmio_write32(b + 0x18, v as u32 & 0xff80_0000);
        }
        2 => {
            // The invalidation queue: its page, then descriptors, then the tail.
            mmio_write(b + 0x90, 8, base() + QUEUE);
            for i in 0..r.below(8) {
                let (lo, hi) = match r.below(6) {
                    // Wait, with a status write into the data area.
                    0 | 1 => (
                        (r.next() & 0xffff_fff0_0000_0070) | 5,
                        base() + DATA + (r.below(DATA_SIZE - 8) & !3),
                    ),
                    2 => (r.next() & !0xe, r.next()),
                    _ => (r.next() & !0xf | r.below(5), r.next()),
                };
                scratch_write(QUEUE + (i % 256) * 16, lo);
                scratch_write(QUEUE + (i % 256) * 16 + 8, hi);
            }
            mmio_write(
                b + 0x88,
                8,
                r.below(256) << 4 | if r.chance(8) { v & 0xf } else { 0 },
            );
        }
        3 => {
            // Fault and completion event messages, with shaped data.
            let off = [0x3c, 0xa4][r.below(2) as usize];
            mmio_write32(b + off, msi_data(v as u32));
            mmio_write32(b + off + 4, 0xfee0_0000 | (v >> 32) as u32 & 0xf_fffc);
        }
        4 => mmio_write32(b + [0x34, 0x38, 0x9c, 0xa0][r.below(4) as usize], v as u32),
        5 => {
            // Context-cache and IOTLB invalidation registers, and the FRCDs.
            let off = [0x28, 0x100, 0x108, 0x200 + 16 * r.below(16) + 8][r.below(4) as usize];
            mmio_write(b + off, 8, v);
        }
        6 => {
            // Anywhere in the page, any size the unit takes (and some it refuses).
            let size = [4, 8, 1, 2][r.below(4) as usize];
            let off = r.below(0x1000) & !(u64::from(size) - 1);
            // Not the address registers above at random (they would aim the unit at
            // guest memory outside the scratch area).
            if !matches!(off & !7, 0x20 | 0x80..=0x98 | 0xa8 | 0xb8) {
                mmio_write(b + off, size, v);
            }
        }
        _ => {
            let _ = mmio_read(b + (r.below(0x200) & !3), 4);
        }
    }
}

/// IRTA (the remapping table area, any size that fits it, either EIME), shaped IRTEs
/// (fixed or lowest-priority delivery of a vector >= 0x30, every other bit random:
/// present or not, FPD, destination and its mode, trigger, SVT/SQ/SID, reserved bits,
/// the posted-format bit), and GCMD commands toggling IRE and CFI or latching the table.
fn ir(r: &mut Rng, t: &Targets) {
    const IRE: u32 = 1 << 25;
    const SIRTP: u32 = 1 << 24;
    const CFI: u32 = 1 << 23;
    let Some(b) = t.vtd else {
        return;
    };
    match r.below(4) {
        0 => {
            // 2^(S+1) entries, S <= 11: at most 4096, inside the area.
            let v = (base() + IRT) | (r.below(2) << 11) | r.below(12);
            mmio_write(b + 0xb8, 8, v);
        }
        1 | 2 => {
            for _ in 0..1 + r.below(8) {
                let at = IRT + r.below(IRT_SIZE / 16) * 16;
                let vector = 0x30 + r.below(0xcf);
                let lo = (r.next() & !(0x7 << 5) & !(0xff << 16)) | r.below(2) << 5 | vector << 16;
                scratch_write(at + 8, r.next());
                scratch_write(at, lo);
            }
        }
        _ => {
            // The persistent bits as they are, with IRE and CFI flipped at random and
            // sometimes SIRTP.
            let gsts = mmio_read32(b + 0x1c) & (0x8600_0000 | CFI);
            let flip = [IRE, CFI, IRE | CFI, 0][r.below(4) as usize];
            let one_shot = if r.chance(64) { SIRTP } else { 0 };
            mmio_write32(b + 0x18, (gsts ^ flip) | one_shot);
        }
    }
}

/// Tables in the table area that identity-map the ring and data areas for every
/// function on bus 0 (3 levels); returns the root table's address.
fn seed_tables() -> u64 {
    let mut next = TABLES;
    let mut page = || {
        let p = next;
        next += 0x1000;
        for o in (0..0x1000).step_by(8) {
            scratch_write(p + o, 0);
        }
        base() + p
    };
    let (root, ctx, top) = (page(), page(), page());
    let off = |a: u64| a - base();
    scratch_write(off(root), ctx | 1);
    for devfn in 0..256u64 {
        scratch_write(off(ctx) + devfn * 16, top | 1);
        scratch_write(off(ctx) + devfn * 16 + 8, 1 | (1 << 8));
    }
    let mut l2s: [(u64, u64); 4] = [(u64::MAX, 0); 4];
    let mut l1s: [(u64, u64); 8] = [(u64::MAX, 0); 8];
    let ranges = [(RINGS, RINGS_SIZE + 0x1000), (DATA, DATA_SIZE)];
    for (start, len) in ranges {
        for a in (base() + start..base() + start + len).step_by(0x1000) {
            let (i3, i2, i1) = ((a >> 30) & 0x1ff, (a >> 21) & 0x1ff, (a >> 12) & 0x1ff);
            let l2 = match l2s.iter().find(|(k, _)| *k == a >> 30) {
                Some(&(_, p)) => p,
                None => {
                    let p = page();
                    if let Some(slot) = l2s.iter_mut().find(|(k, _)| *k == u64::MAX) {
                        *slot = (a >> 30, p);
                    }
                    scratch_write(off(top) + i3 * 8, p | 3);
                    p
                }
            };
            let l1 = match l1s.iter().find(|(k, _)| *k == a >> 21) {
                Some(&(_, p)) => p,
                None => {
                    let p = page();
                    if let Some(slot) = l1s.iter_mut().find(|(k, _)| *k == u64::MAX) {
                        *slot = (a >> 21, p);
                    }
                    scratch_write(off(l2) + i2 * 8, p | 3);
                    p
                }
            };
            scratch_write(off(l1) + i1 * 8, a | 3);
        }
    }
    root
}

/// Random entries in the table area: addresses into the table or data areas, every
/// other bit random.
fn tables(r: &mut Rng) {
    for _ in 0..1 + r.below(16) {
        let slot = TABLES + (r.below(TABLES_SIZE) & !7);
        let target = if r.chance(128) {
            base() + TABLES + (r.below(TABLES_SIZE) & !0xfff)
        } else {
            base() + DATA + (r.below(DATA_SIZE) & !0xfff)
        };
        let bits = r.next() & (0xfff | 0xfff0_0000_0000_0000);
        let v = if r.chance(16) { 0 } else { target | bits };
        scratch_write(slot, v);
    }
}

/// Random descriptors and ring contents in the ring area.
fn virtqueue(r: &mut Rng, _t: &Targets) {
    for _ in 0..1 + r.below(32) {
        let slot = RINGS + (r.below(RINGS_SIZE) & !0xf);
        match r.below(4) {
            0 | 1 => {
                // A descriptor: buffer in the data area (or beyond RAM), random
                // length, flags and next.
                scratch_write(slot, dma_addr(r));
                scratch_write(slot + 8, r.next() & 0xffff_0007_0000_ffff);
            }
            2 => scratch_write(slot, r.next() & 0x00ff_00ff_00ff_00ff),
            _ => scratch_write(slot, filler(r)),
        }
    }
}

fn dma(r: &mut Rng, t: &Targets) {
    let Some((_, b)) = t.edu else {
        return;
    };
    let (src, dst) = if r.chance(128) {
        (dma_addr(r), 0x40000 + r.below(0x1000))
    } else {
        (0x40000 + r.below(0x1000), dma_addr(r))
    };
    let to_ram = !(0x40000..0x41000).contains(&dst);
    mmio_write(b + 0x80, 8, src);
    mmio_write(b + 0x88, 8, dst);
    mmio_write(b + 0x90, 8, r.below(0x1100));
    mmio_write32(
        b + 0x98,
        1 | if to_ram { 2 } else { 0 } | if r.chance(64) { 4 } else { 0 },
    );
}

fn storm(r: &mut Rng, t: &Targets) {
    let n = 16 + r.below(512);
    match r.below(3) {
        0 => {
            if let Some((_, b, _)) = t.fvt {
                for i in 0..n {
                    mmio_write32(b + 0x08, (i % 9) as u32);
                }
            }
        }
        1 => {
            if let Some((_, b, _)) = t.fvt {
                for _ in 0..n / 4 {
                    mmio_write32(b + 0x10, 1);
                }
            }
        }
        _ => {
            if let Some((_, b)) = t.edu {
                for _ in 0..n / 4 {
                    mmio_write32(b + 0x60, r.next() as u32);
                    mmio_write32(b + 0x64, u32::MAX);
                }
            }
        }
    }
}

/// The handler of every vector in hostile mode: acknowledge whatever device might be
/// holding a line up, so that a level-triggered entry does not storm forever.
fn ack_all() {
    let t = targets();
    if let Some((_, b)) = t.edu {
        let s = mmio_read32(b + 0x24);
        mmio_write32(b + 0x64, s);
    }
    if let Some((_, b, _)) = t.fvt {
        mmio_write32(b + 0x0c, 0);
    }
    if let Some((_, b)) = t.virtio {
        let _ = mmio_read(b + 0x1000, 1);
    }
    let _ = inb(0x3fa);
}

static SEEDS: [AtomicU64; smp::MAX_CPUS] = [const { AtomicU64::new(0) }; smp::MAX_CPUS];
static COUNT: AtomicU64 = AtomicU64::new(0);

/// One CPU's share of the attack.
fn run(cpu_idx: u64) {
    let mut r = Rng(SEEDS[cpu_idx as usize % smp::MAX_CPUS].load(Ordering::SeqCst) | 1);
    cpu::sti();
    for _ in 0..COUNT.load(Ordering::SeqCst) {
        act(&mut r);
    }
    cpu::cli();
}

/// Saved configuration of one function.
#[derive(Clone, Copy)]
struct Saved {
    bdf: Bdf,
    regs: [u32; 16],
}

fn restore(s: &Saved) {
    // BARs, then command register; MSI and MSI-X off.
    for i in 4..10 {
        s.bdf.write32(i * 4, s.regs[i as usize]);
    }
    s.bdf.write32(0x3c, s.regs[15]);
    s.bdf.write32(4, s.regs[1] & 0xffff);
    if let Some(m) = Msi::find(s.bdf) {
        m.disable();
    }
    if let Some(m) = Msix::find(s.bdf) {
        m.disable();
    }
}

pub fn chaos(c: &Ctx) -> Outcome {
    let seed = c.opts.seed;
    let actions = u64::from(c.opts.actions);
    let funcs = {
        let mut f = [None; 8];
        for (i, d) in c.devs.iter().take(8).enumerate() {
            f[i] = Some(d.bdf);
        }
        f
    };
    let find = |v: u16, d: u16| {
        c.devs
            .iter()
            .find(|f| f.vendor == v && f.device == d)
            .map(|f| f.bdf)
    };
    let t = Targets {
        fvt: find(0x1234, 0xfa17).and_then(|b| Some((b, b.mem_bar(0)?, b.mem_bar(1)?))),
        edu: find(0x1234, 0x11e8).and_then(|b| Some((b, b.mem_bar(0)?))),
        virtio: find(0x1af4, 0x1044).and_then(|b| Some((b, b.mem_bar(0)?))),
        vtd: c.p.dmar.map(|d| d.base),
        ioapic: c.p.ioapics.first().map_or(0xfec0_0000, |i| i.base),
        funcs,
    };
    let saved: alloc::vec::Vec<Saved> = c
        .devs
        .iter()
        .map(|f| {
            let mut regs = [0u32; 16];
            for (i, r) in regs.iter_mut().enumerate() {
                *r = f.bdf.read32(i as u16 * 4);
            }
            Saved { bdf: f.bdf, regs }
        })
        .collect();
    let boxed = alloc::boxed::Box::leak(alloc::boxed::Box::new(t));
    TARGETS.store(boxed as *const Targets as u64, Ordering::Release);
    // Page 0 holds nothing the probe needs once the CPUs are up. Zeroed, it is a safe
    // place for rings a reset device points at (address 0): no buffer is available
    // there and every descriptor is empty.
    // SAFETY: identity-mapped RAM page 0, unused after start-up; rep stosq writes
    // exactly 512 qwords from address 0.
    unsafe {
        core::arch::asm!("rep stosq", inout("rdi") 0u64 => _, inout("rcx") 512u64 => _, in("rax") 0u64, options(nostack));
    }
    // Aim every device address at the scratch area before anything runs.
    if let Some(b) = t.vtd {
        mmio_write32(b + 0x18, 0);
        mmio_write(b + 0x20, 8, base() + TABLES);
        mmio_write32(b + 0x18, 1 << 30);
        mmio_write32(b + 0x18, 0);
        mmio_write(b + 0x90, 8, base() + QUEUE);
        mmio_write(b + 0x88, 8, 0);
        // Any SIRTP latches a table in the scratch area.
        mmio_write(b + 0xb8, 8, (base() + IRT) | 7);
    }
    if let Some((_, b)) = t.edu {
        mmio_write(b + 0x80, 8, base() + DATA);
        mmio_write(b + 0x88, 8, base() + DATA + 0x1000);
    }
    // A working start, for the attack to take apart: identity-mapped rings and data
    // for every function on bus 0, translation on, MSI and MSI-X aimed at the BSP,
    // the devices' pins unmasked.
    if let Some(b) = t.vtd {
        mmio_write(b + 0x20, 8, seed_tables());
        mmio_write32(b + 0x18, 1 << 30);
        mmio_write32(b + 0x18, 1 << 31);
    }
    for f in c.devs.iter() {
        f.bdf.enable(false);
        if let Some(m) = Msi::find(f.bdf) {
            m.enable(bsp_apic(), 0x40, 1);
        }
        if let Some(m) = Msix::find(f.bdf) {
            for i in 0..m.size.min(8) {
                m.program(i, bsp_apic(), 0x48 + i as u8, false);
            }
            m.enable(false);
        }
    }
    if let Some(io) = c.p.ioapics.first() {
        for pin in 16..24 {
            io.set_rte(
                pin,
                crate::ioapic::IoApic::entry(0x50 + pin as u8, bsp_apic(), false, false),
            );
        }
    }
    for v in 0x30..=0xfeu8 {
        idt::set_callback(v, ack_all);
    }
    // Patterns that read as not-present entries wherever a walk strays.
    let mut fill = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
    for off in (0..SCRATCH as u64).step_by(8) {
        scratch_write(off, filler(&mut fill));
    }
    for off in (QUEUE..QUEUE + 0x1000).step_by(8) {
        scratch_write(off, 0);
    }
    let n = smp::online().min(smp::MAX_CPUS);
    for (i, s) in SEEDS.iter().enumerate().take(n) {
        s.store(
            seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(i as u64 + 1),
            Ordering::SeqCst,
        );
    }
    COUNT.store(actions, Ordering::SeqCst);
    ACTIONS.store(0, Ordering::SeqCst);
    let irqs_before: u32 = (0x30..=0xfeu8).map(idt::total).sum();
    for i in 1..n {
        smp::run_on(i, run, i as u64);
    }
    run(0);
    let mut stuck = 0;
    for i in 1..n {
        if !smp::wait_done(i, 60 * SOON) {
            stuck += 1;
        }
    }
    let irqs: u32 = (0x30..=0xfeu8).map(idt::total).sum::<u32>() - irqs_before;

    // Put everything back: IOMMU off, pins masked, devices as found, virtio reset.
    if let Some(b) = t.vtd {
        mmio_write32(b + 0x18, 0);
        mmio_write32(b + 0x34, 0xff);
        for i in 0..16 {
            mmio_write32(b + 0x200 + 16 * i + 12, 1 << 31);
        }
    }
    let io = c.p.ioapics.first().copied();
    if let Some(io) = io {
        for pin in 0..24 {
            io.set_rte(pin, 1 << 16);
        }
    }
    if let Some((_, b)) = t.virtio {
        mmio_write(b + 0x14, 1, 0);
    }
    for s in &saved {
        restore(s);
        s.bdf.enable(false);
    }
    crate::serial::init();
    for v in 0x30..=0xfeu8 {
        idt::set_mode(v, Mode::Eoi);
    }

    // The verdict: the VMM still answers and still routes interrupts.
    let mut checks = alloc::vec::Vec::new();
    if let Some((bdf, bar, _)) = t.fvt {
        bdf.enable(true);
        mmio_write32(bar + 0x04, 0x1234_5678);
        checks.push(("fv-test register", mmio_read32(bar + 0x04) == 0x1234_5678));
        if let Some(m) = Msi::find(bdf) {
            const V: u8 = 0x6a;
            if m.has_mask() {
                m.set_mask(0);
            }
            m.enable(bsp_apic(), V, 1);
            let before = idt::total(V);
            cpu::sti();
            mmio_write32(bar + 0x08, 0);
            let ok = wait_until(SOON, || idt::total(V) > before);
            cpu::cli();
            let last = mmio_read32(bar + 0x08);
            m.disable();
            if !ok {
                crate::println!("# hostile: the MSI raise reported {last} (0 sent, 1 pending, 2 dropped, 3 blocked)");
            }
            checks.push(("MSI after the attack", ok));
        }
        if let Some(io) = io {
            const V: u8 = 0x6b;
            bdf.enable(false);
            let gsi = u32::from(bdf.read8(0x3c));
            if let Some((io2, pin)) = c.p.pin(gsi) {
                io2.set_rte(
                    pin,
                    crate::ioapic::IoApic::entry(V, bsp_apic(), false, false),
                );
                let before = idt::total(V);
                cpu::sti();
                mmio_write32(bar + 0x10, 1);
                let ok = wait_until(SOON, || idt::total(V) > before);
                cpu::cli();
                io2.mask(pin);
                checks.push(("IOAPIC edge after the attack", ok));
            }
            let _ = io;
        }
    }
    if let Some((_, b)) = t.edu {
        mmio_write32(b + 0x04, 0x0f0f_0f0f);
        checks.push(("edu liveness", mmio_read32(b + 0x04) == !0x0f0f_0f0fu32));
    }
    if let Some(b) = t.vtd {
        checks.push(("VT-d version", mmio_read32(b) == 0x10));
    }
    let kinds: alloc::string::String = KIND_NAMES
        .iter()
        .zip(&KINDS)
        .map(|(n, k)| format!(" {n}={}", k.load(Ordering::Relaxed)))
        .collect();
    crate::println!(
        "# hostile: seed {seed}, {} actions on {n} CPU(s), {irqs} interrupts taken;{kinds}",
        ACTIONS.load(Ordering::Relaxed)
    );
    check!(stuck == 0, "{stuck} CPU(s) did not finish their actions");
    for (what, ok) in &checks {
        check!(*ok, "{what} failed");
    }
    // Time for the host to read the VMM's peak memory before the power-off.
    cpu::delay(SOON / 2);
    Outcome::Pass(Some(format!(
        "seed {seed}: {} actions on {n} CPU(s); the VMM still answers and routes interrupts ({} checks)",
        ACTIONS.load(Ordering::Relaxed),
        checks.len()
    )))
}

// ---------------------------------------------------------------- growth

/// Virtio common configuration offsets (faultvisor's layout: BAR0 + 0).
mod vcfg {
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const STATUS: u64 = 0x14;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_AVAIL: u64 = 0x28;
    pub const QUEUE_USED: u64 = 0x30;
    pub const NOTIFY: u64 = 0x2000;
}

/// Brings virtio-rng up with ACCESS_PLATFORM and queue 0 (256 entries) in the ring
/// area; returns whether FEATURES_OK held.
fn virtio_up(b: u64) -> bool {
    mmio_write(b + vcfg::STATUS, 1, 0);
    mmio_write(b + vcfg::STATUS, 1, 1 | 2);
    mmio_write32(b + vcfg::DRIVER_FEATURE_SELECT, 1);
    mmio_write32(b + vcfg::DRIVER_FEATURE, 3);
    mmio_write(b + vcfg::STATUS, 1, 1 | 2 | 8);
    if mmio_read(b + vcfg::STATUS, 1) & 8 == 0 {
        return false;
    }
    mmio_write(b + vcfg::QUEUE_SELECT, 2, 0);
    mmio_write(b + vcfg::QUEUE_SIZE, 2, 256);
    mmio_write(b + vcfg::QUEUE_MSIX, 2, 0xffff);
    for (off, area) in [
        (vcfg::QUEUE_DESC, 0u64),
        (vcfg::QUEUE_AVAIL, 0x1000),
        (vcfg::QUEUE_USED, 0x2000),
    ] {
        let a = base() + RINGS + area;
        mmio_write32(b + off, a as u32);
        mmio_write32(b + off + 4, (a >> 32) as u32);
    }
    mmio_write(b + vcfg::QUEUE_ENABLE, 2, 1);
    mmio_write(b + vcfg::STATUS, 1, 1 | 2 | 8 | 4);
    true
}

fn ring_u16(off: u64) -> u16 {
    // SAFETY: inside the ring area of the static scratch page set.
    unsafe { core::ptr::read_volatile((base() + RINGS + off) as *const u16) }
}

fn ring_set_u16(off: u64, v: u16) {
    // SAFETY: as for `ring_u16`.
    unsafe { core::ptr::write_volatile((base() + RINGS + off) as *mut u16, v) }
}

/// What a guest can make a VMM grow, each done at scale (`probe.actions` sets it):
/// one-byte virtio buffers on millions of distinct IOVA pages (all mapped onto one
/// data page), virtio reset / FEATURES_OK cycles, boot-timer marks, and unsupported
/// ACPI sleep requests (a log path). The host measures the VMM's memory meanwhile
/// (`ci/bench_hostile.py`); the guest reports what it did.
pub fn growth(c: &Ctx) -> Outcome {
    let scale = u64::from(c.opts.actions);
    let Some(vb) = c
        .devs
        .iter()
        .find(|f| f.vendor == 0x1af4 && f.device == 0x1044)
        .map(|f| f.bdf)
    else {
        crate::skip!("no virtio-rng device (faultvisor run --device virtio-rng)");
    };
    let Some(b) = vb.mem_bar(0) else {
        crate::fail!("virtio-rng BAR0 unassigned");
    };
    let Some(unit) = c.p.dmar.map(|d| d.base) else {
        crate::skip!("no VT-d unit (faultvisor run --iommu intel)");
    };
    vb.enable(true);
    // 8 GiB of IOVA space (4 GiB up), every 4 KiB page of it mapped onto one data page:
    // root -> context (every devfn) -> L3 (entries 4..11) -> one L2 -> one L1 -> the page;
    // the rings identity-mapped through L3 entry 0.
    let t = |i: u64| base() + TABLES + i * 0x1000;
    let rings = base() + RINGS;
    if rings >> 21 != (rings + 0x2fff) >> 21 || rings >> 30 != 0 {
        crate::skip!("the ring area crosses a 2 MiB boundary in this build");
    }
    for i in 0..7 {
        for o in (0..0x1000).step_by(8) {
            scratch_write(TABLES + i * 0x1000 + o, 0);
        }
    }
    scratch_write(TABLES, t(1) | 1);
    for devfn in 0..256 {
        scratch_write(TABLES + 0x1000 + devfn * 16, t(2) | 1);
        scratch_write(TABLES + 0x1000 + devfn * 16 + 8, 1 | (1 << 8));
    }
    for i in 4..12 {
        scratch_write(TABLES + 0x2000 + i * 8, t(3) | 3);
    }
    scratch_write(TABLES + 0x2000, t(5) | 3);
    scratch_write(TABLES + 0x5000 + ((rings >> 21) & 0x1ff) * 8, t(6) | 3);
    for k in 0..3 {
        let a = rings + k * 0x1000;
        scratch_write(TABLES + 0x6000 + ((a >> 12) & 0x1ff) * 8, a | 3);
    }
    for i in 0..512 {
        scratch_write(TABLES + 0x3000 + i * 8, t(4) | 3);
        scratch_write(TABLES + 0x4000 + i * 8, (base() + DATA) | 3);
    }
    mmio_write32(unit + 0x18, 0);
    mmio_write(unit + 0x20, 8, t(0));
    mmio_write32(unit + 0x18, 1 << 30);
    mmio_write32(unit + 0x18, 1 << 31);
    check!(virtio_up(b), "FEATURES_OK refused with ACCESS_PLATFORM");
    // One-byte buffers on distinct IOVA pages, 256 per notification.
    let buffers = scale * 100;
    let mut page = 0u64;
    let mut served = 0u64;
    let mut avail_idx = 0u16;
    while served < buffers {
        for slot in 0..256u64 {
            let d = RINGS + slot * 16;
            scratch_write(d, (4 << 30) + ((page % (1 << 21)) << 12));
            scratch_write(d + 8, 1 | (2u64 << 32));
            page += 1;
            ring_set_u16(
                0x1000 + 4 + 2 * ((u64::from(avail_idx) + slot) % 256),
                slot as u16,
            );
        }
        avail_idx = avail_idx.wrapping_add(256);
        ring_set_u16(0x1000 + 2, avail_idx);
        mmio_write(b + vcfg::NOTIFY, 2, 0);
        if !wait_until(SOON, || ring_u16(0x2000 + 2) == avail_idx) {
            break;
        }
        served += 256;
    }
    // Reset and feature negotiation, over and over.
    let cycles = scale * 2;
    for _ in 0..cycles {
        virtio_up(b);
    }
    mmio_write(b + vcfg::STATUS, 1, 0);
    // Boot-timer marks and unsupported sleep requests.
    for _ in 0..scale * 4 {
        outb(0x440, 123);
    }
    for i in 0..scale {
        outb(0x600, (((i % 4) as u8 + 1) << 2) | 1 << 5);
    }
    mmio_write32(unit + 0x18, 0);
    crate::println!(
        "# growth: {served} one-byte buffers on distinct IOVA pages, {cycles} reset cycles, {} boot-timer marks, {scale} sleep requests",
        scale * 4
    );
    check!(
        served >= buffers,
        "virtio-rng stopped serving after {served} buffers"
    );
    cpu::delay(SOON / 2);
    Outcome::Pass(Some(format!("{served} buffers, {cycles} resets")))
}
