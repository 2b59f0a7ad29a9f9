//! VT-d scenarios: the probe finds the remapping unit in the DMAR table, builds root,
//! context and second-level tables in its own memory, and drives DMA with the edu
//! device (1234:11e8), then checks translations, every fault reason, the fault-recording
//! registers, the fault event, queued invalidation and its completion event, the
//! interrupt address range, and an unsupported root-table mode.

use alloc::format;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use crate::acpi::Dmar;
use crate::cpu::{self, mmio_read32, mmio_write32, rdtsc, wait_until};
use crate::idt::{self, Mode};
use crate::pci::Bdf;
use crate::tap::Outcome;
use crate::tests::{bsp_apic, Ctx, QUIET, SOON};
use crate::{apic, check, fail};

/// Registers (offsets in the 4 KiB page).
pub(crate) mod reg {
    pub const CAP: u64 = 0x08;
    pub const ECAP: u64 = 0x10;
    pub const GCMD: u64 = 0x18;
    pub const GSTS: u64 = 0x1c;
    pub const RTADDR: u64 = 0x20;
    pub const CCMD: u64 = 0x28;
    pub const FSTS: u64 = 0x34;
    pub const FECTL: u64 = 0x38;
    pub const FEDATA: u64 = 0x3c;
    pub const FEADDR: u64 = 0x40;
    pub const FEUADDR: u64 = 0x44;
    pub const IQH: u64 = 0x80;
    pub const IQT: u64 = 0x88;
    pub const IQA: u64 = 0x90;
    pub const ICS: u64 = 0x9c;
    pub const IECTL: u64 = 0xa0;
    pub const IEDATA: u64 = 0xa4;
    pub const IEADDR: u64 = 0xa8;
    pub const IEUADDR: u64 = 0xac;
    pub const IRTA: u64 = 0xb8;
}

pub(crate) const TE: u32 = 1 << 31;
pub(crate) const SRTP: u32 = 1 << 30;
pub(crate) const QIE: u32 = 1 << 26;
const PFO: u32 = 1 << 0;
pub(crate) const PPF: u32 = 1 << 1;
pub(crate) const IQE: u32 = 1 << 4;
/// The fault-event vector.
pub(crate) const FAULT_VECTOR: u8 = 0xa8;
/// An address no RAM backs (beyond any probe VM's memory, below 2^48).
const NOWHERE: u64 = 0x7f00_0000_0000;

/// Persistent GCMD bits, as Linux keeps them.
static GCMD: AtomicU32 = AtomicU32::new(0);

/// The remapping unit.
#[derive(Clone, Copy, Debug)]
pub struct Unit {
    pub(crate) base: u64,
    pub(crate) fro: u64,
    pub(crate) nfr: u32,
    iro: u64,
}

impl Unit {
    pub(crate) fn new(d: &Dmar) -> Self {
        let mut u = Self {
            base: d.base,
            fro: 0,
            nfr: 1,
            iro: 0,
        };
        let cap = u.r64(reg::CAP);
        u.fro = ((cap >> 24) & 0x3ff) * 16;
        u.nfr = ((cap >> 40) & 0xff) as u32 + 1;
        u.iro = ((u.r64(reg::ECAP) >> 8) & 0x3ff) * 16;
        u
    }

    pub(crate) fn r32(&self, off: u64) -> u32 {
        mmio_read32(self.base + off)
    }

    pub(crate) fn w32(&self, off: u64, v: u32) {
        mmio_write32(self.base + off, v)
    }

    pub(crate) fn r64(&self, off: u64) -> u64 {
        // SAFETY: the register page is identity-mapped MMIO; VT-d takes 8-byte accesses.
        unsafe { core::ptr::read_volatile((self.base + off) as *const u64) }
    }

    pub(crate) fn w64(&self, off: u64, v: u64) {
        // SAFETY: as for `r64`.
        unsafe { core::ptr::write_volatile((self.base + off) as *mut u64, v) }
    }

    /// Issues a GCMD with the persistent bits plus `one_shot`, then waits for `want`
    /// in GSTS; returns whether GSTS had it right after the write.
    pub(crate) fn command(&self, one_shot: u32, want: u32, want_set: bool) -> bool {
        self.w32(reg::GCMD, GCMD.load(Ordering::SeqCst) | one_shot);
        let ok = |g: u32| (g & want != 0) == want_set;
        let immediate = ok(self.r32(reg::GSTS));
        wait_until(100_000_000, || ok(self.r32(reg::GSTS)));
        immediate
    }

    pub(crate) fn set_persistent(&self, bit: u32, on: bool) -> bool {
        if on {
            GCMD.fetch_or(bit, Ordering::SeqCst);
        } else {
            GCMD.fetch_and(!bit, Ordering::SeqCst);
        }
        self.command(0, bit, on)
    }

    pub(crate) fn set_root(&self, root: u64) -> bool {
        self.w64(reg::RTADDR, root);
        self.command(SRTP, SRTP, true)
    }

    /// Global context-cache and IOTLB invalidation through the registers.
    pub(crate) fn invalidate(&self) {
        self.w64(reg::CCMD, 1 << 63 | 1 << 61);
        wait_until(100_000_000, || self.r64(reg::CCMD) >> 63 == 0);
        let iotlb = self.iro + 8;
        self.w64(iotlb, 1 << 63 | 1 << 60);
        wait_until(100_000_000, || self.r64(iotlb) >> 63 == 0);
    }

    /// A register-based IOTLB invalidation: granularity `g` (1 global, 2 domain, 3
    /// page-selective with `iva` = address | AM).
    pub(crate) fn iotlb_invalidate(&self, g: u64, did: u16, iva: u64) {
        self.w64(self.iro, iva);
        let r = self.iro + 8;
        self.w64(r, 1 << 63 | g << 60 | u64::from(did) << 32);
        wait_until(100_000_000, || self.r64(r) >> 63 == 0);
    }

    pub(crate) fn fsts(&self) -> u32 {
        self.r32(reg::FSTS)
    }

    /// Fault record `i`: (page address, source ID, reason, read, F).
    pub(crate) fn record(&self, i: u32) -> (u64, u16, u8, bool, bool) {
        let at = self.fro + 16 * u64::from(i);
        let lo = self.r64(at);
        let sid = (self.r32(at + 8) & 0xffff) as u16;
        let hi = self.r32(at + 12);
        (
            lo & !0xfff,
            sid,
            (hi & 0xff) as u8,
            hi & (1 << 30) != 0,
            hi >> 31 != 0,
        )
    }

    /// Clears every F bit and the W1C status bits, as Linux's handler does.
    pub(crate) fn clear_faults(&self) {
        for i in 0..self.nfr {
            self.w32(self.fro + 16 * u64::from(i) + 12, 1 << 31);
        }
        self.w32(reg::FSTS, PFO | PPF | IQE);
    }

    /// Points the fault event at the BSP's `FAULT_VECTOR` and unmasks it.
    pub(crate) fn fault_event_to_bsp(&self, masked: bool) {
        self.w32(reg::FEDATA, u32::from(FAULT_VECTOR));
        self.w32(reg::FEADDR, apic::msi_address(bsp_apic()) as u32);
        self.w32(reg::FEUADDR, 0);
        self.w32(reg::FECTL, if masked { 1 << 31 } else { 0 });
    }
}

// ---------------------------------------------------------------- table memory

#[repr(C, align(4096))]
struct Pool([u8; POOL_PAGES * 4096]);
const POOL_PAGES: usize = 96;
static mut POOL: Pool = Pool([0; POOL_PAGES * 4096]);
static NEXT_PAGE: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn pool_reset() {
    NEXT_PAGE.store(0, Ordering::SeqCst);
}

/// A zeroed, identity-mapped 4 KiB page (guest-physical = virtual).
pub(crate) fn page() -> u64 {
    let i = NEXT_PAGE.fetch_add(1, Ordering::SeqCst);
    if i >= POOL_PAGES {
        crate::println!("Bail out! probe table pool exhausted");
        crate::finish(crate::Verdict::Fail);
    }
    let addr = core::ptr::addr_of_mut!(POOL) as u64 + 4096 * i as u64;
    // SAFETY: page `i` of the static pool belongs to this caller alone until the next
    // `pool_reset`; nothing else references it.
    unsafe { core::ptr::write_bytes(addr as *mut u8, 0, 4096) };
    addr
}

pub(crate) fn w64(addr: u64, v: u64) {
    // SAFETY: `addr` is inside a pool page (identity-mapped RAM the probe owns).
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

pub(crate) fn r64(addr: u64) -> u64 {
    // SAFETY: as for `w64`.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

pub(crate) fn fill(addr: u64, byte: u8, len: usize) {
    // SAFETY: as for `w64`; `len` stays within the page the caller owns.
    unsafe { core::ptr::write_bytes(addr as *mut u8, byte, len) }
}

pub(crate) fn bytes(addr: u64, len: usize) -> &'static [u8] {
    // SAFETY: as for `w64`.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

/// Root, context and second-level tables for one device.
pub(crate) struct Tables {
    pub(crate) root: u64,
    pub(crate) ctx: u64,
    pub(crate) top: u64,
    pub(crate) levels: u32,
    pub(crate) devfn: u8,
}

pub(crate) const R: u64 = 1;
pub(crate) const W: u64 = 2;

impl Tables {
    pub(crate) fn new(sid: u16, levels: u32) -> Self {
        let (root, ctx, top) = (page(), page(), page());
        let t = Self {
            root,
            ctx,
            top,
            levels,
            devfn: sid as u8,
        };
        w64(root + u64::from(sid >> 8) * 16, ctx | 1);
        t.set_context(top | 1, u64::from(levels - 2) | (1 << 8));
        t
    }

    fn context_slot(&self) -> u64 {
        self.ctx + u64::from(self.devfn) * 16
    }

    pub(crate) fn set_context(&self, lo: u64, hi: u64) {
        w64(self.context_slot() + 8, hi);
        w64(self.context_slot(), lo);
    }

    /// Maps `iova` to `gpa` with `perm` as a page at `leaf` level (1: 4K, 2: 2M, 3: 1G);
    /// returns the leaf PTE's address.
    pub(crate) fn map(&self, iova: u64, gpa: u64, perm: u64, leaf: u32) -> u64 {
        let mut table = self.top;
        let mut level = self.levels;
        loop {
            let slot = table + ((iova >> (12 + 9 * (level - 1))) & 0x1ff) * 8;
            if level == leaf {
                w64(slot, gpa | perm | if leaf > 1 { 1 << 7 } else { 0 });
                return slot;
            }
            let cur = r64(slot);
            table = if cur & 3 != 0 {
                cur & !0xfff
            } else {
                let p = page();
                w64(slot, p | R | W);
                p
            };
            level -= 1;
        }
    }
}

// ---------------------------------------------------------------- edu

pub(crate) const EDU_BUF: u64 = 0x40000;
/// Bytes per test transfer: QEMU's edu refuses (aborts the VM on) a transfer that ends
/// exactly at the end of its 4 KiB buffer, so stay below it.
pub(crate) const XFER: u64 = 2048;

#[derive(Clone, Copy)]
pub(crate) struct Edu {
    pub(crate) sid: u16,
    pub(crate) bar: u64,
}

impl Edu {
    fn w64(&self, off: u64, v: u64) {
        // SAFETY: edu's BAR0 is identity-mapped MMIO; its DMA registers take 8 bytes.
        unsafe { core::ptr::write_volatile((self.bar + off) as *mut u64, v) }
    }

    /// Runs one transfer: RAM → device buffer (`to_ram` false) or back. Returns the
    /// command register after it and faultvisor's error register (0xffffffff on QEMU).
    pub(crate) fn dma(&self, src: u64, dst: u64, len: u64, to_ram: bool) -> (u32, u32) {
        self.w64(0x80, src);
        self.w64(0x88, dst);
        self.w64(0x90, len);
        mmio_write32(self.bar + 0x98, 1 | if to_ram { 2 } else { 0 });
        wait_until(1_000_000_000, || mmio_read32(self.bar + 0x98) & 1 == 0);
        (mmio_read32(self.bar + 0x98), mmio_read32(self.bar + 0xa0))
    }

    /// Copies `len` bytes from `src` to the device buffer and back out to `dst`.
    fn copy(&self, src: u64, dst: u64, len: u64) -> (u32, u32) {
        let r = self.dma(src, EDU_BUF, len, false);
        if r.0 & 0x100 != 0 {
            return r;
        }
        self.dma(EDU_BUF, dst, len, true)
    }
}

/// Everything a VT-d scenario needs, with translation off and faults cleared.
pub(crate) fn setup(c: &Ctx) -> Result<(Unit, Edu), Outcome> {
    let Some(d) = c.p.dmar else {
        return Err(Outcome::Skip(
            "no DMAR table (faultvisor run --device edu)".into(),
        ));
    };
    let Some(bdf) = c.find(0x1234, 0x11e8) else {
        return Err(Outcome::Skip(
            "no edu device (faultvisor run --device edu)".into(),
        ));
    };
    let Some(bar) = bdf.mem_bar(0) else {
        return Err(Outcome::Fail("edu BAR0 unassigned".into()));
    };
    bdf.enable(true);
    let u = Unit::new(&d);
    u.set_persistent(TE, false);
    u.set_persistent(QIE, false);
    u.clear_faults();
    u.fault_event_to_bsp(true);
    idt::set_mode(FAULT_VECTOR, Mode::Eoi);
    pool_reset();
    Ok((u, Edu { sid: sid(bdf), bar }))
}

pub(crate) fn sid(b: Bdf) -> u16 {
    (u16::from(b.bus) << 8) | (u16::from(b.dev) << 3) | u16::from(b.func)
}

macro_rules! setup {
    ($c:expr) => {
        match setup($c) {
            Ok(x) => x,
            Err(o) => return o,
        }
    };
}

/// Turns translation on with `t`'s root table.
pub(crate) fn translate_with(u: &Unit, t: &Tables) -> bool {
    let rtps = u.set_root(t.root);
    u.invalidate();
    let tes = u.set_persistent(TE, true);
    rtps && tes
}

pub(crate) fn off(u: &Unit) {
    u.set_persistent(TE, false);
    u.clear_faults();
}

// ---------------------------------------------------------------- scenarios

/// The unit as Linux would check it.
pub fn discover(c: &Ctx) -> Outcome {
    let (u, _) = setup!(c);
    let d = c.p.dmar.unwrap_or_default();
    let cap = u.r64(reg::CAP);
    let ecap = u.r64(reg::ECAP);
    check!(cap != u64::MAX && cap != 0, "CAP reads {cap:#x}");
    check!(
        (cap >> 8) & 0x6 != 0,
        "SAGAW {:#x}: neither 39- nor 48-bit tables",
        (cap >> 8) & 0x1f
    );
    check!(cap & (1 << 7) == 0, "caching mode on");
    check!(ecap & 2 != 0, "no queued invalidation");
    check!(
        u.fro + 16 * u64::from(u.nfr) <= 0x1000 && u.iro + 16 <= 0x1000,
        "registers outside the page"
    );
    check!(
        u.r32(reg::GSTS) & (TE | QIE) == 0,
        "translation or QI on at reset"
    );
    check!(d.include_all, "DRHD without INCLUDE_PCI_ALL");
    Outcome::Pass(Some(format!(
        "DRHD {:#x} HAW {} cap {cap:#x} ecap {ecap:#x}: SAGAW {:#x}, SLLPS {:#x}, PSI {}, {} fault records at {:#x}, IOTLB at {:#x}, IOAPIC scope {:x?}",
        d.base,
        d.haw,
        (cap >> 8) & 0x1f,
        (cap >> 34) & 0xf,
        (cap >> 39) & 1,
        u.nfr,
        u.fro,
        u.iro + 8,
        d.ioapic_sid
    )))
}

/// GSTS follows GCMD before the MMIO write returns.
pub fn gcmd(c: &Ctx) -> Outcome {
    let (u, e) = setup!(c);
    let t = Tables::new(e.sid, 3);
    check!(
        u.set_root(t.root),
        "RTPS not set when the SRTP write returned"
    );
    check!(
        u.set_persistent(QIE, true),
        "QIES not set when the write returned"
    );
    check!(
        u.set_persistent(TE, true),
        "TES not set when the write returned"
    );
    // One-shot SRTP with the persistent bits kept: TE and QIE stay on.
    check!(u.set_root(t.root), "second SRTP");
    let g = u.r32(reg::GSTS);
    check!(
        g & (TE | QIE) == TE | QIE,
        "persistent bits lost by a one-shot command: {g:#x}"
    );
    check!(
        !u.set_persistent(TE, false) || u.r32(reg::GSTS) & TE == 0,
        "TE stuck"
    );
    u.set_persistent(QIE, false);
    check!(
        u.r32(reg::GSTS) & (TE | QIE) == 0,
        "GSTS {:#x} after disabling",
        u.r32(reg::GSTS)
    );
    Outcome::Pass(Some("RTPS/TES/QIES updated synchronously".into()))
}

/// DMA through 4K, 2M and 1G mappings with 3- and 4-level tables, and identity with TE off.
pub fn translate(c: &Ctx) -> Outcome {
    let (u, e) = setup!(c);
    let (src, dst) = (page(), page());
    for i in 0..4096u64 {
        w64_byte(src + i, (i * 7 + 3) as u8);
    }
    // TE off: IOVA = GPA.
    let n = XFER as usize;
    let (cmd, _) = e.copy(src, dst, XFER);
    check!(
        cmd & 0x100 == 0 && bytes(dst, n) == bytes(src, n),
        "identity DMA with TE off failed"
    );
    fill(dst, 0, 4096);
    let cap = u.r64(reg::CAP);
    let mut done = Vec::new();
    for levels in [3u32, 4] {
        if (cap >> 8) & (1 << (levels - 2)) == 0 {
            continue; // this width is not offered (QEMU's default is 39-bit only)
        }
        pool_keep(&[src, dst]);
        let t = Tables::new(e.sid, levels);
        let a = 0x10_0000u64;
        t.map(a, src, R, 1);
        t.map(a + 0x1000, dst, W, 1);
        let big = 0x4000_0000u64; // 1 GiB IOVA, 2 MiB page over dst's 2 MiB region
        t.map(big, dst & !0x1f_ffff, R | W, 2);
        let huge = if levels == 3 {
            0x40_0000_0000u64
        } else {
            0x1000_0000_0000
        };
        t.map(huge, 0, R | W, 3);
        check!(translate_with(&u, &t), "enable failed");
        let cases = [
            ("4K", a, a + 0x1000, true),
            ("2M", a, big + (dst & 0x1f_ffff), (cap >> 34) & 1 != 0),
            ("1G", a, huge + dst, (cap >> 35) & 1 != 0),
        ];
        for (name, s, d, offered) in cases {
            if !offered {
                continue;
            }
            fill(dst, 0, 4096);
            let (cmd, err) = e.copy(s, d, XFER);
            if cmd & 0x100 != 0 || bytes(dst, n) != bytes(src, n) {
                off(&u);
                fail!("{levels}-level {name}: copy through IOVA {d:#x} failed (cmd {cmd:#x} err {err:#x}, FSTS {:#x})", u.fsts());
            }
            done.push(format!("{levels}L/{name}"));
        }
        off(&u);
    }
    Outcome::Pass(Some(format!("edu copies through {}", done.join(" "))))
}

fn w64_byte(addr: u64, b: u8) {
    // SAFETY: `addr` is inside a pool page the caller owns.
    unsafe { core::ptr::write_volatile(addr as *mut u8, b) }
}

/// Keeps the pages of `keep` (allocated first) and frees the rest of the pool.
fn pool_keep(keep: &[u64]) {
    NEXT_PAGE.store(keep.len(), Ordering::SeqCst);
}

/// One faulting case: what to break and how to DMA.
struct Case {
    name: &'static str,
    /// Device writes to memory (else reads from it).
    write: bool,
    iova: u64,
}

/// Every legacy DMA-remapping fault reason the unit can meet, produced one by one with
/// edu, checked in the FRCD, in edu's error register, and in memory (nothing written).
pub fn fault_reasons(c: &Ctx) -> Outcome {
    let (u, e) = setup!(c);
    let data = page();
    let target = page();
    fill(data, 0x5a, 4096);
    let mut seen = Vec::new();
    for reason in 1u8..=0xc {
        pool_keep(&[data, target]);
        fill(target, 0xee, 4096);
        let t = Tables::new(e.sid, 3);
        let ok_iova = 0x30_0000u64;
        t.map(ok_iova, data, R | W, 1);
        let mut case = Case {
            name: "",
            write: true,
            iova: 0x80_0000,
        };
        let mut root = t.root;
        match reason {
            1 => {
                case.name = "root not present";
                w64(t.root, 0);
            }
            2 => {
                case.name = "context not present";
                t.set_context(0, 0);
            }
            3 => {
                case.name = "context AW 57-bit";
                t.set_context(t.top | 1, 3 | (1 << 8));
            }
            4 => {
                case.name = "beyond the 39-bit width";
                case.iova = 1 << 40;
            }
            5 => {
                case.name = "write to a read-only page";
                t.map(case.iova, target, R, 1);
            }
            6 => {
                case.name = "read of a write-only page";
                case.write = false;
                t.map(case.iova, target, W, 1);
            }
            7 => {
                case.name = "next table outside RAM";
                w64(t.top + ((case.iova >> 30) & 0x1ff) * 8, NOWHERE | R | W);
            }
            8 => {
                case.name = "root table outside RAM";
                root = NOWHERE;
            }
            9 => {
                case.name = "context table outside RAM";
                w64(t.root, NOWHERE | 1);
            }
            10 => {
                case.name = "root entry reserved bit";
                w64(t.root, t.ctx | 1 | 0x20);
            }
            11 => {
                case.name = "context entry reserved bit";
                t.set_context(t.top | 1 | 0x10, 1 | (1 << 8));
            }
            _ => {
                case.name = "PTE reserved bit (SNP)";
                t.map(case.iova, target | (1 << 11), R | W, 1);
            }
        }
        let rtps = u.set_root(root);
        u.invalidate();
        u.set_persistent(TE, true);
        // Writes: the device buffer (filled from `data` through a good mapping first
        // would need one too, so fill it with TE's help only when the root is sane).
        let (cmd, err) = if case.write {
            e.dma(EDU_BUF, case.iova, 64, true)
        } else {
            e.dma(case.iova, EDU_BUF, 64, false)
        };
        let fsts = u.fsts();
        let fri = (fsts >> 8) & 0xff;
        let (addr, sid, fr, read, f) = u.record(fri);
        off(&u);
        check!(rtps, "{}: RTPS", case.name);
        check!(
            fsts & PPF != 0,
            "{} (reason {reason:#x}): no fault recorded (FSTS {fsts:#x}, cmd {cmd:#x})",
            case.name
        );
        check!(
            f && fr == reason && sid == e.sid && read != case.write && addr == case.iova & !0xfff,
            "{}: FRCD[{fri}] = addr {addr:#x} sid {sid:#x} reason {fr:#x} read {read}, want {:#x} {:#x} {reason:#x} {}",
            case.name, case.iova & !0xfff, e.sid, !case.write
        );
        if err != u32::MAX {
            check!(
                cmd & 0x100 != 0 && err == 2 | (u32::from(reason) << 8),
                "{}: edu reported cmd {cmd:#x} err {err:#x}",
                case.name
            );
        }
        check!(
            bytes(target, 4096).iter().all(|&b| b == 0xee),
            "{}: the faulting DMA wrote memory",
            case.name
        );
        seen.push(format!("{reason:#x}"));
    }
    Outcome::Pass(Some(format!(
        "reasons {} recorded with SID, address and direction; nothing written",
        seen.join(" ")
    )))
}

/// A transfer whose second page faults moves no byte, not even to the first page.
pub fn partial_fault(c: &Ctx) -> Outcome {
    let (u, e) = setup!(c);
    let (src, dst) = (page(), page());
    fill(src, 0x11, 4096);
    let t = Tables::new(e.sid, 3);
    t.map(0x10_0000, src, R, 1);
    t.map(0x20_0000, dst, W, 1); // 0x20_1000 is not mapped
    check!(translate_with(&u, &t), "enable failed");
    let (cmd, _) = e.dma(0x10_0000, EDU_BUF, XFER, false);
    fill(dst, 0xcc, 4096);
    let (wcmd, werr) = e.dma(EDU_BUF, 0x20_0c00, XFER, true);
    let fsts = u.fsts();
    let (addr, ..) = u.record((fsts >> 8) & 0xff);
    off(&u);
    check!(cmd & 0x100 == 0, "loading the device buffer failed");
    check!(
        wcmd & 0x100 != 0 || werr == u32::MAX,
        "the crossing transfer did not fail"
    );
    check!(
        addr == 0x20_1000,
        "fault recorded at {addr:#x}, want the unmapped page 0x201000"
    );
    check!(
        bytes(dst, 4096).iter().all(|&b| b == 0xcc),
        "bytes reached the mapped first page"
    );
    Outcome::Pass(Some(
        "fault at 0x201000; the mapped half stayed untouched".into(),
    ))
}

/// The fault event: delivered when unmasked; held (IP) while masked and sent on unmask.
pub fn fault_event(c: &Ctx) -> Outcome {
    let (u, e) = setup!(c);
    let t = Tables::new(e.sid, 3);
    check!(translate_with(&u, &t), "enable failed");
    u.fault_event_to_bsp(false);
    let base = idt::total(FAULT_VECTOR);
    cpu::sti();
    e.dma(EDU_BUF, 0x1000, 8, true);
    let got = wait_until(crate::tests::SOON, || idt::total(FAULT_VECTOR) > base);
    cpu::cli();
    let (_, dest_cpu) = idt::last(FAULT_VECTOR);
    let fri = (u.fsts() >> 8) & 0xff;
    let (addr, sid, fr, read, _) = u.record(fri);
    // What Linux's dmar_fault() would print for this record.
    crate::println!(
        "# guest's fault handler read: DMAR: [{} NO_PASID] Request device [{:02x}:{:02x}.{}] fault addr {addr:#x} [fault reason {fr:#04x}] {}",
        if read { "DMA Read" } else { "DMA Write" },
        sid >> 8,
        (sid >> 3) & 0x1f,
        sid & 7,
        reason_text(fr)
    );
    u.clear_faults();
    // Masked: IP set, nothing delivered until unmask.
    u.fault_event_to_bsp(true);
    let base2 = idt::total(FAULT_VECTOR);
    e.dma(EDU_BUF, 0x2000, 8, true);
    let ip = u.r32(reg::FECTL) & (1 << 30) != 0;
    cpu::sti();
    let quiet = !wait_until(crate::tests::QUIET, || idt::total(FAULT_VECTOR) > base2);
    u.w32(reg::FECTL, 0);
    let late = wait_until(crate::tests::SOON, || idt::total(FAULT_VECTOR) > base2);
    cpu::cli();
    let ip_after = u.r32(reg::FECTL) & (1 << 30) != 0;
    off(&u);
    u.fault_event_to_bsp(true);
    check!(got, "no fault-event interrupt on vector {FAULT_VECTOR:#x}");
    check!(dest_cpu == 0, "fault event arrived on CPU {dest_cpu}");
    check!(ip, "FECTL.IP not set while masked");
    check!(quiet, "a masked fault event was delivered");
    check!(late, "the pending fault event was not sent on unmask");
    check!(!ip_after, "IP still set after delivery");
    Outcome::Pass(Some(format!(
        "vector {FAULT_VECTOR:#x} to the BSP; masked event held and sent on unmask"
    )))
}

/// Fills every fault-recording register, overflows (PFO), then wraps around.
pub fn frcd_overflow(c: &Ctx) -> Outcome {
    let (u, e) = setup!(c);
    let t = Tables::new(e.sid, 3);
    check!(translate_with(&u, &t), "enable failed");
    let n = u.nfr;
    for i in 0..=u64::from(n) {
        e.dma(EDU_BUF, 0x100_0000 + i * 0x1000, 8, true);
    }
    let fsts = u.fsts();
    let mut pages = Vec::new();
    for i in 0..n {
        let (addr, _, fr, _, f) = u.record(i);
        if !f || fr != 5 {
            off(&u);
            fail!("FRCD[{i}] not a pending write fault (F {f}, reason {fr:#x})");
        }
        pages.push(addr);
    }
    // Records come out in order from FRI: the first n faults, none lost before PFO.
    let fri = (fsts >> 8) & 0xff;
    let ordered: Vec<u64> = (0..n).map(|k| pages[((fri + k) % n) as usize]).collect();
    let want: Vec<u64> = (0..u64::from(n)).map(|i| 0x100_0000 + i * 0x1000).collect();
    // Service: clear all, then one more fault lands where the ring continues.
    u.clear_faults();
    e.dma(EDU_BUF, 0x200_0000, 8, true);
    let fsts2 = u.fsts();
    let (addr2, ..) = u.record((fsts2 >> 8) & 0xff);
    off(&u);
    check!(
        fsts & PFO != 0,
        "no PFO after {} faults with {n} records (FSTS {fsts:#x})",
        n + 1
    );
    check!(
        ordered == want,
        "records out of order or lost: {ordered:x?}"
    );
    check!(
        fsts2 & (PFO | PPF) == PPF && addr2 == 0x200_0000,
        "after servicing: FSTS {fsts2:#x}, record {addr2:#x}"
    );
    Outcome::Pass(Some(format!(
        "{n} records filled in order from FRI {fri}, PFO on fault {}, after servicing the next lands at FRI {} (wrapped)",
        n + 1,
        (fsts2 >> 8) & 0xff
    )))
}

/// Queued invalidation: a wait descriptor's status write happens during the IQT write;
/// a bad descriptor sets IQE and stops the queue.
pub fn queued_invalidation(c: &Ctx) -> Outcome {
    let (u, _) = setup!(c);
    let (queue, status) = (page(), page());
    u.w64(reg::IQT, 0);
    u.w64(reg::IQA, queue);
    check!(u.set_persistent(QIE, true), "QIES not set");
    let desc = |i: u64, lo: u64, hi: u64| {
        w64(queue + i * 16, lo);
        w64(queue + i * 16 + 8, hi);
    };
    desc(0, 0x2 | 1 << 4, 0); // global IOTLB
    desc(1, 0x1 | 1 << 4, 0); // global context cache
    desc(2, 0x5 | 1 << 5 | 0x1234_5678 << 32, status); // wait, status write
    u.w64(reg::IQT, 3 << 4);
    let written = r64(status) as u32;
    let head = u.r64(reg::IQH);
    desc(3, 0x7, 0); // not a legacy descriptor type
    desc(4, 0x5 | 1 << 5 | 0x9 << 32, status);
    u.w64(reg::IQT, 5 << 4);
    let fsts = u.fsts();
    let head2 = u.r64(reg::IQH);
    let after_bad = r64(status) as u32;
    u.clear_faults();
    u.set_persistent(QIE, false);
    check!(
        written == 0x1234_5678,
        "wait status {written:#x} right after the IQT write"
    );
    check!(head == 3 << 4, "IQH {head:#x}, want 0x30");
    check!(
        fsts & IQE != 0,
        "no IQE for descriptor type 7 (FSTS {fsts:#x})"
    );
    check!(
        head2 == 3 << 4 && after_bad == 0x1234_5678,
        "the queue went past a bad descriptor"
    );
    Outcome::Pass(Some(
        "wait status written synchronously; IQE stops at a bad descriptor".into(),
    ))
}

/// Vector of the invalidation completion event.
const COMPLETION_VECTOR: u8 = 0xa9;

pub fn completion_event(c: &Ctx) -> Outcome {
    let (u, _) = setup!(c);
    let queue = page();
    idt::set_mode(COMPLETION_VECTOR, Mode::Eoi);
    u.w32(reg::IEDATA, u32::from(COMPLETION_VECTOR));
    u.w32(reg::IEADDR, apic::msi_address(bsp_apic()) as u32);
    u.w32(reg::IEUADDR, 0);
    u.w32(reg::IECTL, 0);
    u.w32(reg::ICS, 1);
    u.w64(reg::IQT, 0);
    u.w64(reg::IQA, queue);
    check!(u.set_persistent(QIE, true), "QIES not set");
    cpu::sti();
    // A wait descriptor with IF (bit 4): the completion event, unmasked.
    let t0 = idt::total(COMPLETION_VECTOR);
    w64(queue, 0x5 | 1 << 4);
    w64(queue + 8, 0);
    u.w64(reg::IQT, 1 << 4);
    let sent = wait_until(SOON, || idt::total(COMPLETION_VECTOR) > t0);
    let iwc = u.r32(reg::ICS) & 1;
    u.w32(reg::ICS, 1);
    // Masked: held pending (IP) until IM is cleared.
    u.w32(reg::IECTL, 1 << 31);
    let t1 = idt::total(COMPLETION_VECTOR);
    w64(queue + 16, 0x5 | 1 << 4);
    w64(queue + 24, 0);
    u.w64(reg::IQT, 2 << 4);
    let quiet = !wait_until(QUIET, || idt::total(COMPLETION_VECTOR) > t1);
    let ip = u.r32(reg::IECTL) & (1 << 30) != 0;
    u.w32(reg::IECTL, 0);
    let released = wait_until(SOON, || idt::total(COMPLETION_VECTOR) > t1);
    cpu::cli();
    u.w32(reg::ICS, 1);
    u.set_persistent(QIE, false);
    check!(sent, "no completion event for a wait descriptor with IF");
    check!(iwc == 1, "ICS.IWC not set");
    check!(quiet, "a masked completion event was delivered");
    check!(ip, "IECTL.IP not set for the masked event");
    check!(released, "the held completion event was not sent on unmask");
    Outcome::Pass(Some(format!(
        "vector {COMPLETION_VECTOR:#x} on IF; masked event held (IP) and sent on unmask"
    )))
}

/// A device write of one aligned dword to 0xFEEx_xxxx is an interrupt request, never
/// translated and never a fault; reads there are blocked.
pub fn interrupt_range(c: &Ctx) -> Outcome {
    const V: u8 = 0xaa;
    let (u, e) = setup!(c);
    let data = page();
    w64(data, u64::from(V));
    // The message data into edu's buffer (translation off).
    let (cmd, _) = e.dma(data, EDU_BUF, 4, false);
    check!(cmd & 0x100 == 0, "staging the message data failed");
    // Translation on with no mapping at all: DMA would fault anywhere else.
    let t = Tables::new(e.sid, 3);
    check!(translate_with(&u, &t), "translation did not turn on");
    idt::set_mode(V, Mode::Eoi);
    cpu::sti();
    let t0 = idt::total(V);
    let msi = apic::msi_address(bsp_apic());
    let (cmd, err) = e.dma(EDU_BUF, msi, 4, true);
    let fired = wait_until(SOON, || idt::total(V) > t0);
    let fsts = u.fsts();
    // A read of the same address is not an interrupt: blocked, nothing recorded.
    let (rcmd, rerr) = e.dma(msi, EDU_BUF + 8, 4, false);
    let fsts2 = u.fsts();
    cpu::cli();
    off(&u);
    check!(
        cmd & 0x100 == 0,
        "the dword write to {msi:#x} failed (error {err:#x})"
    );
    check!(
        fired,
        "the dword write to {msi:#x} did not interrupt the BSP"
    );
    check!(
        fsts & PPF == 0,
        "the interrupt request was translated and faulted (FSTS {fsts:#x})"
    );
    check!(
        rcmd & 0x100 != 0,
        "a DMA read of the interrupt range succeeded"
    );
    check!(
        rerr == 0xffff_ffff || rerr & 0xff == 3,
        "read blocked with edu error {rerr:#x}, want 3"
    );
    check!(fsts2 & PPF == 0, "the blocked read recorded a DMA fault");
    Outcome::Pass(Some(format!(
        "dword write to {msi:#x} delivered vector {V:#x} with translation on and nothing mapped; read blocked"
    )))
}

/// A root table latched in a translation table mode the unit does not offer
/// (RTADDR.TTM = scalable) blocks DMA with "root table address invalid".
pub fn root_mode(c: &Ctx) -> Outcome {
    let (u, e) = setup!(c);
    let t = Tables::new(e.sid, 3);
    let buf = page();
    fill(buf, 0x5a, 64);
    t.map(0x1000, buf, R | W, 1);
    u.w64(reg::RTADDR, t.root | 1 << 10);
    u.command(SRTP, SRTP, true);
    u.invalidate();
    u.set_persistent(TE, true);
    let (cmd, err) = e.dma(0x1000, EDU_BUF, 64, false);
    let (page_addr, sid, reason, read, f) = u.record(0);
    // The same tables in legacy mode translate.
    u.clear_faults();
    u.set_root(t.root);
    u.invalidate();
    let (cmd2, _) = e.dma(0x1000, EDU_BUF, 64, false);
    off(&u);
    check!(
        cmd & 0x100 != 0,
        "DMA succeeded under an unsupported root table mode"
    );
    check!(
        f && reason == 0x8 && sid == e.sid && page_addr == 0x1000 && read,
        "record F {f} reason {reason:#x} sid {sid:#x} addr {page_addr:#x} read {read} (edu error {err:#x}), want 0x8 for the read at 0x1000"
    );
    check!(
        cmd2 & 0x100 == 0,
        "the same tables in legacy mode did not translate"
    );
    Outcome::Pass(Some(
        "TTM=01 (scalable, not offered): DMA blocked with fault 0x8; legacy mode translates".into(),
    ))
}

/// Linux's string for a legacy fault reason.
fn reason_text(r: u8) -> &'static str {
    match r {
        1 => "Present bit in root entry is clear",
        2 => "Present bit in context entry is clear",
        3 => "Invalid context entry",
        4 => "Access beyond MGAW",
        5 => "PTE Write access is not set",
        6 => "PTE Read access is not set",
        7 => "Next page table ptr is invalid",
        8 => "Root table address invalid",
        9 => "Context table ptr is invalid",
        0xa => "non-zero reserved fields in RTP",
        0xb => "non-zero reserved fields in CTP",
        0xc => "non-zero reserved fields in PTE",
        _ => "Unknown",
    }
}

// ---------------------------------------------------------------- benchmarks

/// edu copies (RAM → device → RAM) with translation off and on.
pub fn bench_dma(c: &Ctx) -> Outcome {
    let (u, e) = setup!(c);
    let (src, dst) = (page(), page());
    let t = Tables::new(e.sid, 3);
    t.map(0x10_0000, src, R, 1);
    t.map(0x20_0000, dst, W, 1);
    let iters = c.opts.iters.min(5000) as usize;
    let run = |on: bool| -> Vec<u64> {
        if on {
            translate_with(&u, &t);
        }
        let (s, d) = if on {
            (0x10_0000, 0x20_0000)
        } else {
            (src, dst)
        };
        let mut v = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t0 = rdtsc();
            e.copy(s, d, XFER);
            v.push(rdtsc().wrapping_sub(t0));
        }
        off(&u);
        v
    };
    let mut offv = run(false);
    let mut onv = run(true);
    offv.sort_unstable();
    onv.sort_unstable();
    let (m_off, m_on) = (offv[offv.len() / 2], onv[onv.len() / 2]);
    let pct = m_off * 100 / m_on.max(1);
    crate::println!(
        "# bench dma_iommu_off median={m_off} min={} n={iters} unit=cycles what=\"edu {XFER}-byte copy RAM->dev->RAM, TE off\"",
        offv[0]
    );
    crate::println!(
        "# bench dma_iommu_on median={m_on} min={} n={iters} unit=cycles what=\"edu {XFER}-byte copy RAM->dev->RAM, TE on\"",
        onv[0]
    );
    Outcome::Pass(Some(format!(
        "{XFER}-byte copy: {m_off} cycles off, {m_on} on: throughput with the IOMMU {pct}% of without"
    )))
}

/// From the MMIO write that starts a faulting DMA to the fault-event handler.
pub fn bench_fault_latency(c: &Ctx) -> Outcome {
    let (u, e) = setup!(c);
    let t = Tables::new(e.sid, 3);
    translate_with(&u, &t);
    u.fault_event_to_bsp(false);
    let iters = c.opts.iters.min(5000) as usize;
    let mut v = Vec::with_capacity(iters);
    cpu::sti();
    for i in 0..iters as u64 {
        let before = idt::total(FAULT_VECTOR);
        e.w64(0x80, EDU_BUF);
        e.w64(0x88, 0x1000 + (i % 16) * 0x1000);
        e.w64(0x90, 8);
        let t0 = rdtsc();
        mmio_write32(e.bar + 0x98, 3);
        if !wait_until(crate::tests::SOON, || idt::total(FAULT_VECTOR) > before) {
            cpu::cli();
            off(&u);
            fail!("fault event lost after {i} samples");
        }
        v.push(idt::last(FAULT_VECTOR).0.wrapping_sub(t0));
        u.clear_faults();
    }
    cpu::cli();
    off(&u);
    u.fault_event_to_bsp(true);
    crate::tests::summarize(
        "fault_latency",
        "edu DMA command write to VT-d fault-event handler",
        &mut v,
    )
}

/// Vector the host sends (a spurious interrupt through the API) to say "go".
const GO_VECTOR: u8 = 0xee;
/// Vector of a host interrupt storm.
const STORM_VECTOR: u8 = 0xed;
/// fv-test's MSI vector while watching.
pub const WATCH_MSI: u8 = 0x71;

/// For fault-injection tests: arms the unit (translation on, nothing mapped, fault
/// event to the BSP), prints `# watch: ready`, waits for the host's "go" interrupt on
/// 0xee, raises 10 fv-test MSIs, collects for a while, and reports everything it saw in
/// one `# watch:` line.
pub fn watch(c: &Ctx) -> Outcome {
    watch_with(c, None)
}

/// [`watch`], with fv-test's MSI sent in remappable format to `ir_address` when given
/// (interrupt remapping already on, its table allocated from the page pool).
pub fn watch_with(c: &Ctx, ir_address: Option<u64>) -> Outcome {
    let unit = c.p.dmar.map(|d| Unit::new(&d));
    if let Some(u) = &unit {
        u.set_persistent(TE, false);
        u.clear_faults();
        if ir_address.is_none() {
            pool_reset();
        }
        let root = page();
        u.set_root(root);
        u.invalidate();
        u.set_persistent(TE, true);
        u.fault_event_to_bsp(false);
    }
    idt::set_callback(FAULT_VECTOR, count_and_clear_faults);
    let fvt = c
        .find(0x1234, 0xfa17)
        .and_then(|b| Some((b, b.mem_bar(0)?)));
    if let Some((bdf, _)) = fvt {
        if let Some(m) = crate::pci::Msi::find(bdf) {
            bdf.enable(true);
            match ir_address {
                Some(a) => m.enable_raw(a, 0, 1),
                None => m.enable(bsp_apic(), WATCH_MSI, 1),
            }
        }
    }
    if let Some(u) = unit {
        UNIT_BASE.store(u.base, Ordering::SeqCst);
        UNIT_FRO.store(u.fro, Ordering::SeqCst);
        UNIT_NFR.store(u64::from(u.nfr), Ordering::SeqCst);
    }
    crate::println!("# watch: ready");
    cpu::sti();
    let go = wait_until(60_000_000_000, || idt::total(GO_VECTOR) > 0);
    let mut raised = 0;
    if let Some((_, bar)) = fvt {
        for _ in 0..10 {
            let before = idt::total(WATCH_MSI);
            mmio_write32(bar + 0x08, 0);
            raised += 1;
            wait_until(crate::tests::QUIET, || idt::total(WATCH_MSI) > before);
            // Room for duplicates to land as interrupts of their own: the local APIC
            // merges two requests for one vector that are pending at once.
            cpu::delay(crate::tests::QUIET * 2);
        }
    }
    // Late arrivals (delayed interrupts, storms, fault events).
    cpu::delay(crate::tests::SOON);
    cpu::cli();
    let fsts = unit.map_or(0, |u| u.fsts());
    crate::println!(
        "# watch: go={} msi_raised={raised} msi_received={} storm_irqs={} fault_events={} records={} pfo={} fsts={fsts:#x}",
        u8::from(go),
        idt::total(WATCH_MSI),
        idt::total(STORM_VECTOR),
        idt::total(FAULT_VECTOR),
        RECORDS_SEEN.load(Ordering::SeqCst),
        u8::from(PFO_SEEN.load(Ordering::SeqCst) || fsts & PFO != 0),
    );
    if let Some(u) = unit {
        off(&u);
    }
    check!(
        go,
        "no go signal (spurious interrupt on {GO_VECTOR:#x}) from the host"
    );
    Outcome::Pass(Some("watched".into()))
}

static UNIT_BASE: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static UNIT_FRO: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static UNIT_NFR: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static RECORDS_SEEN: AtomicU32 = AtomicU32::new(0);
static PFO_SEEN: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// The fault-event handler while watching: counts and clears pending records, as Linux's
/// dmar_fault() does.
fn count_and_clear_faults() {
    let base = UNIT_BASE.load(Ordering::SeqCst);
    if base == 0 {
        return;
    }
    let fro = UNIT_FRO.load(Ordering::SeqCst);
    let nfr = UNIT_NFR.load(Ordering::SeqCst);
    let fsts = mmio_read32(base + reg::FSTS);
    if fsts & PFO != 0 {
        PFO_SEEN.store(true, Ordering::SeqCst);
    }
    for i in 0..nfr {
        let hi = base + fro + 16 * i + 12;
        if mmio_read32(hi) >> 31 != 0 {
            RECORDS_SEEN.fetch_add(1, Ordering::SeqCst);
            mmio_write32(hi, 1 << 31);
        }
    }
    mmio_write32(base + reg::FSTS, PFO | PPF | IQE);
}
