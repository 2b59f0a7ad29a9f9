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

#[test]
fn disk_errors() {
    assert_one_line_error(
        &["run", "--disk", "readonly=on"],
        "a disk needs path=FILE or dir=DIR",
    );
    assert_one_line_error(
        &["run", "--disk", "path=a,speed=3"],
        "unknown disk option 'speed'",
    );
    if !common::kvm_available("disk_errors") {
        return;
    }
    let k = common::tiny_elf("disk-errors", &common::debug_exit(0));
    let k = k.to_str().expect("utf8");
    assert_one_line_error(
        &["run", "--kernel", k, "--disk", "path=/nonexistent/disk.img"],
        "disk /nonexistent/disk.img: cannot open",
    );
    let dir = std::env::temp_dir().join(format!("fv-cli-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let odd = dir.join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).expect("write");
    let odd = odd.to_str().expect("utf8");
    assert_one_line_error(
        &["run", "--kernel", k, "--disk", &format!("path={odd}")],
        "size 1000 is not a multiple of 512",
    );
    let img = dir.join("d.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("write");
    let img = img.to_str().expect("utf8");
    let spec = format!("path={img}");
    assert_one_line_error(
        &["run", "--kernel", k, "--disk", &spec, "--disk", &spec],
        "already in use",
    );
    // A well-formed disk: the tiny guest runs and exits through debug-exit.
    let out = run(&["run", "--kernel", k, "--disk", &spec, "--serial", "none"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("device virtio-blk (1af4:1042)"), "{log}");
    std::fs::remove_dir_all(&dir).expect("rm");
}
