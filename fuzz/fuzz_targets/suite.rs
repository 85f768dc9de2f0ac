#![no_main]
//! A suite .yaml → Suite::parse.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = glm4_verify::suite::Suite::parse(text, "fuzz.yaml");
});
