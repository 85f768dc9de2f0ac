#![no_main]
//! A data .jsonl file → data::parse_row on each line, and checks::data_format::scan_jsonl on the file.
use glm4_verify_fuzz::input_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let f = input_file(data, ".jsonl");
    let text = String::from_utf8_lossy(data);
    for (i, line) in text.lines().enumerate() {
        let _ = glm4_verify::data::parse_row(line, &f.path, i + 1);
    }
    let _ = glm4_verify::checks::data_format::scan_jsonl(&f.path);
});
