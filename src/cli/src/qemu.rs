//! `faultvisor qemu ARGS...` (also when the binary is invoked under a name containing
//! "qemu", e.g. a symlink `qemu-system-x86_64`): a launcher that takes QEMU x86 command
//! lines — what kvm-unit-tests' `x86/run` and `x86/unittests.cfg` produce — and runs
//! them on faultvisor, so that `QEMU=<launcher> ./run_tests.sh` works unmodified.
//!
//! It answers the runner's probes (`--help`, whose first line carries a QEMU-style
//! version; `-device '?'`, which lists the devices faultvisor models) and maps the rest:
//! `-kernel`/`-initrd`/`-append`, `-smp`, `-m`, `-cpu` (qemu64, max, host and kvm64 all
//! mean the host's CPUID, with `+f`/`-f`/`f=on|off` features added or removed),
//! `-machine`/`-M` (pc or q35 with kvm, split or on irqchip), `-device` (pc-testdev,
//! isa-debug-exit at 0xf4, edu, intel-iommu with intremap/eim, virtio-rng-pci),
//! `-serial stdio|none`, and options without effect here (`-nodefaults`, `-display
//! none`, `--no-reboot`, `-global kvm-pit.lost_tick_policy=...`, ...). An option it
//! cannot honour is never ignored: the launcher prints why on one line and exits 1,
//! which the runner's premature-failure probe turns into a SKIP with that reason.
//!
//! QEMU's intel-iommu does not verify the source ID of IOAPIC interrupts under
//! interrupt remapping, and kvm-unit-tests' `intel_iommu` relies on it; the launcher
//! maps `-device intel-iommu` to `--iommu intel,ioapic-sid=any` accordingly (faultvisor's
//! own default is strict, as hardware).

use arch::cpuid::{CpuFeatures, FEATURES};

/// The version line the runner parses (`QEMU emulator version MAJOR.MINOR.MICRO`).
pub const VERSION_LINE: &str = concat!(
    "QEMU emulator version 7.2.0 (faultvisor ",
    env!("CARGO_PKG_VERSION"),
    " QEMU-compatible launcher)"
);

/// What a command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Translation {
    /// Print this and exit 0 (`--help`, `-version`, `-device ?`).
    Print(String),
    /// An option faultvisor cannot honour: this reason, exit 1.
    Unsupported(String),
    /// Run `faultvisor` with these arguments (after `run`); the CPU features are
    /// checked against the host first.
    Run {
        /// Arguments of `faultvisor run`.
        args: Vec<String>,
        /// The kernel file (checked to exist, as QEMU does, before anything runs).
        kernel: String,
        /// `-cpu` translated.
        cpu: CpuFeatures,
    },
}

fn device_list() -> String {
    [
        "Controller/Bridge/Hub devices:",
        "name \"pc-testdev\", bus ISA",
        "name \"isa-debug-exit\", bus ISA",
        "",
        "Misc devices:",
        "name \"edu\", bus PCI",
        "name \"virtio-rng-pci\", bus PCI",
        "name \"intel-iommu\", bus System, desc \"Intel IOMMU (VT-d) DMA Remapping device\"",
        "",
    ]
    .join("\n")
}

fn help() -> String {
    format!(
        "{VERSION_LINE}\n\
         usage: qemu-system-x86_64 [options]\n\n\
         faultvisor runs a QEMU x86 command line on its own VMM. Understood:\n\
         -kernel FILE -initrd FILE -append STR -smp N[,...] -m SIZE\n\
         -cpu qemu64|max|host|kvm64[,+FEATURE|-FEATURE|FEATURE=on|off] (features: {})\n\
         -machine|-M [pc|q35][,accel=kvm][,kernel-irqchip=split|on]  -accel kvm  -enable-kvm\n\
         -device pc-testdev | isa-debug-exit,iobase=0xf4[,iosize=N] | edu |\n\
                 intel-iommu[,intremap=on|off][,eim=on|off] | virtio-rng-pci\n\
         -serial stdio|none  -display none  -nographic  -nodefaults  -no-reboot\n\
         -monitor none  -vga none  -name NAME  -global kvm-pit.lost_tick_policy=VALUE\n\
         Anything else is refused with the reason (kvm-unit-tests then SKIPs the test).\n",
        FEATURES.iter().map(|f| f.0).collect::<Vec<_>>().join(", ")
    )
}

/// The value of an option that takes one, or the refusal.
fn value<'a>(it: &mut std::slice::Iter<'a, String>, opt: &str) -> Result<&'a str, Translation> {
    it.next()
        .map(String::as_str)
        .ok_or_else(|| Translation::Unsupported(format!("option {opt} needs a value")))
}

fn refuse(what: impl std::fmt::Display) -> Translation {
    Translation::Unsupported(format!("faultvisor cannot honour {what}"))
}

/// QEMU's `-m`: a bare number is MiB; k/m/g/t suffixes (either case), `size=` form.
fn memory_mib(v: &str) -> Option<u64> {
    let v = v.strip_prefix("size=").unwrap_or(v);
    let v = v.split(',').next()?;
    let (num, mul) = match v.chars().last()?.to_ascii_lowercase() {
        'k' => (&v[..v.len() - 1], 1.0 / 1024.0),
        'm' => (&v[..v.len() - 1], 1.0),
        'g' => (&v[..v.len() - 1], 1024.0),
        't' => (&v[..v.len() - 1], 1024.0 * 1024.0),
        _ => (v, 1.0),
    };
    let n: f64 = num.parse().ok()?;
    let mib = (n * mul).ceil();
    (mib.is_finite() && (1.0..1e9).contains(&mib)).then_some(mib as u64)
}

/// `-smp N` or `-smp cpus=N,sockets=..,cores=..,threads=..,maxcpus=..`.
fn smp(v: &str) -> Option<u32> {
    let mut cpus = None;
    let mut product: Option<u32> = None;
    for (i, part) in v.split(',').enumerate() {
        match part.split_once('=') {
            None if i == 0 => cpus = part.parse().ok(),
            Some(("cpus", n)) => cpus = n.parse().ok(),
            Some(("sockets" | "cores" | "threads" | "dies", n)) => {
                product = Some(product.unwrap_or(1).checked_mul(n.parse().ok()?)?)
            }
            Some(("maxcpus", _)) => {}
            _ => return None,
        }
    }
    cpus.or(product).filter(|n| *n >= 1)
}

fn cpu(v: &str) -> Result<CpuFeatures, Translation> {
    let mut parts = v.split(',');
    let model = parts.next().unwrap_or("");
    if !matches!(model, "qemu64" | "max" | "host" | "kvm64" | "base") {
        return Err(refuse(format!(
            "-cpu {model}: faultvisor passes the host's CPUID through and models no named CPU"
        )));
    }
    let mut spec = String::from("host");
    for p in parts {
        let (name, on) = if let Some(n) = p.strip_prefix('+') {
            (n, true)
        } else if let Some(n) = p.strip_prefix('-') {
            (n, false)
        } else if let Some((n, val)) = p.split_once('=') {
            match (n, val) {
                ("vendor", _) => {
                    spec.push(',');
                    spec.push_str(p);
                    continue;
                }
                ("host-phys-bits", "on" | "true") | ("migratable", _) | ("check", _) => continue,
                (_, "on" | "true") => (n, true),
                (_, "off" | "false") => (n, false),
                _ => return Err(refuse(format!("-cpu property {p}"))),
            }
        } else if matches!(p, "host-phys-bits" | "check" | "enforce") {
            continue;
        } else {
            (p, true)
        };
        if !FEATURES.iter().any(|f| f.0 == name) {
            return Err(refuse(format!("-cpu feature {name}")));
        }
        spec.push(',');
        spec.push(if on { '+' } else { '-' });
        spec.push_str(name);
    }
    spec.parse()
        .map_err(|e: String| refuse(format!("-cpu {v}: {e}")))
}

/// Translates a QEMU command line (without the program name).
pub fn translate(argv: &[String]) -> Translation {
    // Every QEMU PC has the 8259A pair (real-mode tests take IRQs through it) and the
    // CMOS RTC (whose alarm wakes the s3 test).
    let mut run: Vec<String> = vec![
        "--serial".into(),
        "stdio".into(),
        "--device".into(),
        "pic".into(),
        "--device".into(),
        "rtc".into(),
    ];
    let mut kernel = None;
    let mut cmdline = None;
    let mut cpu_features = CpuFeatures::default();
    let mut iommu: Option<String> = None;
    let mut vcpus = 1u32;
    let mut mem_mib = 128u64;
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        // QEMU takes -opt and --opt alike.
        let opt = match arg.strip_prefix("--") {
            Some(o) => format!("-{o}"),
            None => arg.clone(),
        };
        let r: Result<(), Translation> = (|| {
            match opt.as_str() {
                "-h" | "-help" => return Err(Translation::Print(help())),
                "-version" => return Err(Translation::Print(format!("{VERSION_LINE}\n"))),
                "-nodefaults" | "-no-reboot" | "-nographic" | "-enable-kvm" | "-no-user-config" => {
                }
                "-kernel" => kernel = Some(value(&mut it, &opt)?.to_string()),
                "-initrd" => {
                    let v = value(&mut it, &opt)?;
                    run.extend(["--initrd".into(), v.to_string()]);
                }
                "-append" => cmdline = Some(value(&mut it, &opt)?.to_string()),
                "-smp" => {
                    let v = value(&mut it, &opt)?;
                    vcpus = smp(v).ok_or_else(|| refuse(format!("-smp {v}")))?;
                }
                "-m" => {
                    let v = value(&mut it, &opt)?;
                    mem_mib = memory_mib(v).ok_or_else(|| refuse(format!("-m {v}")))?;
                }
                "-cpu" => cpu_features = cpu(value(&mut it, &opt)?)?,
                "-accel" => {
                    let v = value(&mut it, &opt)?;
                    if v.split(',').next() != Some("kvm") {
                        return Err(refuse(format!("-accel {v}: faultvisor runs on KVM only")));
                    }
                }
                "-machine" | "-M" => {
                    let v = value(&mut it, &opt)?;
                    for (i, p) in v.split(',').enumerate() {
                        match p.split_once('=') {
                            None if i == 0 && is_machine(p) => {}
                            Some(("type", m)) if is_machine(m) => {}
                            Some(("accel", "kvm")) => {}
                            Some(("accel", a)) => {
                                return Err(refuse(format!(
                                    "-machine accel={a}: faultvisor runs on KVM only"
                                )))
                            }
                            Some(("kernel-irqchip", "split" | "on")) => {}
                            // faultvisor has no PIT.
                            Some(("pit", "off")) => {}
                            _ => return Err(refuse(format!("-machine {p}"))),
                        }
                    }
                }
                "-global" => {
                    let v = value(&mut it, &opt)?;
                    if !v.starts_with("kvm-pit.lost_tick_policy=") {
                        return Err(refuse(format!("-global {v}")));
                    }
                }
                "-serial" => match value(&mut it, &opt)? {
                    "stdio" => {}
                    "none" | "null" => {
                        run.retain(|a| a != "--serial" && a != "stdio");
                        run.extend(["--serial".into(), "none".into()]);
                    }
                    v => return Err(refuse(format!("-serial {v}"))),
                },
                "-display" | "-vga" | "-monitor" => {
                    let v = value(&mut it, &opt)?;
                    if v != "none" {
                        return Err(refuse(format!("{opt} {v}")));
                    }
                }
                "-name" => {
                    value(&mut it, &opt)?;
                }
                "-device" => {
                    let v = value(&mut it, &opt)?;
                    if matches!(v, "?" | "help") {
                        return Err(Translation::Print(device_list()));
                    }
                    device(v, &mut run, &mut iommu)?;
                }
                other => return Err(refuse(format!("option {other}"))),
            }
            Ok(())
        })();
        if let Err(t) = r {
            return t;
        }
    }
    let Some(kernel) = kernel else {
        return Translation::Unsupported("no -kernel given: faultvisor boots kernels only".into());
    };
    if mem_mib < 64 {
        mem_mib = 64;
    }
    run.extend([
        "--kernel".into(),
        kernel.clone(),
        "--vcpus".into(),
        vcpus.to_string(),
        "--memory".into(),
        format!("{mem_mib}M"),
        "--iommu".into(),
        iommu.unwrap_or_else(|| "off".into()),
        "--cmdline".into(),
        cmdline.unwrap_or_default(),
    ]);
    let mut cpu_arg = String::from("host");
    for f in &cpu_features.add {
        cpu_arg.push_str(&format!(",+{f}"));
    }
    for f in &cpu_features.remove {
        cpu_arg.push_str(&format!(",-{f}"));
    }
    if let Some(v) = cpu_features.vendor {
        cpu_arg.push_str(&format!(",vendor={}", String::from_utf8_lossy(&v)));
    }
    run.extend(["--cpu".into(), cpu_arg]);
    Translation::Run {
        args: run,
        kernel,
        cpu: cpu_features,
    }
}

fn is_machine(m: &str) -> bool {
    matches!(m, "pc" | "q35") || m.starts_with("pc-q35-") || m.starts_with("pc-i440fx-")
}

fn device(v: &str, run: &mut Vec<String>, iommu: &mut Option<String>) -> Result<(), Translation> {
    let mut parts = v.split(',');
    let name = parts.next().unwrap_or("");
    let props: Vec<(&str, &str)> = parts
        .map(|p| p.split_once('=').unwrap_or((p, "on")))
        .collect();
    let no_props = |props: &[(&str, &str)]| match props.first() {
        Some((k, val)) => Err(refuse(format!("-device {name} property {k}={val}"))),
        None => Ok(()),
    };
    match name {
        "pc-testdev" => {
            no_props(&props)?;
            run.extend(["--device".into(), "pc-testdev".into()]);
        }
        "isa-debug-exit" => {
            for (k, val) in &props {
                let num = |s: &str| {
                    s.strip_prefix("0x").map_or_else(
                        || s.parse::<u64>().ok(),
                        |h| u64::from_str_radix(h, 16).ok(),
                    )
                };
                match (*k, num(val)) {
                    ("iobase", Some(0xf4)) | ("iosize", Some(1 | 2 | 4)) => {}
                    _ => {
                        return Err(refuse(format!(
                            "-device isa-debug-exit,{k}={val} (it is at 0xf4)"
                        )))
                    }
                }
            }
        }
        "edu" => {
            no_props(&props)?;
            run.extend(["--device".into(), "edu".into()]);
        }
        "virtio-rng-pci" | "virtio-rng" => {
            no_props(&props)?;
            run.extend(["--device".into(), "virtio-rng".into()]);
        }
        "intel-iommu" => {
            // QEMU does not verify IOAPIC messages' source ID; the suite relies on it.
            let mut spec = String::from("intel,ioapic-sid=any");
            for (k, val) in &props {
                match (*k, *val) {
                    ("intremap", "on" | "off") => spec.push_str(&format!(",intremap={val}")),
                    ("eim", "on" | "off") => spec.push_str(&format!(",eim={val}")),
                    ("caching-mode", "off") | ("device-iotlb", "off") | ("aw-bits", "48") => {}
                    _ => return Err(refuse(format!("-device intel-iommu,{k}={val}"))),
                }
            }
            *iommu = Some(spec);
        }
        _ => return Err(refuse(format!("-device {name}"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Translation {
        let v: Vec<String> = shell_words(s);
        translate(&v)
    }

    fn shell_words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn the_runners_command_lines() {
        let line = "--no-reboot -nodefaults -global kvm-pit.lost_tick_policy=discard \
                    -device pc-testdev -device isa-debug-exit,iobase=0xf4,iosize=0x4 \
                    -display none -serial stdio -machine accel=kvm -kernel x86/apic.flat \
                    -smp 2 -cpu qemu64,+x2apic,+tsc-deadline -initrd /tmp/env";
        let Translation::Run { args, kernel, cpu } = t(line) else {
            panic!("{:?}", t(line));
        };
        assert_eq!(kernel, "x86/apic.flat");
        assert_eq!(cpu.add, vec!["x2apic", "tsc-deadline"]);
        let joined = args.join(" ");
        for want in [
            "--device pc-testdev",
            "--vcpus 2",
            "--memory 128M",
            "--initrd /tmp/env",
            "--iommu off",
            "--cpu host,+x2apic,+tsc-deadline",
            "--cmdline ",
        ] {
            assert!(joined.contains(want), "{want}: {joined}");
        }
        let Translation::Run { args, .. } = t(
            "-M q35,kernel-irqchip=split -device intel-iommu,intremap=on,eim=off -device edu \
             -kernel k -smp 4 -m 4g -append -v",
        ) else {
            panic!("iommu line");
        };
        let joined = args.join(" ");
        assert!(
            joined.contains("--iommu intel,ioapic-sid=any,intremap=on,eim=off"),
            "{joined}"
        );
        assert!(joined.contains("--device edu") && joined.contains("--memory 4096M"));
        assert!(joined.contains("--cmdline -v"));
    }

    #[test]
    fn every_vm_gets_the_pc_legacy_devices() {
        let Translation::Run { args, .. } = t("-kernel k") else {
            panic!("not run");
        };
        let j = args.join(" ");
        assert!(
            j.contains("--device pic") && j.contains("--device rtc"),
            "{j}"
        );
    }

    #[test]
    fn cpu_vendor_is_passed_on() {
        let Translation::Run { args, .. } = t("-kernel k -cpu max,vendor=GenuineIntel") else {
            panic!("not run");
        };
        assert!(args.join(" ").contains("--cpu host,vendor=GenuineIntel"));
    }

    #[test]
    fn probes_and_refusals() {
        assert!(matches!(t("--help"), Translation::Print(s) if s.starts_with(VERSION_LINE)));
        assert!(
            matches!(t("-device ?"), Translation::Print(s) if s.contains("\"pc-testdev\"") && !s.contains("pci-testdev"))
        );
        for (line, why) in [
            ("-kernel k -cpu Skylake-Server,+vmx", "models no named CPU"),
            ("-kernel k -cpu max,vendor=Intel", "12 printable ASCII"),
            (
                "-kernel k -cpu host,hv_passthrough",
                "-cpu feature hv_passthrough",
            ),
            ("-kernel k -machine vmport=on", "-machine vmport=on"),
            ("-kernel k -machine accel=tcg", "KVM only"),
            ("-kernel k -device pci-testdev", "-device pci-testdev"),
            ("-kernel k -device hyperv-testdev", "-device hyperv-testdev"),
            ("-kernel k -overcommit cpu-pm=on", "option -overcommit"),
            ("-kernel k -chardev file,id=x,path=y", "option -chardev"),
            ("-kernel k -smp x", "-smp x"),
            ("-kernel", "needs a value"),
            ("-smp 2", "no -kernel"),
        ] {
            match t(line) {
                Translation::Unsupported(r) => assert!(r.contains(why), "{line}: {r}"),
                other => panic!("{line}: {other:?}"),
            }
        }
    }

    #[test]
    fn sizes_and_smp() {
        assert_eq!(memory_mib("2048"), Some(2048));
        assert_eq!(memory_mib("4g"), Some(4096));
        assert_eq!(memory_mib("512M"), Some(512));
        assert_eq!(memory_mib("size=1G,maxmem=4G"), Some(1024));
        assert_eq!(memory_mib("x"), None);
        assert_eq!(smp("3"), Some(3));
        assert_eq!(smp("cpus=4,maxcpus=8"), Some(4));
        assert_eq!(smp("sockets=2,cores=2"), Some(4));
        assert_eq!(smp("0"), None);
    }
}
