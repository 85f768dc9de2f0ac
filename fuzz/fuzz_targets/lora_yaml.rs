#![no_main]
//! finetune_demo lora.yaml → Recipe::from_yaml (and the hardware check's precision reader, which
//! reads the same file).
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(v) = serde_yaml::from_str::<serde_yaml::Value>(text) {
        let _ = glm4_verify::tokenizer::recipe::Recipe::from_yaml(&v, Path::new("lora.yaml"));
        let _ = glm4_verify::checks::hardware::read_training_precision_from_yaml(&v);
    }
});
