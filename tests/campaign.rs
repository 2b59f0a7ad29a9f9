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
    assert!(res.iter().all(|l| l["verdict"] == "pass"));
    // Plain progress lines when stderr is not a terminal.
    assert!(
        stderr.contains(&format!("[{0}/{0}] PASS", res.len())),
        "{stderr}"
    );
    assert!(report.contains(&format!(
        "{} experiments: **{} passed, 0 failed**",
        res.len(),
        res.len()
    )));
    for col in [
        "| experiment | fault | expected | observed | verdict | latency |",
        "fault at",
    ] {
        assert!(report.contains(col), "{report}");
    }
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
    assert_eq!(res[0]["verdict"], "fail");
    assert_eq!(res[1]["verdict"], "pass");
    let failed: Vec<_> = res[0]["checks"]
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
        let r = common::run(&[
            "campaign",
            f,
            "--shard",
            &format!("{i}/2"),
            "--out",
            o.to_str().expect("utf-8"),
        ]);
        assert_eq!(
            r.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert_eq!(results(&o).len(), 1);
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
    assert_eq!(results(&merged).len(), 2);
    assert!(std::fs::read_to_string(merged.join("report.md"))
        .expect("report")
        .contains("2 passed, 0 failed"));
    // The random IOVA comes from the seed: same seed, same IOVA; another seed, another.
    let iova = |o: &Path| results(o)[0]["injected"][0]["fault"]["iova"].clone();
    let again = dir.join("again");
    common::run(&[
        "campaign",
        f,
        "--shard",
        "1/2",
        "--out",
        again.to_str().expect("utf-8"),
    ]);
    assert_eq!(iova(&outs[1]), iova(&again));
    let other = dir.join("other");
    common::run(&[
        "campaign",
        f,
        "--shard",
        "1/2",
        "--seed",
        "99",
        "--out",
        other.to_str().expect("utf-8"),
    ]);
    assert_ne!(iova(&outs[1]), iova(&other));
}
