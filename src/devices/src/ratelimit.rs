//! Counting and rate-limited logging of guest anomalies.
//!
//! - [`GuestAnomalies`]: a per-device counter of refused guest accesses that logs only
//!   the first few of each device.
//! - [`LogGate`]: the limiter the VMM's logger puts in front of every line once the
//!   guest runs: at most [`LINES_PER_WINDOW`] lines per call site (file and line) per
//!   [`WINDOW_MS`]; the first line through after a quiet spell says how many were
//!   suppressed. A hostile guest can thus make faultvisor log at a bounded rate only,
//!   whichever path (ours or a crate's, such as virtio-queue) it drives.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use crate::limits::{self, Cap};

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

/// Lines one call site may log per window.
pub const LINES_PER_WINDOW: u64 = 10;
/// The window, in milliseconds.
pub const WINDOW_MS: u64 = 5000;
/// Limiter slots (call sites hash into them; a collision only shares a budget).
const SLOTS: usize = 512;

static GUEST_RUNNING: AtomicBool = AtomicBool::new(false);

/// Marks the start of guest execution: from now on the logger limits every call site.
/// (Set-up messages before, such as one line per device, are not limited.)
pub fn set_guest_running() {
    GUEST_RUNNING.store(true, Ordering::Release);
}

/// Whether [`set_guest_running`] was called.
pub fn guest_running() -> bool {
    GUEST_RUNNING.load(Ordering::Acquire)
}

/// One slot: the current window (start in ms << 16 | lines in it) and the lines
/// suppressed since the last one that passed.
struct Slot {
    window: AtomicU64,
    suppressed: AtomicU64,
}

/// The per-call-site log limiter.
pub struct LogGate {
    epoch: OnceLock<Instant>,
    slots: [Slot; SLOTS],
}

/// What to do with one log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Print it; `suppressed` lines of this call site were dropped before it.
    Pass {
        /// Lines dropped since the last one printed.
        suppressed: u64,
    },
    /// Drop it (counted).
    Drop,
}

impl Default for LogGate {
    fn default() -> Self {
        Self::new()
    }
}

impl LogGate {
    /// A limiter with every budget full.
    pub const fn new() -> Self {
        Self {
            epoch: OnceLock::new(),
            slots: [const {
                Slot {
                    window: AtomicU64::new(0),
                    suppressed: AtomicU64::new(0),
                }
            }; SLOTS],
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.get_or_init(Instant::now).elapsed().as_millis() as u64
    }

    /// Decides about one line from `file:line`.
    pub fn admit(&self, file: &str, line: u32) -> Gate {
        self.admit_at(file, line, self.now_ms())
    }

    fn admit_at(&self, file: &str, line: u32, now: u64) -> Gate {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in file.bytes().chain(line.to_le_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        let slot = &self.slots[(h as usize) % SLOTS];
        // (window start in ms) << 16 | lines in the window; +1 so that a fresh slot
        // (0) always opens a new window.
        let start = now + 1;
        let passed = slot
            .window
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                let (ws, n) = (w >> 16, w & 0xffff);
                if w == 0 || start.saturating_sub(ws) >= WINDOW_MS {
                    Some(start << 16 | 1)
                } else if n < LINES_PER_WINDOW {
                    Some(w + 1)
                } else {
                    None
                }
            })
            .is_ok();
        if passed {
            Gate::Pass {
                suppressed: slot.suppressed.swap(0, Ordering::AcqRel),
            }
        } else {
            slot.suppressed.fetch_add(1, Ordering::Relaxed);
            limits::hit(Cap::LogLines);
            Gate::Drop
        }
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

    #[test]
    fn gate_limits_each_call_site_per_window() {
        let g = LogGate::new();
        let passed = (0..1000)
            .filter(|_| g.admit_at("a.rs", 7, 100) != Gate::Drop)
            .count();
        assert_eq!(passed as u64, LINES_PER_WINDOW);
        // Another call site has its own budget.
        assert_eq!(g.admit_at("a.rs", 8, 100), Gate::Pass { suppressed: 0 });
        // The next window lets a line through and reports the suppressed ones.
        assert_eq!(
            g.admit_at("a.rs", 7, 100 + WINDOW_MS),
            Gate::Pass {
                suppressed: 1000 - LINES_PER_WINDOW
            }
        );
        assert_eq!(
            g.admit_at("a.rs", 7, 101 + WINDOW_MS),
            Gate::Pass { suppressed: 0 }
        );
    }
}
