#![no_main]
//! A .safetensors file → Weights::open, then every listed tensor loaded to CPU f32.
use candle_core::{DType, Device};
use glm4_verify_fuzz::input_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let f = input_file(data, ".safetensors");
    let Ok(w) = glm4_verify::model::weights::Weights::open(&[f.path.clone()]) else {
        return;
    };
    let names: Vec<String> = w.names().map(String::from).collect();
    let _ = w.total_bytes();
    for n in &names {
        let _ = w.shape(n);
        let _ = w.load(n, DType::F32, &Device::Cpu);
    }
    let _ = w.first_nonfinite();
});
