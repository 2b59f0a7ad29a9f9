//! faultvisor's probe guest: a freestanding x86_64 kernel that discovers the platform
//! from ACPI, programs the local APIC, IOAPIC, PCI MSI and MSI-X directly, runs the
//! scenarios its command line selects and reports in TAP on COM1.
//!
//! Built for `x86_64-unknown-none` (soft-float: no SSE anywhere, which this project's
//! software-KVM host requires). Boots on faultvisor (ELF 64-bit entry) and on QEMU
//! (`-kernel`, PVH note). Command line:
//!
//! - `probe.tests=PAT[,PAT..]`: scenarios to run (`*` matches any run of characters);
//!   default: every scenario except `bench.*`.
//! - `probe.apic=x2apic|xapic`: local APIC mode (default x2APIC when the CPU has it).
//! - `probe.iters=N`: samples per benchmark (default 2000).
//! - `probe.list`: print the scenario names and stop.
//! - `probe.seed=S`, `probe.actions=N`: seed and actions per CPU of `hostile.chaos`.
//!
//! Verdict: every selected scenario passed → ACPI S5 power-off (faultvisor and QEMU
//! exit 0); a failure → debug-exit port 0xf4 value 1 (exit status 3); bad command
//! line or nothing selected → value 2 (exit status 5).

#![no_std]
#![no_main]

extern crate alloc;

mod acpi;
mod apic;
mod boot;
mod cpu;
mod heap;
mod hostile;
mod idt;
mod ioapic;
mod iommu;
mod ir;
mod pci;
mod serial;
mod smp;
mod stale;
mod tap;
mod tests;

use alloc::string::String;
use alloc::vec::Vec;

use boot::BootKind;

/// Debug-exit port (QEMU isa-debug-exit convention: status = value * 2 + 1).
const DEBUG_EXIT_PORT: u16 = 0xf4;

/// How the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every selected scenario passed.
    Pass,
    /// At least one failed.
    Fail,
    /// The command line was wrong or selected nothing.
    Usage,
}

/// Ends the VM with `v`.
pub fn finish(v: Verdict) -> ! {
    cpu::cli();
    match v {
        Verdict::Pass => {
            if let Some(p) = tests::platform().and_then(|p| p.poweroff) {
                p.request();
                cpu::delay(100_000_000);
            }
            cpu::outb(DEBUG_EXIT_PORT, 0);
        }
        Verdict::Fail => cpu::outb(DEBUG_EXIT_PORT, 1),
        Verdict::Usage => cpu::outb(DEBUG_EXIT_PORT, 2),
    }
    cpu::halt_forever()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("Bail out! probe panic: {}", info);
    finish(Verdict::Fail)
}

/// Options from the command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// Scenario patterns.
    pub tests: Vec<String>,
    /// Force xAPIC mode.
    pub xapic: bool,
    /// Samples per benchmark.
    pub iters: u32,
    /// Only list the scenarios.
    pub list: bool,
    /// Seed of the hostile scenario.
    pub seed: u64,
    /// Actions per CPU of the hostile scenario.
    pub actions: u32,
}

fn parse_cmdline(s: &str) -> Result<Options, String> {
    let mut o = Options {
        tests: Vec::new(),
        xapic: false,
        iters: 2000,
        list: false,
        seed: 1,
        actions: 20_000,
    };
    for w in s.split_ascii_whitespace() {
        let (k, v) = w.split_once('=').unwrap_or((w, ""));
        match k {
            "probe.tests" => {
                o.tests = v
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(String::from)
                    .collect()
            }
            "probe.apic" => match v {
                "xapic" => o.xapic = true,
                "x2apic" => o.xapic = false,
                _ => return Err(alloc::format!("probe.apic={v}: expected x2apic or xapic")),
            },
            "probe.iters" => {
                o.iters = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=100_000).contains(n))
                    .ok_or_else(|| alloc::format!("probe.iters={v}: expected 1..100000"))?
            }
            "probe.list" => o.list = true,
            "probe.seed" => {
                o.seed = v
                    .parse()
                    .map_err(|_| alloc::format!("probe.seed={v}: expected a number"))?
            }
            "probe.actions" => {
                o.actions = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=10_000_000).contains(n))
                    .ok_or_else(|| alloc::format!("probe.actions={v}: expected 1..10000000"))?
            }
            k if k.starts_with("probe.") => return Err(alloc::format!("unknown option {k}")),
            _ => {}
        }
    }
    Ok(o)
}

/// Reads the command line and RSDP hint the loader left.
fn boot_info(kind: BootKind, info: u64) -> (String, u64) {
    let read_cstr = |addr: u64| -> String {
        if addr == 0 || addr >= 0x1_0000_0000 {
            return String::new();
        }
        let mut s = String::new();
        for i in 0..4096u64 {
            // SAFETY: identity-mapped memory below 4 GiB, read byte by byte up to a NUL.
            let b = unsafe { core::ptr::read_volatile((addr + i) as *const u8) };
            if b == 0 {
                break;
            }
            s.push(if b.is_ascii() { b as char } else { '?' });
        }
        s
    };
    if info == 0 || info >= 0x1_0000_0000 {
        return (String::new(), 0);
    }
    let rd32 = |off: u64| -> u32 {
        // SAFETY: `info` (checked below 4 GiB above) is the loader's boot structure in
        // identity-mapped RAM; the offsets are within the zero page / hvm_start_info.
        unsafe { core::ptr::read_volatile((info + off) as *const u32) }
    };
    let rd64 = |off: u64| u64::from(rd32(off)) | (u64::from(rd32(off + 4)) << 32);
    match kind {
        // Zero page: cmd_line_ptr at 0x228, acpi_rsdp_addr at 0x70.
        BootKind::Linux => (read_cstr(u64::from(rd32(0x228))), rd64(0x70)),
        // hvm_start_info: magic, ..., cmdline_paddr at 24, rsdp_paddr at 32.
        BootKind::Pvh if rd32(0) == 0x336e_c578 => (read_cstr(rd64(24)), rd64(32)),
        BootKind::Pvh => (String::new(), 0),
    }
}

/// Rust entry of the boot CPU.
#[no_mangle]
extern "C" fn probe_main(kind: u64, info: u64) -> ! {
    let t0 = cpu::rdtsc();
    serial::init();
    // Mask both 8259s (QEMU has them; faultvisor ignores the writes).
    cpu::outb(0x21, 0xff);
    cpu::outb(0xa1, 0xff);
    let kind = BootKind::from_raw(kind);
    let (cmdline, rsdp_hint) = boot_info(kind, info);
    println!("# faultvisor probe guest ({kind:?} boot), cmdline: {cmdline}");
    let opts = match parse_cmdline(&cmdline) {
        Ok(o) => o,
        Err(e) => {
            println!("Bail out! {e}");
            finish(Verdict::Usage)
        }
    };
    idt::init();
    tests::run(&opts, rsdp_hint, t0)
}
