//! The self-contained HTML report: outcome distributions as stacked bars, the reaction
//! latency CDF, and the event timeline of each run that went wrong, all as inline SVG
//! (no script, no external file: it opens from a CI artifact or a mail attachment).
//!
//! The SVG is written here rather than by a plotting crate: plotters, the usual
//! choice, lays out text itself and needs a font backend and font files for it, while
//! inline SVG leaves text to the browser and keeps the report one plain file.

use std::fmt::Write as _;

use quick_xml::escape::escape;
use serde_json::Value;

use crate::outcome::Outcome;
use crate::report::ConfigSummary;
use crate::stats::wilson;

/// Timelines drawn at most, and events per timeline.
pub const MAX_TIMELINES: usize = 12;
/// Events of one trace drawn at most.
pub const MAX_EVENTS: usize = 2000;

/// The colour of each outcome class (also what the browser test looks for).
pub fn colour(o: Outcome) -> &'static str {
    match o {
        Outcome::Masked => "#2e7d32",
        Outcome::Degraded => "#f9a825",
        Outcome::Recovered => "#0277bd",
        Outcome::Detected => "#6a1b9a",
        Outcome::Sdc => "#c62828",
        Outcome::Hang => "#8d6e63",
        Outcome::Crash => "#212121",
    }
}

/// One run's events from its Chrome-format trace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timeline {
    /// The run ID.
    pub run: String,
    /// Its outcome (or "failed").
    pub outcome: String,
    /// Lane names (trace threads), in order.
    pub lanes: Vec<String>,
    /// (lane, milliseconds, event name).
    pub events: Vec<(usize, f64, String)>,
    /// Events left out past [`MAX_EVENTS`].
    pub cut: usize,
}

/// A run's timeline from its `trace.json` (the VMM's Chrome trace): instant events by
/// thread, bounded by [`MAX_EVENTS`].
pub fn timeline(run: &str, outcome: &str, trace: &Value) -> Timeline {
    let mut t = Timeline {
        run: run.into(),
        outcome: outcome.into(),
        ..Timeline::default()
    };
    let events = trace["traceEvents"].as_array().cloned().unwrap_or_default();
    let mut tids: Vec<(u64, String)> = Vec::new();
    for e in &events {
        if e["ph"] == "M" && e["name"] == "thread_name" {
            if let (Some(tid), Some(name)) = (e["tid"].as_u64(), e["args"]["name"].as_str()) {
                tids.push((tid, name.chars().take(40).collect()));
            }
        }
    }
    for e in &events {
        if e["ph"] == "M" {
            continue;
        }
        let (Some(tid), Some(ts)) = (e["tid"].as_u64(), e["ts"].as_f64()) else {
            continue;
        };
        if t.events.len() >= MAX_EVENTS {
            t.cut += 1;
            continue;
        }
        let lane = match tids.iter().position(|(id, _)| *id == tid) {
            Some(i) => i,
            None => {
                tids.push((tid, format!("thread {tid}")));
                tids.len() - 1
            }
        };
        let name: String = e["name"].as_str().unwrap_or("?").chars().take(60).collect();
        t.events.push((lane, ts / 1000.0, name));
    }
    t.lanes = tids.into_iter().map(|(_, n)| n).collect();
    t
}

fn bars(md: &mut String, title: &str, rows: &[ConfigSummary]) {
    let rows: Vec<&ConfigSummary> = rows.iter().filter(|r| r.runs > 0).collect();
    if rows.is_empty() {
        return;
    }
    let (label_w, bar_w, row_h) = (420.0, 560.0, 26.0);
    let h = 40.0 + row_h * rows.len() as f64;
    let _ = writeln!(md, "<h2>{}</h2>", escape(title));
    let _ = writeln!(
        md,
        "<svg class=\"outcomes\" width=\"{}\" height=\"{h}\" xmlns=\"http://www.w3.org/2000/svg\" font-family=\"sans-serif\" font-size=\"12\">",
        label_w + bar_w + 60.0
    );
    for (i, r) in rows.iter().enumerate() {
        let y = 10.0 + row_h * i as f64;
        let label: String = r.config.chars().take(64).collect();
        let _ = writeln!(
            md,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            label_w - 8.0,
            y + 15.0,
            escape(label.as_str())
        );
        let mut x = label_w;
        for (k, o) in Outcome::ALL.iter().enumerate() {
            let n = r.counts[k];
            if n == 0 {
                continue;
            }
            let w = bar_w * n as f64 / r.runs as f64;
            let (lo, hi) = wilson(n, r.runs, crate::stats::Z95);
            let _ = writeln!(
                md,
                "<rect x=\"{x:.1}\" y=\"{y}\" width=\"{w:.1}\" height=\"20\" fill=\"{}\"><title>{}: {n} of {} ({:.0} %, 95 % CI {:.0}–{:.0} %)</title></rect>",
                colour(*o),
                o.name(),
                r.runs,
                100.0 * n as f64 / r.runs as f64,
                100.0 * lo,
                100.0 * hi
            );
            x += w;
        }
        let _ = writeln!(
            md,
            "<text x=\"{}\" y=\"{}\">n={}</text>",
            label_w + bar_w + 6.0,
            y + 15.0,
            r.runs
        );
    }
    let mut lx = label_w;
    for o in Outcome::ALL {
        let _ = writeln!(
            md,
            "<rect x=\"{lx}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            h - 20.0,
            colour(o),
            lx + 16.0,
            h - 10.0,
            o.name()
        );
        lx += 80.0;
    }
    md.push_str("</svg>\n");
}

/// A latency CDF per configuration of the samples `pick` chooses (ms), under `title`.
fn cdf(
    md: &mut String,
    rows: &[ConfigSummary],
    title: &str,
    pick: fn(&ConfigSummary) -> &Vec<f64>,
) {
    let rows: Vec<&ConfigSummary> = rows.iter().filter(|r| !pick(r).is_empty()).collect();
    if rows.is_empty() {
        return;
    }
    let top = rows
        .iter()
        .flat_map(|r| pick(r).iter().copied())
        .fold(0.0f64, f64::max);
    // Sub-millisecond samples (the trace's) keep their scale.
    let max = if top < 1.0 { top.max(0.001) } else { top };
    let digits = if max < 10.0 { 3 } else { 0 };
    let (x0, y0, w, h) = (60.0, 20.0, 620.0, 240.0);
    let _ = writeln!(md, "<h2>{}</h2>", escape(title));
    let _ = writeln!(
        md,
        "<svg class=\"cdf\" width=\"{}\" height=\"{}\" xmlns=\"http://www.w3.org/2000/svg\" font-family=\"sans-serif\" font-size=\"12\">",
        x0 + w + 260.0,
        y0 + h + 50.0
    );
    let _ = writeln!(
        md,
        "<line x1=\"{x0}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#444\"/><line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x0}\" y2=\"{}\" stroke=\"#444\"/>",
        y0 + h,
        x0 + w,
        y0 + h,
        y0 + h
    );
    let _ = writeln!(
        md,
        "<text x=\"{x0}\" y=\"{}\">0</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{max:.digits$} ms</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">1.0</text>",
        y0 + h + 16.0,
        x0 + w,
        y0 + h + 16.0,
        x0 - 6.0,
        y0 + 10.0
    );
    let palette = [
        "#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f",
    ];
    for (i, r) in rows.iter().enumerate() {
        let mut v = pick(r).clone();
        v.sort_by(f64::total_cmp);
        let mut pts = format!("{x0},{}", y0 + h);
        for (k, ms) in v.iter().enumerate() {
            let x = x0 + w * ms / max;
            let before = y0 + h - h * k as f64 / v.len() as f64;
            let after = y0 + h - h * (k + 1) as f64 / v.len() as f64;
            let _ = write!(pts, " {x:.1},{before:.1} {x:.1},{after:.1}");
        }
        let c = palette[i % palette.len()];
        let _ = writeln!(
            md,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{pts}\"/>"
        );
        let label: String = r.config.chars().take(40).collect();
        let _ = writeln!(
            md,
            "<text x=\"{}\" y=\"{}\" fill=\"{c}\">{} (n={})</text>",
            x0 + w + 10.0,
            y0 + 14.0 + 16.0 * i as f64,
            escape(label.as_str()),
            v.len()
        );
    }
    md.push_str("</svg>\n");
}

fn timelines(md: &mut String, tls: &[Timeline]) {
    if tls.is_empty() {
        return;
    }
    md.push_str("<h2>Timelines of runs that went wrong</h2>\n");
    for t in tls.iter().take(MAX_TIMELINES) {
        let end = t.events.iter().map(|e| e.1).fold(1.0f64, f64::max);
        let (x0, w, lane_h) = (140.0, 700.0, 22.0);
        let h = 30.0 + lane_h * t.lanes.len().max(1) as f64;
        let _ = writeln!(
            md,
            "<h3>{} — {}{}</h3>",
            escape(t.run.as_str()),
            escape(t.outcome.as_str()),
            if t.cut > 0 {
                format!(" ({} more events not drawn)", t.cut)
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            md,
            "<svg class=\"timeline\" width=\"{}\" height=\"{h}\" xmlns=\"http://www.w3.org/2000/svg\" font-family=\"sans-serif\" font-size=\"12\">",
            x0 + w + 60.0
        );
        for (i, lane) in t.lanes.iter().enumerate() {
            let y = 10.0 + lane_h * i as f64;
            let _ = writeln!(
                md,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><line x1=\"{x0}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#ddd\"/>",
                x0 - 8.0,
                y + 14.0,
                escape(lane.as_str()),
                y + 10.0,
                x0 + w,
                y + 10.0
            );
        }
        for (lane, ms, name) in &t.events {
            let x = x0 + w * ms / end;
            let y = 10.0 + lane_h * *lane as f64;
            let c = if name.contains("drop") || name.contains("fault") || name.contains("inject") {
                "#c62828"
            } else {
                "#1565c0"
            };
            let _ = writeln!(
                md,
                "<line x1=\"{x:.1}\" y1=\"{y}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"{c}\" stroke-width=\"2\"><title>{ms:.3} ms: {}</title></line>",
                y + 18.0,
                escape(name.as_str())
            );
        }
        let _ = writeln!(
            md,
            "<text x=\"{x0}\" y=\"{}\">0</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{end:.1} ms</text></svg>",
            h - 4.0,
            x0 + w,
            h - 4.0
        );
    }
}

/// The whole report as one HTML document.
pub fn html(
    title: &str,
    summary_line: &str,
    configs: &[ConfigSummary],
    breakdown: &[ConfigSummary],
    tls: &[Timeline],
) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Campaign {}</title>\n<style>body{{font-family:sans-serif;margin:24px;background:#fff;color:#111}}h2{{margin-top:28px}}svg{{display:block;margin:8px 0}}</style></head><body>",
        escape(title)
    );
    let _ = writeln!(
        md,
        "<h1>Campaign {}</h1>\n<p>{}</p>",
        escape(title),
        escape(summary_line)
    );
    bars(&mut md, "Outcomes per configuration", configs);
    if breakdown.len() > 1 {
        bars(
            &mut md,
            "Outcomes per experiment and swept value",
            breakdown,
        );
    }
    cdf(
        &mut md,
        configs,
        "Fault → first reaction on the console (CDF)",
        |r| &r.reactions,
    );
    cdf(
        &mut md,
        configs,
        "Fault → fault record acknowledged, from the trace (CDF)",
        |r| &r.trace_reactions,
    );
    timelines(&mut md, tls);
    md.push_str("</body></html>\n");
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn summary(config: &str, counts: [u64; 7], reactions: Vec<f64>) -> ConfigSummary {
        ConfigSummary {
            config: config.into(),
            runs: counts.iter().sum(),
            unclassified: 0,
            counts,
            reactions,
            trace_reactions: Vec::new(),
        }
    }

    #[test]
    fn the_report_draws_every_class_it_counts() {
        let s = vec![summary(
            "cfg <a&b>",
            [3, 0, 0, 1, 2, 0, 0],
            vec![5.0, 9.0, 40.0],
        )];
        let tl = timeline(
            "r1",
            "sdc",
            &json!({"traceEvents": [
                {"ph": "M", "name": "thread_name", "tid": 1, "args": {"name": "interrupts"}},
                {"ph": "i", "name": "vector 0x71", "tid": 1, "ts": 1000},
                {"ph": "i", "name": "interrupt dropped", "tid": 1, "ts": 2500},
                {"ph": "i", "name": "dma", "tid": 2, "ts": 3000},
            ]}),
        );
        assert_eq!(tl.lanes, ["interrupts", "thread 2"]);
        assert_eq!(tl.events[1], (0, 2.5, "interrupt dropped".into()));
        let mut s = s;
        s[0].trace_reactions = vec![0.25, 0.5];
        let h = html("t", "6 runs", &s, &[], &[tl]);
        assert_eq!(h.matches("class=\"cdf\"").count(), 2, "console and trace");
        assert!(h.contains(">0.500 ms<"), "sub-ms scale kept");
        for o in [Outcome::Masked, Outcome::Detected, Outcome::Sdc] {
            assert!(h.contains(&format!("fill=\"{}\"", colour(o))), "{o:?}");
        }
        assert!(!h.contains("width=\"0.0\""), "no empty bars");
        assert!(h.contains("cfg &lt;a&amp;b&gt;"));
        assert!(h.contains("class=\"cdf\"") && h.contains("class=\"timeline\""));
        // Well-formed as XML (the SVG parts in particular).
        let body = h.split_once("<body>").map(|x| x.1).unwrap_or("");
        let body = body
            .trim_end()
            .trim_end_matches("</html>")
            .trim_end_matches("</body>");
        let wrapped = format!("<body>{body}</body>");
        let mut r = quick_xml::Reader::from_str(&wrapped);
        loop {
            match r.read_event() {
                Ok(quick_xml::events::Event::Eof) => break,
                Ok(_) => {}
                Err(e) => panic!("{e}: {h}"),
            }
        }
    }

    #[test]
    fn traces_are_bounded() {
        let events: Vec<Value> = (0..(MAX_EVENTS + 50))
            .map(|i| json!({"ph": "i", "name": "x", "tid": 1, "ts": i}))
            .collect();
        let t = timeline("r", "hang", &json!({ "traceEvents": events }));
        assert_eq!((t.events.len(), t.cut), (MAX_EVENTS, 50));
        assert_eq!(timeline("r", "hang", &json!("not a trace")).events.len(), 0);
    }
}
