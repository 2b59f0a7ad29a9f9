//! A small stderr logger for the `log` crate: `[+12.345ms faultvisor LEVEL] message`.
//!
//! Once the guest runs, every line below `trace` passes the per-call-site limiter
//! ([`devices::ratelimit::LogGate`]): a guest that triggers a message in a loop gets at
//! most 10 lines per 5 s out of each call site, however the message is reached.

use std::time::Instant;

use devices::ratelimit::{self, Gate, LogGate};
use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    start: Instant,
    level: LevelFilter,
    gate: LogGate,
}

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        // `trace` is the firehose the user asked for (every exit); the rest is limited.
        let mut suppressed = 0;
        if r.level() < Level::Trace && ratelimit::guest_running() {
            match self
                .gate
                .admit(r.file().unwrap_or(r.target()), r.line().unwrap_or(0))
            {
                Gate::Drop => return,
                Gate::Pass { suppressed: n } => suppressed = n,
            }
        }
        let t = self.start.elapsed();
        let lvl = match r.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        // One write per line: lines from several threads never interleave, and a line
        // costs one system call rather than one per formatted piece.
        use std::io::Write as _;
        let mut line = format!(
            "[+{}.{:03}ms faultvisor {lvl}] {}",
            t.as_millis(),
            t.as_micros() % 1000,
            r.args()
        );
        if suppressed > 0 {
            line.push_str(&format!(" ({suppressed} similar lines suppressed)"));
        }
        line.push('\n');
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the logger at `level` (default info).
pub fn init(level: Option<&str>, start: Instant) -> Result<(), String> {
    let level = match level.map(str::to_ascii_lowercase).as_deref() {
        None | Some("") | Some("info") => LevelFilter::Info,
        Some("error") => LevelFilter::Error,
        Some("warn") | Some("warning") => LevelFilter::Warn,
        Some("debug") => LevelFilter::Debug,
        Some("trace") => LevelFilter::Trace,
        Some("off") => LevelFilter::Off,
        Some(other) => {
            return Err(format!(
                "invalid log level '{other}': use error, warn, info, debug, trace or off"
            ))
        }
    };
    log::set_boxed_logger(Box::new(StderrLogger {
        start,
        level,
        gate: LogGate::new(),
    }))
    .map_err(|e| format!("cannot install the logger: {e}"))?;
    log::set_max_level(level);
    Ok(())
}
