//! The command line as a user runs it, on ../shared/fixtures/glm4-tiny.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// Runs the verifier; returns (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    let out = bin().args(args).output().expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn verify_json(adapter: &str, base: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let (a, b, d) = (f(adapter), f(base), f("data/train.jsonl"));
    let mut args = vec!["--adapter", &a, "--base", &b, "--data", &d, "--device", "cpu", "--format", "json"];
    args.extend_from_slice(extra);
    let (code, out, err) = run(&args);
    assert!(!err.contains("panicked"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("json: {e}\n{out}\n{err}"));
    (code, v)
}

fn codes(v: &serde_json::Value) -> Vec<String> {
    v["findings"].as_array().unwrap().iter().map(|f| f["code"].as_str().unwrap().to_string()).collect()
}

#[test]
fn good_passes_and_json_logprobs_equal_reference() {
    let lora = f("lora.yaml");
    let (code, v) = verify_json("adapters/good", "base", &["--config", &lora]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["verdict"], "pass");
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["base"]["layout"], "glm");
    assert_eq!(v["adapter"]["rank"], 8);
    assert_eq!(v["adapter"]["scaling"], 4.0);
    assert_eq!(v["adapter"]["matched_modules"], 12);
    assert_eq!(v["summary"]["samples"], 24);
    assert_eq!(v["summary"]["target_tokens"], 305);
    let refj = reference();
    let samples = v["samples"].as_array().unwrap();
    for (i, s) in samples.iter().enumerate() {
        let r = &refj["samples"][i];
        assert_eq!(s["line"], i + 1);
        let want_b: f64 = f64s(&r["base"]["target_logprobs"]).iter().sum();
        let want_t: f64 = f64s(&r["good"]["target_logprobs"]).iter().sum();
        let (gb, gt) = (s["logprob_base"].as_f64().unwrap(), s["logprob_tuned"].as_f64().unwrap());
        assert!((gb - want_b).abs() <= 1e-4 * want_b.abs(), "line {}: base {gb} vs {want_b}", i + 1);
        assert!((gt - want_t).abs() <= 1e-4 * want_t.abs(), "line {}: tuned {gt} vs {want_t}", i + 1);
    }
    let mb = v["summary"]["mean_logprob_per_token_base"].as_f64().unwrap();
    let mt = v["summary"]["mean_logprob_per_token_tuned"].as_f64().unwrap();
    assert!((mb + 7.782).abs() < 1e-3 && (mt + 2.540).abs() < 1e-3, "{mb} {mt}");
}

#[test]
fn untrained_wrong_keys_and_tiny_delta_have_no_effect_with_their_cause() {
    for (adapter, finding, words) in [
        ("adapters/untrained", "adapter_lora_b_zero", "never trained"),
        ("adapters/wrong-keys", "adapter_keys_unmatched", "ChatGLM names"),
        ("adapters/tiny-delta", "adapter_merge_vanishes", "bf16"),
    ] {
        let (code, v) = verify_json(adapter, "base", &[]);
        assert_eq!(code, 1, "{adapter}");
        assert_eq!(v["verdict"], "no_effect", "{adapter}");
        let c = codes(&v);
        assert!(c.contains(&finding.to_string()) && c.contains(&"behavior_no_effect".to_string()), "{adapter}: {c:?}");
        assert!(v["cause"].as_str().unwrap().contains(words), "{adapter}: {}", v["cause"]);
    }
}

#[test]
fn truncated_adapter_is_not_a_pass_and_names_the_truncation() {
    let cfg = f("lora-truncated.yaml");
    let (code, v) = verify_json("adapters/truncated", "base", &["--config", &cfg]);
    assert_eq!(code, 1);
    assert_ne!(v["verdict"], "pass");
    assert!(v["cause"].as_str().unwrap().contains("labels truncated in 24 of 24 rows"), "{}", v["cause"]);
    let t = v["findings"].as_array().unwrap().iter().find(|f| f["code"] == "data_labels_truncated").unwrap();
    assert_eq!(t["evidence"]["max_input_length"], 9);
    let nl = v["findings"].as_array().unwrap().iter().find(|f| f["code"] == "data_no_labels").unwrap();
    assert_eq!(nl["evidence"]["rows"], 16);
    // Without the config the full answers are the targets: it moved away from them.
    let (code, v) = verify_json("adapters/truncated", "base", &[]);
    assert_eq!((code, v["verdict"].as_str().unwrap()), (1, "regressed"));
}

#[test]
fn other_layouts_and_merged_checkpoint_pass() {
    for (adapter, base, layout) in [
        ("adapters/good-0414", "base-0414", "glm4"),
        ("adapters/good-chatglm", "base-chatglm", "chatglm"),
        ("merged/good-bf16", "base", "glm"),
    ] {
        let (code, v) = verify_json(adapter, base, &[]);
        assert_eq!((code, v["verdict"].as_str().unwrap()), (0, "pass"), "{adapter}: {}", v["cause"]);
        assert_eq!(v["base"]["layout"], layout);
    }
}

fn with_base(adapter_copy: &Path, base: &str) {
    let p = adapter_copy.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["base_model_name_or_path"] = base.into();
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn base_is_found_from_adapter_config_local_path_and_hf_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let data = f("data/train.jsonl");
    // A local path.
    let a = tmp.path().join("local");
    copy_dir(&fixtures().join("adapters/good"), &a);
    with_base(&a, &f("base"));
    let (code, out, err) =
        run(&["--adapter", a.to_str().unwrap(), "--data", &data, "--device", "cpu", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"verdict\": \"pass\""));
    // A Hugging Face id inside a temporary cache layout.
    let hub = tmp.path().join("hub");
    let snap = hub.join("models--THUDM--glm-4-9b-chat-hf/snapshots/abc123");
    copy_dir(&fixtures().join("base"), &snap);
    std::fs::create_dir_all(hub.join("models--THUDM--glm-4-9b-chat-hf/refs")).unwrap();
    std::fs::write(hub.join("models--THUDM--glm-4-9b-chat-hf/refs/main"), "abc123").unwrap();
    let h = tmp.path().join("hf");
    copy_dir(&fixtures().join("adapters/good"), &h);
    with_base(&h, "THUDM/glm-4-9b-chat-hf");
    let out = bin()
        .args(["--adapter", h.to_str().unwrap(), "--data", &data, "--device", "cpu", "--format", "json"])
        .env("HF_HUB_CACHE", &hub)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("abc123"));
    // Nothing resolves: exit 2 and the list of places tried.
    let m = tmp.path().join("missing");
    copy_dir(&fixtures().join("adapters/good"), &m);
    with_base(&m, "nobody/no-such-model");
    let out = bin()
        .args(["--adapter", m.to_str().unwrap(), "--data", &data, "--device", "cpu"])
        .env("HF_HUB_CACHE", &hub)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("tried") && err.contains("models--nobody--no-such-model") || err.contains("Hugging Face cache"),
        "{err}"
    );
}

#[test]
fn training_output_directory_uses_the_highest_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("adapters/untrained"), &tmp.path().join("checkpoint-100"));
    copy_dir(&fixtures().join("adapters/good"), &tmp.path().join("checkpoint-300"));
    let (code, out, err) = run(&[
        "--adapter",
        tmp.path().to_str().unwrap(),
        "--base",
        &f("base"),
        "--data",
        &f("data/train.jsonl"),
        "--device",
        "cpu",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("checkpoint-300") && out.contains("PASS"), "{err}\n{out}");
}

#[test]
fn every_report_format_is_produced() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, d) = (f("adapters/untrained"), f("base"), f("data/train.jsonl"));
    for (fmt, check) in [
        ("text", "NO EFFECT"),
        ("markdown", "**no_effect**"),
        ("junit", "<testsuites"),
        ("json", "\"no_effect\""),
        ("html", "<svg"),
    ] {
        let out: PathBuf = tmp.path().join(format!("report.{fmt}"));
        let (code, stdout, err) = run(&[
            "--adapter",
            &a,
            "--base",
            &b,
            "--data",
            &d,
            "--device",
            "cpu",
            "--format",
            fmt,
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 1, "{fmt}: {err}");
        assert!(stdout.is_empty());
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.contains(check), "{fmt}: {text}");
        if fmt == "junit" {
            // Well-formed XML with one failing verdict testcase and one testcase per sample.
            assert!(text.starts_with("<?xml"));
            assert_eq!(text.matches("<testcase").count(), 1 + 3 + 24, "{text}");
        }
    }
}

#[test]
fn bad_input_exits_2_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{not json\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--adapter".into(), "/no/such/dir".into()], "no such directory"),
        (
            vec![
                "--adapter".into(),
                f("adapters/good"),
                "--base".into(),
                f("base"),
                "--data".into(),
                bad.display().to_string(),
            ],
            "no usable rows",
        ),
        (
            vec![
                "--adapter".into(),
                f("adapters/good"),
                "--base".into(),
                f("base"),
                "--data".into(),
                f("data/train.jsonl"),
                "--device".into(),
                "cuda".into(),
            ],
            "without CUDA",
        ),
        (
            vec!["--adapter".into(), f("adapters/good"), "--data".into(), f("data/train.jsonl")],
            "base_model_name_or_path",
        ),
        (
            vec!["--adapter".into(), f("adapters/good"), "--gpu-memory".into(), "lots".into()],
            "expected a size such as 20GB",
        ),
    ];
    for (args, msg) in cases {
        let out = bin().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(msg) && !err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn timeout_stops_with_exit_2_and_writes_no_report() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("report.json");
    let (code, _, err) = run(&[
        "--adapter",
        &f("adapters/good"),
        "--base",
        &f("base"),
        "--data",
        &f("data/train.jsonl"),
        "--device",
        "cpu",
        "--timeout",
        "0",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--timeout") && err.contains("incomplete"), "{err}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "no temporary file left");
}

#[test]
fn out_of_memory_retries_with_smaller_batches_then_fails_clearly() {
    // The engine fails any pass over more than N tokens as a CUDA allocation would.
    let (a, b, d) = (f("adapters/good"), f("base"), f("data/train.jsonl"));
    let args = ["--adapter", &a, "--base", &b, "--data", &d, "--device", "cpu", "--format", "json"];
    let (_, plain, _) = run(&args);
    let plain: serde_json::Value = serde_json::from_str(&plain).unwrap();
    let out = bin().args(args).env("GLM4_VERIFY_SIMULATE_OOM_TOKENS", "300").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let retries: Vec<&serde_json::Value> =
        v["findings"].as_array().unwrap().iter().filter(|f| f["code"] == "gpu_out_of_memory_retried").collect();
    assert!(!retries.is_empty(), "{}", v["findings"]);
    assert!(retries[0]["message"].as_str().unwrap().contains("8192 tokens per pass"), "{}", retries[0]);
    // Same numbers as without the retry.
    for (s, p) in v["samples"].as_array().unwrap().iter().zip(plain["samples"].as_array().unwrap()) {
        for k in ["logprob_base", "logprob_tuned"] {
            let (x, y) = (s[k].as_f64().unwrap(), p[k].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-4 * y.abs(), "{k}: {x} vs {y}");
        }
        assert_eq!(s["generation_tuned"], p["generation_tuned"]);
    }
    // A single sample (two rows of ~30 tokens) never fits in 40 tokens: a clear error, exit 2.
    let out = bin().args(args).env("GLM4_VERIFY_SIMULATE_OOM_TOKENS", "40").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("out of memory even one row at a time") && !err.contains("panicked"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn a_stopped_run_reports_the_finished_samples_as_incomplete() {
    // GLM4_VERIFY_STOP_AFTER_CHECKS=N acts as Ctrl-C at the (N+1)th stop check (batches, decode steps).
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("report.json");
    let (a, b, d) = (f("adapters/good"), f("base"), f("data/train.jsonl"));
    let base = ["--adapter", &a, "--base", &b, "--data", &d, "--device", "cpu", "--format", "json"];
    let (_, full, _) = run(&base);
    let full: serde_json::Value = serde_json::from_str(&full).unwrap();
    // Small batches so that some samples finish before the stop.
    let mut args = base.to_vec();
    args.extend(["--batch-size", "4", "-o", out.to_str().unwrap()]);
    let r = bin().args(&args).env("GLM4_VERIFY_STOP_AFTER_CHECKS", "30").output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(err.contains("stopped early") && !err.contains("panicked"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["verdict"], "incomplete");
    assert!(v["cause"].as_str().unwrap().contains("interrupted"), "{}", v["cause"]);
    assert!(codes(&v).contains(&"run_incomplete".to_string()));
    let n = v["samples"].as_array().unwrap().len();
    assert!(n > 0 && n < 24, "{n} samples");
    assert_eq!(v["summary"]["samples"], n);
    // The finished samples carry the same numbers as in a full run.
    for s in v["samples"].as_array().unwrap() {
        let want = full["samples"].as_array().unwrap().iter().find(|x| x["line"] == s["line"]).unwrap();
        for k in ["logprob_base", "logprob_tuned"] {
            let (x, y) = (s[k].as_f64().unwrap(), want[k].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-4 * y.abs(), "line {}: {k} {x} vs {y}", s["line"]);
        }
        assert_eq!(s["generation_tuned"], want["generation_tuned"]);
    }
    // An incomplete report is not accepted as a baseline.
    let mut args = base.to_vec();
    args.extend(["--baseline", out.to_str().unwrap()]);
    let (code, _, err) = run(&args);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("stopped early") && err.contains("baseline"), "{err}");
}
