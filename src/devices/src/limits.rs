//! Caps on everything a guest or an API client can make faultvisor grow.
//!
//! Every structure whose size a guest or client drives is bounded where it is born: a
//! ring of N, a map of at most M entries, at most K log lines per call site and window.
//! Hitting a cap is never silent: [`hit`] counts it (served as `caps` in `GET
//! /v1/stats` and as `faultvisor_cap_hits_total` in `GET /metrics`) and logs it once.
//! [`ALL`] lists every cap with its limit and what happens there; the README's table is
//! checked against it by a unit test.

use std::sync::atomic::{AtomicU64, Ordering};

/// One cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum Cap {
    /// Log lines per call site once the guest runs.
    LogLines,
    /// Mappings in one virtio device's IOTLB (vm-memory's `Iotlb` never evicts).
    VirtioIotlb,
    /// Bytes a virtio-rng notification serves on the notifying thread.
    VirtioRngBytes,
    /// Boot-timer marks kept.
    BootTimerMarks,
    /// Interrupt fault-injection rules armed at once.
    IrqRules,
    /// Delayed or duplicated interrupts waiting for delivery.
    PendingIrqs,
    /// Interrupt storms running at once.
    IrqStorms,
    /// Long API jobs (fault storms) queued or running.
    ApiJobs,
    /// Open API connections.
    ApiConnections,
    /// Connections past [`Cap::ApiConnections`] that still get a 503.
    ApiRejects,
    /// Bytes of one request head.
    ApiHead,
    /// Bytes of one request body.
    ApiBody,
    /// Injected "invalid context" faults armed per device.
    ContextFaults,
    /// Events kept by the timeline.
    Timeline,
    /// Console and VMM-log bytes a campaign keeps per VM.
    CampaignOutput,
    /// Interrupt messages KVM refused to route (delivered as hardware would: dropped).
    RefusedRoutes,
    /// Invalidations kept for caches that have not caught up.
    InvalidationLog,
    /// Distinct stale cache entries kept in the history (`caching=exact`).
    StaleHistory,
    /// Unflushed bytes a disk's volatile cache holds.
    DiskCache,
    /// Bytes or segments of one virtio-blk request.
    BlkRequest,
}

/// What a cap is, for the README table and the metrics.
#[derive(Clone, Copy, Debug)]
pub struct CapInfo {
    /// The cap.
    pub cap: Cap,
    /// Its name in metrics (`snake_case`).
    pub name: &'static str,
    /// The limit, in words.
    pub limit: &'static str,
    /// What happens at the limit.
    pub at_cap: &'static str,
}

/// Every cap, in [`Cap`] order.
pub const ALL: [CapInfo; 20] = [
    CapInfo {
        cap: Cap::LogLines,
        name: "log_lines",
        limit: "10 lines per call site per 5 s once the guest runs",
        at_cap: "further lines are counted; the next line that passes says how many were suppressed",
    },
    CapInfo {
        cap: Cap::VirtioIotlb,
        name: "virtio_iotlb",
        limit: "4096 mappings per virtio device",
        at_cap: "the device's IOTLB is emptied and refilled from the page tables",
    },
    CapInfo {
        cap: Cap::VirtioRngBytes,
        name: "virtio_rng_bytes",
        limit: "256 KiB per notification",
        at_cap: "the rest of the queue is served on the next notification or worker pass",
    },
    CapInfo {
        cap: Cap::BootTimerMarks,
        name: "boot_timer_marks",
        limit: "16 marks",
        at_cap: "later marks are counted, not kept or logged",
    },
    CapInfo {
        cap: Cap::IrqRules,
        name: "irq_rules",
        limit: "64 armed interrupt rules",
        at_cap: "POST /v1/inject answers 429 naming the field",
    },
    CapInfo {
        cap: Cap::PendingIrqs,
        name: "pending_irqs",
        limit: "65536 delayed or duplicated interrupts armed",
        at_cap: "POST /v1/inject answers 429 naming count (or copies)",
    },
    CapInfo {
        cap: Cap::IrqStorms,
        name: "irq_storms",
        limit: "4 interrupt storms at once",
        at_cap: "POST /v1/inject answers 429 naming fault",
    },
    CapInfo {
        cap: Cap::ApiJobs,
        name: "api_jobs",
        limit: "4 long jobs (fault storms) queued or running",
        at_cap: "POST /v1/inject answers 429 naming fault",
    },
    CapInfo {
        cap: Cap::ApiConnections,
        name: "api_connections",
        limit: "64 open connections",
        at_cap: "a new client gets a JSON 503 and the connection is closed",
    },
    CapInfo {
        cap: Cap::ApiRejects,
        name: "api_rejects",
        limit: "16 connections being refused at once",
        at_cap: "further clients are closed without a reply",
    },
    CapInfo {
        cap: Cap::ApiHead,
        name: "api_head",
        limit: "8 KiB request head",
        at_cap: "431, connection closed",
    },
    CapInfo {
        cap: Cap::ApiBody,
        name: "api_body",
        limit: "64 KiB request body",
        at_cap: "413, connection closed",
    },
    CapInfo {
        cap: Cap::ContextFaults,
        name: "context_faults",
        limit: "1000000 armed per device",
        at_cap: "POST /v1/inject answers 429 naming count",
    },
    CapInfo {
        cap: Cap::Timeline,
        name: "timeline",
        limit: "65536 events",
        at_cap: "the oldest events are overwritten",
    },
    CapInfo {
        cap: Cap::CampaignOutput,
        name: "campaign_output",
        limit: "1 MiB of console and 1 MiB of VMM log per VM",
        at_cap: "the first 512 KiB and the last 512 KiB are kept, the cut is marked",
    },
    CapInfo {
        cap: Cap::RefusedRoutes,
        name: "refused_routes",
        limit: "routes KVM refuses (e.g. reserved address bits)",
        at_cap: "the route table stays as it was; the message is dropped, as hardware drops an MSI to no destination",
    },
    CapInfo {
        cap: Cap::InvalidationLog,
        name: "invalidation_log",
        limit: "256 invalidations a cache may lag behind",
        at_cap: "a cache further behind drops all its entries (over-invalidation, never a stale hit)",
    },
    CapInfo {
        cap: Cap::StaleHistory,
        name: "stale_history",
        limit: "64 distinct stale entries in the history",
        at_cap: "the oldest leaves the history; every use is still counted",
    },
    CapInfo {
        cap: Cap::DiskCache,
        name: "disk_cache",
        limit: "64 MiB of unflushed writes per disk (cache=volatile)",
        at_cap: "the cache is written back and synced, as a disk with a full cache does",
    },
    CapInfo {
        cap: Cap::BlkRequest,
        name: "blk_request",
        limit: "4 MiB of data, 32 discard or write-zeroes segments per virtio-blk request",
        at_cap: "the request completes with VIRTIO_BLK_S_IOERR and nothing is written",
    },
];

static HITS: [AtomicU64; ALL.len()] = [const { AtomicU64::new(0) }; ALL.len()];

/// The description of `cap`.
pub fn info(cap: Cap) -> &'static CapInfo {
    &ALL[cap as usize]
}

/// Counts one hit of `cap`; the first one is logged at `warn`.
pub fn hit(cap: Cap) {
    hits_n(cap, 1);
}

/// Counts `n` hits of `cap` at once.
pub fn hits_n(cap: Cap, n: u64) {
    if n == 0 {
        return;
    }
    let before = HITS[cap as usize].fetch_add(n, Ordering::Relaxed);
    if before == 0 && cap != Cap::LogLines {
        let i = info(cap);
        log::warn!(
            "cap reached: {} ({}): {}; further hits are counted in the metrics",
            i.name,
            i.limit,
            i.at_cap
        );
    }
}

/// Hits of `cap` so far.
pub fn hits(cap: Cap) -> u64 {
    HITS[cap as usize].load(Ordering::Relaxed)
}

/// Every cap with its hits, in [`ALL`] order.
pub fn snapshot() -> Vec<(&'static CapInfo, u64)> {
    ALL.iter().map(|i| (i, hits(i.cap))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_in_enum_order_and_names_are_unique() {
        for (i, c) in ALL.iter().enumerate() {
            assert_eq!(c.cap as usize, i, "{}", c.name);
            assert!(c
                .name
                .chars()
                .all(|ch| ch.is_ascii_lowercase() || ch == '_'));
        }
        let mut names: Vec<_> = ALL.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
    }

    #[test]
    fn hits_are_counted() {
        let before = hits(Cap::BootTimerMarks);
        hit(Cap::BootTimerMarks);
        hits_n(Cap::BootTimerMarks, 3);
        assert_eq!(hits(Cap::BootTimerMarks), before + 4);
    }

    #[test]
    fn readme_lists_every_cap() {
        let readme = include_str!("../../../README.md");
        for c in ALL {
            assert!(
                readme.contains(&format!("`{}`", c.name)),
                "README.md has no row for the cap `{}`",
                c.name
            );
        }
    }
}
