//! Reports from a campaign's run records: each faulty run classified against its
//! configuration's golden run, outcome counts and rates per configuration (with Wilson
//! 95 % intervals), reaction-latency percentiles, as Markdown and as JUnit XML.
//!
//! Everything here is a function of the records alone, sorted by run index: a merged
//! set of shards yields exactly the report of the unsharded run.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use quick_xml::escape::escape;
use serde::{Deserialize, Serialize};

use crate::outcome::{classify, reaction_ms, Facts, Outcome};
use crate::stats::{percentile, wilson, Z95};

/// The part of a `results.jsonl` line the report reads (other fields are ignored).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct RunRecord {
    /// Position in the expanded campaign (0-based, the same in every shard).
    pub index: usize,
    /// The run ID (`--only` replays it).
    pub run: String,
    /// The experiment it came from.
    pub experiment: String,
    /// The configuration's key: runs with the same key share a golden run.
    pub config: String,
    /// Whether this is the configuration's fault-free golden run.
    pub golden: bool,
    /// The fault plan's kinds, in order.
    #[serde(default)]
    pub faults: Vec<String>,
    /// When the first fault was injected (ms after the start).
    #[serde(default)]
    pub fault_at_ms: Option<u64>,
    /// Fault → the guest's first acknowledgement of a fault record, from the VMM's
    /// trace (µs).
    #[serde(default)]
    pub trace_reaction_us: Option<u64>,
    /// What the run showed.
    pub facts: Facts,
    /// The degraded threshold of its rules.
    pub degraded_factor: f64,
    /// "pass" or "fail" from the experiment's expectations ("none" without any).
    pub verdict: String,
    /// Failed expectations, one line each.
    #[serde(default)]
    pub failed_checks: Vec<String>,
    /// The sweep point's values (swept key → value).
    #[serde(default)]
    pub point: BTreeMap<String, serde_json::Value>,
}

/// A faulty run's outcome (None: its golden run is missing or did not finish).
#[derive(Clone, Debug, PartialEq)]
pub struct Classified {
    /// Index into the records.
    pub record: usize,
    /// The outcome.
    pub outcome: Option<Outcome>,
    /// Fault → first guest reaction, ms (console).
    pub reaction_ms: Option<u64>,
    /// Fault → the guest's first fault-record acknowledgement, µs (trace).
    pub trace_reaction_us: Option<u64>,
}

/// Classifies every faulty run of `records` (sorted by index first).
pub fn classify_all(records: &mut [RunRecord]) -> Vec<Classified> {
    records.sort_by_key(|r| r.index);
    let golden: BTreeMap<&str, &RunRecord> = records
        .iter()
        .filter(|r| r.golden)
        .map(|r| (r.config.as_str(), r))
        .collect();
    records
        .iter()
        .enumerate()
        // Runs without a fault (baselines with expectations only) are not classified.
        .filter(|(_, r)| !r.golden && !r.faults.is_empty())
        .map(|(i, r)| {
            let g = golden
                .get(r.config.as_str())
                .filter(|g| crate::outcome::usable_golden(&g.facts));
            Classified {
                record: i,
                outcome: g.map(|g| classify(&g.facts, &r.facts, r.degraded_factor)),
                reaction_ms: g.and_then(|g| {
                    r.fault_at_ms
                        .and_then(|at| reaction_ms(&g.facts, &r.facts, at))
                }),
                trace_reaction_us: r.trace_reaction_us,
            }
        })
        .collect()
}

/// Outcome counts of one configuration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConfigSummary {
    /// The configuration's key.
    pub config: String,
    /// Faulty runs classified.
    pub runs: u64,
    /// Faulty runs without a usable golden run.
    pub unclassified: u64,
    /// Count per outcome, in [`Outcome::ALL`] order.
    pub counts: [u64; 7],
    /// Reaction latencies from console lines (ms).
    pub reactions: Vec<f64>,
    /// Reaction latencies from the trace (ms).
    pub trace_reactions: Vec<f64>,
}

/// Per-configuration summaries, in the order configurations first appear.
pub fn summarize(records: &[RunRecord], classified: &[Classified]) -> Vec<ConfigSummary> {
    summarize_by(records, classified, |r| vec![r.config.clone()])
}

/// Summaries per experiment and per value of each swept parameter ("lost", "lost ·
/// fault.2.count=4", ...), in the order they first appear.
pub fn breakdown(records: &[RunRecord], classified: &[Classified]) -> Vec<ConfigSummary> {
    let label = |e: &str, k: &str, v: &serde_json::Value| {
        let v = v.as_str().map_or_else(|| v.to_string(), String::from);
        format!("{e} · {k}={v}")
    };
    let mut rows = summarize_by(records, classified, |r| {
        let mut g = vec![r.experiment.clone()];
        for (k, v) in &r.point {
            g.push(label(&r.experiment, k, v));
        }
        g
    });
    // Experiment, then each parameter with its values in the order they were first
    // met: (experiment's position, parameter, position of the row).
    let mut place: BTreeMap<String, (usize, String, usize)> = BTreeMap::new();
    let mut experiments: Vec<&str> = Vec::new();
    for c in classified {
        let r = &records[c.record];
        let e = match experiments.iter().position(|x| *x == r.experiment) {
            Some(i) => i,
            None => {
                experiments.push(&r.experiment);
                experiments.len() - 1
            }
        };
        let n = place.len();
        place
            .entry(r.experiment.clone())
            .or_insert((e, String::new(), n));
        for (k, v) in &r.point {
            let n = place.len();
            place
                .entry(label(&r.experiment, k, v))
                .or_insert((e, k.clone(), n));
        }
    }
    rows.sort_by(|a, b| place.get(&a.config).cmp(&place.get(&b.config)));
    rows
}

/// Summaries of the groups `groups` puts each classified run in.
pub fn summarize_by(
    records: &[RunRecord],
    classified: &[Classified],
    groups: impl Fn(&RunRecord) -> Vec<String>,
) -> Vec<ConfigSummary> {
    let mut order: Vec<String> = Vec::new();
    let mut by: BTreeMap<String, ConfigSummary> = BTreeMap::new();
    for c in classified {
        let r = &records[c.record];
        for key in groups(r) {
            let s = by.entry(key.clone()).or_insert_with(|| {
                order.push(key.clone());
                ConfigSummary {
                    config: key.clone(),
                    ..ConfigSummary::default()
                }
            });
            add(s, c);
        }
    }
    order.into_iter().filter_map(|k| by.remove(&k)).collect()
}

fn add(s: &mut ConfigSummary, c: &Classified) {
    {
        match c.outcome {
            Some(o) => {
                s.runs += 1;
                if let Some(k) = Outcome::ALL.iter().position(|x| *x == o) {
                    s.counts[k] += 1;
                }
            }
            None => s.unclassified += 1,
        }
        if let Some(ms) = c.reaction_ms {
            s.reactions.push(ms as f64);
        }
        if let Some(us) = c.trace_reaction_us {
            s.trace_reactions.push(us as f64 / 1000.0);
        }
    }
}

/// "rate (low–high)" in percent, Wilson 95 %.
pub fn rate(k: u64, n: u64) -> String {
    if n == 0 {
        return "–".into();
    }
    let (lo, hi) = wilson(k, n, Z95);
    format!(
        "{:.0} % ({:.0}–{:.0})",
        100.0 * k as f64 / n as f64,
        100.0 * lo,
        100.0 * hi
    )
}

/// The Markdown outcome section: one table row per configuration.
pub fn markdown(summaries: &[ConfigSummary]) -> String {
    table(
        "## Outcomes per configuration\n\nEach faulty run against its configuration's golden \
         run; rates with Wilson 95 % intervals.\n\n| configuration | runs |",
        summaries,
    )
}

/// The Markdown breakdown section (see [`breakdown`]).
pub fn breakdown_markdown(summaries: &[ConfigSummary]) -> String {
    table(
        "## Outcomes per experiment and swept value\n\n| group | runs |",
        summaries,
    )
}

fn table(head: &str, summaries: &[ConfigSummary]) -> String {
    let mut md = String::from(head);
    for o in Outcome::ALL {
        let _ = write!(md, " {} |", o.name());
    }
    md.push_str("\n|---|---:|");
    for _ in Outcome::ALL {
        md.push_str("---|");
    }
    md.push('\n');
    for s in summaries {
        if s.runs > 0 {
            let _ = write!(md, "| {} | {} |", s.config.replace('|', "\\|"), s.runs);
            for k in 0..Outcome::ALL.len() {
                if s.counts[k] == 0 {
                    md.push_str(" 0 |");
                } else {
                    let _ = write!(md, " {}: {} |", s.counts[k], rate(s.counts[k], s.runs));
                }
            }
            md.push('\n');
        }
        if s.unclassified > 0 {
            let _ = writeln!(
                md,
                "| {} (no usable golden run) | {} |{}",
                s.config.replace('|', "\\|"),
                s.unclassified,
                " |".repeat(Outcome::ALL.len())
            );
        }
    }
    md
}

/// The Markdown latency section: fault → first guest reaction per configuration, from
/// the console (a new detection or crash line) and from the VMM's trace (the guest's
/// fault handler clearing a fault record). A timing, so apart from the outcome table,
/// which a rerun with the same seed reproduces exactly.
pub fn latency_markdown(summaries: &[ConfigSummary]) -> String {
    let mut md = String::from(
        "## Reaction latency\n\nFrom the first injected fault to the guest's first reaction: \
         on the console, its first new detection or crash line (console timestamps, ms \
         resolution); in the trace, its fault handler clearing a fault record (VMM \
         timestamps, µs resolution).\n\n| configuration | source | reactions | p50 ms | p90 ms | p99 ms | max ms |\n|---|---|---:|---:|---:|---:|---:|\n",
    );
    for s in summaries {
        for (source, v, digits) in [
            ("console", &s.reactions, 0),
            ("trace", &s.trace_reactions, 3),
        ] {
            if v.is_empty() {
                continue;
            }
            let p = |q| percentile(v, q).map_or("–".to_string(), |x| format!("{x:.digits$}"));
            let _ = writeln!(
                md,
                "| {} | {source} | {} | {} | {} | {} | {} |",
                s.config.replace('|', "\\|"),
                v.len(),
                p(50.0),
                p(90.0),
                p(99.0),
                p(100.0)
            );
        }
    }
    md
}

/// JUnit XML: one test suite per experiment, one test case per run; a run fails when
/// an expectation failed, and its outcome class is a property.
pub fn junit(title: &str, records: &[RunRecord], classified: &[Classified]) -> String {
    let outcome_of: BTreeMap<usize, &Classified> =
        classified.iter().map(|c| (c.record, c)).collect();
    let mut suites: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, r) in records.iter().enumerate() {
        match suites.iter_mut().find(|(n, _)| *n == r.experiment) {
            Some((_, v)) => v.push(i),
            None => suites.push((&r.experiment, vec![i])),
        }
    }
    let failures = |v: &[usize]| v.iter().filter(|&&i| records[i].verdict == "fail").count();
    let total_fail: usize = suites.iter().map(|(_, v)| failures(v)).sum();
    let secs = |i: usize| records[i].facts.duration_ms as f64 / 1000.0;
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"{}\" tests=\"{}\" failures=\"{total_fail}\">",
        escape(title),
        records.len()
    );
    for (name, idx) in &suites {
        let time: f64 = idx.iter().map(|&i| secs(i)).sum();
        let _ = writeln!(
            x,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" time=\"{time:.3}\">",
            escape(*name),
            idx.len(),
            failures(idx)
        );
        for &i in idx {
            let r = &records[i];
            let _ = write!(
                x,
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\">",
                escape(title),
                escape(r.run.as_str()),
                secs(i)
            );
            let outcome = if r.golden {
                "golden".to_string()
            } else {
                outcome_of
                    .get(&i)
                    .and_then(|c| c.outcome)
                    .map_or("unclassified".into(), |o| o.name().to_string())
            };
            let _ = write!(
                x,
                "<properties><property name=\"outcome\" value=\"{}\"/><property name=\"config\" value=\"{}\"/></properties>",
                escape(outcome.as_str()),
                escape(r.config.as_str())
            );
            if r.verdict == "fail" {
                let msg = r.failed_checks.join("; ");
                let _ = write!(
                    x,
                    "<failure message=\"{}\" type=\"expectation\">{}</failure>",
                    escape(msg.as_str()),
                    escape(r.failed_checks.join("\n").as_str())
                );
            }
            x.push_str("</testcase>\n");
        }
        x.push_str("  </testsuite>\n");
    }
    x.push_str("</testsuites>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(index: usize, config: &str, golden: bool, result: &str, exit: Option<i32>) -> RunRecord {
        RunRecord {
            index,
            run: format!("e.c{config}.r{index}"),
            experiment: "e".into(),
            config: config.into(),
            golden,
            faults: if golden {
                vec![]
            } else {
                vec!["drop-irq".into()]
            },
            fault_at_ms: Some(10),
            trace_reaction_us: None,
            facts: Facts {
                exit_code: exit,
                result: vec![result.into()],
                duration_ms: 100,
                ..Facts::default()
            },
            degraded_factor: 2.0,
            verdict: "none".into(),
            failed_checks: vec![],
            point: BTreeMap::new(),
        }
    }

    #[test]
    fn classified_against_the_configurations_golden_run() {
        let mut r = vec![
            rec(3, "b", false, "x", Some(0)),
            rec(0, "a", true, "x", Some(0)),
            rec(1, "a", false, "x", Some(0)),
            rec(2, "a", false, "y", Some(0)),
            rec(4, "a", false, "x", None),
            RunRecord {
                faults: vec![],
                ..rec(5, "a", false, "q", Some(0))
            },
        ];
        let c = classify_all(&mut r);
        assert_eq!(r[0].index, 0, "sorted by index");
        // A golden run whose VM never started (the VMM's error status, no result
        // line) classifies nothing.
        let mut broken = vec![
            rec(0, "a", true, "", Some(2)),
            rec(1, "a", false, "", Some(2)),
        ];
        broken[0].facts.result.clear();
        broken[1].facts.result.clear();
        assert_eq!(classify_all(&mut broken)[0].outcome, None);
        broken[0].facts.exit_code = Some(0);
        assert!(
            classify_all(&mut broken)[0].outcome.is_some(),
            "exit 0 is a result"
        );
        let out: Vec<_> = c.iter().map(|c| (r[c.record].index, c.outcome)).collect();
        assert_eq!(
            out,
            vec![
                (1, Some(Outcome::Masked)),
                (2, Some(Outcome::Sdc)),
                (3, None),
                (4, Some(Outcome::Hang)),
            ],
            "run 5 injected nothing: not classified"
        );
        let s = summarize(&r, &c);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].config.as_str(), s[0].runs, s[0].counts[0]),
            ("a", 3, 1)
        );
        assert_eq!((s[1].config.as_str(), s[1].unclassified), ("b", 1));
        let md = markdown(&s);
        assert!(md.contains("| a | 3 | 1: 33 % (6–79) |"), "{md}");
        assert!(md.contains("b (no usable golden run)"), "{md}");
    }

    #[test]
    fn latency_from_console_and_trace() {
        let mut r = vec![rec(0, "a", true, "x", Some(0))];
        for (i, us) in [(1, Some(250)), (2, Some(1750)), (3, None)] {
            let mut f = rec(i, "a", false, "x", Some(0));
            f.trace_reaction_us = us;
            r.push(f);
        }
        r[0].trace_reaction_us = Some(5);
        let c = classify_all(&mut r);
        let s = summarize(&r, &c);
        assert_eq!(
            s[0].trace_reactions,
            vec![0.25, 1.75],
            "golden runs not counted"
        );
        let md = latency_markdown(&s);
        assert!(md.contains("| a | trace | 2 | 0.250 | 1.750 |"), "{md}");
        assert!(!md.contains("| console |"), "no console reactions: {md}");
    }

    #[test]
    fn shuffled_records_give_the_same_report() {
        let make = || {
            (0..40)
                .map(|i| {
                    rec(
                        i,
                        if i % 2 == 0 { "p" } else { "q" },
                        i < 2,
                        if i % 5 == 0 { "z" } else { "x" },
                        Some(0),
                    )
                })
                .collect::<Vec<_>>()
        };
        let mut a = make();
        let mut b = make();
        b.reverse();
        b.swap(3, 17);
        let (ca, cb) = (classify_all(&mut a), classify_all(&mut b));
        assert_eq!(markdown(&summarize(&a, &ca)), markdown(&summarize(&b, &cb)));
        assert_eq!(junit("t", &a, &ca), junit("t", &b, &cb));
    }

    #[test]
    fn junit_is_well_formed_and_escaped() {
        let mut r = vec![
            rec(0, "a", true, "x", Some(0)),
            rec(1, "a", false, "y", Some(0)),
        ];
        r[1].verdict = "fail".into();
        r[1].failed_checks = vec!["log contains '<&\"x\">'".into()];
        r[1].run = "e&<run>".into();
        let c = classify_all(&mut r);
        let x = junit("camp \"1\"", &r, &c);
        let mut reader = quick_xml::Reader::from_str(&x);
        let (mut cases, mut fails) = (0, 0);
        loop {
            match reader.read_event() {
                Ok(quick_xml::events::Event::Eof) => break,
                Ok(quick_xml::events::Event::Start(e)) => {
                    cases += usize::from(e.name().as_ref() == b"testcase");
                    fails += usize::from(e.name().as_ref() == b"failure");
                }
                Ok(_) => {}
                Err(e) => panic!("not well-formed: {e}\n{x}"),
            }
        }
        assert_eq!((cases, fails), (2, 1), "{x}");
        assert!(x.contains("value=\"sdc\""), "{x}");
        assert!(x.contains("e&amp;&lt;run&gt;"), "{x}");
    }
}
