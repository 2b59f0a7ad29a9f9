//! The `POST /v1/inject` body parser (also used for campaign files) on arbitrary
//! bytes. Checked: no panic; errors name a field and stay short whatever the input;
//! an accepted request has a short summary and stays accepted after a JSON round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::inject::{parse, parse_value};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(req) => {
            assert!(req.summary().len() < 256);
            if let Ok(v) = serde_json_value(data) {
                assert_eq!(parse_value(&v).ok(), Some(req));
            }
        }
        Err(e) => {
            assert!(!e.field().is_empty());
            let text = e.to_string();
            assert!(text.len() < 512, "{} bytes: {text:.80}", text.len());
        }
    }
});

fn serde_json_value(data: &[u8]) -> Result<serde_json::Value, serde_json::Error> {
    serde_json::from_slice(data)
}
