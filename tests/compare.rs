//! `compare` over a run directory and the `--baseline` gate.

mod common;

use common::*;

#[test]
fn compare_ranks_the_good_checkpoint_best_with_one_base_load() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    copy_dir(&fixtures().join("adapters/untrained"), &out.join("checkpoint-100"));
    copy_dir(&fixtures().join("adapters/truncated"), &out.join("checkpoint-200"));
    copy_dir(&fixtures().join("adapters/good"), &out.join("checkpoint-300"));
    std::fs::write(
        out.join("checkpoint-300/trainer_state.json"),
        r#"{"global_step":300,"log_history":[{"step":100,"loss":3.1,"grad_norm":1.0,"learning_rate":0.01},{"step":300,"loss":0.3,"grad_norm":1.0,"learning_rate":0.01}]}"#,
    )
    .unwrap();
    let o = bin()
        .args([
            "compare",
            out.to_str().unwrap(),
            "--base",
            &f("base"),
            "--data",
            &f("data/train.jsonl"),
            "--config",
            &f("lora.yaml"),
        ])
        .args(["--device", "cpu", "--format", "json"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["best"]["step"], 300);
    assert!(v["best"]["path"].as_str().unwrap().ends_with("checkpoint-300"));
    let steps: Vec<u64> = v["checkpoints"].as_array().unwrap().iter().map(|c| c["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [100, 200, 300]);
    let verdicts: Vec<&str> =
        v["checkpoints"].as_array().unwrap().iter().map(|c| c["verdict"].as_str().unwrap()).collect();
    assert_eq!(verdicts, ["no_effect", "regressed", "pass"]);
    assert_eq!(v["checkpoints"][2]["train_loss"], 0.3);
    assert_eq!(v["model_loads"], 1, "the base is loaded once for all checkpoints");
}

#[test]
fn baseline_gate_passes_an_unchanged_run_and_catches_a_regression() {
    let tmp = tempfile::tempdir().unwrap();
    let last = tmp.path().join("last-night.json");
    let args = |adapter: &str| -> Vec<String> {
        [
            "--adapter",
            &f(adapter),
            "--base",
            &f("base"),
            "--data",
            &f("data/train.jsonl"),
            "--device",
            "cpu",
            "--format",
            "json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let o = bin().args(args("adapters/good")).args(["-o", last.to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    // Same adapter tonight: passes, with a baseline_ok finding.
    let o = bin().args(args("adapters/good")).args(["--baseline", last.to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["findings"].as_array().unwrap().iter().any(|f| f["code"] == "baseline_ok"));
    // A regression: the good adapter with lora_B halved still passes the gates on its own,
    // but lost log-probability against last night.
    let weak = tmp.path().join("weak");
    std::fs::create_dir_all(&weak).unwrap();
    std::fs::copy(fixtures().join("adapters/good/adapter_config.json"), weak.join("adapter_config.json")).unwrap();
    let t = candle_core::safetensors::load(
        fixtures().join("adapters/good/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let t: std::collections::HashMap<String, candle_core::Tensor> =
        t.into_iter().map(|(k, v)| if k.contains("lora_B") { (k, (v * 0.5).unwrap()) } else { (k, v) }).collect();
    candle_core::safetensors::save(&t, weak.join("adapter_model.safetensors")).unwrap();
    let mut a = args("adapters/good");
    a[1] = weak.display().to_string();
    let o = bin().args(&a).args(["--baseline", last.to_str().unwrap()]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", v["cause"]);
    let reg = v["findings"].as_array().unwrap().iter().find(|f| f["code"] == "baseline_regressed").unwrap();
    assert!(reg["evidence"]["logprob_per_token_change"].as_f64().unwrap() < -0.05);
    assert!(reg["evidence"]["samples_worse"].as_u64().unwrap() > 0);
    // Another data set or schema is refused (exit 2).
    let o = bin()
        .args([
            "--adapter",
            &f("adapters/good"),
            "--base",
            &f("base"),
            "--data",
            &f("data/dev.jsonl"),
            "--device",
            "cpu",
        ])
        .args(["--baseline", last.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("other data"));
    let old = tmp.path().join("old.json");
    std::fs::write(&old, r#"{"schema_version": 0}"#).unwrap();
    let o = bin().args(args("adapters/good")).args(["--baseline", old.to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("schema_version"));
}
