#![no_main]
//! model.safetensors.index.json → Weights::open_dir on a directory holding the fuzzed index and
//! three small valid shards (two named by the seeds' weight_map, one repeating a tensor of the
//! second), then every tensor loaded to CPU f32 as in the `safetensors` target.
use std::sync::OnceLock;

use candle_core::{DType, Device};
use glm4_verify::model::weights::Weights;
use glm4_verify_fuzz::{debug, fixed_dir, safetensors_bytes};
use libfuzzer_sys::fuzz_target;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fuzz_target!(|data: &[u8]| {
    let dir = fixed_dir(&DIR, || {
        let emb = f32s(&[0.5, -1.0, 2.0, 0.25]);
        let norm = f32s(&[1.0, 1.0]);
        let half = [0x00, 0x3c, 0x00, 0xbc, 0x00, 0x7c, 0x00, 0x00]; // 1, -1, inf, 0
        vec![
            (
                "model-00001-of-00002.safetensors",
                safetensors_bytes(&[
                    ("model.embed_tokens.weight", "F32", &[2, 2], &emb),
                    ("model.layers.0.input_layernorm.weight", "BF16", &[2], &[0x80, 0x3f, 0x00, 0x40]),
                ]),
            ),
            (
                "model-00002-of-00002.safetensors",
                safetensors_bytes(&[
                    ("lm_head.weight", "F16", &[2, 2], &half),
                    ("model.norm.weight", "F32", &[2], &norm),
                ]),
            ),
            ("model-extra.safetensors", safetensors_bytes(&[("model.norm.weight", "F32", &[2], &norm)])),
        ]
    });
    std::fs::write(dir.join("model.safetensors.index.json"), data).expect("write index");
    let w = match Weights::open_dir(dir) {
        Ok(w) => w,
        Err(e) => return debug(|| format!("error: {e:#}")),
    };
    let mut names: Vec<String> = w.names().map(String::from).collect();
    names.sort();
    debug(|| format!("ok: {} files, tensors {names:?}", w.files().len()));
    let _ = w.total_bytes();
    for n in &names {
        let _ = w.shape(n);
        let _ = w.dtype(n);
        let _ = w.load(n, DType::F32, &Device::Cpu);
    }
    let _ = w.first_nonfinite();
});
