#![no_main]
//! config.json → ModelConfig::from_json. Any panic is a finding; errors are fine.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = glm4_verify::model::config::ModelConfig::from_json(&v);
    }
});
