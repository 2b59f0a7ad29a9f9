//! The faultvisor binary's command line: help, and one-line errors with a non-zero exit
//! for every bad input, checked in child processes.

mod common;

use common::run;

fn assert_one_line_error(args: &[&str], want: &str) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: stderr {err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.contains("faultvisor WARN"))
        .collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {err:?}");
    assert!(
        lines[0].starts_with("faultvisor: error: "),
        "{args:?}: {err}"
    );
    assert!(
        lines[0].contains(want),
        "{args:?}: '{}' lacks '{want}'",
        lines[0]
    );
    assert!(!err.contains("panicked"), "{args:?}: panic: {err}");
}

#[test]
fn help_shows_examples() {
    let out = run(&["run", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let s = String::from_utf8_lossy(&out.stdout);
    for w in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--memory",
        "--vcpus",
        "--serial",
        "Examples:",
    ] {
        assert!(s.contains(w), "help lacks {w}");
    }
}

#[test]
fn usage_errors() {
    assert_one_line_error(&["run", "--bogus"], "unexpected argument '--bogus'");
    assert_one_line_error(&["run", "--vcpus", "two"], "invalid value 'two'");
    assert_one_line_error(&["frobnicate"], "unrecognized subcommand");
    assert_one_line_error(&["--log-level", "loud", "run"], "invalid log level 'loud'");
}

#[test]
fn file_errors() {
    assert_one_line_error(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "cannot read kernel '/nonexistent/vmlinux'",
    );
    assert_one_line_error(&["run", "--kernel", "/etc/hostname"], "not a kernel image");
    let k = common::tiny_elf("file-errors", &common::debug_exit(0));
    let k = k.to_str().expect("utf8");
    assert_one_line_error(
        &["run", "--kernel", k, "--initrd", "/nonexistent/initrd"],
        "cannot read initrd",
    );
}

#[test]
fn resource_errors() {
    let k = common::tiny_elf("resource-errors", &common::debug_exit(0));
    let k = k.to_str().expect("utf8");
    assert_one_line_error(
        &["run", "--kernel", k, "--memory", "32M"],
        "below the minimum of 64M",
    );
    assert_one_line_error(
        &["run", "--kernel", k, "--memory", "1000T"],
        "more than this host's",
    );
    assert_one_line_error(
        &["run", "--kernel", k, "--vcpus", "0"],
        "--vcpus must be at least 1",
    );
    assert_one_line_error(
        &["run", "--kernel", k, "--serial", "tty"],
        "invalid --serial 'tty'",
    );
}

#[test]
fn kvm_device_errors() {
    let k = common::tiny_elf("kvm-errors", &common::debug_exit(0));
    let out = std::process::Command::new(common::faultvisor())
        .args(["run", "--kernel", k.to_str().expect("utf8")])
        .env("FAULTVISOR_KVM_DEVICE", "/nonexistent/kvm")
        .output()
        .expect("spawn");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.lines().any(|l| l
            == "faultvisor: error: cannot open /nonexistent/kvm: no such device (KVM is not \
                available: load the kvm module, or enable virtualization in the firmware or \
                the outer hypervisor)"),
        "{err}"
    );
}

#[test]
fn too_many_vcpus() {
    if !common::kvm_available("too_many_vcpus") {
        return;
    }
    let k = common::tiny_elf("too-many", &common::debug_exit(0));
    assert_one_line_error(
        &[
            "run",
            "--kernel",
            k.to_str().expect("utf8"),
            "--vcpus",
            "100000",
        ],
        "100000 vCPUs requested, but at most",
    );
}
