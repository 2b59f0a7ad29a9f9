//! Counting and rate-limited logging of guest anomalies (bad register accesses).
//!
//! A hostile guest can hit a bad offset millions of times; we count every occurrence
//! and log only the first few of each device, so the log cannot be flooded.

use std::sync::atomic::{AtomicU64, Ordering};

/// How many anomalies of one device are logged at `warn` before going quiet.
const LOGGED_PER_DEVICE: u64 = 8;

/// A per-device counter of guest accesses that the device had to refuse.
#[derive(Debug, Default)]
pub struct GuestAnomalies {
    count: AtomicU64,
}

impl GuestAnomalies {
    /// Creates a counter at zero.
    pub const fn new() -> Self {
        Self {
            count: AtomicU64::new(0),
        }
    }

    /// Records one anomaly; logs it while the device is under its log budget.
    pub fn record(&self, device: &str, what: std::fmt::Arguments<'_>) {
        let n = self.count.fetch_add(1, Ordering::Relaxed);
        if n < LOGGED_PER_DEVICE {
            log::warn!("{device}: ignored guest access: {what}");
        } else if n == LOGGED_PER_DEVICE {
            log::warn!("{device}: further ignored guest accesses are counted, not logged");
        } else {
            log::debug!("{device}: ignored guest access: {what}");
        }
    }

    /// Number of anomalies recorded so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_occurrence() {
        let a = GuestAnomalies::new();
        for i in 0..100 {
            a.record("test", format_args!("access {i}"));
        }
        assert_eq!(a.count(), 100);
    }
}
