#![no_main]
//! A tiktoken tokenizer.model → load_tiktoken(path, None).
use glm4_verify_fuzz::input_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let f = input_file(data, ".model");
    let _ = glm4_verify::tokenizer::tiktoken::load_tiktoken(&f.path, None);
});
