//! Builds the probe guest (src/probe, its own workspace, target x86_64-unknown-none) and
//! hands its ELF to the `cli` crate, which embeds it for `faultvisor demo`.
//!
//! The probe is built by a nested `cargo build` into `<profile dir>/probe-build`, shared
//! by every build of this profile. A missing `x86_64-unknown-none` standard library is
//! added with `rustup target add` (the only network access, to the Rust dist server);
//! if that is impossible the build fails with the command to run.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-none";

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}

fn sysroot_has_target(rustc: &str) -> bool {
    let out = Command::new(rustc).args(["--print", "sysroot"]).output();
    match out {
        Ok(o) if o.status.success() => {
            let root = String::from_utf8_lossy(&o.stdout).trim().to_string();
            Path::new(&root)
                .join("lib/rustlib")
                .join(TARGET)
                .join("lib")
                .is_dir()
        }
        _ => false,
    }
}

fn ensure_target(rustc: &str) {
    if sysroot_has_target(rustc) {
        return;
    }
    println!("cargo:warning=installing the {TARGET} target for the probe guest (rustup target add {TARGET})");
    let ok = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()
        .is_ok_and(|s| s.success());
    if !ok || !sysroot_has_target(rustc) {
        fail(&format!(
            "the probe guest needs the {TARGET} target; run: rustup target add {TARGET}"
        ));
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let probe_dir = manifest.join("../probe");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default());
    // OUT_DIR is <target>/[<triple>/]<profile>/build/cli-<hash>/out.
    let profile_dir = out_dir
        .ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| out_dir.clone());
    let target_dir = profile_dir.join("probe-build");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    for f in [
        "Cargo.toml",
        "build.rs",
        "link.ld",
        ".cargo/config.toml",
        "src",
    ] {
        println!("cargo:rerun-if-changed={}", probe_dir.join(f).display());
    }
    ensure_target(&rustc);

    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&probe_dir)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    // Start from a clean slate: the outer build's flags, wrappers (clippy) and target
    // settings must not leak into a freestanding kernel build.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        let leak = (k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_NET_OFFLINE")
            || k.starts_with("RUSTC_")
            || k == "RUSTFLAGS"
            || k == "RUSTDOCFLAGS"
            || k == "RUSTDOC"
            || k.starts_with("DEP_");
        if leak {
            cmd.env_remove(&k);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(&format!("cannot run {cargo}: {e}")));
    if !status.success() {
        fail("building the probe guest (src/probe) failed; see the messages above");
    }
    let elf = target_dir.join(TARGET).join("release/probe");
    let dest = out_dir.join("probe.elf");
    std::fs::copy(&elf, &dest)
        .unwrap_or_else(|e| fail(&format!("cannot copy {}: {e}", elf.display())));
    println!("cargo:rustc-env=FAULTVISOR_PROBE_ELF={}", dest.display());
}
