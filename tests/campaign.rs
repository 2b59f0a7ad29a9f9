//! `faultvisor campaign` and `faultvisor merge`: the example campaign, failing
//! expectations, file errors, shards, seeds.

mod common;

use std::path::{Path, PathBuf};

/// Campaigns start many VMs; one at a time in this binary keeps the host's two CPUs
/// from being oversubscribed (the watch experiments count interrupts in time windows).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fv-campaign-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp");
    d
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("c.toml");
    std::fs::write(&p, text).expect("write");
    p
}

/// `faultvisor ARGS`, which must exit 0 (the test fails with its stderr otherwise).
fn succeed(args: &[&str]) -> std::process::Output {
    let r = common::run(args);
    assert_eq!(
        r.status.code(),
        Some(0),
        "faultvisor {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&r.stderr)
    );
    r
}

fn results(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("results.jsonl"))
        .expect("results.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

const SMALL: &str = r##"
[campaign]
name = "small"
seed = 11

[defaults]
guest = "probe"
devices = ["test", "edu"]

[[experiment]]
name = "drop two"
probe_tests = "opt.watch"
[[experiment.fault]]
at = "# watch: ready"
inject = "drop-irq"
device = "00:01.0"
count = 2
[[experiment.fault]]
inject = "spurious-irq"
vector = 0xee
stimulus = true
cpu = 0
[experiment.expect]
exit_code = 0
log_contains = ["msi_received=8 "]
stats = { "irq_injection.dropped" = "== 2" }

[[experiment]]
name = "random DMA"
probe_tests = "opt.watch"
[[experiment.fault]]
at = "# watch: ready"
inject = "dma"
device = "00:02.0"
iova = "rand:0x100000..0xffffffff"
direction = "write"
length = 4
[[experiment.fault]]
inject = "spurious-irq"
vector = 0xee
stimulus = true
cpu = 0
[experiment.expect]
exit_code = 0
log_contains = ["records=1 "]
"##;

#[test]
fn example_probe_campaign_passes() {
    let _one_at_a_time = serial();
    if !common::kvm_available("example_probe_campaign_passes") {
        return;
    }
    let out = tmp("example");
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/resources/campaigns/probe.toml"
    );
    let r = common::run(&[
        "campaign",
        file,
        "--jobs",
        "2",
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap_or_default();
    assert_eq!(r.status.code(), Some(0), "{stderr}\n{report}");
    let res = results(&out);
    assert!(
        res.len() >= 30,
        "at least 30 experiments, got {}",
        res.len()
    );
    let golden = res.iter().filter(|l| l["golden"] == true).count();
    assert!(golden >= 1, "golden runs for the fault experiments");
    assert!(res
        .iter()
        .all(|l| l["verdict"] == if l["golden"] == true { "none" } else { "pass" }));
    // Plain progress lines when stderr is not a terminal.
    assert!(
        stderr.contains(&format!("[{0}/{0}] ", res.len())),
        "{stderr}"
    );
    assert!(
        report.contains(&format!(
            "{} runs ({golden} golden): **{} passed, 0 failed**",
            res.len(),
            res.len() - golden
        )),
        "{report}"
    );
    for col in [
        "## Outcomes per configuration",
        "| run | fault | expected | observed | verdict | outcome | latency |",
        "fault at",
    ] {
        assert!(report.contains(col), "{report}");
    }
    // No golden run may hang: every faulty run has one to be classified against.
    assert!(!report.contains("no usable golden run"), "{report}");
    assert!(std::fs::read_to_string(out.join("junit.xml"))
        .expect("junit.xml")
        .contains("<testsuites name=\"probe-faults\""));
}

/// Golden runs and outcome classes on the probe: dropped MSIs the guest cannot notice
/// are silent data corruption, a DMA fault it records is detected; `--only` replays
/// one run with its golden run, the same fault plan drawn again.
#[test]
fn outcomes_are_classified_against_golden_runs() {
    let _one_at_a_time = serial();
    if !common::kvm_available("outcomes") {
        return;
    }
    let dir = tmp("outcomes");
    let file = write(&dir, SMALL);
    let out = dir.join("out");
    succeed(&[
        "campaign",
        file.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    let res = results(&out);
    assert_eq!(res.len(), 3);
    assert_eq!(
        (res[0]["run"].as_str(), res[0]["golden"].as_bool()),
        (Some("golden-0"), Some(true))
    );
    let junit = std::fs::read_to_string(out.join("junit.xml")).expect("junit");
    for (run, outcome) in [("drop two", "sdc"), ("random DMA", "detected")] {
        let at = junit.find(&format!("name=\"{run}\"")).expect(run);
        assert!(
            junit[at..]
                .split("</testcase>")
                .next()
                .unwrap_or("")
                .contains(&format!("value=\"{outcome}\"")),
            "{run} should be {outcome}: {junit}"
        );
    }
    let report = std::fs::read_to_string(out.join("report.md")).expect("report");
    assert!(report.contains("1: 50 % (9–91)"), "{report}");
    // The guest's fault handler acknowledged the DMA fault: the trace times it; a
    // dropped MSI leaves nothing to acknowledge.
    let acked = res[2]["trace_reaction_us"]
        .as_u64()
        .expect("trace reaction");
    assert!(acked < 10_000_000, "{acked} µs");
    assert!(res[1]["trace_reaction_us"].is_null(), "{}", res[1]);
    assert!(report.contains("| trace | 1 |"), "{report}");
    assert!(
        report.contains(&format!("acknowledged after {acked} µs")),
        "{report}"
    );
    let replay = dir.join("replay");
    succeed(&[
        "campaign",
        file.to_str().expect("utf-8"),
        "--only",
        "random DMA",
        "--out",
        replay.to_str().expect("utf-8"),
    ]);
    let again = results(&replay);
    assert_eq!(again.len(), 2, "the run and its golden run");
    assert_eq!(again[1]["plan"], res[2]["plan"], "the same fault plan");
    // --repeat replaces every experiment's repeat count; golden runs stay one.
    let rep = dir.join("repeat");
    succeed(&[
        "campaign",
        file.to_str().expect("utf-8"),
        "--repeat",
        "3",
        "--out",
        rep.to_str().expect("utf-8"),
    ]);
    let runs: Vec<String> = results(&rep)
        .iter()
        .map(|l| l["run"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        runs,
        [
            "golden-0",
            "drop two#0",
            "drop two#1",
            "drop two#2",
            "random DMA#0",
            "random DMA#1",
            "random DMA#2"
        ],
    );
    let r = common::run(&["campaign", file.to_str().expect("utf-8"), "--repeat", "0"]);
    assert_eq!(r.status.code(), Some(2));
    let r = common::run(&["campaign", file.to_str().expect("utf-8"), "--only", "nope"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("no run 'nope'"));
}

#[test]
fn a_failed_expectation_fails_the_campaign_and_shows_in_the_report() {
    let _one_at_a_time = serial();
    if !common::kvm_available("failed_expectation") {
        return;
    }
    let dir = tmp("fail");
    let text = SMALL.replace("msi_received=8 ", "msi_received=9 ");
    let file = write(&dir, &text);
    let out = dir.join("out");
    let r = common::run(&[
        "campaign",
        file.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    assert_eq!(r.status.code(), Some(1));
    let res = results(&out);
    assert_eq!(
        res[0]["verdict"], "none",
        "the golden run has no expectations"
    );
    assert_eq!(res[1]["verdict"], "fail");
    assert_eq!(res[2]["verdict"], "pass");
    let failed: Vec<_> = res[1]["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["ok"] == false)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["check"], "log contains 'msi_received=9 '");
    let report = std::fs::read_to_string(out.join("report.md")).expect("report");
    assert!(report.contains("1 passed, 1 failed"), "{report}");
    assert!(
        report.contains("| drop two |")
            && report.contains("**FAIL**")
            && report.contains("**✗** absent"),
        "{report}"
    );
    assert!(String::from_utf8_lossy(&r.stdout).contains("1 passed, 1 failed"));
}

#[test]
fn file_errors_name_line_and_field() {
    let dir = tmp("errors");
    for (text, want) in [
        ("[campaign]\nname = \"x\"\n[[experiment]]\nname = \"a\"\nprobe_tests = \"x\"\ntimeout = 3\n", ":6: unknown field `timeout`"),
        (
            "[campaign]\nname = \"x\"\n[[experiment]]\nname = \"a\"\nprobe_tests = \"x\"\n[[experiment.fault]]\ninject = \"drop-irq\"\nvector = 3\ncount = 1\n",
            ":6: experiment 'a' fault 1 field 'vector'",
        ),
        ("[campaign]\nname = \"x\"\n[[experiment]]\nname = \"a\"\n", ":3: experiment field 'probe_tests'"),
        ("this is not toml\n", ":1:"),
    ] {
        let file = write(&dir, text);
        let r = common::run(&["campaign", file.to_str().expect("utf-8"), "--out", dir.join("o").to_str().expect("utf-8")]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{text}: {err}");
        assert!(err.contains("c.toml") && err.contains(want), "{text}\n=> {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    let r = common::run(&["campaign", "/nonexistent.toml"]);
    assert_eq!(r.status.code(), Some(2));
    let r = common::run(&[
        "campaign",
        write(&dir, SMALL).to_str().expect("utf-8"),
        "--shard",
        "2/2",
    ]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("invalid --shard '2/2'"));
}

#[test]
fn shards_merge_and_seeds_reproduce() {
    let _one_at_a_time = serial();
    if !common::kvm_available("shards") {
        return;
    }
    let dir = tmp("shards");
    let file = write(&dir, SMALL);
    let f = file.to_str().expect("utf-8");
    let mut outs = Vec::new();
    for i in 0..2 {
        let o = dir.join(format!("s{i}"));
        succeed(&[
            "campaign",
            f,
            "--shard",
            &format!("{i}/2"),
            "--out",
            o.to_str().expect("utf-8"),
        ]);
        // Three runs: the golden run and "random DMA" in shard 0, "drop two" in 1.
        assert_eq!(results(&o).len(), if i == 0 { 2 } else { 1 });
        outs.push(o);
    }
    let merged = dir.join("all");
    let r = common::run(&[
        "merge",
        "--out",
        merged.to_str().expect("utf-8"),
        outs[0].to_str().expect("utf-8"),
        outs[1].to_str().expect("utf-8"),
    ]);
    assert_eq!(r.status.code(), Some(0));
    assert_eq!(results(&merged).len(), 3);
    let merged_report = std::fs::read_to_string(merged.join("report.md")).expect("report");
    assert!(
        merged_report.contains("2 passed, 0 failed"),
        "{merged_report}"
    );
    // The outcome table of the merged shards is exactly that of one unsharded run.
    let whole = dir.join("whole");
    common::run(&["campaign", f, "--out", whole.to_str().expect("utf-8")]);
    let outcomes = |r: &str| {
        r.split("## Outcomes per configuration")
            .nth(1)
            .and_then(|t| t.split("\n## ").next())
            .map(String::from)
    };
    let whole_report = std::fs::read_to_string(whole.join("report.md")).expect("report");
    assert!(outcomes(&whole_report).is_some(), "{whole_report}");
    assert_eq!(outcomes(&merged_report), outcomes(&whole_report));
    // The random IOVA comes from the seed: same seed, same IOVA; another seed, another.
    let iova = |o: &Path| {
        results(o)
            .into_iter()
            .find(|l| l["run"] == "random DMA")
            .map(|l| l["injected"][0]["fault"]["iova"].clone())
            .expect("random DMA ran")
    };
    let again = dir.join("again");
    common::run(&[
        "campaign",
        f,
        "--shard",
        "0/2",
        "--out",
        again.to_str().expect("utf-8"),
    ]);
    assert_eq!(iova(&outs[0]), iova(&again));
    let other = dir.join("other");
    common::run(&[
        "campaign",
        f,
        "--shard",
        "0/2",
        "--seed",
        "99",
        "--out",
        other.to_str().expect("utf-8"),
    ]);
    assert_ne!(iova(&outs[0]), iova(&other));
}

/// The example sweep: count × vector × timing for lost, delayed and duplicated MSIs,
/// at least 200 runs, every one classified against the golden run. Faults aimed at a
/// vector nothing uses are masked; lost MSIs on the live vector are silent data
/// corruption (the guest cannot tell).
#[test]
fn example_sweep_expands_and_classifies_every_run() {
    let _one_at_a_time = serial();
    if !common::kvm_available("example_sweep") {
        return;
    }
    let out = tmp("sweep");
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/resources/campaigns/probe-sweep.toml"
    );
    succeed(&[
        "campaign",
        file,
        "--jobs",
        "2",
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    let res = results(&out);
    let faulty: Vec<_> = res.iter().filter(|l| l["golden"] == false).collect();
    assert!(faulty.len() >= 200, "{} runs", faulty.len());
    assert_eq!(
        res.len() - faulty.len(),
        1,
        "one configuration, one golden run"
    );
    let ids: std::collections::HashSet<_> = res.iter().map(|l| l["run"].as_str()).collect();
    assert_eq!(ids.len(), res.len(), "run IDs are unique");
    let report = std::fs::read_to_string(out.join("report.md")).expect("report");
    assert!(!report.contains("no usable golden run"), "{report}");
    let row = |label: &str| {
        report
            .lines()
            .find(|l| l.starts_with(&format!("| {label} |")))
            .unwrap_or_else(|| panic!("no row {label}: {report}"))
            .to_string()
    };
    // 36 runs each: every count and timing, three repetitions.
    assert!(
        row("lost · fault.2.vector=114").contains("| 36 | 36: 100 %"),
        "{report}"
    );
    assert!(
        row("lost · fault.2.vector=113").contains(" 36: 100 % (90–100) | 0 | 0 |"),
        "{report}"
    );
    assert!(
        row("duplicated · fault.2.vector=114").contains("| 54 | 54: 100 %"),
        "{report}"
    );
}

/// The HTML report in a real headless browser (Debian's Chromium): the screenshot
/// must show the outcome bars in the colours of the classes the campaign found.
#[test]
fn html_report_renders_in_a_headless_browser() {
    let _one_at_a_time = serial();
    if !common::kvm_available("html_report") {
        return;
    }
    let browser = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    let Some(browser) = browser else {
        assert!(
            std::env::var_os("FAULTVISOR_REQUIRE_BROWSER").is_none(),
            "FAULTVISOR_REQUIRE_BROWSER is set but no chromium is installed"
        );
        eprintln!("SKIP html_report_renders_in_a_headless_browser: no chromium (apt-get install chromium)");
        return;
    };
    let dir = tmp("html");
    let file = write(&dir, SMALL);
    let out = dir.join("out");
    succeed(&[
        "campaign",
        file.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    let html = out.join("report.html");
    let shot = dir.join("shot.png");
    let b = std::process::Command::new(browser)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .args(["--window-size=1280,1400"])
        .arg(format!("file://{}", html.display()))
        .output()
        .expect("run the browser");
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&b.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&shot).expect("png"),
    ));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("png frame");
    let px = info.color_type.samples();
    let count = |rgb: [u8; 3]| {
        buf[..info.buffer_size()]
            .chunks(px)
            .filter(|p| p.len() >= 3 && (0..3).all(|i| p[i].abs_diff(rgb[i]) <= 6))
            .count()
    };
    // SMALL: one SDC run (dropped MSIs) and one detected run (a recorded DMA fault).
    let sdc = count([0xc6, 0x28, 0x28]);
    let detected = count([0x6a, 0x1b, 0x9a]);
    assert!(
        sdc > 2000 && detected > 2000,
        "bars not drawn: sdc {sdc} px, detected {detected} px"
    );
}

/// A power cut, then a second boot on the run's own copy of the disk: the cut VM ends
/// with the power-cut status, the second boot runs on the same copy, and the copy is
/// gone afterwards (the original image untouched).
#[test]
fn a_second_boot_follows_a_power_cut_on_the_runs_disk_copy() {
    let _one_at_a_time = serial();
    if !common::kvm_available("second_boot") {
        return;
    }
    let dir = tmp("after");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0x5au8; 1 << 20]).expect("image");
    let text = format!(
        r##"
[campaign]
name = "after"
golden = false
[[experiment]]
name = "cut and boot again"
guest = "probe"
probe_tests = "opt.watch"
devices = ["test"]
disks = ["path={{copy:{}}}"]
[[experiment.fault]]
at = "# watch: ready"
after_ms = 20
inject = "power-cut"
[experiment.after]
cmdline = "boot.smp"
timeout_s = 20
[experiment.expect]
exit_code = 6
"##,
        img.display()
    );
    let text = text.replace(
        "cmdline = \"boot.smp\"",
        "cmdline = \"probe.tests=boot.smp\"",
    );
    let file = write(&dir, &text);
    let out = dir.join("out");
    succeed(&[
        "campaign",
        file.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    let res = results(&out);
    assert_eq!(res.len(), 1);
    assert_eq!(res[0]["exit_code"], 6, "{}", res[0]);
    assert_eq!(
        res[0]["after_exit_code"], 0,
        "the second boot passed: {}",
        res[0]
    );
    let run_dir = out.join("cut_and_boot_again");
    let console = std::fs::read_to_string(run_dir.join("console.log")).expect("console");
    assert!(console.contains("second boot, exit code 0"), "{console}");
    assert!(console.contains("boot.smp"), "{console}");
    assert!(
        !run_dir.join("disk0.img").exists(),
        "the run's disk copy is removed"
    );
    assert_eq!(std::fs::read(&img).expect("image"), vec![0x5au8; 1 << 20]);
}
