//! The VT-d unit seen through vm-memory's IOMMU interface, so that rust-vmm code that
//! takes a [`vm_memory::GuestMemory`] — `virtio-queue` in particular — reads descriptors,
//! rings and buffers at IOVAs that this unit translates, with faults recorded as for any
//! other DMA.
//!
//! [`DeviceIommu`] is one requester's view: a vm-memory [`Iotlb`] filled from the page
//! tables on misses. When the unit's invalidation generation moves it replays the
//! invalidations it missed: in simple caching mode each one empties the IOTLB; in
//! exact mode it drops the mappings each IOTLB invalidation covers (it keeps a shadow
//! of every mapping's domain and page for that), and every hit is checked against the
//! page tables by the stale-use detector (the first [`STALE_CHECK_PAGES`] pages of an
//! access). It caches no context entry, so context-cache invalidations do not concern
//! it. With translation off it maps IOVA = guest-physical address; those identity
//! mappings are dropped whenever TE changes. vm-memory's `Iotlb` never evicts, so this
//! view counts the mappings it adds and empties the IOTLB at [`MAX_MAPPINGS`] (a guest
//! offering millions of one-byte buffers on distinct pages cannot grow it). The
//! interrupt address range is never translated: a ring or buffer there is refused.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use vm_memory::iommu::{Error, Iommu, IommuMemory, Iotlb, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, GuestMemoryMmap, Permissions};

use super::cache::{Invalidation, StaleKind, StaleUse};
use super::Vtd;
use crate::sync::lock;

/// Mappings one device's IOTLB holds before it is emptied.
pub const MAX_MAPPINGS: usize = 4096;
/// Pages of one access the stale-use detector checks (exact caching).
pub const STALE_CHECK_PAGES: u64 = 64;

/// Where one IOTLB mapping came from (exact caching).
#[derive(Clone, Copy, Debug)]
struct Shadow {
    did: u16,
    shift: u32,
    gpa_base: u64,
}

/// Guest memory as one device sees it (IOVAs when the unit translates).
pub type DeviceMemory = IommuMemory<GuestMemoryMmap, DeviceIommu>;

/// One requester ID's translation through the unit.
pub struct DeviceIommu {
    vtd: Option<Arc<Vtd>>,
    requests: Option<Arc<AtomicU64>>,
    sid: u16,
    iotlb: RwLock<Iotlb>,
    generation: AtomicU64,
    /// Whether the IOTLB was filled with translation on (else it holds identity maps).
    translating: AtomicBool,
    /// Mappings added since the IOTLB was last emptied.
    mappings: std::sync::atomic::AtomicUsize,
    /// Exact caching: page IOVA → the mapping's domain, size and target.
    shadow: Mutex<BTreeMap<u64, Shadow>>,
}

impl fmt::Debug for DeviceIommu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceIommu(sid {:#06x})", self.sid)
    }
}

impl DeviceIommu {
    /// The view of requester `sid` (no unit: IOVA = guest-physical address).
    pub fn new(vtd: Option<Arc<Vtd>>, sid: u16) -> Self {
        Self {
            generation: AtomicU64::new(vtd.as_ref().map_or(0, |v| v.generation())),
            requests: vtd.as_ref().map(|v| v.request_counter(sid)),
            vtd,
            sid,
            iotlb: RwLock::new(Iotlb::new()),
            translating: AtomicBool::new(false),
            mappings: std::sync::atomic::AtomicUsize::new(0),
            shadow: Mutex::new(BTreeMap::new()),
        }
    }

    /// Guest memory for device `sid`, ready for `virtio-queue`: through `vtd` when it
    /// is given and `use_iommu` (the driver accepted VIRTIO_F_ACCESS_PLATFORM), else
    /// straight to `mem`.
    pub fn memory(
        mem: &GuestMemoryMmap,
        vtd: Option<&Arc<Vtd>>,
        sid: u16,
        use_iommu: bool,
    ) -> DeviceMemory {
        // No dirty-page logging: the bitmap type is `()`.
        IommuMemory::new(
            mem.clone(),
            Self::new(vtd.cloned(), sid),
            use_iommu && vtd.is_some(),
            (),
        )
    }

    fn write_tlb(&self) -> std::sync::RwLockWriteGuard<'_, Iotlb> {
        self.iotlb.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes room for `pages` mappings: empties the IOTLB when they would not fit. Done
    /// once before a fill, never in the middle of one (emptying it there would drop the
    /// mappings of the range being filled, and the lookup after the fill would fail).
    fn reserve(&self, pages: usize) {
        if self.mappings.load(Ordering::Acquire).saturating_add(pages) <= MAX_MAPPINGS {
            return;
        }
        let mut tlb = self.write_tlb();
        tlb.invalidate_all();
        lock(&self.shadow).clear();
        self.mappings.store(0, Ordering::Release);
        crate::limits::hit(crate::limits::Cap::VirtioIotlb);
    }

    /// Adds one mapping (of domain `did` when translated).
    fn add_mapping(
        &self,
        iova: u64,
        gpa: u64,
        len: usize,
        perm: Permissions,
        did: Option<u16>,
    ) -> Result<(), Error> {
        let mut tlb = self.write_tlb();
        let exact = self.vtd.as_ref().is_some_and(|v| v.exact());
        self.mappings.fetch_add(1, Ordering::AcqRel);
        if let (true, Some(did)) = (exact, did) {
            lock(&self.shadow).insert(
                iova,
                Shadow {
                    did,
                    shift: len.trailing_zeros(),
                    gpa_base: gpa,
                },
            );
        }
        tlb.set_mapping(GuestAddress(iova), GuestAddress(gpa), len, perm)
    }

    /// Brings the IOTLB up to the unit's invalidations and translation state.
    fn sync(&self, v: &Vtd) {
        let te = v.translating();
        let te_moved = self.translating.load(Ordering::Acquire) != te;
        if !te_moved && self.generation.load(Ordering::Acquire) == v.generation() {
            return;
        }
        let mut tlb = self.write_tlb();
        let mut shadow = lock(&self.shadow);
        if self.translating.swap(te, Ordering::AcqRel) != te {
            tlb.invalidate_all();
            shadow.clear();
            self.mappings.store(0, Ordering::Release);
        }
        let seen = self.generation.load(Ordering::Acquire);
        let now = v.replay(seen, |inv| {
            if matches!(inv, Invalidation::Everything | Invalidation::IotlbGlobal) || !v.exact() {
                tlb.invalidate_all();
                shadow.clear();
                self.mappings.store(0, Ordering::Release);
                return;
            }
            shadow.retain(|&page, e| {
                let keep = !inv.drops_iotlb(e.did, page, e.shift);
                if !keep {
                    tlb.invalidate_mapping(GuestAddress(page), 1usize << e.shift);
                    self.mappings.fetch_sub(1, Ordering::AcqRel);
                }
                keep
            });
        });
        self.generation.store(now, Ordering::Release);
    }

    /// Exact caching: checks the pages of an access the IOTLB served against the page
    /// tables in guest memory.
    fn check_stale(&self, v: &Vtd, iova: u64, length: usize, write: bool) {
        let shadow = lock(&self.shadow);
        let end = iova.saturating_add(length.max(1) as u64);
        let mut at = iova;
        for _ in 0..STALE_CHECK_PAGES {
            if at >= end {
                break;
            }
            let Some((&page, e)) = shadow.range(..=at).next_back() else {
                break;
            };
            let size = 1u64 << e.shift;
            if at - page >= size {
                break;
            }
            let cached = e.gpa_base | (at - page);
            let fresh = v.peek(self.sid, at, write).map(|(_, m)| m.gpa(at));
            if fresh != Some(cached) {
                v.report_stale(StaleUse {
                    kind: StaleKind::Iotlb,
                    sid: self.sid,
                    did: e.did,
                    at: page,
                });
            }
            at = page.saturating_add(size);
        }
    }

    /// Mappings held now (at most [`MAX_MAPPINGS`]).
    pub fn mappings(&self) -> usize {
        self.mappings.load(Ordering::Acquire)
    }

    fn read_tlb(&self) -> RwLockReadGuard<'_, Iotlb> {
        self.iotlb.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Fills the IOTLB for `[iova, iova + len)` from the page tables; records a fault and
    /// fails at the first page refused.
    fn fill(&self, iova: u64, len: u64, access: Permissions) -> Result<(), Error> {
        let (read, write) = match access {
            Permissions::No => (false, false),
            Permissions::Read => (true, false),
            Permissions::Write => (false, true),
            Permissions::ReadWrite => (true, true),
        };
        let end = iova + len;
        let Some(vtd) = self.vtd.as_ref().filter(|v| v.translating()) else {
            // Identity (translation off): the whole range, page-aligned, as one mapping.
            self.reserve(1);
            let start = iova & !0xfff;
            let stop = end.saturating_add(0xfff) & !0xfff;
            return self.add_mapping(
                start,
                start,
                (stop.max(start + 0x1000) - start) as usize,
                Permissions::ReadWrite,
                None,
            );
        };
        // Room for every 4 KiB page of the range (larger pages need fewer).
        let pages = (((end.max(iova + 1) - 1) >> 12) - (iova >> 12) + 1) as usize;
        self.reserve(pages);
        // One walk per leaf table (see Vtd::resolve_range), one IOTLB lock per fill.
        let mut tlb = self.write_tlb();
        let mut shadow = vtd.exact().then(|| lock(&self.shadow));
        let mut added: Result<(), Error> = Ok(());
        let mut at = iova;
        let walked = vtd.resolve_range(self.sid, iova, end, read, write, |m, did| {
            let size = 1u64 << m.page_shift;
            let page = at & !(size - 1);
            at = page.saturating_add(size);
            let perm = match (m.read, m.write) {
                (true, true) => Permissions::ReadWrite,
                (true, false) => Permissions::Read,
                (false, true) => Permissions::Write,
                (false, false) => Permissions::No,
            };
            self.mappings.fetch_add(1, Ordering::AcqRel);
            if let Some(sh) = shadow.as_mut() {
                sh.insert(
                    page,
                    Shadow {
                        did,
                        shift: m.page_shift,
                        gpa_base: m.gpa_base,
                    },
                );
            }
            if added.is_ok() {
                added = tlb.set_mapping(
                    GuestAddress(page),
                    GuestAddress(m.gpa_base),
                    size as usize,
                    perm,
                );
            }
        });
        walked.map_err(|(at, reason)| Error::CannotResolve {
            iova_range: IovaRange {
                base: GuestAddress(iova),
                length: len as usize,
            },
            reason: format!(
                "VT-d fault {:#x} ({}) at {at:#x}",
                reason as u8,
                reason.linux_text()
            ),
        })?;
        added
    }
}

impl Iommu for DeviceIommu {
    type IotlbGuard<'a> = RwLockReadGuard<'a, Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, Error> {
        let range = IovaRange { base: iova, length };
        // A guest-chosen address near the top must not wrap.
        if iova.0.checked_add(length as u64).is_none() {
            return Err(Error::CannotResolve {
                iova_range: range,
                reason: "range wraps around the address space".into(),
            });
        }
        if let (Some(c), Some(v)) = (&self.requests, &self.vtd) {
            if v.translating() {
                c.fetch_add(1, Ordering::Relaxed);
                v.trace(|| crate::timeline::EventKind::Dma {
                    sid: self.sid,
                    iova: iova.0,
                    len: length as u64,
                    write: matches!(access, Permissions::Write | Permissions::ReadWrite),
                });
            }
        }
        if super::dma::touches_interrupt_range(iova.0, length) {
            return Err(Error::CannotResolve {
                iova_range: range,
                reason: "the interrupt address range is not translated".into(),
            });
        }
        if let Some(v) = &self.vtd {
            self.sync(v);
        }
        if let Ok(it) = Iotlb::lookup(self.read_tlb(), iova, length, access) {
            if let Some(v) = self.vtd.as_ref().filter(|v| v.exact() && v.translating()) {
                let write = matches!(access, Permissions::Write | Permissions::ReadWrite);
                self.check_stale(v, iova.0, length, write);
            }
            return Ok(it);
        }
        self.fill(iova.0, length as u64, access)?;
        Iotlb::lookup(self.read_tlb(), iova, length, access).map_err(|_| Error::CannotResolve {
            iova_range: range,
            reason: "not mapped after an IOTLB fill".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::RecordingController;
    use vm_memory::{Bytes, GuestMemory};

    #[test]
    fn a_long_range_near_the_cap_is_never_evicted_while_it_is_filled() {
        // The virtio-blk corruption the ext4 Linux-tier job found: the IOTLB was emptied
        // in the middle of filling a multi-page range, whose lookup then failed.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("mem");
        let rec = Arc::new(RecordingController::new(24, 100));
        let vtd = Arc::new(Vtd::new(mem.clone(), rec));
        let dm = DeviceIommu::memory(&mem, Some(&vtd), 0x20, true);
        for i in 0..(MAX_MAPPINGS as u64 - 3) {
            dm.write_obj(1u8, GuestAddress(i * 4096)).expect("page");
        }
        let big = vec![7u8; 1 << 20];
        for round in 0..8u64 {
            dm.write_slice(&big, GuestAddress((32 << 20) + round * 4096 + 17))
                .expect("a 1 MiB range right at the cap");
        }
        assert!(dm.iommu().mappings() <= MAX_MAPPINGS);
    }

    #[test]
    fn reads_and_writes_through_the_unit() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("mem");
        let w = |a: u64, v: u64| mem.write_obj(v, GuestAddress(a)).expect("w");
        let rec = Arc::new(RecordingController::new(24, 100));
        let vtd = Arc::new(Vtd::new(mem.clone(), rec));
        let dm = DeviceIommu::memory(&mem, Some(&vtd), 0x20, true);
        // TE off: identity.
        dm.write_obj(0xabu8, GuestAddress(0x9000))
            .expect("identity");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x9000)).expect("r"), 0xab);
        // Map IOVA 0x1000 -> 0x50_0000 read/write, then turn translation on.
        w(0x10_0000, 0x10_1000 | 1);
        w(0x10_1000 + 0x20 * 16, 0x10_2000 | 1);
        w(0x10_1000 + 0x20 * 16 + 8, 1 | (1 << 8));
        w(0x10_2000, 0x10_3000 | 3);
        w(0x10_3000, 0x10_4000 | 3);
        w(0x10_4000 + 8, 0x50_0000 | 3);
        vtd.write(super::super::reg::RTADDR, &0x10_0000u64.to_le_bytes());
        vtd.write(super::super::reg::GCMD, &(1u32 << 30).to_le_bytes());
        vtd.write(super::super::reg::GCMD, &(1u32 << 31).to_le_bytes());
        dm.write_obj(0x1122_3344u32, GuestAddress(0x1ffc))
            .expect("translated write");
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x50_0ffc)).expect("r"),
            0x1122_3344
        );
        // Unmapped: an error, one fault, nothing written.
        assert!(dm.write_obj(0u32, GuestAddress(0x2000)).is_err());
        let faults: Vec<_> = vtd
            .fault_records()
            .into_iter()
            .filter(|f| f.pending)
            .collect();
        assert_eq!(faults.len(), 1);
        assert_eq!((faults[0].reason, faults[0].page), (5, 0x2000));
        // Identity mappings (translation off) of a million distinct pages stay capped.
        let big = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("mem");
        let vtd2 = Arc::new(Vtd::new(
            big.clone(),
            Arc::new(RecordingController::new(24, 30)),
        ));
        let dm = DeviceIommu::memory(&big, Some(&vtd2), 0x28, true);
        for i in 0..(3 * MAX_MAPPINGS as u64) {
            dm.read_obj::<u8>(GuestAddress(i * 4096)).expect("identity");
        }
        let n = dm.iommu().mappings();
        assert!(n > 0 && n <= MAX_MAPPINGS, "{n} mappings");
        // The interrupt range is never translated.
        assert!(dm.read_obj::<u32>(GuestAddress(0xfee0_0000)).is_err());
        // Hostile ranges do not panic.
        assert!(dm.read_obj::<u64>(GuestAddress(u64::MAX - 3)).is_err());
        assert!(!dm.check_range(
            GuestAddress(u64::MAX - 100),
            200,
            vm_memory::Permissions::Read
        ));
    }
}
