//! The DMA API of device models: one [`DmaHandle`] per requester ID.
//!
//! With translation off (or no IOMMU at all) an access goes straight to guest memory.
//! With translation on, every page the access touches is translated first (per-handle
//! cache, then the walk); only when all of them are allowed are bytes moved, so a
//! faulting request writes nothing and reads nothing. One fault is recorded per request,
//! at the first page that failed.
//!
//! The interrupt address range (0xFEEx_xxxx) is never translated, with or without the
//! unit: an aligned dword write there is an interrupt request (the MSI it describes is
//! sent), anything else touching the range is blocked and moves nothing.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::interrupt::{InterruptController, MsiMessage, MsiSource};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::cache::{Invalidation, StaleKind, StaleUse};
use super::walk::{self, Context, FaultReason, Mapping};
use super::Vtd;
use crate::sync::lock;

/// Why a DMA did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// The IOMMU refused the access (and recorded the fault unless FPD was set).
    #[error("DMA {} at IOVA {iova:#x} faulted: reason {:#x} ({})", if *.write { "write" } else { "read" }, *.reason as u8, .reason.linux_text())]
    Fault {
        /// First faulting address.
        iova: u64,
        /// Fault reason.
        reason: FaultReason,
        /// A write to memory (else a read).
        write: bool,
    },
    /// The (translated) address is not guest RAM: the access is dropped, as a master
    /// abort on hardware.
    #[error("DMA to {gpa:#x}, which is not guest RAM")]
    NotRam {
        /// Guest-physical address.
        gpa: u64,
    },
    /// A request to the interrupt address range that is not an interrupt (a read, or a
    /// write other than one aligned dword): blocked, nothing moved (VT-d §3.14).
    #[error(
        "DMA to {address:#x} in the interrupt address range is not an interrupt request; blocked"
    )]
    Interrupt {
        /// The address.
        address: u64,
    },
}

/// Direct-mapped slots per page size in a handle's IOTLB.
const TLB_SLOTS: usize = 64;
/// Page sizes cached: 4 KiB, 2 MiB, 1 GiB.
const SHIFTS: [u32; 3] = [12, 21, 30];

/// One IOTLB entry: the page (tag = IOVA >> page shift) of a domain.
#[derive(Clone, Copy)]
struct Entry {
    tag: u64,
    did: u16,
    m: Mapping,
}

/// Cached translations of one requester, current as of invalidation `seen`: the
/// context entry and a direct-mapped IOTLB per page size, tagged by domain as
/// hardware's is (so a context that moves the device to another domain misses).
struct Cache {
    seen: u64,
    context: Option<Context>,
    tlb: [[Option<Entry>; TLB_SLOTS]; 3],
}

impl Default for Cache {
    fn default() -> Self {
        Self {
            seen: 0,
            context: None,
            tlb: [[None; TLB_SLOTS]; 3],
        }
    }
}

impl Cache {
    fn lookup(&self, did: u16, iova: u64, write: bool) -> Option<Mapping> {
        for (i, shift) in SHIFTS.iter().enumerate() {
            let tag = iova >> shift;
            if let Some(e) = &self.tlb[i][tag as usize % TLB_SLOTS] {
                if e.tag == tag && e.did == did && ((write && e.m.write) || (!write && e.m.read)) {
                    return Some(e.m);
                }
            }
        }
        None
    }

    fn insert(&mut self, did: u16, iova: u64, m: Mapping) {
        let i = SHIFTS.iter().position(|s| *s == m.page_shift).unwrap_or(0);
        let tag = iova >> m.page_shift;
        self.tlb[i][tag as usize % TLB_SLOTS] = Some(Entry { tag, did, m });
    }

    /// Drops what `inv` covers for requester `sid`.
    fn apply(&mut self, inv: &Invalidation, sid: u16) {
        if *inv == Invalidation::Everything {
            self.context = None;
            self.tlb = [[None; TLB_SLOTS]; 3];
            return;
        }
        if let Some(c) = self.context {
            if inv.drops_context(sid, c.did) {
                self.context = None;
            }
        }
        for (i, shift) in SHIFTS.iter().enumerate() {
            for slot in self.tlb[i].iter_mut() {
                if let Some(e) = slot {
                    if inv.drops_iotlb(e.did, e.tag << shift, *shift) {
                        *slot = None;
                    }
                }
            }
        }
    }
}

/// The last translation a handle used, readable without the cache's lock: a seqlock
/// whose writers hold the cache's lock. An entry is valid only at the invalidation
/// generation it was filled at, so any invalidation since (which moves the unit's
/// generation) sends the next access down the locked path, which replays it.
#[derive(Default)]
struct LastHit {
    seq: AtomicU64,
    /// The generation the entry is valid at.
    gen: AtomicU64,
    /// IOVA >> page shift.
    tag: AtomicU64,
    /// The page's guest-physical base | page shift (bits 5:0; 0 = empty) | read (bit 6)
    /// | write (bit 7). Pages are at least 4 KiB, so the low 12 bits are free.
    val: AtomicU64,
}

impl LastHit {
    const READ: u64 = 1 << 6;
    const WRITE: u64 = 1 << 7;

    /// The guest-physical address of `iova` if the entry covers it for this access
    /// and is current at generation `now`.
    #[inline]
    fn get(&self, now: u64, iova: u64, write: bool) -> Option<u64> {
        let s1 = self.seq.load(Ordering::Acquire);
        if s1 & 1 == 1 {
            return None;
        }
        let gen = self.gen.load(Ordering::Relaxed);
        let tag = self.tag.load(Ordering::Relaxed);
        let val = self.val.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        if self.seq.load(Ordering::Relaxed) != s1 || gen != now {
            return None;
        }
        let shift = (val & 0x3f) as u32;
        let allowed = val & if write { Self::WRITE } else { Self::READ } != 0;
        if shift == 0 || shift >= 64 || iova >> shift != tag || !allowed {
            return None;
        }
        Some((val & !0xfff) | (iova & ((1u64 << shift) - 1)))
    }

    /// Makes `m` (for `iova`, current at generation `gen`) the entry. The caller holds
    /// the cache's lock, so writers never race each other.
    fn set(&self, gen: u64, iova: u64, m: &Mapping) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.gen.store(gen, Ordering::Relaxed);
        self.tag.store(iova >> m.page_shift, Ordering::Relaxed);
        let val = (m.gpa_base & !0xfff)
            | u64::from(m.page_shift & 0x3f)
            | if m.read { Self::READ } else { 0 }
            | if m.write { Self::WRITE } else { 0 };
        self.val.store(val, Ordering::Relaxed);
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }
}

/// A device's path to guest memory.
pub struct DmaHandle {
    sid: u16,
    inner: Inner,
    interrupts: AtomicU64,
}

/// Whether `[iova, iova + len)` touches the interrupt address range.
pub(crate) fn touches_interrupt_range(iova: u64, len: usize) -> bool {
    let end = iova.saturating_add(len as u64);
    len > 0 && iova < super::INTERRUPT_RANGE.end && end > super::INTERRUPT_RANGE.start
}

/// A write to the interrupt range: `Some(message)` for an aligned dword (an interrupt
/// request), an error for anything else there, `None` outside the range.
fn interrupt_request(iova: u64, data: &[u8]) -> Result<Option<MsiMessage>, DmaError> {
    if !touches_interrupt_range(iova, data.len()) {
        return Ok(None);
    }
    match <[u8; 4]>::try_from(data) {
        Ok(b) if iova.is_multiple_of(4) => Ok(Some(MsiMessage {
            address: iova,
            data: u32::from_le_bytes(b),
        })),
        _ => Err(DmaError::Interrupt { address: iova }),
    }
}

enum Inner {
    Direct(GuestMemoryMmap, Option<Arc<dyn InterruptController>>),
    Translated {
        vtd: Arc<Vtd>,
        cache: Box<Mutex<Cache>>,
        last: Box<LastHit>,
        requests: Arc<AtomicU64>,
    },
}

impl DmaHandle {
    /// A handle without an IOMMU: IOVA = guest-physical address; interrupt requests
    /// (dword writes to 0xFEEx_xxxx) go to `irq`.
    pub fn direct(
        mem: GuestMemoryMmap,
        sid: u16,
        irq: Option<Arc<dyn InterruptController>>,
    ) -> Self {
        Self {
            sid,
            inner: Inner::Direct(mem, irq),
            interrupts: AtomicU64::new(0),
        }
    }

    pub(super) fn translated(vtd: Arc<Vtd>, sid: u16) -> Self {
        let requests = vtd.request_counter(sid);
        Self {
            sid,
            inner: Inner::Translated {
                vtd,
                cache: Box::new(Mutex::new(Cache::default())),
                last: Box::default(),
                requests,
            },
            interrupts: AtomicU64::new(0),
        }
    }

    /// The requester ID.
    pub fn sid(&self) -> u16 {
        self.sid
    }

    /// Reads guest memory at `iova` into `buf` (a device read: "DMA Read").
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        if touches_interrupt_range(iova, buf.len()) {
            return Err(DmaError::Interrupt { address: iova });
        }
        let segs = self.resolve(iova, buf.len(), false)?;
        let mem = self.memory();
        let mut done = 0;
        for (gpa, len) in segs {
            mem.read_slice(&mut buf[done..done + len], GuestAddress(gpa))
                .map_err(|_| DmaError::NotRam { gpa })?;
            done += len;
        }
        Ok(())
    }

    /// Writes `data` to guest memory at `iova` (a device write: "DMA Write").
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        if let Some(msg) = interrupt_request(iova, data)? {
            self.interrupts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let source = MsiSource::Pci {
                bdf: self.sid,
                vector: u16::MAX,
            };
            if let Some(irq) = self.irq() {
                // An interrupt the VMM cannot send is lost, as one the bus drops.
                let _ = irq.signal_msi(source, msg);
            }
            return Ok(());
        }
        let segs = self.resolve(iova, data.len(), true)?;
        let mem = self.memory();
        let mut done = 0;
        for (gpa, len) in segs {
            mem.write_slice(&data[done..done + len], GuestAddress(gpa))
                .map_err(|_| DmaError::NotRam { gpa })?;
            done += len;
        }
        Ok(())
    }

    fn memory(&self) -> &GuestMemoryMmap {
        match &self.inner {
            Inner::Direct(m, _) => m,
            Inner::Translated { vtd, .. } => vtd.memory(),
        }
    }

    fn irq(&self) -> Option<&Arc<dyn InterruptController>> {
        match &self.inner {
            Inner::Direct(_, i) => i.as_ref(),
            Inner::Translated { vtd, .. } => Some(vtd.interrupts()),
        }
    }

    /// Interrupt requests (dword writes to the interrupt range) this handle sent.
    pub fn interrupt_requests(&self) -> u64 {
        self.interrupts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Translates `[iova, iova + len)` into guest-physical segments, all checked to be
    /// RAM, before anything moves.
    fn resolve(&self, iova: u64, len: usize, write: bool) -> Result<Vec<(u64, usize)>, DmaError> {
        let mut segs = Vec::new();
        if len == 0 {
            return Ok(segs);
        }
        if let Inner::Translated { vtd, requests, .. } = &self.inner {
            if vtd.translating() {
                requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                vtd.trace(|| crate::timeline::EventKind::Dma {
                    sid: self.sid,
                    iova,
                    len: len as u64,
                    write,
                });
            }
        }
        let end = iova.checked_add(len as u64 - 1).ok_or(DmaError::Fault {
            iova,
            reason: FaultReason::BeyondMgaw,
            write,
        })?;
        let mut at = iova;
        loop {
            let page_end = at | 0xfff;
            let chunk_end = page_end.min(end);
            let n = (chunk_end - at + 1) as usize;
            let gpa = self.translate(at, write)?;
            let mem = self.memory();
            if !mem.check_range(GuestAddress(gpa), n) {
                return Err(DmaError::NotRam { gpa });
            }
            match segs.last_mut() {
                Some((g, l)) if *g + *l as u64 == gpa => *l += n,
                _ => segs.push((gpa, n)),
            }
            if chunk_end == end {
                return Ok(segs);
            }
            at = chunk_end + 1;
        }
    }

    /// Translates one address; records a fault on failure.
    #[inline]
    pub fn translate(&self, iova: u64, write: bool) -> Result<u64, DmaError> {
        if let Inner::Translated { vtd, last, .. } = &self.inner {
            // The hit path: no lock, no call. Exact caching checks every use against
            // the tables, and armed context faults must be taken: both go the long way.
            if vtd.translating() && !vtd.exact() && !vtd.context_faults_armed() {
                if let Some(gpa) = last.get(vtd.generation(), iova, write) {
                    return Ok(gpa);
                }
            }
        }
        self.translate_slow(iova, write)
    }

    /// [`DmaHandle::translate`] through the cache's lock, the walk and fault recording.
    #[inline(never)]
    fn translate_slow(&self, iova: u64, write: bool) -> Result<u64, DmaError> {
        let (vtd, cache, last) = match &self.inner {
            Inner::Direct(..) => return Ok(iova),
            Inner::Translated {
                vtd, cache, last, ..
            } => (vtd, cache, last),
        };
        if !vtd.translating() {
            return Ok(iova);
        }
        if vtd.take_context_fault(self.sid, iova, write) {
            return Err(DmaError::Fault {
                iova,
                reason: FaultReason::ContextInvalid,
                write,
            });
        }
        let exact = vtd.exact();
        let mut c = lock(cache);
        let seen = c.seen;
        if seen != vtd.generation() {
            let now = vtd.replay(seen, |inv| c.apply(inv, self.sid));
            c.seen = now;
        }
        let mem = vtd.memory();
        let (ctx, ctx_cached) = match c.context {
            Some(ctx) => (ctx, true),
            None => match walk::context_entry(mem, vtd.root(), self.sid) {
                Ok(ctx) => {
                    c.context = Some(ctx);
                    (ctx, false)
                }
                Err(reason) => {
                    drop(c);
                    vtd.record_fault(self.sid, iova, !write, reason, false);
                    return Err(DmaError::Fault {
                        iova,
                        reason,
                        write,
                    });
                }
            },
        };
        if let Some(m) = c.lookup(ctx.did, iova, write) {
            if !exact {
                last.set(c.seen, iova, &m);
            }
            drop(c);
            if exact {
                self.check_stale(vtd, ctx_cached.then_some(ctx), Some(m), iova, write);
            }
            return Ok(m.gpa(iova));
        }
        if vtd.exact() && ctx_cached {
            self.check_stale(vtd, Some(ctx), None, iova, write);
        }
        vtd.count_walk();
        match walk::walk(mem, &ctx, iova, write) {
            Ok(m) => {
                c.insert(ctx.did, iova, m);
                if !exact {
                    last.set(c.seen, iova, &m);
                }
                Ok(m.gpa(iova))
            }
            Err(reason) => {
                drop(c);
                vtd.record_fault(self.sid, iova, !write, reason, ctx.fpd);
                Err(DmaError::Fault {
                    iova,
                    reason,
                    write,
                })
            }
        }
    }

    /// Exact caching: compares what a cached entry gave with the tables in guest memory
    /// now. `cached_ctx` is the context entry taken from the cache (None when it was
    /// just read), `used` the IOTLB entry that served the access (None on a miss).
    fn check_stale(
        &self,
        vtd: &Vtd,
        cached_ctx: Option<Context>,
        used: Option<Mapping>,
        iova: u64,
        write: bool,
    ) {
        let mem = vtd.memory();
        let fresh_ctx = walk::context_entry(mem, vtd.root(), self.sid).ok();
        if let Some(cc) = cached_ctx {
            if fresh_ctx != Some(cc) {
                vtd.report_stale(StaleUse {
                    kind: StaleKind::Context,
                    sid: self.sid,
                    did: cc.did,
                    at: iova & !0xfff,
                });
                return;
            }
        }
        if let Some(m) = used {
            let fresh = fresh_ctx.and_then(|c| walk::walk(mem, &c, iova, write).ok());
            if fresh.map(|f| f.gpa(iova)) != Some(m.gpa(iova)) {
                let did = cached_ctx.or(fresh_ctx).map_or(0, |c| c.did);
                vtd.report_stale(StaleUse {
                    kind: StaleKind::Iotlb,
                    sid: self.sid,
                    did,
                    at: iova & !((1u64 << m.page_shift) - 1),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(gpa_base: u64, page_shift: u32, read: bool, write: bool) -> Mapping {
        Mapping {
            gpa_base,
            page_shift,
            read,
            write,
        }
    }

    #[test]
    fn last_hit_serves_only_its_page_access_and_generation() {
        let l = LastHit::default();
        assert_eq!(l.get(0, 0, false), None, "empty");
        l.set(7, 0x1234, &page(0x9000, 12, true, false));
        assert_eq!(l.get(7, 0x1fff, false), Some(0x9fff));
        assert_eq!(l.get(7, 0x1234, true), None, "read-only page");
        assert_eq!(l.get(7, 0x2000, false), None, "another page");
        assert_eq!(l.get(8, 0x1234, false), None, "an invalidation since");
        l.set(8, 0x4012_3456, &page(0x20_0000, 21, true, true));
        assert_eq!(l.get(8, 0x401f_ffff, true), Some(0x3f_ffff), "2 MiB page");
        l.set(9, 0x8000_0000, &page(0x4000_0000, 30, false, true));
        assert_eq!(l.get(9, 0xbfff_fff0, true), Some(0x7fff_fff0), "1 GiB page");
        assert_eq!(l.get(9, 0xbfff_fff0, false), None, "write-only");
    }

    /// A reader never sees half of one entry and half of another.
    #[test]
    fn last_hit_reads_are_never_torn() {
        let l = Arc::new(LastHit::default());
        let w = {
            let l = l.clone();
            std::thread::spawn(move || {
                for i in 0..200_000u64 {
                    // Page i maps to frame i + 1 at generation i: each field follows i.
                    let iova = i << 12;
                    l.set(i, iova, &page((i + 1) << 12, 12, true, true));
                }
            })
        };
        let mut hits = 0u64;
        while !w.is_finished() {
            let gen = l.gen.load(Ordering::Relaxed);
            if let Some(gpa) = l.get(gen, gen << 12 | 0x10, false) {
                assert_eq!(gpa, ((gen + 1) << 12) | 0x10, "torn at {gen}");
                hits += 1;
            }
        }
        w.join().expect("writer");
        let last = l.gen.load(Ordering::Relaxed);
        assert_eq!(l.get(last, last << 12, false), Some((last + 1) << 12));
        assert!(hits > 0 || last == 199_999, "the reader saw entries");
    }
}
