//! Whole-VM tests on this host's KVM with tiny hand-assembled 64-bit kernels: long-mode
//! entry, port I/O to COM1 and the debug-exit port, MMIO to the IOAPIC, PCI configuration
//! through 0xCF8/0xCFC. Each VM runs in its own faultvisor process.

mod common;

use common::{debug_exit, print, run, tiny_elf};

fn boot(name: &str, code: &[u8], extra: &[&str]) -> Option<(i32, String, String)> {
    if !common::kvm_available(name) {
        return None;
    }
    let k = tiny_elf(name, code);
    let mut args = vec![
        "run",
        "--kernel",
        k.to_str().expect("utf8"),
        "--memory",
        "64M",
    ];
    args.extend_from_slice(extra);
    let out = run(&args);
    Some((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn serial_output_and_debug_exit_code() {
    let mut code = print("hello from the guest\n");
    code.extend(debug_exit(3));
    let Some((rc, out, err)) = boot("serial", &code, &["--vcpus", "1"]) else {
        return;
    };
    assert_eq!(rc, 7, "stderr: {err}");
    assert_eq!(out, "hello from the guest\n");
    assert!(
        err.contains("guest wrote 0x3 to the debug-exit port"),
        "{err}"
    );
}

#[test]
fn two_vcpus_boot_with_the_ap_waiting_for_sipi() {
    let Some((rc, _, err)) = boot("two-vcpus", &debug_exit(5), &["--vcpus", "2"]) else {
        return;
    };
    assert_eq!(rc, 11, "stderr: {err}");
}

#[test]
fn serial_to_file() {
    let mut code = print("to a file\n");
    code.extend(debug_exit(0));
    let path = std::env::temp_dir().join(format!("fv-serial-{}.log", std::process::id()));
    let arg = format!("file={}", path.display());
    let Some((rc, out, err)) = boot("serial-file", &code, &["--serial", &arg]) else {
        return;
    };
    assert_eq!(rc, 1, "stderr: {err}");
    assert!(out.is_empty());
    assert_eq!(std::fs::read_to_string(&path).expect("log"), "to a file\n");
    let _ = std::fs::remove_file(path);
}

#[test]
fn ioapic_version_register_over_mmio() {
    // mov ebx, 0xfec00000; mov dword [rbx], 1 (IOREGSEL = version); mov eax, [rbx+0x10];
    // out 0xf4, al  => exit code (0x20 << 1) | 1.
    let code = [
        0xbb, 0x00, 0x00, 0xc0, 0xfe, 0xc7, 0x03, 0x01, 0x00, 0x00, 0x00, 0x8b, 0x43, 0x10, 0xe6,
        0xf4, 0xf4, 0xeb, 0xfd,
    ];
    let Some((rc, _, err)) = boot("ioapic", &code, &[]) else {
        return;
    };
    assert_eq!(rc, (0x20 << 1) | 1, "stderr: {err}");
}

#[test]
fn pci_host_bridge_through_cf8() {
    // mov eax, 0x80000000; mov dx, 0xcf8; out dx, eax; mov dx, 0xcfc; in eax, dx;
    // shr eax, 16 (device ID 0x0008); out 0xf4, al  => exit code (8 << 1) | 1.
    let code = [
        0xb8, 0x00, 0x00, 0x00, 0x80, 0x66, 0xba, 0xf8, 0x0c, 0xef, 0x66, 0xba, 0xfc, 0x0c, 0xed,
        0xc1, 0xe8, 0x10, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd,
    ];
    let Some((rc, _, err)) = boot("pci", &code, &[]) else {
        return;
    };
    assert_eq!(rc, 17, "stderr: {err}");
}

#[test]
fn acpi_reset_register_ends_with_zero() {
    // mov dx, 0x602; mov al, 1; out dx, al
    let code = [0x66, 0xba, 0x02, 0x06, 0xb0, 0x01, 0xee, 0xf4, 0xeb, 0xfd];
    let Some((rc, _, err)) = boot("acpi-reset", &code, &[]) else {
        return;
    };
    assert_eq!(rc, 0, "stderr: {err}");
    assert!(err.contains("ACPI reset register"), "{err}");
}

#[test]
fn triple_fault_is_reported_as_a_crash() {
    // lidt [zero-limit IDT] then int3 -> #GP -> #DF -> triple fault. Use ud2 with an
    // empty IDT: the boot IDT has limit 7 and no valid gate.
    let code = [0x0f, 0x0b];
    let Some((rc, _, err)) = boot("triple-fault", &code, &[]) else {
        return;
    };
    assert_eq!(rc, 4, "stderr: {err}");
    assert!(
        err.contains("triple-fault") || err.contains("KVM internal error"),
        "{err}"
    );
}

/// `--load map` maps the kernel's whole pages from the file and `--load copy` reads
/// them; the guest runs the same either way (its code spans two pages and a bit, and
/// jumps across both page boundaries before it prints).
#[test]
fn kernel_pages_are_mapped_or_copied_with_the_same_result() {
    // jmp rel32 over 8 KiB of int3 padding into the printing code.
    let pad = 8192usize;
    let mut code = vec![0xe9];
    code.extend_from_slice(&(pad as i32).to_le_bytes());
    code.extend(std::iter::repeat_n(0xccu8, pad));
    code.extend(print("loaded\n"));
    code.extend(debug_exit(2));
    for (mode, mapped) in [("map", "8 KiB mapped"), ("copy", "0 KiB mapped")] {
        let Some((rc, out, err)) = boot(
            &format!("load-{mode}"),
            &code,
            &["--load", mode, "--log-level", "debug"],
        ) else {
            return;
        };
        assert_eq!((rc, out.as_str()), (5, "loaded\n"), "{mode}: {err}");
        assert!(
            err.contains(&format!("kernel: {mapped} from the file")),
            "{mode}: {err}"
        );
    }
    let r = run(&["run", "--kernel", "/nonexistent", "--load", "mmap"]);
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("not a load mode (expected map or copy)"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
