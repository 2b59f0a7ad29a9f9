//! `faultvisor demo`: boots the probe guest embedded in this binary (no download, any
//! KVM) with two vCPUs, the fv-test device, and an edu device behind the emulated VT-d
//! unit; runs its scenarios and prints what the guest saw, in TAP — including the DMA
//! faults the guest's own fault handler reads from the unit.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use vmm::{DeviceKind, DeviceSpec, SerialConfig, VmConfig};

use crate::CliError;

/// The probe guest ELF, built by build.rs from src/probe.
pub static PROBE_ELF: &[u8] = include_bytes!(env!("FAULTVISOR_PROBE_ELF"));

/// Exit status of `demo` when a scenario failed.
pub const EXIT_DEMO_FAILED: i32 = 1;

pub(crate) const DEMO_EXAMPLES: &str = "\
Examples:
  # Every scenario (IOAPIC, MSI, MSI-X, exceptions, serial, VT-d), 2 vCPUs
  faultvisor demo

  # Only the IOMMU: translations, every fault reason, the fault event
  faultvisor demo --tests 'iommu.*'

  # Only the MSI-X scenarios, then the microbenchmarks
  faultvisor demo --tests 'msix.*'
  faultvisor demo --tests 'bench.*'

  # Save the probe guest to run it elsewhere (QEMU: -kernel probe.elf)
  faultvisor demo --write-probe probe.elf

Exit status: 0 when every selected scenario passed, 1 when one failed, 2 on a usage or
VMM error (including a pattern that selects nothing), 4 when the guest crashed.";

/// Arguments of `faultvisor demo`.
#[derive(Debug, Args, Clone)]
pub struct DemoArgs {
    /// Scenarios to run: comma-separated patterns, `*` matches anything (e.g.
    /// 'ioapic.*,msi.dest'). Default: all but the benchmarks.
    #[arg(long, value_name = "PATTERNS")]
    pub tests: Option<String>,
    /// Number of vCPUs (MSI / MSI-X / IOAPIC routing is checked on each).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub vcpus: u32,
    /// Run the local APIC in xAPIC (MMIO) mode instead of x2APIC.
    #[arg(long)]
    pub xapic: bool,
    /// Samples per benchmark.
    #[arg(long, value_name = "N")]
    pub iters: Option<u32>,
    /// List the scenarios and exit.
    #[arg(long)]
    pub list: bool,
    /// Write the embedded probe guest ELF to PATH and exit.
    #[arg(long, value_name = "PATH")]
    pub write_probe: Option<PathBuf>,
    /// Serve the control API on PATH while the demo runs (try `--tests opt.watch`,
    /// then `faultvisor inject --api-socket PATH ...` and the "go" interrupt:
    /// `faultvisor inject --api-socket PATH spurious-irq --vector 0xee --cpu 0`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Per-thread seccomp filters: on, log or off (as for `run`).
    #[arg(long, value_name = "MODE", default_value = "on", value_parser = crate::parse_seccomp)]
    pub seccomp: vmm::seccomp::SeccompMode,
}

/// The probe command line for `args`.
pub fn probe_cmdline(args: &DemoArgs) -> Result<String, CliError> {
    let mut c = String::from("console=ttyS0");
    if let Some(t) = &args.tests {
        let t = t.trim();
        let ok = !t.is_empty()
            && t.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "._*,-".contains(ch));
        if !ok {
            return Err(CliError::Usage(format!(
                "invalid --tests '{t}': use comma-separated names or patterns like 'ioapic.*,msi.dest'"
            )));
        }
        c.push_str(&format!(" probe.tests={t}"));
    }
    if args.xapic {
        c.push_str(" probe.apic=xapic");
    }
    if let Some(n) = args.iters {
        if !(1..=100_000).contains(&n) {
            return Err(CliError::Usage(format!(
                "invalid --iters {n}: expected 1 to 100000"
            )));
        }
        c.push_str(&format!(" probe.iters={n}"));
    }
    if args.list {
        c.push_str(" probe.list");
    }
    Ok(c)
}

/// Puts the probe in an anonymous memory file and returns a path that opens it.
fn probe_file() -> Result<(OwnedFd, PathBuf), CliError> {
    let name = c"faultvisor-probe";
    // SAFETY: memfd_create takes a valid NUL-terminated name and flags; it returns a
    // new descriptor or -1, checked below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(CliError::Usage(format!(
            "cannot create a memory file for the probe: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f =
        std::fs::File::from(owned.try_clone().map_err(|e| {
            CliError::Usage(format!("cannot duplicate the probe's memory file: {e}"))
        })?);
    f.write_all(PROBE_ELF)
        .map_err(|e| CliError::Usage(format!("cannot write the probe to memory: {e}")))?;
    Ok((owned, PathBuf::from(format!("/proc/self/fd/{fd}"))))
}

/// Runs the demo; returns the exit status.
pub fn run(args: &DemoArgs, start: Instant) -> Result<i32, CliError> {
    if let Some(p) = &args.write_probe {
        std::fs::write(p, PROBE_ELF).map_err(|e| CliError::File {
            what: "probe output",
            path: p.clone(),
            reason: e.to_string(),
        })?;
        println!(
            "wrote the probe guest ({} bytes) to {}",
            PROBE_ELF.len(),
            p.display()
        );
        println!(
            "run it: faultvisor run --kernel {0} --device test   or   qemu-system-x86_64 -M q35 -accel kvm -smp 2 -kernel {0} -device edu -device isa-debug-exit,iobase=0xf4,iosize=4 -serial stdio -display none",
            p.display()
        );
        return Ok(0);
    }
    if args.vcpus == 0 {
        return Err(CliError::Usage("--vcpus must be at least 1".into()));
    }
    let cmdline = probe_cmdline(args)?;
    let (_fd, kernel) = probe_file()?;
    let cfg = VmConfig {
        kernel,
        initrd: None,
        cmdline,
        mem_size: vmm::MIN_MEMORY,
        vcpus: args.vcpus,
        serial: SerialConfig::Stdout,
        devices: vec![
            DeviceSpec {
                kind: DeviceKind::Test,
                bdf: None,
            },
            DeviceSpec {
                kind: DeviceKind::Edu,
                bdf: None,
            },
        ],
        disks: Vec::new(),
        iommu: vmm::IommuConfig::default(),
        api_socket: args.api_socket.clone(),
        metrics_file: None,
        trace_file: None,
        start,
        seccomp: args.seccomp,
        load: arch::mapload::LoadMode::default(),
        cpu: Default::default(),
    };
    println!(
        "faultvisor demo: booting the embedded probe guest ({} KiB) with {} vCPU(s), the fv-test device and edu behind an Intel VT-d unit; the guest reports:",
        PROBE_ELF.len() / 1024,
        cfg.vcpus
    );
    let vm = vmm::Vm::build(&cfg)?;
    let req = vm.run()?;
    let took = start.elapsed().as_millis();
    let _ = std::io::stdout().flush();
    // The probe powers off when every scenario passed and writes 1 (status 3) or
    // 2 (status 5) to the debug-exit port otherwise.
    let (code, verdict) = match req.code {
        0 => (0, "PASS: every selected scenario passed".to_string()),
        3 => (EXIT_DEMO_FAILED, "FAIL: a scenario failed (see 'not ok' above)".into()),
        5 => (
            vmm::EXIT_VMM_ERROR,
            "no scenario ran: the pattern selects nothing or the command line is wrong (try --list)".into(),
        ),
        c => (c, format!("the VM ended abnormally: {}", req.reason)),
    };
    println!("faultvisor demo: {verdict} ({took} ms in all)");
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> DemoArgs {
        DemoArgs {
            tests: None,
            vcpus: 2,
            xapic: false,
            iters: None,
            list: false,
            write_probe: None,
            api_socket: None,
            seccomp: vmm::seccomp::SeccompMode::On,
        }
    }

    #[test]
    fn embedded_probe_is_a_static_elf64() {
        assert_eq!(&PROBE_ELF[0..4], b"\x7fELF");
        assert_eq!(PROBE_ELF[4], 2, "ELFCLASS64");
        assert_eq!(
            u16::from_le_bytes([PROBE_ELF[16], PROBE_ELF[17]]),
            2,
            "ET_EXEC"
        );
        assert!(
            PROBE_ELF.len() < 1 << 20,
            "probe grew to {} bytes",
            PROBE_ELF.len()
        );
    }

    #[test]
    fn cmdline_from_args() {
        assert_eq!(
            probe_cmdline(&args()).ok().as_deref(),
            Some("console=ttyS0")
        );
        let mut a = args();
        a.tests = Some("msi.*,ioapic.edge".into());
        a.xapic = true;
        a.iters = Some(10);
        assert_eq!(
            probe_cmdline(&a).ok().as_deref(),
            Some("console=ttyS0 probe.tests=msi.*,ioapic.edge probe.apic=xapic probe.iters=10")
        );
        for bad in ["", "a b", "x;y", "\u{e9}"] {
            a.tests = Some(bad.into());
            assert!(probe_cmdline(&a).is_err(), "{bad:?}");
        }
        a.tests = None;
        a.iters = Some(0);
        assert!(probe_cmdline(&a).is_err());
    }
}
