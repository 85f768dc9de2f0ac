//! Root-cause diagnostics on constructed broken inputs (`glm4-verify check`, `inspect-data`).

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::*;

/// Copies adapters/good with its tensors changed by `edit` (key, tensor) -> Option<(key, tensor)>.
fn edited_adapter(dir: &Path, edit: impl Fn(&str, Tensor) -> Option<(String, Tensor)>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(fixtures().join("adapters/good/adapter_config.json"), dir.join("adapter_config.json")).unwrap();
    let t = candle_core::safetensors::load(fixtures().join("adapters/good/adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let out: HashMap<String, Tensor> = t.into_iter().filter_map(|(k, v)| edit(&k, v)).collect();
    candle_core::safetensors::save(&out, dir.join("adapter_model.safetensors")).unwrap();
}

fn check_json(args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = bin().arg("check").args(args).args(["--format", "json"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    let v = serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), v, err)
}

fn finding<'a>(v: &'a serde_json::Value, code: &str) -> Option<&'a serde_json::Value> {
    v["findings"].as_array()?.iter().find(|f| f["code"] == code)
}

#[test]
fn fixture_adapters_yield_their_findings_without_a_model_run() {
    let base = f("base");
    let (code, v, _) = check_json(&["--adapter", &f("adapters/untrained"), "--base", &base]);
    assert_eq!(code, 1);
    assert_eq!(finding(&v, "adapter_lora_b_zero").unwrap()["evidence"]["zero_lora_b"], 12);
    let (_, v, _) = check_json(&["--adapter", &f("adapters/wrong-keys"), "--base", &base]);
    let k = finding(&v, "adapter_keys_unmatched").unwrap();
    assert_eq!(k["evidence"]["matched_modules"], 0);
    assert_eq!(k["evidence"]["unmatched_tensors"], 24);
    assert!(
        k["message"].as_str().unwrap().contains("query_key_value")
            || k["message"].as_str().unwrap().contains("ChatGLM")
    );
    let (_, v, _) = check_json(&["--adapter", &f("adapters/tiny-delta"), "--base", &base]);
    let m = finding(&v, "adapter_merge_vanishes").unwrap();
    assert!(m["evidence"]["median_relative_norm"].as_f64().unwrap() < 1e-3);
    let (_, v, _) = check_json(&[
        "--adapter",
        &f("adapters/truncated"),
        "--base",
        &base,
        "--data",
        &f("data/train.jsonl"),
        "--config",
        &f("lora-truncated.yaml"),
    ]);
    assert_eq!(finding(&v, "data_labels_truncated").unwrap()["evidence"]["rows_truncated"], 24);
    assert_eq!(finding(&v, "data_no_labels").unwrap()["evidence"]["rows"], 16);
    let (code, v, _) =
        check_json(&["--adapter", &f("adapters/good"), "--base", &base, "--data", &f("data/train.jsonl")]);
    assert_eq!(code, 0, "{v}");
}

#[test]
fn nan_adapter_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nan");
    edited_adapter(&dir, |k, t| {
        if k.contains("layers.1.mlp.down_proj.lora_A") {
            let nan = Tensor::full(f32::NAN, t.dims(), &Device::Cpu).unwrap();
            Some((k.to_string(), nan))
        } else {
            Some((k.to_string(), t))
        }
    });
    let (code, v, _) = check_json(&["--adapter", dir.to_str().unwrap(), "--base", &f("base")]);
    assert_eq!(code, 1);
    let n = finding(&v, "adapter_nonfinite").unwrap();
    assert!(n["evidence"]["tensors"][0].as_str().unwrap().contains("layers.1.mlp.down_proj.lora_A"), "{n}");
}

#[test]
fn custom_adapter_name_in_keys_is_read_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("named");
    edited_adapter(&dir, |k, t| Some((k.replace(".weight", ".my_task.weight"), t)));
    let (_, v, _) = check_json(&["--adapter", dir.to_str().unwrap(), "--base", &f("base")]);
    let k = finding(&v, "adapter_keys_unmatched").unwrap();
    assert!(k["message"].as_str().unwrap().contains("my_task"), "{k}");
    assert!(finding(&v, "adapter_lora_b_zero").is_none());
}

#[test]
fn shape_mismatch_and_empty_adapter_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shape");
    edited_adapter(&dir, |k, t| {
        if k.contains("layers.0.self_attn.q_proj.lora_B") {
            Some((k.to_string(), Tensor::zeros((32, 8), candle_core::DType::F32, &Device::Cpu).unwrap()))
        } else {
            Some((k.to_string(), t))
        }
    });
    let (_, v, _) = check_json(&["--adapter", dir.to_str().unwrap(), "--base", &f("base")]);
    assert!(finding(&v, "adapter_shape_mismatch").unwrap()["message"].as_str().unwrap().contains("q_proj"));
    // ZeRO-3 without gathering saves a tiny file with no tensors.
    let z = tmp.path().join("zero3");
    std::fs::create_dir_all(&z).unwrap();
    std::fs::copy(fixtures().join("adapters/good/adapter_config.json"), z.join("adapter_config.json")).unwrap();
    let empty: HashMap<String, Tensor> = HashMap::new();
    candle_core::safetensors::save(&empty, z.join("adapter_model.safetensors")).unwrap();
    let len = std::fs::metadata(z.join("adapter_model.safetensors")).unwrap().len();
    assert!(len < 64, "{len}");
    let (code, _, err) = check_json(&["--adapter", z.to_str().unwrap(), "--base", &f("base")]);
    assert_eq!(code, 2);
    assert!(err.contains("holds no tensors") && err.contains("ZeRO-3"), "{err}");
}

#[test]
fn trainer_state_problems_are_found_next_to_the_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, log, code) in [
        (
            "gradzero",
            r#"[{"step":1,"loss":2.0,"grad_norm":0.0,"learning_rate":0.001},{"step":2,"loss":2.0,"grad_norm":0.0,"learning_rate":0.001}]"#,
            "train_grad_norm_zero",
        ),
        (
            "nanloss",
            r#"[{"step":1,"loss":2.0,"grad_norm":1.0,"learning_rate":0.001},{"step":2,"loss":NaN,"grad_norm":NaN,"learning_rate":0.001}]"#,
            "train_loss_nonfinite",
        ),
    ] {
        let dir = tmp.path().join(name);
        edited_adapter(&dir, |k, t| Some((k.to_string(), t)));
        std::fs::write(dir.join("trainer_state.json"), format!(r#"{{"global_step": 2, "log_history": {log}}}"#))
            .unwrap();
        let (exit, v, _) = check_json(&["--adapter", dir.to_str().unwrap(), "--base", &f("base")]);
        assert_eq!(exit, 1, "{name}");
        assert!(finding(&v, code).is_some(), "{name}: {v}");
    }
}

#[test]
fn data_format_errors_have_line_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.jsonl");
    let good = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;
    let lines = [
        good,
        "{not json",
        r#"{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}"#,
        r#"{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}"#,
        r#"{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}"#,
        r#"{"messages": [{"role": "user", "content": "q"}]}"#,
        r#"{"messages": [{"role": "user", "content": "q", "tools": []}, {"role": "assistant", "content": "y"}]}"#,
        r#"{"messages": [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "y"}]}"#,
    ];
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    let (code, v, err) =
        check_json(&["--adapter", &f("adapters/good"), "--base", &f("base"), "--data", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    let probs: Vec<(String, Vec<u64>)> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["code"] == "data_format")
        .map(|f| {
            (
                f["evidence"]["problem"].as_str().unwrap_or("").to_string(),
                f["evidence"]["lines"].as_array().unwrap().iter().filter_map(|l| l.as_u64()).collect(),
            )
        })
        .collect();
    for line in 2..=8u64 {
        assert!(probs.iter().any(|(_, ls)| ls.contains(&line)), "line {line} not reported: {probs:?}");
    }
    assert!(!probs.iter().any(|(_, ls)| ls.contains(&1)), "{probs:?}");
}

#[test]
fn inspect_data_shows_trained_tokens_and_lengths() {
    let out = bin()
        .args([
            "inspect-data",
            "--data",
            &f("data/train.jsonl"),
            "--config",
            &f("lora-truncated.yaml"),
            "--tokenizer",
            &f("base"),
            "--rows",
            "2",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("line 1: 10 tokens, 0 trained (15 of 15 cut by max length)"), "{s}");
    assert!(s.contains("token lengths") && s.contains("data_labels_truncated"), "{s}");
    let out = bin()
        .args([
            "inspect-data",
            "--data",
            &f("data/train.jsonl"),
            "--config",
            &f("lora.yaml"),
            "--tokenizer",
            &f("base"),
            "--rows",
            "1",
        ])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("⟦↵The cinder maple service number 0 is owned by the compiler team.<|user|>⟧"), "{s}");
}

#[test]
fn effect_check_reads_the_rows_of_the_fused_weights_from_the_files() {
    use glm4_verify::checks::adapter::weight_rows_from_files;
    use glm4_verify::model::{self, weights::Weights, Target};
    for dir in ["base", "base-0414", "base-chatglm"] {
        let path = fixtures().join(dir);
        let m = model::load_dir(&path, candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Weights::open_dir(&path).unwrap();
        let rows = weight_rows_from_files(&w, &m.cfg);
        for t in [Target::Qkv, Target::O, Target::GateUp, Target::Down] {
            let full = m.target_weight(1, t).unwrap();
            let (n, cols) = full.dims2().unwrap();
            // First and last rows, and (for q/k/v stored apart) the first rows of k and v.
            let (q, kv) = (m.cfg.q_out(), m.cfg.kv_out());
            let mut at = vec![0, n / 2, n - 1];
            if t == Target::Qkv {
                at.extend([q - 1, q, q + kv - 1, q + kv]);
            }
            let got = rows(1, t, &at).unwrap();
            assert_eq!(got.len(), at.len() * cols, "{dir} {t:?}");
            for (k, &r) in at.iter().enumerate() {
                let want: Vec<f32> = full.get(r).unwrap().to_vec1().unwrap();
                assert_eq!(&got[k * cols..(k + 1) * cols], want.as_slice(), "{dir} {t:?} row {r}");
            }
            assert!(rows(1, t, &[n]).is_err(), "{dir} {t:?}: a row past the end is an error");
        }
    }
}
