//! The hostile guest (`probe.tests=hostile.chaos`): seeded random MMIO, port I/O,
//! configuration-space, table, queue and interrupt-storm actions against every device
//! from 2 vCPUs at once. Every run must end with the guest's own verdict (the VMM
//! still answers and routes interrupts), the VMM alive to power off, its peak RSS
//! within guest RAM + 16 MiB, and its log bounded.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

const MEMORY_MIB: u64 = 64;

fn probe() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("faultvisor-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let p = dir.join("probe.elf");
    if !p.exists() {
        let out = common::run(&["demo", "--write-probe", p.to_str().expect("utf-8")]);
        assert!(out.status.success(), "{out:?}");
    }
    p
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `caching` is the VT-d caching mode (`exact` also runs the stale-use detector on
/// every cached use the chaos makes).
fn hostile(seed: u64, caching: &str) {
    if !common::kvm_available(&format!("hostile seed {seed}")) {
        return;
    }
    let mut child = Command::new(common::faultvisor())
        .args(["run", "--kernel"])
        .arg(probe())
        .args([
            "--memory",
            &format!("{MEMORY_MIB}M"),
            "--vcpus",
            "2",
            "--serial",
            "stdio",
        ])
        .args([
            "--device",
            "test",
            "--device",
            "edu",
            "--device",
            "virtio-rng",
            "--iommu",
            &format!("intel,caching={caching}"),
        ])
        .args([
            "--cmdline",
            &format!("probe.tests=hostile.chaos probe.seed={seed} probe.actions=2500"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn faultvisor");
    let pid = child.id();
    let mut err = child.stderr.take().expect("stderr");
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut out = String::new();
    let mut peak = 0;
    for line in BufReader::new(child.stdout.take().expect("stdout"))
        .lines()
        .map_while(Result::ok)
    {
        if line.starts_with("# hostile:") {
            // The guest waits a moment after this line: the VMM is at its peak.
            peak = peak_rss_kib(pid);
        }
        out.push_str(&line);
        out.push('\n');
    }
    let status = child.wait().expect("wait");
    let log = log.join().expect("log");
    assert!(
        out.lines().any(|l| l.starts_with("ok 1 - hostile.chaos")),
        "seed {seed}: no passing verdict\n{out}\n{log}"
    );
    assert_eq!(
        status.code(),
        Some(0),
        "seed {seed}: the VMM did not power off cleanly\n{log}"
    );
    assert!(peak > 0, "seed {seed}: no RSS sample\n{out}");
    assert!(
        peak <= (MEMORY_MIB + 16) * 1024,
        "seed {seed}: peak RSS {peak} KiB exceeds guest RAM + 16 MiB"
    );
    let lines = log.lines().count();
    assert!(lines < 400, "seed {seed}: {lines} log lines\n{log}");
    eprintln!(
        "seed {seed}: peak RSS {} MiB, {lines} log lines",
        peak / 1024
    );
}

macro_rules! seeds {
    ($($name:ident => $seed:literal, $caching:literal),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                hostile($seed, $caching);
            }
        )*
    };
}

seeds! {
    seed_1 => 1, "simple",
    seed_2 => 2, "exact",
    seed_3 => 3, "simple",
    seed_17 => 17, "exact",
    seed_4242 => 4242, "simple",
    seed_77777 => 77777, "exact",
}

#[test]
fn growth_patterns_keep_the_vmm_flat() {
    if !common::kvm_available("growth_patterns_keep_the_vmm_flat") {
        return;
    }
    let mut child = Command::new(common::faultvisor())
        .args(["run", "--kernel"])
        .arg(probe())
        .args([
            "--memory",
            &format!("{MEMORY_MIB}M"),
            "--vcpus",
            "1",
            "--serial",
            "stdio",
        ])
        .args(["--device", "virtio-rng", "--iommu", "intel"])
        .args(["--cmdline", "probe.tests=hostile.growth probe.actions=1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn faultvisor");
    let pid = child.id();
    let mut err = child.stderr.take().expect("stderr");
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut out = String::new();
    let mut peak = 0;
    for line in BufReader::new(child.stdout.take().expect("stdout"))
        .lines()
        .map_while(Result::ok)
    {
        if line.starts_with("# growth:") {
            peak = peak_rss_kib(pid);
        }
        out.push_str(&line);
        out.push('\n');
    }
    let status = child.wait().expect("wait");
    let log = log.join().expect("log");
    assert!(
        out.lines().any(|l| l.starts_with("ok 1 - hostile.growth")),
        "{out}\n{log}"
    );
    assert!(out.contains("100096 one-byte buffers"), "{out}");
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        peak > 0 && peak <= (MEMORY_MIB + 16) * 1024,
        "peak RSS {peak} KiB"
    );
    // The boot timer logs its first marks only; the sleep requests are rate-limited.
    let marks = log.matches("Guest-boot-time").count();
    assert!(marks <= 16, "{marks} boot-timer lines");
    assert!(
        log.lines().count() < 200,
        "{} log lines\n{log}",
        log.lines().count()
    );
}
