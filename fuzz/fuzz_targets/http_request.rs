//! The API's HTTP request parser on arbitrary bytes. Checked: no panic; a parsed
//! request used at most the bytes given, its head within 8 KiB and its body within
//! 64 KiB; a refusal carries a 4xx/5xx status and a short message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::http::{parse, Parsed, MAX_BODY, MAX_HEAD};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Parsed::Partial => assert!(data.len() <= MAX_HEAD + MAX_BODY + 64 || !data.is_empty()),
        Parsed::Done(r) => {
            assert!(r.used <= data.len());
            assert!(r.body.len() <= MAX_BODY);
            assert!(r.used - r.body.len() <= MAX_HEAD);
        }
        Parsed::Error(status, msg) => {
            assert!((400..600).contains(&status));
            assert!(msg.len() < 256, "{msg}");
        }
    }
});
