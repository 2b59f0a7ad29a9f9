//! A small stderr logger for the `log` crate: `[+12.345ms faultvisor LEVEL] message`.

use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    start: Instant,
    level: LevelFilter,
}

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let t = self.start.elapsed();
        let lvl = match r.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        eprintln!(
            "[+{}.{:03}ms faultvisor {lvl}] {}",
            t.as_millis(),
            t.as_micros() % 1000,
            r.args()
        );
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
    log::set_boxed_logger(Box::new(StderrLogger { start, level }))
        .map_err(|e| format!("cannot install the logger: {e}"))?;
    log::set_max_level(level);
    Ok(())
}
