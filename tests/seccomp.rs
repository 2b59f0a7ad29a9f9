//! The per-thread seccomp filters: a forbidden call in each kind of thread ends the VMM
//! with one line naming the thread and the call; `log` and `off` let it through.

mod common;

use std::process::{Command, Stdio};

fn probe() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("faultvisor-seccomp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let p = dir.join("probe.elf");
    if !p.exists() {
        let out = common::run(&["demo", "--write-probe", p.to_str().expect("utf-8")]);
        assert!(out.status.success(), "{out:?}");
    }
    p
}

/// Runs a short probe VM with the self-test hook aimed at `kind`; (status, stderr).
fn run(kind: &str, mode: &str) -> (Option<i32>, String) {
    let sock =
        std::env::temp_dir().join(format!("fv-sc-{}-{kind}-{mode}.sock", std::process::id()));
    let out = Command::new(common::faultvisor())
        .args(["run", "--kernel"])
        .arg(probe())
        .args(["--memory", "64M", "--serial", "none", "--device", "test"])
        .args(["--cmdline", "probe.tests=msi.dest", "--seccomp", mode])
        .arg("--api-socket")
        .arg(&sock)
        .env("FAULTVISOR_SECCOMP_SELFTEST", kind)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let _ = std::fs::remove_file(&sock);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_forbidden_call_ends_the_vmm_naming_thread_and_call() {
    if !common::kvm_available("seccomp_violation") {
        return;
    }
    for (kind, thread) in [
        ("vcpu", "fv-vcpu"),
        ("event_loop", "fv-events"),
        ("worker", "fv-"),
        ("main", "thread main "),
    ] {
        let (code, err) = run(kind, "on");
        assert_eq!(code, Some(70), "{kind}: {err}");
        let line = err
            .lines()
            .find(|l| l.contains("seccomp"))
            .unwrap_or_else(|| panic!("{kind}: no seccomp line in {err}"));
        assert!(
            line.starts_with("faultvisor: internal error: seccomp: thread ")
                && line.contains(thread)
                && line.contains("made a forbidden system call: uname (63)"),
            "{kind}: {line}"
        );
    }
}

#[test]
fn log_and_off_let_the_call_through() {
    if !common::kvm_available("seccomp_log_off") {
        return;
    }
    for mode in ["log", "off"] {
        let (code, err) = run("vcpu", mode);
        assert_eq!(code, Some(0), "--seccomp {mode}: {err}");
    }
}

#[test]
fn a_bad_mode_is_a_usage_error() {
    let out = common::run(&["run", "--seccomp", "sometimes"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not a seccomp mode (on, log or off)"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
