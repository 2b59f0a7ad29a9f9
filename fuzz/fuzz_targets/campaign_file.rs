//! Campaign files (TOML) as `faultvisor campaign` checks them. Checked: no panic, a
//! one-line error, and never more runs than the cap.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match cli::campaign::check_text(text, None) {
        Ok(n) => assert!(n <= cli::campaign::MAX_RUNS),
        Err(e) => assert!(!e.contains('\n') || e.lines().count() <= 1, "{e}"),
    }
});
