//! A bounded ring of interrupt, DMA, fault and injection events with timestamps, for
//! `faultvisor run --trace-file` (Chrome trace JSON, opens in Perfetto). When tracing is
//! off, recording costs one relaxed atomic load.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::sync::lock;

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A message went to KVM on `gsi` (vector, destination APIC, who raised it).
    Interrupt {
        /// GSI.
        gsi: u32,
        /// Vector.
        vector: u8,
        /// Destination APIC ID.
        dest: u32,
        /// Source, e.g. "pci 00:04.0 #0" or "ioapic pin 4".
        source: String,
    },
    /// Fault injection changed an interrupt ("dropped", "delayed", "duplicated").
    InterruptInjected {
        /// GSI.
        gsi: u32,
        /// What happened to it.
        action: &'static str,
    },
    /// A translated DMA request.
    Dma {
        /// Requester ID.
        sid: u16,
        /// I/O virtual address.
        iova: u64,
        /// Length in bytes.
        len: u64,
        /// Device write to memory.
        write: bool,
    },
    /// A DMA-remapping fault (recorded or dropped).
    Fault {
        /// Requester ID.
        sid: u16,
        /// Faulting address.
        iova: u64,
        /// Reason code.
        reason: u8,
        /// Recorded in an FRCD (else dropped by overflow or FPD).
        recorded: bool,
    },
    /// The unit sent its fault-event interrupt.
    FaultEvent {
        /// Vector.
        vector: u8,
    },
    /// A cached VT-d entry was used although its table changed without the required
    /// invalidation (`caching=exact`).
    StaleUse {
        /// "context", "iotlb" or "irte".
        cache: &'static str,
        /// Requester ID.
        sid: u16,
        /// IOVA page or IRTE index.
        at: u64,
        /// The invalidation that was missing.
        missing: String,
    },
    /// The guest cleared a pending fault record (its fault handler acknowledged a
    /// DMA-remapping or interrupt-remapping fault).
    FaultCleared {
        /// The fault record's index.
        record: u8,
    },
    /// A fault injected through the API.
    Injection {
        /// The request body.
        what: String,
    },
}

/// The Chrome-trace name of [`EventKind::FaultCleared`] (campaigns look for it).
pub const FAULT_CLEARED: &str = "fault record cleared";

/// The Chrome-trace name of [`EventKind::Injection`].
pub const INJECTED: &str = "injected";

/// One event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Microseconds since the timeline started.
    pub ts_us: u64,
    /// What.
    pub kind: EventKind,
}

/// The ring.
#[derive(Debug)]
pub struct Timeline {
    enabled: AtomicBool,
    start: Instant,
    capacity: usize,
    events: Mutex<VecDeque<Event>>,
    overwritten: AtomicU64,
}

impl Timeline {
    /// A timeline holding at most `capacity` events (the oldest go first); off until
    /// [`Timeline::enable`].
    pub fn new(capacity: usize) -> Self {
        Self {
            enabled: AtomicBool::new(false),
            start: Instant::now(),
            capacity: capacity.max(1),
            events: Mutex::new(VecDeque::new()),
            overwritten: AtomicU64::new(0),
        }
    }

    /// Starts recording.
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Release);
    }

    /// Whether events are being recorded.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Records `kind` now (no-op when off).
    pub fn record(&self, kind: impl FnOnce() -> EventKind) {
        if !self.enabled() {
            return;
        }
        let ev = Event {
            ts_us: self.start.elapsed().as_micros() as u64,
            kind: kind(),
        };
        let mut q = lock(&self.events);
        if q.len() == self.capacity {
            q.pop_front();
            self.overwritten.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(ev);
    }

    /// The events held, oldest first, and how many older ones were overwritten.
    pub fn events(&self) -> (Vec<Event>, u64) {
        (
            lock(&self.events).iter().cloned().collect(),
            self.overwritten.load(Ordering::Relaxed),
        )
    }

    /// The events as Chrome trace JSON (instant events, one track per kind).
    pub fn chrome_trace(&self) -> String {
        use serde_json::{json, Value};
        let (events, overwritten) = self.events();
        let mut out: Vec<Value> = vec![json!({"ph": "M", "name": "process_name", "pid": 1,
                                               "args": {"name": "faultvisor"}})];
        for (tid, name) in [
            (1, "interrupts"),
            (2, "DMA"),
            (3, "VT-d faults"),
            (4, "fault injection"),
        ] {
            out.push(
                json!({"ph": "M", "name": "thread_name", "pid": 1, "tid": tid,
                            "args": {"name": name}}),
            );
        }
        for e in events {
            let (tid, cat, name, args) = match &e.kind {
                EventKind::Interrupt {
                    gsi,
                    vector,
                    dest,
                    source,
                } => (
                    1,
                    "irq",
                    format!("vector {vector:#04x}"),
                    json!({"gsi": gsi, "vector": vector, "dest": dest, "source": source}),
                ),
                EventKind::InterruptInjected { gsi, action } => (
                    4,
                    "inject",
                    format!("interrupt {action}"),
                    json!({"gsi": gsi, "action": action}),
                ),
                EventKind::Dma {
                    sid,
                    iova,
                    len,
                    write,
                } => (
                    2,
                    "dma",
                    format!("DMA {} {sid:04x}", if *write { "write" } else { "read" }),
                    json!({"sid": sid, "iova": format!("{iova:#x}"), "len": len, "write": write}),
                ),
                EventKind::Fault {
                    sid,
                    iova,
                    reason,
                    recorded,
                } => (
                    3,
                    "fault",
                    format!("fault {reason:#04x}"),
                    json!({"sid": sid, "iova": format!("{iova:#x}"), "reason": reason,
                           "recorded": recorded}),
                ),
                EventKind::FaultEvent { vector } => (
                    3,
                    "fault",
                    "fault event".to_string(),
                    json!({"vector": vector}),
                ),
                EventKind::StaleUse {
                    cache,
                    sid,
                    at,
                    missing,
                } => (
                    3,
                    "stale",
                    format!("stale {cache} entry"),
                    json!({"sid": sid, "at": format!("{at:#x}"), "missing": missing}),
                ),
                EventKind::FaultCleared { record } => (
                    3,
                    "fault",
                    FAULT_CLEARED.to_string(),
                    json!({"record": record}),
                ),
                EventKind::Injection { what } => {
                    (4, "inject", INJECTED.to_string(), json!({"request": what}))
                }
            };
            out.push(
                json!({"ph": "i", "s": "t", "pid": 1, "tid": tid, "ts": e.ts_us,
                            "cat": cat, "name": name, "args": args}),
            );
        }
        json!({"displayTimeUnit": "ms", "traceEvents": out,
               "otherData": {"overwritten_events": overwritten}})
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_off_by_default_and_chrome_json() {
        let t = Timeline::new(3);
        t.record(|| EventKind::FaultEvent { vector: 1 });
        assert!(t.events().0.is_empty(), "off by default");
        t.enable();
        for v in 0..5u8 {
            t.record(|| EventKind::FaultEvent { vector: v });
        }
        let (ev, over) = t.events();
        assert_eq!((ev.len(), over), (3, 2));
        assert_eq!(ev[0].kind, EventKind::FaultEvent { vector: 2 });
        t.record(|| EventKind::Injection {
            what: r#"{"fault":"dma"}"#.into(),
        });
        let v: serde_json::Value = serde_json::from_str(&t.chrome_trace()).expect("json");
        let evs = v["traceEvents"].as_array().expect("events");
        let last = evs.last().expect("last");
        assert_eq!(last["args"]["request"], r#"{"fault":"dma"}"#);
        assert_eq!(last["ph"], "i");
        assert_eq!(v["otherData"]["overwritten_events"], 3);
        assert_eq!(evs.iter().filter(|e| e["ph"] == "M").count(), 5);
    }
}
