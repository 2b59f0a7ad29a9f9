//! Missed-invalidation scenarios: the probe plays a VT-d driver that changes its tables
//! and then issues the wrong invalidation (another page, another domain, another
//! function, a context flush without the IOTLB flush that must follow), and checks
//! where edu's DMA write lands. On a unit with hardware-exact caching
//! (`--iommu intel,caching=exact`) the stale entry is used until exactly the right
//! invalidation, and faultvisor's detector reports each use (the host test reads its
//! report). A unit that empties its caches on any invalidation makes the scenarios skip
//! with that reason.

use alloc::format;

use crate::iommu::{
    self, bytes, fill, off, page, reg, translate_with, w64, Edu, Tables, Unit, EDU_BUF, QIE, R, W,
    XFER,
};
use crate::tap::Outcome;
use crate::tests::Ctx;
use crate::{check, skip};

/// IOVA edu reads its pattern from.
const SRC: u64 = 0x10_0000;
/// IOVA edu writes to (0x23000: a two-page mask from 0x22000 covers it).
const DST: u64 = 0x2_3000;
const PATTERN: u8 = 0x5a;
const SIMPLE: &str = "the unit empties its caches on any invalidation (simple caching); run faultvisor with --iommu intel,caching=exact";

/// Where a DMA write of the pattern to `DST` lands: 1 (first page), 2 (second), 0
/// (nowhere: a fault), 3 (both, which never happens).
fn lands(e: &Edu, p1: u64, p2: u64) -> u8 {
    let n = XFER as usize;
    fill(p1, 0, n);
    fill(p2, 0, n);
    e.dma(EDU_BUF, DST, XFER, true);
    let hit = |p: u64| bytes(p, n).iter().all(|b| *b == PATTERN);
    u8::from(hit(p1)) | (u8::from(hit(p2)) << 1)
}

/// Tables for edu in domain 1 with the pattern at `SRC` and `DST` → `p1`, translation
/// on and edu's buffer loaded. Returns the tables and `DST`'s leaf PTE.
fn prepare(u: &Unit, e: &Edu, p1: u64) -> Result<(Tables, u64), Outcome> {
    let src = page();
    fill(src, PATTERN, XFER as usize);
    let t = Tables::new(e.sid, 3);
    t.map(SRC, src, R, 1);
    let pte = t.map(DST, p1, W, 1);
    if !translate_with(u, &t) {
        return Err(Outcome::Fail("translation did not turn on".into()));
    }
    let (cmd, _) = e.dma(SRC, EDU_BUF, XFER, false);
    if cmd & 0x100 != 0 {
        return Err(Outcome::Fail("edu could not read its pattern".into()));
    }
    Ok((t, pte))
}

/// IOTLB entries stay until a page-selective invalidation of their domain covers them
/// (its address mask included), or a domain or global one.
pub fn iotlb(c: &Ctx) -> Outcome {
    let (u, e) = match iommu::setup(c) {
        Ok(x) => x,
        Err(o) => return o,
    };
    let (p1, p2) = (page(), page());
    let (_t, pte) = match prepare(&u, &e, p1) {
        Ok(x) => x,
        Err(o) => return o,
    };
    let first = lands(&e, p1, p2);
    // The driver remaps DST to p2 and forgets to invalidate.
    w64(pte, p2 | W);
    let forgot = lands(&e, p1, p2);
    // The wrong page, then the wrong domain.
    u.iotlb_invalidate(3, 1, DST + 0x1000);
    let wrong_page = lands(&e, p1, p2);
    if first == 1 && forgot == 1 && wrong_page == 2 {
        off(&u);
        skip!("{SIMPLE}");
    }
    u.iotlb_invalidate(3, 2, DST);
    let wrong_domain = lands(&e, p1, p2);
    // A two-page mask (AM 1) from 0x22000 covers 0x23000.
    u.iotlb_invalidate(3, 1, (DST & !0x1fff) | 1);
    let masked = lands(&e, p1, p2);
    // Back to p1: a domain-selective invalidation of another domain, then of domain 1.
    w64(pte, p1 | W);
    u.iotlb_invalidate(2, 2, 0);
    let other_domain = lands(&e, p1, p2);
    u.iotlb_invalidate(2, 1, 0);
    let domain = lands(&e, p1, p2);
    w64(pte, p2 | W);
    u.iotlb_invalidate(1, 0, 0);
    let global = lands(&e, p1, p2);
    off(&u);
    check!(first == 1, "the first DMA landed at {first}");
    check!(
        forgot == 1,
        "without invalidation the cached entry was not used (landed at {forgot})"
    );
    check!(wrong_page == 1, "a PSI of another page refreshed the entry");
    check!(
        wrong_domain == 1,
        "a PSI of another domain refreshed the entry"
    );
    check!(
        masked == 2,
        "a PSI with AM 1 covering the page did not refresh it (landed at {masked})"
    );
    check!(
        other_domain == 2,
        "a DSI of another domain refreshed the entry"
    );
    check!(domain == 1, "the DSI of the domain did not refresh it");
    check!(global == 2, "the global invalidation did not refresh it");
    Outcome::Pass(Some(
        "stale through no/wrong-page/wrong-domain PSI; refreshed by AM 1 PSI, DSI, global".into(),
    ))
}

/// A queued-invalidation ring for the scenario (128-bit descriptors).
struct Queue {
    base: u64,
    status: u64,
    tail: u64,
}

impl Queue {
    fn on(u: &Unit) -> Result<Self, Outcome> {
        let q = Self {
            base: page(),
            status: page(),
            tail: 0,
        };
        u.w64(reg::IQT, 0);
        u.w64(reg::IQA, q.base);
        if !u.set_persistent(QIE, true) {
            return Err(Outcome::Fail("QIES not set".into()));
        }
        Ok(q)
    }

    /// Queues `descs` and a wait descriptor, and runs them.
    fn submit(&mut self, u: &Unit, descs: &[(u64, u64)]) -> bool {
        let mut put = |lo: u64, hi: u64| {
            let at = self.base + (self.tail % 256) * 16;
            w64(at, lo);
            w64(at + 8, hi);
            self.tail += 1;
        };
        for (lo, hi) in descs {
            put(*lo, *hi);
        }
        w64(self.status, 0);
        put(5 | 1 << 5 | 0x77 << 32, self.status);
        u.w64(reg::IQT, (self.tail % 256) << 4);
        iommu::r64(self.status) as u32 == 0x77 && u.fsts() & iommu::IQE == 0
    }
}

/// Context-cache descriptor: granularity `g` (1 global, 2 domain, 3 device).
fn cc(g: u64, did: u16, sid: u16, fm: u64) -> (u64, u64) {
    (
        1 | g << 4 | u64::from(did) << 16 | u64::from(sid) << 32 | fm << 48,
        0,
    )
}

/// IOTLB descriptor: granularity `g` (1 global, 2 domain, 3 page).
fn tlb(g: u64, did: u16, addr_am: u64) -> (u64, u64) {
    (2 | g << 4 | u64::from(did) << 16, addr_am)
}

/// Context entries stay cached until a context-cache invalidation covers them (device
/// with its function mask, domain, global); IOTLB entries, tagged by domain, outlive a
/// context flush until the IOTLB flush the specification requires after it.
pub fn context(c: &Ctx) -> Outcome {
    let (u, e) = match iommu::setup(c) {
        Ok(x) => x,
        Err(o) => return o,
    };
    let (p1, p2) = (page(), page());
    let (t, _) = match prepare(&u, &e, p1) {
        Ok(x) => x,
        Err(o) => return o,
    };
    let mut q = match Queue::on(&u) {
        Ok(q) => q,
        Err(o) => return o,
    };
    let first = lands(&e, p1, p2);
    // A second tree for the same domain, with DST → p2; the context entry points at it.
    let t2 = Tables {
        root: t.root,
        ctx: t.ctx,
        top: page(),
        levels: 3,
        devfn: t.devfn,
    };
    t2.map(DST, p2, W, 1);
    t.set_context(t2.top | 1, 1 | 1 << 8);
    let forgot = lands(&e, p1, p2);
    // Another function of the device (FM 0): not covered.
    let ok1 = q.submit(&u, &[cc(3, 0, e.sid ^ 1, 0)]);
    let other_function = lands(&e, p1, p2);
    if first == 1 && forgot == 1 && other_function == 2 {
        u.set_persistent(QIE, false);
        off(&u);
        skip!("{SIMPLE}");
    }
    // The device itself: the context is read again, but the IOTLB entry of domain 1
    // for DST is still there (no IOTLB invalidation followed).
    let ok2 = q.submit(&u, &[cc(3, 0, e.sid, 0)]);
    let context_only = lands(&e, p1, p2);
    let ok3 = q.submit(&u, &[tlb(2, 1, 0)]);
    let with_iotlb = lands(&e, p1, p2);
    // Domain 3 with the first tree: a domain-selective context flush of domain 1 (the
    // cached entry's) reaches it, and domain 3 has no IOTLB entries yet.
    t.set_context(t.top | 1, 1 | 3 << 8);
    let ok4 = q.submit(&u, &[cc(2, 1, 0, 0)]);
    let new_domain = lands(&e, p1, p2);
    // FM 3 (all functions) from function 7, then a global IOTLB flush.
    t.set_context(t2.top | 1, 1 | 3 << 8);
    let ok5 = q.submit(&u, &[cc(3, 0, e.sid | 7, 3), tlb(1, 0, 0)]);
    let masked = lands(&e, p1, p2);
    u.set_persistent(QIE, false);
    off(&u);
    check!(
        ok1 && ok2 && ok3 && ok4 && ok5,
        "a queued invalidation did not complete"
    );
    check!(first == 1, "the first DMA landed at {first}");
    check!(
        forgot == 1,
        "a changed context entry was used without invalidation (landed at {forgot})"
    );
    check!(
        other_function == 1,
        "a device-selective flush of another function refreshed the context"
    );
    check!(
        context_only == 1,
        "the IOTLB entry did not outlive the context flush (landed at {context_only})"
    );
    check!(
        with_iotlb == 2,
        "the domain's IOTLB flush did not refresh it"
    );
    check!(
        new_domain == 1,
        "the move to domain 3 was not seen (landed at {new_domain})"
    );
    check!(
        masked == 2,
        "FM 3 from function 7 did not cover the device (landed at {masked})"
    );
    Outcome::Pass(Some(format!(
        "context stale until device/domain flush (FM masks honoured); IOTLB of domain 1 outlives it; domain tags {:#x}",
        e.sid
    )))
}
