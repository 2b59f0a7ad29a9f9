//! Outcome classes: what a run's console says, and how it compares with the golden run.
//!
//! While a VM runs, its console is fed to a [`Watcher`], which keeps (bounded) what the
//! classification needs: the first line and time of each detection and crash pattern,
//! the lines of the workload's result, and when progress was last seen. When the run
//! ends the watcher yields its [`Facts`], which go into `results.jsonl`; the outcome
//! is decided later, by [`classify`], against the facts of the configuration's
//! fault-free golden run:
//!
//! 1. **hang**: the runner killed the VM (timeout, or no progress marker for the
//!    rules' `hang_s`);
//! 2. **crash**: a crash pattern the golden run does not show (oops, panic, triple
//!    fault), or the VMM's "guest crashed" exit status (4);
//! 3. **detected** / **recovered**: a detection pattern the golden run does not show
//!    (a DMAR fault line, an interrupt-remapping fault, an I/O error, "No irq
//!    handler"); recovered when the result is still the golden one;
//! 4. **SDC** (silent data corruption): finished, nothing detected, and the result (or
//!    the exit status) differs from the golden run's;
//! 5. **degraded**: same result, but more than `degraded_factor` × the golden run's
//!    duration;
//! 6. **masked**: same result, in time: the fault had no visible effect.

use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// Lines of a result kept at most.
pub const MAX_RESULT_LINES: usize = 256;
/// Characters of one kept line at most.
pub const MAX_LINE: usize = 512;
/// Bytes of a console line the patterns see at most (the rest is cut).
pub const MAX_SCAN_LINE: usize = 64 * 1024;

/// The outcome of one faulty run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Same result as golden, in time.
    Masked,
    /// Finished with the golden result, but slowly.
    Degraded,
    /// The guest reported the error and its result still matched golden.
    Recovered,
    /// The guest reported the error; its result differs from golden.
    Detected,
    /// Finished without a report, with a different result.
    Sdc,
    /// No progress: killed.
    Hang,
    /// Oops, panic, triple fault.
    Crash,
}

impl Outcome {
    /// Every class, in report order.
    pub const ALL: [Outcome; 7] = [
        Outcome::Masked,
        Outcome::Degraded,
        Outcome::Recovered,
        Outcome::Detected,
        Outcome::Sdc,
        Outcome::Hang,
        Outcome::Crash,
    ];

    /// The name used in files and reports.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Masked => "masked",
            Outcome::Degraded => "degraded",
            Outcome::Recovered => "recovered",
            Outcome::Detected => "detected",
            Outcome::Sdc => "sdc",
            Outcome::Hang => "hang",
            Outcome::Crash => "crash",
        }
    }

    /// The class called `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.name() == name)
    }
}

/// A rule set could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// A pattern is not a valid regular expression.
    #[error("'{pattern}' is not a valid regular expression: {reason}")]
    Pattern {
        /// The pattern as written.
        pattern: String,
        /// The regex crate's explanation (first line).
        reason: String,
    },
    /// A number out of range.
    #[error("{0}")]
    Value(String),
}

/// Classification rules as a campaign file writes them (`[experiment.outcome]`):
/// patterns are added to the guest's defaults; `result`, `progress`, `hang_s` and
/// `degraded_factor` replace them.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// More detection patterns (regular expressions over console lines).
    #[serde(default)]
    pub detected: Vec<String>,
    /// More crash patterns.
    #[serde(default)]
    pub crash: Vec<String>,
    /// The lines that make up the workload's result (compared with golden); with
    /// capture groups, only the captured text of each line.
    #[serde(default)]
    pub result: Option<String>,
    /// What counts as progress (default: any line).
    #[serde(default)]
    pub progress: Option<String>,
    /// Seconds without progress after which the run is a hang (default 10 for the
    /// probe, 60 for Linux).
    #[serde(default)]
    pub hang_s: Option<f64>,
    /// A run slower than this × golden is degraded (default 2).
    #[serde(default)]
    pub degraded_factor: Option<f64>,
}

/// Compiled rules for one experiment.
#[derive(Clone, Debug)]
pub struct Rules {
    detected: Vec<Regex>,
    crash: Vec<Regex>,
    result: Regex,
    progress: Option<Regex>,
    /// Seconds without progress that make a hang.
    pub hang: Duration,
    /// The degraded threshold, as a multiple of the golden run's duration.
    pub degraded_factor: f64,
}

fn compile(p: &str) -> Result<Regex, RuleError> {
    // Bounded: a hostile campaign file cannot make the matcher huge.
    regex::RegexBuilder::new(p)
        .size_limit(1 << 20)
        .dfa_size_limit(1 << 20)
        .build()
        .map_err(|e| RuleError::Pattern {
            pattern: p.chars().take(200).collect(),
            reason: e
                .to_string()
                .lines()
                .last()
                .unwrap_or("")
                .trim()
                .to_string(),
        })
}

/// The default patterns for a guest kind ("probe" or "linux").
fn defaults(guest: &str) -> (Vec<&'static str>, Vec<&'static str>, &'static str) {
    match guest {
        "linux" => (
            vec![
                r"DMAR: \[DMA (Read|Write)",
                r"DMAR: DRHD: handling fault",
                r"DMAR: \[INTR-REMAP",
                r"I/O error",
                r"No irq handler",
                r"nobody cared",
                r"EXT4-fs error",
                r"Buffer I/O error",
            ],
            vec![
                r"Kernel panic",
                r"\bOops\b",
                r"\bBUG: ",
                r"general protection fault",
                r"triple fault",
            ],
            r"^(?:FV-CHECK|FV-RESULT|FV-VERIFY) ",
        ),
        _ => (
            // The probe guest: its watch line counts the fault events it took.
            vec![r"fault_events=[1-9]", r"records=[1-9]", r"# detected"],
            vec![
                r"unexpected exception",
                r"triple fault",
                r"PANIC",
                r"panicked",
            ],
            r"^(?:ok|not ok) |^# watch: go=",
        ),
    }
}

impl Rules {
    /// The rules for `guest` ("probe" or "linux"), extended by `spec`.
    pub fn new(guest: &str, spec: &RuleSpec) -> Result<Self, RuleError> {
        let (det, crash, result) = defaults(guest);
        let mut detected: Vec<Regex> = det.into_iter().map(compile).collect::<Result<_, _>>()?;
        for p in &spec.detected {
            detected.push(compile(p)?);
        }
        let mut crashes: Vec<Regex> = crash.into_iter().map(compile).collect::<Result<_, _>>()?;
        for p in &spec.crash {
            crashes.push(compile(p)?);
        }
        if detected.len() > 64 || crashes.len() > 64 {
            return Err(RuleError::Value(
                "at most 64 detection and 64 crash patterns".into(),
            ));
        }
        // A quiet Linux boot can print nothing for a while (longer under emulation).
        let hang_s = spec
            .hang_s
            .unwrap_or(if guest == "linux" { 60.0 } else { 10.0 });
        if !(0.1..=3600.0).contains(&hang_s) {
            return Err(RuleError::Value(format!(
                "hang_s = {hang_s}: between 0.1 and 3600"
            )));
        }
        let factor = spec.degraded_factor.unwrap_or(2.0);
        if !(1.0..=1000.0).contains(&factor) {
            return Err(RuleError::Value(format!(
                "degraded_factor = {factor}: between 1 and 1000"
            )));
        }
        Ok(Self {
            detected,
            crash: crashes,
            result: compile(spec.result.as_deref().unwrap_or(result))?,
            progress: spec.progress.as_deref().map(compile).transpose()?,
            hang: Duration::from_secs_f64(hang_s),
            degraded_factor: factor,
        })
    }
}

/// The first match of one pattern.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    /// Which pattern (index in the rules' list).
    pub pattern: usize,
    /// The line (cut to [`MAX_LINE`]).
    pub line: String,
    /// Milliseconds after the run started.
    pub at_ms: u64,
}

/// Why the runner ended a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Killed {
    /// The experiment's timeout.
    Timeout,
    /// No progress for the rules' `hang_s`.
    NoProgress,
}

/// What one run's console and exit showed: all the classification needs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Facts {
    /// The VMM's exit status (None when killed).
    pub exit_code: Option<i32>,
    /// Why the runner killed it, if it did.
    pub killed: Option<Killed>,
    /// First match of each detection pattern.
    pub detected: Vec<Hit>,
    /// First match of each crash pattern.
    pub crashed: Vec<Hit>,
    /// The result lines, in order (at most [`MAX_RESULT_LINES`]).
    pub result: Vec<String>,
    /// Whether result lines were dropped past the cap.
    pub result_cut: bool,
    /// Run time in milliseconds.
    pub duration_ms: u64,
}

/// Reads a console as it arrives and keeps the [`Facts`] (bounded: one hit per
/// pattern, [`MAX_RESULT_LINES`] result lines, lines cut at [`MAX_SCAN_LINE`]).
#[derive(Debug)]
pub struct Watcher {
    rules: Rules,
    partial: Vec<u8>,
    facts: Facts,
    last_progress_ms: u64,
}

fn cut(line: &str) -> String {
    line.chars().take(MAX_LINE).collect()
}

impl Watcher {
    /// A watcher for a run that started just now (times are given to [`Watcher::feed`]).
    pub fn new(rules: Rules) -> Self {
        Self {
            rules,
            partial: Vec::new(),
            facts: Facts::default(),
            last_progress_ms: 0,
        }
    }

    /// Console bytes that arrived `at_ms` after the start.
    pub fn feed(&mut self, bytes: &[u8], at_ms: u64) {
        for chunk in bytes.split_inclusive(|&b| b == b'\n') {
            if self.partial.len() < MAX_SCAN_LINE {
                let room = MAX_SCAN_LINE - self.partial.len();
                self.partial
                    .extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            if chunk.ends_with(b"\n") {
                let line = String::from_utf8_lossy(&self.partial).into_owned();
                self.partial.clear();
                self.line(line.trim_end_matches(['\r', '\n']), at_ms);
            }
        }
    }

    fn line(&mut self, line: &str, at_ms: u64) {
        let progress = match &self.rules.progress {
            Some(p) => p.is_match(line),
            None => !line.trim().is_empty(),
        };
        if progress {
            self.last_progress_ms = at_ms;
        }
        for (i, re) in self.rules.detected.iter().enumerate() {
            if !self.facts.detected.iter().any(|h| h.pattern == i) && re.is_match(line) {
                self.facts.detected.push(Hit {
                    pattern: i,
                    line: cut(line),
                    at_ms,
                });
            }
        }
        for (i, re) in self.rules.crash.iter().enumerate() {
            if !self.facts.crashed.iter().any(|h| h.pattern == i) && re.is_match(line) {
                self.facts.crashed.push(Hit {
                    pattern: i,
                    line: cut(line),
                    at_ms,
                });
            }
        }
        if let Some(c) = self.rules.result.captures(line) {
            // With capture groups, only what they captured is the result (so a line
            // may carry a varying part, such as random bytes, that is not compared).
            let kept = if c.len() > 1 {
                c.iter()
                    .skip(1)
                    .map(|m| m.map_or("", |m| m.as_str()))
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                line.to_string()
            };
            if self.facts.result.len() < MAX_RESULT_LINES {
                self.facts.result.push(cut(&kept));
            } else {
                self.facts.result_cut = true;
            }
        }
    }

    /// Whether the run has shown no progress for the rules' `hang_s` at `now_ms`.
    pub fn stalled(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_progress_ms) > self.rules.hang.as_millis() as u64
    }

    /// The facts, once the run is over.
    pub fn finish(
        mut self,
        exit_code: Option<i32>,
        killed: Option<Killed>,
        duration_ms: u64,
    ) -> Facts {
        if !self.partial.is_empty() {
            let line = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
            self.line(&line, duration_ms);
        }
        self.facts.exit_code = exit_code;
        self.facts.killed = killed;
        self.facts.duration_ms = duration_ms;
        self.facts
    }
}

/// The VMM's exit status for a guest crash (triple fault, shutdown without reset).
pub const EXIT_GUEST_CRASH: i32 = 4;

/// The VMM's exit status when it could not build or run the VM (bad options, a
/// missing file) and for an internal error.
pub const EXIT_VMM_ERRORS: [i32; 2] = [vmm::EXIT_VMM_ERROR, vmm::seccomp::EXIT_SECCOMP];

/// Whether a golden run with facts `g` can serve as the reference: it ended by itself
/// (not killed), and either printed a result or the VMM did not fail to start (a VM
/// that never ran says nothing about the guest).
pub fn usable_golden(g: &Facts) -> bool {
    g.killed.is_none()
        && g.exit_code
            .is_some_and(|c| !g.result.is_empty() || !EXIT_VMM_ERRORS.contains(&c))
}

/// The outcome of a faulty run with `run` facts, against the golden run's.
pub fn classify(golden: &Facts, run: &Facts, degraded_factor: f64) -> Outcome {
    if run.killed.is_some() || run.exit_code.is_none() {
        return Outcome::Hang;
    }
    let new = |hits: &[Hit], base: &[Hit]| {
        hits.iter()
            .any(|h| !base.iter().any(|g| g.pattern == h.pattern))
    };
    if run.exit_code == Some(EXIT_GUEST_CRASH) || new(&run.crashed, &golden.crashed) {
        return Outcome::Crash;
    }
    let same = run.result == golden.result && run.exit_code == golden.exit_code;
    if new(&run.detected, &golden.detected) {
        return if same {
            Outcome::Recovered
        } else {
            Outcome::Detected
        };
    }
    if !same {
        return Outcome::Sdc;
    }
    if run.duration_ms as f64 > degraded_factor * golden.duration_ms.max(1) as f64 {
        Outcome::Degraded
    } else {
        Outcome::Masked
    }
}

/// Milliseconds from the fault to the guest's first reaction (a new detection or crash
/// pattern), if it reacted after the fault.
pub fn reaction_ms(golden: &Facts, run: &Facts, fault_at_ms: u64) -> Option<u64> {
    let fresh = |hits: &[Hit], base: &[Hit]| -> Option<u64> {
        hits.iter()
            .filter(|h| !base.iter().any(|g| g.pattern == h.pattern) && h.at_ms >= fault_at_ms)
            .map(|h| h.at_ms)
            .min()
    };
    match (
        fresh(&run.detected, &golden.detected),
        fresh(&run.crashed, &golden.crashed),
    ) {
        (Some(a), Some(b)) => Some(a.min(b) - fault_at_ms),
        (a, b) => a.or(b).map(|t| t - fault_at_ms),
    }
}

/// Microseconds from the injection of the run's first fault to the guest's first
/// acknowledgement of a fault record after it, in a VMM trace (Chrome trace JSON from
/// `--trace-file`); `first_fault` is how many injections (stimuli) came before the
/// fault's. None if the trace has neither.
pub fn trace_reaction_us(trace: &serde_json::Value, first_fault: usize) -> Option<u64> {
    use devices::timeline::{FAULT_CLEARED, INJECTED};
    let events = trace["traceEvents"].as_array()?;
    let named = |name: &'static str| {
        events
            .iter()
            .filter(move |e| e["ph"] == "i" && e["name"] == name)
            .filter_map(|e| e["ts"].as_u64())
    };
    let fault = named(INJECTED).nth(first_fault)?;
    let ack = named(FAULT_CLEARED).filter(|&t| t >= fault).min()?;
    Some(ack - fault)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(guest: &str, spec: &RuleSpec, text: &str) -> Facts {
        let mut w = Watcher::new(Rules::new(guest, spec).expect("rules"));
        for (i, l) in text.split_inclusive('\n').enumerate() {
            w.feed(l.as_bytes(), 100 * i as u64);
        }
        w.finish(Some(0), None, 1000)
    }

    const GOLDEN: &str = "# faultvisor probe guest\n# watch: ready\n# watch: go=1 msi_raised=8 msi_received=8 storm_irqs=0 fault_events=0 records=0 pfo=0 fsts=0x0\nok 1 opt.watch\n";

    #[test]
    fn probe_runs_fall_into_each_class() {
        let spec = RuleSpec::default();
        let g = watch("probe", &spec, GOLDEN);
        assert_eq!(g.result.len(), 2, "{g:?}");
        assert_eq!(classify(&g, &g, 2.0), Outcome::Masked);
        let lost = GOLDEN.replace("msi_received=8", "msi_received=5");
        assert_eq!(
            classify(&g, &watch("probe", &spec, &lost), 2.0),
            Outcome::Sdc
        );
        let seen = GOLDEN.replace("fault_events=0", "fault_events=2");
        let f = watch("probe", &spec, &seen);
        assert_eq!(
            classify(&g, &f, 2.0),
            Outcome::Detected,
            "the watch line differs too"
        );
        assert_eq!(reaction_ms(&g, &f, 150), Some(50));
        let mut slow = g.clone();
        slow.duration_ms = 5000;
        assert_eq!(classify(&g, &slow, 2.0), Outcome::Degraded);
        assert_eq!(classify(&g, &slow, 10.0), Outcome::Masked);
        let mut hung = g.clone();
        (hung.exit_code, hung.killed) = (None, Some(Killed::NoProgress));
        assert_eq!(classify(&g, &hung, 2.0), Outcome::Hang);
        let mut crashed = g.clone();
        crashed.exit_code = Some(EXIT_GUEST_CRASH);
        assert_eq!(classify(&g, &crashed, 2.0), Outcome::Crash);
        let mut other = g.clone();
        other.exit_code = Some(3);
        assert_eq!(
            classify(&g, &other, 2.0),
            Outcome::Sdc,
            "another exit status"
        );
    }

    #[test]
    fn linux_detection_recovery_and_crash() {
        let spec = RuleSpec {
            detected: vec![r"my-driver: retrying".into()],
            ..RuleSpec::default()
        };
        let base = "FAULTVISOR-INIT\nFV-CHECK disk write=0 got=abc\nFAULTVISOR-DONE\n";
        let g = watch("linux", &spec, base);
        let dmar = format!(
            "DMAR: [DMA Write NO_PASID] Request device [00:05.0] fault addr 0x1000\n{base}"
        );
        assert_eq!(
            classify(&g, &watch("linux", &spec, &dmar), 2.0),
            Outcome::Recovered
        );
        let bad = dmar.replace("got=abc", "got=def");
        assert_eq!(
            classify(&g, &watch("linux", &spec, &bad), 2.0),
            Outcome::Detected
        );
        let custom = format!("my-driver: retrying\n{base}");
        assert_eq!(
            classify(&g, &watch("linux", &spec, &custom), 2.0),
            Outcome::Recovered
        );
        let oops = format!("BUG: kernel NULL pointer dereference\n{base}");
        assert_eq!(
            classify(&g, &watch("linux", &spec, &oops), 2.0),
            Outcome::Crash
        );
        // A pattern the golden run shows too is not a reaction to the fault.
        let g2 = watch("linux", &spec, &dmar);
        assert_eq!(
            classify(&g2, &watch("linux", &spec, &dmar), 2.0),
            Outcome::Masked
        );
    }

    #[test]
    fn the_watcher_is_bounded_and_times_progress() {
        let spec = RuleSpec {
            progress: Some("tick".into()),
            hang_s: Some(1.0),
            result: Some("^r ".into()),
            ..RuleSpec::default()
        };
        let mut w = Watcher::new(Rules::new("probe", &spec).expect("rules"));
        w.feed(b"tick\n", 0);
        w.feed(b"other\n", 900);
        assert!(!w.stalled(1000));
        assert!(w.stalled(1100));
        for i in 0..(MAX_RESULT_LINES + 10) {
            w.feed(format!("r {i}\n").as_bytes(), 2000);
        }
        // One line without end, far too long: cut, never grown without bound.
        for _ in 0..100 {
            w.feed(&[b'x'; 4096], 3000);
        }
        let f = w.finish(Some(0), None, 4000);
        assert_eq!(f.result.len(), MAX_RESULT_LINES);
        assert!(f.result_cut);
        assert!(f.result.iter().all(|l| l.len() <= MAX_LINE));
    }

    #[test]
    fn capture_groups_keep_only_what_is_compared() {
        let spec = RuleSpec {
            result: Some(r"^FV-CHECK hwrng current=(\S*) .*bytes=(none)?".into()),
            ..RuleSpec::default()
        };
        let a = watch(
            "linux",
            &spec,
            "FV-CHECK hwrng current=virtio_rng.0 x=1 bytes=a1b2\n",
        );
        let b = watch(
            "linux",
            &spec,
            "FV-CHECK hwrng current=virtio_rng.0 x=1 bytes=ffee\n",
        );
        let none = watch(
            "linux",
            &spec,
            "FV-CHECK hwrng current=virtio_rng.0 x=1 bytes=none\n",
        );
        assert_eq!(a.result, ["virtio_rng.0 "]);
        assert_eq!(
            classify(&a, &b, 2.0),
            Outcome::Masked,
            "random bytes are not compared"
        );
        assert_eq!(classify(&a, &none, 2.0), Outcome::Sdc);
    }

    #[test]
    fn bad_rules_are_refused_with_a_reason() {
        let spec = RuleSpec {
            detected: vec!["(unclosed".into()],
            ..RuleSpec::default()
        };
        let e = Rules::new("linux", &spec).expect_err("bad regex");
        assert!(e.to_string().contains("(unclosed"), "{e}");
        let spec = RuleSpec {
            hang_s: Some(0.0),
            ..RuleSpec::default()
        };
        assert!(Rules::new("probe", &spec).is_err());
        assert_eq!(Outcome::parse("sdc"), Some(Outcome::Sdc));
        assert_eq!(Outcome::parse("fine"), None);
    }

    #[test]
    fn trace_reaction_counts_from_the_fault_not_the_stimulus() {
        let ev = |name: &str, ts: u64| serde_json::json!({"ph": "i", "name": name, "ts": ts});
        let t = serde_json::json!({"traceEvents": [
            {"ph": "M", "name": "thread_name"},
            ev("injected", 100),
            ev("fault record cleared", 150),
            ev("injected", 1000),
            ev("fault record cleared", 900),
            ev("fault record cleared", 1240),
            ev("fault record cleared", 1800),
        ]});
        assert_eq!(trace_reaction_us(&t, 0), Some(50));
        assert_eq!(trace_reaction_us(&t, 1), Some(240), "after the stimulus");
        assert_eq!(trace_reaction_us(&t, 2), None, "no such injection");
        let quiet = serde_json::json!({"traceEvents": [ev("injected", 5)]});
        assert_eq!(trace_reaction_us(&quiet, 0), None, "no acknowledgement");
        assert_eq!(trace_reaction_us(&serde_json::json!([1]), 0), None);
    }
}
