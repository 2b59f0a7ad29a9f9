//! The way devices end the VM: a one-shot exit request that the VMM waits on.
//!
//! The first request wins (a guest that writes the debug-exit port and then powers off
//! keeps the debug-exit code); later requests are ignored.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitRequest {
    /// The process exit code the VMM should use.
    pub code: i32,
    /// A one-line human-readable reason.
    pub reason: String,
}

/// A shared, one-shot "the VM is over" signal.
#[derive(Debug, Default)]
pub struct ExitHandle {
    state: Mutex<Option<ExitRequest>>,
    cond: Condvar,
}

impl ExitHandle {
    /// Creates a handle with no request yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the VMM to end the VM with `code`. Only the first request counts.
    pub fn request(&self, code: i32, reason: impl Into<String>) {
        let mut st = crate::sync::lock(&self.state);
        if st.is_none() {
            *st = Some(ExitRequest {
                code,
                reason: reason.into(),
            });
            self.cond.notify_all();
        }
    }

    /// The request, if one was made.
    pub fn get(&self) -> Option<ExitRequest> {
        crate::sync::lock(&self.state).clone()
    }

    /// Blocks until a request is made or `timeout` passes (None: forever).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<ExitRequest> {
        let mut st = crate::sync::lock(&self.state);
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        while st.is_none() {
            match deadline {
                None => {
                    st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        break;
                    }
                    st = self
                        .cond
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        st.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins() {
        let h = ExitHandle::new();
        assert_eq!(h.wait(Some(Duration::from_millis(1))), None);
        h.request(7, "debug exit");
        h.request(0, "poweroff");
        assert_eq!(h.get().map(|r| r.code), Some(7));
        assert_eq!(h.wait(None).map(|r| r.reason), Some("debug exit".into()));
    }
}
