//! A fixed pool of worker threads for long API work (fault storms, interrupt storms,
//! vCPU register snapshots), so that neither the event loop nor a vCPU thread ever runs
//! it. Each kind of job has its own cap on jobs queued or running; a submission past it
//! is refused at once (the API answers 429), never queued without bound.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use devices::limits::{self, Cap};
use devices::sync::lock;

/// Kinds of jobs, each with its own cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    /// Interrupt storms (run up to a minute each).
    IrqStorm,
    /// Fault storms, snapshots and other bounded but slow requests.
    Job,
}

impl JobKind {
    /// Jobs of this kind queued or running at most.
    pub const fn cap(self) -> usize {
        match self {
            Self::IrqStorm => 4,
            Self::Job => 4,
        }
    }

    fn limit(self) -> Cap {
        match self {
            Self::IrqStorm => Cap::IrqStorms,
            Self::Job => Cap::ApiJobs,
        }
    }

    fn index(self) -> usize {
        match self {
            Self::IrqStorm => 0,
            Self::Job => 1,
        }
    }
}

/// Threads in the pool: enough for every kind at its cap, so no job waits behind
/// another kind's.
pub const THREADS: usize = JobKind::IrqStorm.cap() + JobKind::Job.cap();

type Job = Box<dyn FnOnce() + Send>;

struct Shared {
    queue: Mutex<VecDeque<(JobKind, Job)>>,
    ready: Condvar,
    active: [AtomicUsize; 2],
}

/// The pool.
#[derive(Clone)]
pub struct Workers {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("storms", &self.active(JobKind::IrqStorm))
            .field("jobs", &self.active(JobKind::Job))
            .finish()
    }
}

/// A job was refused because its kind is at its cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{running} {what} already running (at most {cap})")]
pub struct Busy {
    /// Jobs of the kind queued or running.
    pub running: usize,
    /// The cap.
    pub cap: usize,
    /// What they are.
    pub what: &'static str,
}

impl Workers {
    /// Starts the pool's threads; each runs `on_start` first (the seccomp filter).
    pub fn start(on_start: Arc<dyn Fn() + Send + Sync>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            active: [AtomicUsize::new(0), AtomicUsize::new(0)],
        });
        for i in 0..THREADS {
            let s = shared.clone();
            let init = on_start.clone();
            std::thread::Builder::new()
                .name(format!("fv-worker{i}"))
                .stack_size(256 << 10)
                .spawn(move || {
                    init();
                    s.run()
                })?;
        }
        Ok(Self { shared })
    }

    /// Jobs of `kind` queued or running.
    pub fn active(&self, kind: JobKind) -> usize {
        self.shared.active[kind.index()].load(Ordering::Acquire)
    }

    /// Queues `job` unless `kind` is at its cap.
    pub fn submit(&self, kind: JobKind, job: impl FnOnce() + Send + 'static) -> Result<(), Busy> {
        let counter = &self.shared.active[kind.index()];
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < kind.cap()).then_some(n + 1)
            })
            .map_err(|running| {
                limits::hit(kind.limit());
                Busy {
                    running,
                    cap: kind.cap(),
                    what: match kind {
                        JobKind::IrqStorm => "interrupt storms",
                        JobKind::Job => "long API jobs",
                    },
                }
            })?;
        lock(&self.shared.queue).push_back((kind, Box::new(job)));
        self.shared.ready.notify_one();
        Ok(())
    }
}

impl Shared {
    fn run(&self) {
        loop {
            let (kind, job) = {
                let mut q = lock(&self.queue);
                loop {
                    if let Some(j) = q.pop_front() {
                        break j;
                    }
                    q = match self.ready.wait(q) {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                }
            };
            // A panicking job must not take the worker (or its slot) with it.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            self.active[kind.index()].fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn jobs_run_and_kinds_are_capped() {
        let w = Workers::start(Arc::new(|| {})).expect("pool");
        let (tx, rx) = mpsc::channel();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        for _ in 0..JobKind::IrqStorm.cap() {
            let g = gate.clone();
            let tx = tx.clone();
            w.submit(JobKind::IrqStorm, move || {
                let mut open = lock(&g.0);
                while !*open {
                    open = g.1.wait(open).expect("wait");
                }
                let _ = tx.send(1);
            })
            .expect("under the cap");
        }
        let busy = w.submit(JobKind::IrqStorm, || {}).expect_err("at the cap");
        assert_eq!(busy.cap, JobKind::IrqStorm.cap());
        // The other kind still runs while storms occupy their slots.
        let tx2 = tx.clone();
        w.submit(JobKind::Job, move || {
            let _ = tx2.send(2);
        })
        .expect("other kind");
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)), Ok(2));
        *lock(&gate.0) = true;
        gate.1.notify_all();
        for _ in 0..JobKind::IrqStorm.cap() {
            assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)), Ok(1));
        }
    }
}
