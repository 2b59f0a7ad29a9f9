//! The DMA API of device models: one [`DmaHandle`] per requester ID.
//!
//! With translation off (or no IOMMU at all) an access goes straight to guest memory.
//! With translation on, every page the access touches is translated first (per-handle
//! cache, then the walk); only when all of them are allowed are bytes moved, so a
//! faulting request writes nothing and reads nothing. One fault is recorded per request,
//! at the first page that failed.

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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
}

/// Direct-mapped slots per page size in a handle's IOTLB.
const TLB_SLOTS: usize = 64;
/// Page sizes cached: 4 KiB, 2 MiB, 1 GiB.
const SHIFTS: [u32; 3] = [12, 21, 30];

/// Cached translations of one requester, valid for one invalidation generation: the
/// context entry and a direct-mapped IOTLB per page size (tag = IOVA >> page shift).
struct Cache {
    generation: u64,
    context: Option<Context>,
    tlb: [[Option<(u64, Mapping)>; TLB_SLOTS]; 3],
}

impl Default for Cache {
    fn default() -> Self {
        Self {
            generation: 0,
            context: None,
            tlb: [[None; TLB_SLOTS]; 3],
        }
    }
}

impl Cache {
    fn lookup(&self, iova: u64, write: bool) -> Option<u64> {
        for (i, shift) in SHIFTS.iter().enumerate() {
            let tag = iova >> shift;
            if let Some((t, m)) = &self.tlb[i][tag as usize % TLB_SLOTS] {
                if *t == tag && ((write && m.write) || (!write && m.read)) {
                    return Some(m.gpa(iova));
                }
            }
        }
        None
    }

    fn insert(&mut self, iova: u64, m: Mapping) {
        let i = SHIFTS.iter().position(|s| *s == m.page_shift).unwrap_or(0);
        let tag = iova >> m.page_shift;
        self.tlb[i][tag as usize % TLB_SLOTS] = Some((tag, m));
    }

    fn clear(&mut self, generation: u64) {
        self.generation = generation;
        self.context = None;
        self.tlb = [[None; TLB_SLOTS]; 3];
    }
}

/// A device's path to guest memory.
pub struct DmaHandle {
    sid: u16,
    inner: Inner,
}

enum Inner {
    Direct(GuestMemoryMmap),
    Translated {
        vtd: Arc<Vtd>,
        cache: Box<Mutex<Cache>>,
        requests: Arc<std::sync::atomic::AtomicU64>,
    },
}

impl DmaHandle {
    /// A handle without an IOMMU: IOVA = guest-physical address.
    pub fn direct(mem: GuestMemoryMmap, sid: u16) -> Self {
        Self {
            sid,
            inner: Inner::Direct(mem),
        }
    }

    pub(super) fn translated(vtd: Arc<Vtd>, sid: u16) -> Self {
        let requests = vtd.request_counter();
        Self {
            sid,
            inner: Inner::Translated {
                vtd,
                cache: Box::new(Mutex::new(Cache::default())),
                requests,
            },
        }
    }

    /// The requester ID.
    pub fn sid(&self) -> u16 {
        self.sid
    }

    /// Reads guest memory at `iova` into `buf` (a device read: "DMA Read").
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
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
            Inner::Direct(m) => m,
            Inner::Translated { vtd, .. } => vtd.memory(),
        }
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
    pub fn translate(&self, iova: u64, write: bool) -> Result<u64, DmaError> {
        let (vtd, cache) = match &self.inner {
            Inner::Direct(_) => return Ok(iova),
            Inner::Translated { vtd, cache, .. } => (vtd, cache),
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
        let generation = vtd.generation();
        let mut c = lock(cache);
        if c.generation != generation {
            c.clear(generation);
        }
        if let Some(gpa) = c.lookup(iova, write) {
            return Ok(gpa);
        }
        let mem = vtd.memory();
        vtd.count_walk();
        let ctx = match c.context {
            Some(ctx) => ctx,
            None => match walk::context_entry(mem, vtd.root(), self.sid) {
                Ok(ctx) => {
                    c.context = Some(ctx);
                    ctx
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
        match walk::walk(mem, &ctx, iova, write) {
            Ok(m) => {
                c.insert(iova, m);
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
}
