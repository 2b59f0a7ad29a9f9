//! The faultvisor command line: argument parsing (clap), validation with one-line error
//! messages, logging, and the `run` command that boots a VM with the `vmm` crate.
//!
//! Exit codes: 0 the guest powered off or reset; `(v << 1) | 1` the guest wrote `v` to
//! the debug-exit port; 2 a usage or VMM error; 4 the guest crashed; 70 an internal
//! error (a bug, reported on one line).

pub mod campaign;
pub mod client;
pub mod demo;
mod logger;
pub mod qemu;
pub mod size;
pub mod symbols;
mod terminal;

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use vmm::{SerialConfig, VmConfig, EXIT_VMM_ERROR};

/// Exit code after an internal error (a bug in faultvisor).
pub const EXIT_INTERNAL_ERROR: i32 = 70;

/// Default kernel command line for the default guest (and when `--cmdline` is absent).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet";

const RUN_EXAMPLES: &str = "\
Examples:
  # Boot the default Debian guest (build it first: python3 resources/guest/build.py)
  faultvisor run

  # Boot your own kernel with 2 vCPUs and 1 GiB, console on stdout
  faultvisor run --kernel vmlinux --initrd initrd.cpio --vcpus 2 --memory 1G \\
      --cmdline 'console=ttyS0 quiet'

  # Keep the console in a file
  faultvisor run --kernel bzImage --serial file=/tmp/console.log

Exit status: 0 when the guest powers off or reboots, (v<<1)|1 when it writes v to the
debug-exit port 0xf4, 2 on a usage or VMM error, 4 when the guest crashes.";

/// faultvisor: a minimal KVM VMM with an emulated VT-d IOMMU, a userspace IOAPIC and
/// guest-visible DMA faults.
#[derive(Debug, Parser)]
#[command(name = "faultvisor", version, about, long_about = None)]
pub struct Cli {
    /// Log level: error, warn, info, debug or trace (also FAULTVISOR_LOG).
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM: the default Debian guest, or the kernel you name.
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Boot the probe guest built into this binary and show what it sees: IOAPIC,
    /// MSI and MSI-X delivery, exceptions, serial interrupts (works on any KVM).
    #[command(after_help = demo::DEMO_EXAMPLES)]
    Demo(demo::DemoArgs),
    /// Inject a fault into a running VM through its API socket.
    #[command(after_help = client::INJECT_EXAMPLES)]
    Inject(client::InjectArgs),
    /// Print a running VM's counters (VT-d, interrupt injection, IOAPIC pins).
    Stats(client::StatsArgs),
    /// Run a fault-injection campaign: many short VMs with fault plans and
    /// expectations, in parallel; JSON Lines and Markdown report.
    #[command(after_help = campaign::CAMPAIGN_EXAMPLES)]
    Campaign(campaign::CampaignArgs),
    /// Join the outputs of campaign shards into one report.
    Merge(campaign::MergeArgs),
    /// Show a running VM's IOAPIC redirection table, decoded.
    Ioapic(client::SocketArgs),
    /// Show a running VM's VT-d unit: state, root table, the last faults decoded.
    Iommu(client::IommuArgs),
    /// Dump a vCPU's IDT like WinDbg's !idt: handler, symbol+offset, gate type, DPL,
    /// IST, and what faultvisor routes to each vector with its count.
    Idt(client::IdtArgs),
}

/// Arguments of `faultvisor run`.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// Kernel image: an uncompressed ELF vmlinux (faster) or a bzImage. Default: the
    /// guest built by resources/guest/build.py.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (cpio archive). Default with the default guest: its initramfs.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Guest RAM: a number with an optional K, M or G suffix (MiB when bare).
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub vcpus: u32,
    /// Serial console: stdio, file=PATH or none.
    #[arg(long, value_name = "DEST", default_value = "stdio")]
    pub serial: String,
    /// Add a device (repeatable). PCI: `test` is fv-test (1234:fa17), the probe guest's
    /// interrupt source; `edu` is QEMU's educational device (1234:11e8) with its DMA
    /// engine behind the IOMMU; `virtio-rng` is an entropy device on modern virtio-pci
    /// whose DMA the IOMMU translates (option bdf=00:DD.0). ISA, for kvm-unit-tests and
    /// real-mode code: `pc-testdev` (QEMU's test ports), `pic` (the 8259A pair on vCPU
    /// 0's LINT0), `rtc` (the CMOS clock, whose alarm wakes from ACPI S3).
    #[arg(long = "device", value_name = "KIND[,bdf=00:DD.0]", value_parser = parse_device)]
    pub devices: Vec<vmm::DeviceSpec>,
    /// Add a virtio-blk disk (repeatable): a raw image (`path=FILE`, its size a multiple
    /// of 512; locked like QEMU locks it) or a host directory copied into a read-only
    /// ext4 image at start (`dir=DIR`). Options: readonly=on, snapshot=on (the guest
    /// works on a private copy, removed at exit), bdf=00:DD.0, serial=ID (GET_ID, 20
    /// characters at most), cache=volatile (default: writes reach the file at the
    /// guest's flush, a power cut loses the rest) or cache=host. Without --kernel and
    /// --initrd the default guest boots from a snapshot of its root disk.
    #[arg(long = "disk", value_name = "path=FILE|dir=DIR[,OPT=V]...", value_parser = parse_disk)]
    pub disks: Vec<vmm::DiskSpec>,
    /// IOMMU: intel (an emulated VT-d unit and its DMAR table), off, or auto (intel
    /// when a device does DMA, such as edu); options after commas:
    /// intremap=on|off (interrupt remapping offered, default on), ioapic-sid=strict|any
    /// (verify IOAPIC messages' source ID, default strict), caching=simple|exact (exact:
    /// caches keep entries until exactly the invalidation the spec requires, and every
    /// use of a stale entry is reported; default simple).
    #[arg(long, value_name = "MODE[,OPT=V]", default_value = "auto", value_parser = parse_iommu)]
    pub iommu: vmm::IommuConfig,
    /// Serve the control API (HTTP/1.1 + JSON) on this Unix socket: `faultvisor inject`
    /// and `faultvisor stats` talk to it.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Write every counter (interrupts, VT-d, VM exits) as JSON to PATH when the VM ends.
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,
    /// Record interrupts, DMA requests, VT-d faults and injections (the last 65536) and
    /// write them to PATH as Chrome trace JSON when the VM ends (opens in Perfetto).
    #[arg(long, value_name = "PATH")]
    pub trace_file: Option<PathBuf>,
    /// Per-thread seccomp filters: on (a forbidden system call ends the VMM with a
    /// message naming the thread and the call), log (the kernel logs it and lets it
    /// through) or off.
    #[arg(long, value_name = "MODE", default_value = "on", value_parser = parse_seccomp)]
    pub seccomp: vmm::seccomp::SeccompMode,
    /// The vCPUs' CPUID: host (what the host's KVM offers), with features added (+NAME)
    /// or removed (-NAME): x2apic, tsc-deadline, pcid, invpcid, umip, pku, la57, xsave,
    /// vmx, svm, rdtscp. A feature the host does not offer is an error. vendor=NAME
    /// replaces the vendor string (vendor=GenuineIntel on an AMD host).
    #[arg(long, value_name = "host[,+F][,-F][,vendor=V]", default_value = "host", value_parser = parse_cpu)]
    pub cpu: arch::cpuid::CpuFeatures,
    /// How the kernel and initrd reach guest RAM: copy (read straight into guest RAM)
    /// or map (their pages are mapped from the files, copy-on-write: nothing is read
    /// before the guest touches it, the fastest start, but KVM then maps them with 4 KiB
    /// pages; the files must not be modified in place while the VM runs).
    #[arg(long, value_name = "MODE", default_value = "copy", value_parser = parse_load)]
    pub load: arch::mapload::LoadMode,
}

fn parse_load(s: &str) -> Result<arch::mapload::LoadMode, String> {
    s.parse()
}

fn parse_disk(s: &str) -> Result<vmm::DiskSpec, String> {
    s.parse()
}

pub(crate) fn parse_cpu(s: &str) -> Result<arch::cpuid::CpuFeatures, String> {
    s.parse()
}

fn parse_seccomp(s: &str) -> Result<vmm::seccomp::SeccompMode, String> {
    s.parse()
}

fn parse_iommu(s: &str) -> Result<vmm::IommuConfig, String> {
    s.parse()
}

fn parse_device(s: &str) -> Result<vmm::DeviceSpec, String> {
    s.parse()
}

/// A user-facing error: one line, non-zero exit.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad argument value.
    #[error("{0}")]
    Usage(String),
    /// A file problem.
    #[error("cannot read {what} '{path}': {reason}")]
    File {
        /// Which file.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The default guest is missing.
    #[error("the default guest image is not built ({0} is missing); run: python3 resources/guest/build.py")]
    NoDefaultGuest(PathBuf),
    /// The VMM failed.
    #[error(transparent)]
    Vmm(#[from] vmm::VmmError),
    /// A campaign could not run (its file, an option, a file it writes).
    #[error(transparent)]
    Campaign(#[from] ::campaign::run::Error),
    /// A running VMM could not be reached (exit status 2).
    #[error("{0}")]
    Unreachable(String),
}

/// Parses `--serial`.
pub fn parse_serial(s: &str) -> Result<SerialConfig, CliError> {
    match s {
        "stdio" => Ok(SerialConfig::Stdio),
        "none" => Ok(SerialConfig::None),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
            _ => Err(CliError::Usage(format!(
                "invalid --serial '{s}': expected stdio, file=PATH or none"
            ))),
        },
    }
}

/// Where the default guest lives ($FAULTVISOR_CACHE or ~/.cache/faultvisor, then guest/).
pub fn default_guest_dir() -> PathBuf {
    let base = std::env::var_os("FAULTVISOR_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/faultvisor")))
        .unwrap_or_else(|| PathBuf::from("/tmp/faultvisor-cache"));
    base.join("guest")
}

fn check_file(what: &'static str, path: &Path) -> Result<std::fs::File, CliError> {
    let f = std::fs::File::open(path).map_err(|e| CliError::File {
        what,
        path: path.to_path_buf(),
        reason: e.kind().to_string(),
    })?;
    let meta = f.metadata().map_err(|e| CliError::File {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if !meta.is_file() {
        return Err(CliError::File {
            what,
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    Ok(f)
}

/// Total host RAM in bytes (from /proc/meminfo), if known.
pub fn host_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Validates `run` arguments into a [`VmConfig`] without touching KVM.
pub fn build_config(args: &RunArgs, start: Instant) -> Result<VmConfig, CliError> {
    let mem_size = size::parse_size(&args.memory)
        .map_err(|e| CliError::Usage(format!("invalid --memory '{}': {e}", args.memory)))?;
    if mem_size < vmm::MIN_MEMORY {
        return Err(CliError::Usage(format!(
            "--memory {} is below the minimum of 64M",
            args.memory
        )));
    }
    if let Some(host) = host_memory() {
        if mem_size > host {
            return Err(CliError::Usage(format!(
                "--memory {} is more than this host's {} MiB of RAM",
                args.memory,
                host >> 20
            )));
        }
    }
    if args.vcpus == 0 {
        return Err(CliError::Usage("--vcpus must be at least 1".into()));
    }
    let serial = parse_serial(&args.serial)?;
    let mut disks = args.disks.clone();
    let mut root_disk = false;
    let (kernel, initrd) = match &args.kernel {
        Some(k) => (k.clone(), args.initrd.clone()),
        None => {
            let dir = default_guest_dir();
            let k = dir.join("vmlinux");
            if !k.exists() {
                return Err(CliError::NoDefaultGuest(k));
            }
            // Without --initrd the default guest boots from its root disk (a private
            // copy: nothing the guest writes reaches the cached image); the initramfs
            // only loads the virtio modules and switches to it.
            let rootfs = dir.join("rootfs.ext4");
            if args.initrd.is_none() && rootfs.exists() {
                root_disk = true;
                disks.insert(
                    0,
                    vmm::DiskSpec {
                        source: vmm::DiskSource::File(rootfs),
                        readonly: false,
                        bdf: None,
                        serial: Some("fv-root".into()),
                        cache: devices::virtio::disk::CacheMode::Volatile,
                        snapshot: true,
                    },
                );
            }
            let i = args
                .initrd
                .clone()
                .unwrap_or_else(|| dir.join("initramfs.cpio"));
            (k, Some(i))
        }
    };
    let mut kf = check_file("kernel", &kernel)?;
    let format = arch::boot::detect_format(&mut kf).map_err(|e| CliError::File {
        what: "kernel",
        path: kernel.clone(),
        reason: e.to_string(),
    })?;
    // A Multiboot kernel's command line is its arguments (its name comes first anyway);
    // Linux gets the default console settings.
    let default_cmdline = match format {
        arch::boot::KernelFormat::Multiboot => String::new(),
        _ if root_disk => format!("{DEFAULT_CMDLINE} root=/dev/vda"),
        _ => DEFAULT_CMDLINE.to_string(),
    };
    if let Some(i) = &initrd {
        check_file("initrd", i)?;
    }
    Ok(VmConfig {
        kernel,
        initrd,
        cmdline: args.cmdline.clone().unwrap_or(default_cmdline),
        mem_size,
        vcpus: args.vcpus,
        serial,
        devices: args.devices.clone(),
        disks,
        iommu: args.iommu,
        api_socket: args.api_socket.clone(),
        metrics_file: args.metrics_file.clone(),
        trace_file: args.trace_file.clone(),
        start,
        seccomp: args.seccomp,
        load: args.load,
        cpu: args.cpu.clone(),
    })
}

fn run(args: &RunArgs, start: Instant) -> Result<i32, CliError> {
    let cfg = build_config(args, start)?;
    // Small images are test kernels and probes, which kvm_pvm runs fine.
    let big_kernel = std::fs::metadata(&cfg.kernel).is_ok_and(|m| m.len() > 1 << 20);
    if vmm::host_kvm_is_pvm() && big_kernel {
        log::warn!(
            "this host's KVM is kvm_pvm (software): a stock Linux guest cannot boot on it; \
             ci/boot.sh runs the default guest in the nested lab instead"
        );
    }
    let vm = vmm::Vm::build(&cfg)?;
    if cfg.serial == SerialConfig::Stdio && terminal::enter_raw_mode() {
        log::info!("console in raw mode: Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A");
    }
    let req = vm.run();
    terminal::restore();
    let req = req?;
    log::info!("VM ended: {} (exit code {})", req.reason, req.code);
    Ok(req.code)
}

/// `faultvisor qemu ...`: the QEMU command line translated into `faultvisor run`
/// arguments, or the exit status when there is nothing to run (a probe answered, an
/// option refused, the kernel missing).
fn qemu_launch(args: &[String]) -> Result<Vec<std::ffi::OsString>, i32> {
    match qemu::translate(args) {
        qemu::Translation::Print(s) => {
            print!("{s}");
            Err(0)
        }
        qemu::Translation::Unsupported(why) => {
            eprintln!("{why}");
            Err(1)
        }
        qemu::Translation::Run { args, kernel, cpu } => {
            if let Err(f) = vmm::host_offers(&cpu) {
                eprintln!("faultvisor cannot honour -cpu +{f}: this host's KVM does not offer it");
                return Err(1);
            }
            if let Err(e) = std::fs::File::open(&kernel) {
                // The runner's premature-failure probe looks for this wording.
                eprintln!("qemu-system-x86_64: could not load kernel '{kernel}': {e}");
                return Err(1);
            }
            // QEMU prints nothing of its own on stderr: errors only.
            let mut v: Vec<std::ffi::OsString> = ["faultvisor", "--log-level", "error", "run"]
                .map(Into::into)
                .to_vec();
            v.extend(args.into_iter().map(Into::into));
            Ok(v)
        }
    }
}

/// Entry point; returns the process exit code.
pub fn main() -> i32 {
    let start = Instant::now();
    // A bug must not leave a VM half-running or print a backtrace: report it on one
    // line and end the whole process (vCPU threads included).
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        terminal::restore();
        eprintln!("faultvisor: internal error: {what}{at} (please report this)");
        std::process::exit(EXIT_INTERNAL_ERROR);
    }));
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let invoked_as_qemu = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n.to_string_lossy().contains("qemu"));
    let argv = if invoked_as_qemu || argv.get(1).is_some_and(|a| a == "qemu") {
        let skip = if invoked_as_qemu { 1 } else { 2 };
        let rest: Vec<String> = argv
            .iter()
            .skip(skip)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        match qemu_launch(&rest) {
            Ok(run_argv) => run_argv,
            Err(code) => return code,
        }
    } else {
        argv
    };
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = e.print();
                    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                        EXIT_VMM_ERROR
                    } else {
                        0
                    }
                }
                _ => {
                    let text = e.to_string();
                    let first = text.lines().next().unwrap_or("invalid arguments");
                    let first = first.strip_prefix("error: ").unwrap_or(first);
                    eprintln!("faultvisor: error: {first} (see --help)");
                    EXIT_VMM_ERROR
                }
            };
        }
    };
    // The demo's output is the guest's report: only warnings by default.
    let level = cli
        .log_level
        .clone()
        .or_else(|| std::env::var("FAULTVISOR_LOG").ok())
        .or_else(|| matches!(cli.command, Command::Demo(_)).then(|| "warn".to_string()));
    if let Err(e) = logger::init(level.as_deref(), start) {
        eprintln!("faultvisor: error: {e}");
        return EXIT_VMM_ERROR;
    }
    let result = match &cli.command {
        Command::Run(a) => run(a, start),
        Command::Demo(a) => demo::run(a, start),
        Command::Inject(a) => client::inject(a),
        Command::Stats(a) => client::stats(a),
        Command::Campaign(a) => campaign::run(a),
        Command::Merge(a) => campaign::merge(a),
        Command::Ioapic(a) => client::ioapic(a),
        Command::Iommu(a) => client::iommu(a),
        Command::Idt(a) => client::idt(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("faultvisor: error: {e}");
            EXIT_VMM_ERROR
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> RunArgs {
        let mut v = vec!["faultvisor", "run"];
        v.extend_from_slice(extra);
        match Cli::try_parse_from(v).expect("parse").command {
            Command::Run(a) => a,
            _ => unreachable!("run was parsed"),
        }
    }

    #[test]
    fn defaults() {
        let a = args(&[]);
        assert_eq!(
            (a.memory.as_str(), a.vcpus, a.serial.as_str()),
            ("512M", 2, "stdio")
        );
        assert!(a.kernel.is_none());
    }

    #[test]
    fn serial_values() {
        assert_eq!(parse_serial("stdio").ok(), Some(SerialConfig::Stdio));
        assert_eq!(parse_serial("none").ok(), Some(SerialConfig::None));
        assert_eq!(
            parse_serial("file=/tmp/x").ok(),
            Some(SerialConfig::File("/tmp/x".into()))
        );
        for bad in ["file=", "tty", ""] {
            let e = parse_serial(bad).expect_err("bad");
            assert!(e.to_string().contains("expected stdio, file=PATH or none"));
        }
    }

    fn err(extra: &[&str]) -> String {
        build_config(&args(extra), Instant::now())
            .expect_err("must fail")
            .to_string()
    }

    #[test]
    fn error_messages_are_one_line_and_specific() {
        let exe = std::env::current_exe().expect("exe");
        let exe = exe.to_str().expect("utf8");
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (
                vec!["--kernel", "/nonexistent/vmlinux"],
                "cannot read kernel '/nonexistent/vmlinux': entity not found",
            ),
            (
                vec!["--kernel", "/"],
                "cannot read kernel '/': not a regular file",
            ),
            (vec!["--kernel", "/etc/hostname"], "not a kernel image"),
            (
                vec!["--kernel", exe, "--memory", "32M"],
                "below the minimum of 64M",
            ),
            (
                vec!["--kernel", exe, "--memory", "64T"],
                "more than this host's",
            ),
            (
                vec!["--kernel", exe, "--memory", "lots"],
                "invalid --memory 'lots'",
            ),
            (
                vec!["--kernel", exe, "--vcpus", "0"],
                "--vcpus must be at least 1",
            ),
            (
                vec!["--kernel", exe, "--serial", "tty"],
                "invalid --serial 'tty'",
            ),
            (
                vec!["--kernel", exe, "--initrd", "/nonexistent/initrd"],
                "cannot read initrd",
            ),
        ];
        for (a, want) in cases {
            let e = err(&a);
            assert!(e.contains(want), "{a:?}: got '{e}', want '{want}'");
            assert!(!e.contains('\n'), "{a:?}: multi-line error '{e}'");
        }
    }

    #[test]
    fn missing_default_guest_says_how_to_build_it() {
        let dir = std::env::temp_dir().join(format!("fv-no-guest-{}", std::process::id()));
        // SAFETY-free: env var set for this process's test only; tests that read it run here.
        std::env::set_var("FAULTVISOR_CACHE", &dir);
        let e = err(&[]);
        std::env::remove_var("FAULTVISOR_CACHE");
        assert!(e.contains("resources/guest/build.py"), "{e}");
    }

    #[test]
    fn elf_kernel_passes_validation() {
        let exe = std::env::current_exe().expect("exe");
        let cfg = build_config(
            &args(&[
                "--kernel",
                exe.to_str().expect("utf8"),
                "--memory",
                "128M",
                "--vcpus",
                "3",
            ]),
            Instant::now(),
        )
        .expect("valid");
        assert_eq!((cfg.mem_size, cfg.vcpus), (128 << 20, 3));
        assert_eq!(cfg.cmdline, DEFAULT_CMDLINE);
    }
}
