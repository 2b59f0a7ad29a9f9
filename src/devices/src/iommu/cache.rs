//! How the unit's caches follow invalidations, and the detector of missed ones.
//!
//! Every invalidation the guest issues (CCMD, the IOTLB register, a queued context or
//! IOTLB descriptor) is appended to a short log, [`InvalLog`], whose sequence number is
//! the unit's invalidation generation. Each cache (a [`super::DmaHandle`]'s context
//! entry and IOTLB, a virtio device's vm-memory IOTLB) remembers the generation it has
//! seen; when the generation moves it replays the invalidations it missed, dropping
//! exactly the entries each one covers. A cache more than [`LOG_CAP`] invalidations
//! behind drops everything (counted).
//!
//! - [`CachingMode::Simple`] (the default): every invalidation, and SRTP and a TE
//!   change, drops every cache entry. Correct for any guest, and forgiving: a driver
//!   that invalidates the wrong thing still sees fresh tables.
//! - [`CachingMode::Exact`]: an invalidation drops only what the specification says it
//!   covers (context cache: global, domain, device with its function mask; IOTLB:
//!   global, domain, page-selective with its address mask), and SRTP and TE changes
//!   drop nothing (the specification makes software invalidate after them), so a
//!   driver that forgets one keeps using the stale entry, as on hardware. In this mode
//!   every use of a cached context entry, IOTLB entry or interrupt remapping table
//!   entry is checked against guest memory; a use of an entry whose table changed
//!   without the required invalidation is a [`StaleUse`], counted per cache, kept in a
//!   short history, logged (rate-limited) and traced.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::sync::lock;

/// Invalidations kept for caches that have not caught up yet.
pub const LOG_CAP: usize = 256;
/// Distinct stale uses kept for introspection.
pub const STALE_HISTORY: usize = 64;

/// How the caches follow invalidations (`--iommu intel,caching=simple|exact`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CachingMode {
    /// Any invalidation empties every cache.
    #[default]
    Simple,
    /// Each invalidation drops exactly what it covers; stale uses are detected.
    Exact,
}

/// One invalidation as the caches see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// Every cached entry (simple mode, or a cache that fell behind the log).
    Everything,
    /// All context entries.
    ContextGlobal,
    /// Context entries of one domain.
    ContextDomain(u16),
    /// Context entries of the requesters that match `sid` outside the function mask.
    ContextDevice {
        /// Source ID.
        sid: u16,
        /// Function mask (CCMD/descriptor FM: 0 none, 1 bit 2, 2 bits 2:1, 3 bits 2:0).
        fm: u8,
    },
    /// All IOTLB entries.
    IotlbGlobal,
    /// IOTLB entries of one domain.
    IotlbDomain(u16),
    /// IOTLB entries of `did` that overlap `2^am` pages from `base`.
    IotlbPages {
        /// Domain ID.
        did: u16,
        /// First IOVA (aligned to the range).
        base: u64,
        /// Address mask: the range is `2^am` 4 KiB pages.
        am: u8,
    },
}

impl Invalidation {
    /// A page-selective invalidation of `2^am` pages at `addr` (the address is aligned
    /// down to the range, as hardware ignores the low bits).
    pub fn pages(did: u16, addr: u64, am: u8) -> Self {
        let am = am.min(MAX_AM);
        let size = range_size(am);
        Self::IotlbPages {
            did,
            base: addr & !(size - 1),
            am,
        }
    }

    /// Whether it drops the context entry of requester `sid` in domain `did`.
    pub fn drops_context(&self, sid: u16, did: u16) -> bool {
        match *self {
            Self::Everything | Self::ContextGlobal => true,
            Self::ContextDomain(d) => d == did,
            Self::ContextDevice { sid: s, fm } => {
                let fm = u16::from(fm.min(3));
                let mask = ((1u16 << fm) - 1) << (3 - fm);
                s & !mask == sid & !mask
            }
            _ => false,
        }
    }

    /// Whether it drops an IOTLB entry of domain `did` for the page of `2^page_shift`
    /// bytes that holds `iova`.
    pub fn drops_iotlb(&self, did: u16, iova: u64, page_shift: u32) -> bool {
        match *self {
            Self::Everything | Self::IotlbGlobal => true,
            Self::IotlbDomain(d) => d == did,
            Self::IotlbPages { did: d, base, am } => {
                if d != did {
                    return false;
                }
                let size = range_size(am);
                let page = 1u64 << page_shift.min(63);
                let start = iova & !(page - 1);
                start <= base.saturating_add(size - 1) && base <= start.saturating_add(page - 1)
            }
            _ => false,
        }
    }

    /// What it was, in words.
    pub fn describe(&self) -> String {
        match *self {
            Self::Everything => "everything".into(),
            Self::ContextGlobal => "global context-cache invalidation".into(),
            Self::ContextDomain(d) => format!("context-cache invalidation of domain {d}"),
            Self::ContextDevice { sid, fm } => {
                format!("context-cache invalidation of {} (FM {fm})", bdf(sid))
            }
            Self::IotlbGlobal => "global IOTLB invalidation".into(),
            Self::IotlbDomain(d) => format!("IOTLB invalidation of domain {d}"),
            Self::IotlbPages { did, base, am } => {
                format!("IOTLB invalidation of domain {did} at {base:#x} (AM {am})")
            }
        }
    }
}

/// Largest address mask kept (2^51 pages: the whole 64-bit space).
const MAX_AM: u8 = 51;

/// Bytes covered by an address mask.
fn range_size(am: u8) -> u64 {
    1u64 << (12 + u32::from(am.min(MAX_AM)))
}

/// The recent invalidations, numbered.
#[derive(Debug, Default)]
pub struct InvalLog {
    ring: VecDeque<(u64, Invalidation)>,
    latest: u64,
    /// Caches that fell more than [`LOG_CAP`] behind and dropped everything.
    pub overruns: u64,
}

impl InvalLog {
    /// Appends `inv`; returns its sequence number (the new generation).
    pub fn push(&mut self, inv: Invalidation) -> u64 {
        self.latest += 1;
        if self.ring.len() == LOG_CAP {
            self.ring.pop_front();
        }
        self.ring.push_back((self.latest, inv));
        self.latest
    }

    /// The newest sequence number.
    pub fn latest(&self) -> u64 {
        self.latest
    }

    /// Calls `apply` with every invalidation after `seen` (or once with
    /// [`Invalidation::Everything`] when some of them have left the ring); returns the
    /// generation the cache is now at.
    pub fn replay(&mut self, seen: u64, mut apply: impl FnMut(&Invalidation)) -> u64 {
        if seen >= self.latest {
            return self.latest;
        }
        match self.ring.front() {
            Some((first, _)) if *first <= seen + 1 => {
                for (_, inv) in self.ring.iter().filter(|(n, _)| *n > seen) {
                    apply(inv);
                }
            }
            _ => {
                self.overruns += 1;
                crate::limits::hit(crate::limits::Cap::InvalidationLog);
                apply(&Invalidation::Everything);
            }
        }
        self.latest
    }
}

/// Which cache held the stale entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StaleKind {
    /// A context-cache entry (the root or context entry changed).
    Context,
    /// An IOTLB entry (a page-table entry changed).
    Iotlb,
    /// An interrupt entry cache entry (an IRTE changed).
    Irte,
}

impl StaleKind {
    /// All kinds, in counter order.
    pub const ALL: [StaleKind; 3] = [Self::Context, Self::Iotlb, Self::Irte];

    /// Short name: "context", "iotlb", "irte".
    pub fn name(self) -> &'static str {
        match self {
            Self::Context => "context",
            Self::Iotlb => "iotlb",
            Self::Irte => "irte",
        }
    }
}

/// A use of a cached entry whose table in guest memory changed without the
/// invalidation that would have refreshed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaleUse {
    /// Which cache.
    pub kind: StaleKind,
    /// Requester ID (the IOAPIC's for its messages).
    pub sid: u16,
    /// Domain ID of the cached context entry (0 for IRTEs).
    pub did: u16,
    /// The IOVA page (IOTLB, context) or the IRTE index.
    pub at: u64,
}

impl StaleUse {
    /// The invalidation that was missing.
    pub fn missing(&self) -> String {
        match self.kind {
            StaleKind::Context => format!(
                "a context-cache invalidation of {} (device-selective), of domain {} or global, then an IOTLB invalidation of the domain",
                bdf(self.sid),
                self.did
            ),
            StaleKind::Iotlb => format!(
                "an IOTLB invalidation of domain {} covering IOVA {:#x} (page-selective), of the domain or global",
                self.did, self.at
            ),
            StaleKind::Irte => format!(
                "an interrupt entry cache invalidation of index {} (index-selective) or global",
                self.at
            ),
        }
    }

    /// One line: what was used, and what was missing.
    pub fn describe(&self) -> String {
        let what = match self.kind {
            StaleKind::Context => format!(
                "stale context entry of {} (domain {}) used at IOVA {:#x}",
                bdf(self.sid),
                self.did,
                self.at
            ),
            StaleKind::Iotlb => format!(
                "stale IOTLB entry of {} (domain {}) used at IOVA {:#x}",
                bdf(self.sid),
                self.did,
                self.at
            ),
            StaleKind::Irte => format!(
                "stale IRTE {} used by an interrupt from {}",
                self.at,
                bdf(self.sid)
            ),
        };
        format!("{what}; missing: {}", self.missing())
    }
}

/// One entry of the stale-use history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaleRecord {
    /// The use.
    pub what: StaleUse,
    /// Microseconds since the unit was created, of the latest use.
    pub last_us: u64,
    /// Uses of this entry while stale.
    pub uses: u64,
}

/// Stale-use counters and the history of distinct ones.
#[derive(Debug, Default)]
pub struct StaleLog {
    counts: [AtomicU64; 3],
    recent: Mutex<VecDeque<StaleRecord>>,
}

impl StaleLog {
    /// Counts a use; returns true when it is the first use of that stale entry in the
    /// history (worth a log line).
    pub fn record(&self, u: StaleUse, now_us: u64) -> bool {
        self.counts[u.kind as usize].fetch_add(1, Ordering::Relaxed);
        let mut r = lock(&self.recent);
        if let Some(i) = r.iter().position(|x| x.what == u) {
            if let Some(mut rec) = r.remove(i) {
                rec.uses += 1;
                rec.last_us = now_us;
                r.push_back(rec);
            }
            return false;
        }
        if r.len() == STALE_HISTORY {
            r.pop_front();
            crate::limits::hit(crate::limits::Cap::StaleHistory);
        }
        r.push_back(StaleRecord {
            what: u,
            last_us: now_us,
            uses: 1,
        });
        true
    }

    /// Uses counted per kind (context, IOTLB, IRTE).
    pub fn counts(&self) -> [u64; 3] {
        [0, 1, 2].map(|i| self.counts[i].load(Ordering::Relaxed))
    }

    /// The distinct stale entries used lately, oldest first.
    pub fn history(&self) -> Vec<StaleRecord> {
        lock(&self.recent).iter().copied().collect()
    }
}

fn bdf(sid: u16) -> String {
    format!("{:02x}:{:02x}.{}", sid >> 8, (sid >> 3) & 0x1f, sid & 7)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        let p = Invalidation::pages(3, 0x1fff, 1);
        assert_eq!(
            p,
            Invalidation::IotlbPages {
                did: 3,
                base: 0,
                am: 1
            }
        );
        assert!(p.drops_iotlb(3, 0x1000, 12));
        assert!(!p.drops_iotlb(3, 0x2000, 12));
        assert!(!p.drops_iotlb(4, 0x1000, 12));
        // A 2 MiB entry that holds the range is dropped too.
        assert!(p.drops_iotlb(3, 0x10_0000, 21));
        assert!(!p.drops_context(0x08, 3));
        // FM 2 masks function bits 2:1: 00:01.0 and 00:01.6 match, 00:01.1 does not.
        let d = Invalidation::ContextDevice { sid: 0x08, fm: 2 };
        assert!(d.drops_context(0x0e, 0));
        assert!(!d.drops_context(0x09, 0));
        assert!(!d.drops_iotlb(0, 0, 12));
        assert!(Invalidation::ContextDomain(5).drops_context(0x10, 5));
        assert!(!Invalidation::ContextDomain(5).drops_context(0x10, 6));
        assert!(Invalidation::IotlbDomain(5).drops_iotlb(5, 1 << 40, 30));
        assert!(Invalidation::pages(1, 0x1234_5000, 63).drops_iotlb(1, 0, 12));
        assert!(!Invalidation::pages(1, u64::MAX, 63).drops_iotlb(1, 0, 12));
    }

    #[test]
    fn log_replays_or_drops_everything() {
        let mut l = InvalLog::default();
        l.push(Invalidation::IotlbDomain(1));
        l.push(Invalidation::IotlbDomain(2));
        let mut seen = vec![];
        assert_eq!(l.replay(1, |i| seen.push(*i)), 2);
        assert_eq!(seen, vec![Invalidation::IotlbDomain(2)]);
        for _ in 0..LOG_CAP {
            l.push(Invalidation::ContextGlobal);
        }
        let mut seen = vec![];
        l.replay(1, |i| seen.push(*i));
        assert_eq!((seen, l.overruns), (vec![Invalidation::Everything], 1));
        assert_eq!(l.replay(l.latest(), |_| panic!("nothing new")), l.latest());
    }

    #[test]
    fn stale_history_is_bounded_and_merged() {
        let s = StaleLog::default();
        let u = |at| StaleUse {
            kind: StaleKind::Iotlb,
            sid: 8,
            did: 1,
            at,
        };
        assert!(s.record(u(0), 1));
        assert!(!s.record(u(0), 2));
        for i in 1..200 {
            s.record(u(i << 12), 3);
        }
        let h = s.history();
        assert_eq!(h.len(), STALE_HISTORY);
        assert_eq!(s.counts(), [0, 201, 0]);
        assert!(u(0x5000)
            .describe()
            .contains("IOTLB invalidation of domain 1"));
    }
}
