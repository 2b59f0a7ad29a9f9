//! Helpers for the integration tests: run the faultvisor binary in a child process and
//! build tiny 64-bit ELF "kernels" from raw machine code.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// Path of the faultvisor binary under test.
pub fn faultvisor() -> &'static str {
    env!("CARGO_BIN_EXE_faultvisor")
}

/// Runs faultvisor with `args`, stdin closed.
pub fn run(args: &[&str]) -> Output {
    Command::new(faultvisor())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn faultvisor")
}

/// Whether this host has a usable KVM; prints a loud skip notice when it has not.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!(
            "\n!!!!!!!!!! SKIPPED {test}: /dev/kvm is missing or not accessible; \
             this test needs KVM !!!!!!!!!!\n"
        );
    }
    ok
}

/// Load address and entry of the test kernels.
pub const LOAD_ADDR: u64 = 0x100_0000;

/// Writes a minimal ELF64 executable whose single PT_LOAD segment holds `code` at
/// [`LOAD_ADDR`], with the entry point at its first byte. Returns its path.
pub fn tiny_elf(name: &str, code: &[u8]) -> PathBuf {
    const CODE_OFF: u64 = 0x1000;
    let mut f = vec![0u8; CODE_OFF as usize];
    // ELF header.
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // ELFCLASS64
    f[5] = 1; // little endian
    f[6] = 1; // EV_CURRENT
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
                                                    // Program header.
    let ph = 64;
    f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    f[ph + 8..ph + 16].copy_from_slice(&CODE_OFF.to_le_bytes());
    f[ph + 16..ph + 24].copy_from_slice(&LOAD_ADDR.to_le_bytes());
    f[ph + 24..ph + 32].copy_from_slice(&LOAD_ADDR.to_le_bytes());
    f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    f.extend_from_slice(code);
    let dir = std::env::temp_dir().join(format!("faultvisor-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let path = dir.join(name);
    std::fs::write(&path, f).expect("write elf");
    path
}

/// `out 0xf4, al` after `mov al, v`: ends the VM with exit code (v << 1) | 1.
pub fn debug_exit(v: u8) -> Vec<u8> {
    vec![0xb0, v, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd]
}

/// Code that prints `s` on COM1 (polled, no interrupts).
pub fn print(s: &str) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in s.bytes() {
        c.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    c
}
