//! Determinism, read-only inputs and atomic reports (../shared/fixtures/glm4-tiny).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use common::{copy_dir, fixtures};

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Runs the binary; asserts no panic; returns (exit code, stdout, stderr).
fn run(args: &[String]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_glm4-verify")).args(args).output().unwrap();
    let (stdout, stderr): (String, String) =
        (String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into());
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

/// Command-line arguments from one line (the paths here have no spaces).
fn words(line: &str) -> Vec<String> {
    line.split_whitespace().map(String::from).collect()
}

fn f(rel: &str) -> String {
    s(&fixtures().join(rel))
}

/// The JSON text with every `"timings": {...}` object cut out (they hold no nested objects).
fn without_timings(json: &str) -> String {
    let mut out = String::new();
    let mut rest = json;
    while let Some(i) = rest.find("\"timings\": {") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('}').expect("timings object closes");
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn same_inputs_give_byte_identical_json_apart_from_timings() {
    let (good, untrained, tiny, wrong) =
        (f("adapters/good"), f("adapters/untrained"), f("adapters/tiny-delta"), f("adapters/wrong-keys"));
    let (base, train, dev, lora, cut) =
        (f("base"), f("data/train.jsonl"), f("data/dev.jsonl"), f("lora.yaml"), f("lora-truncated.yaml"));
    let runs = [
        // Two adapters in one batch, a sampled subset of two data files.
        format!("--adapter {good} --adapter {untrained} --base {base} --data {train} --data {dev} --config {lora} --samples 17 --seed 5"),
        format!("compare {good} {tiny} --base {base} --data {dev}"),
        format!("check --adapter {wrong} --base {base} --data {train} --config {cut}"),
    ];
    for line in &runs {
        let a = words(&format!("{line} --device cpu --format json"));
        let (c1, first, e1) = run(&a);
        let (c2, second, e2) = run(&a);
        assert!(c1 == c2 && c1 != 2, "{line}: exit {c1} / {c2}\n{e1}\n{e2}");
        assert!(first.len() > 200, "{first}");
        assert_eq!(without_timings(&first), without_timings(&second), "{line}");
    }
}

/// Content hash and mtime of every file under `dirs`.
fn snapshot(dirs: &[&Path]) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut todo: Vec<PathBuf> = dirs.iter().map(|d| d.to_path_buf()).collect();
    while let Some(p) = todo.pop() {
        if p.is_dir() {
            todo.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            fs::read(&p).unwrap().hash(&mut h);
            out.insert(p.clone(), (h.finish(), fs::metadata(&p).unwrap().modified().unwrap()));
        }
    }
    out
}

#[test]
fn inputs_are_left_untouched_by_every_subcommand() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |rel: &str| tmp.path().join(rel);
    copy_dir(&fixtures().join("base"), &dir("base"));
    copy_dir(&fixtures().join("adapters/good"), &dir("out/checkpoint-20"));
    copy_dir(&fixtures().join("adapters/untrained"), &dir("out/checkpoint-10"));
    copy_dir(&fixtures().join("data"), &dir("data"));
    copy_dir(&fixtures().join("lora.yaml"), &dir("data/lora.yaml"));
    let log =
        r#"{"global_step": 20, "log_history": [{"step": 10, "loss": 2.5, "grad_norm": 1.0, "learning_rate": 0.005}]}"#;
    fs::write(dir("out/checkpoint-20/trainer_state.json"), log).unwrap();
    let inputs = [dir("base"), dir("out"), dir("data")];
    let inputs: Vec<&Path> = inputs.iter().map(|p| p.as_path()).collect();
    let before = snapshot(&inputs);
    assert!(before.len() >= 15, "{before:?}");

    let (base, out, data, lora) = (s(&dir("base")), s(&dir("out")), s(&dir("data")), s(&dir("data/lora.yaml")));
    let (train, report) = (s(&dir("data/train.jsonl")), s(&dir("report.json")));
    let common = format!("--base {base} --data {data} --config {lora} --device cpu");
    let runs = [
        format!("--adapter {out} {common} --format json -o {report}"),
        format!("--adapter {out} {common} --baseline {report}"),
        format!("check --adapter {out} {common}"),
        format!("compare {out} {common}"),
        format!("inspect-data --data {train} --tokenizer {base} --config {lora}"),
    ];
    for line in &runs {
        let (code, stdout, stderr) = run(&words(line));
        assert!(code == 0 || code == 1, "{line}: exit {code}\n{stdout}\n{stderr}");
        assert_eq!(snapshot(&inputs), before, "{line} changed its inputs");
    }
}

#[test]
fn reports_are_written_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("reports");
    fs::create_dir_all(&out_dir).unwrap();
    let report = out_dir.join("report.json");
    let (a, b, d) = (f("adapters/good"), f("base"), f("data/train.jsonl"));
    let verify =
        |o: &Path| run(&words(&format!("--adapter {a} --base {b} --data {d} --device cpu --format json -o {}", s(o))));
    let listing = || -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(&out_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    // A new report: only it appears in the directory.
    let (code, _, err) = verify(&report);
    assert_eq!(code, 0, "{err}");
    assert_eq!(listing(), ["report.json"]);
    let first = fs::read_to_string(&report).unwrap();
    serde_json::from_str::<serde_json::Value>(&first).unwrap();

    // An existing, longer report is replaced whole, by a rename (a new inode), not rewritten in place.
    fs::write(&report, "x".repeat(4 * first.len())).unwrap();
    let inode = fs::metadata(&report).unwrap().ino();
    let (code, _, err) = verify(&report);
    assert_eq!(code, 0, "{err}");
    let second = fs::read_to_string(&report).unwrap();
    let v: serde_json::Value = serde_json::from_str(&second).unwrap();
    assert_eq!(v["verdict"], "pass");
    assert_ne!(fs::metadata(&report).unwrap().ino(), inode);
    assert_eq!(listing(), ["report.json"]);

    // A report that cannot be moved into place (a directory is in the way): exit 2, no temporary left.
    let blocked = out_dir.join("blocked");
    fs::create_dir_all(blocked.join("inside")).unwrap();
    let (code, _, err) = verify(&blocked);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot write the report") && err.contains("blocked"), "{err}");
    assert_eq!(listing(), ["blocked", "report.json"]);
}

/// The memory budget counts the model's bytes on the device: for a checkpoint loaded in its own
/// dtype, exactly its tensors' bytes.
#[test]
fn model_bytes_are_the_checkpoints_tensor_bytes() {
    use candle_core::{DType, Device};
    let dir = fixtures().join("base");
    let weights = glm4_verify::model::weights::Weights::open_dir(&dir).unwrap();
    let model = glm4_verify::model::load_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.bytes(), weights.total_bytes());
    let half = glm4_verify::model::load_dir(&dir, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(half.bytes() * 2, weights.total_bytes());
}
