//! A corpus of broken inputs, each built here from a scratch copy of ../shared/fixtures/glm4-tiny.
//! Every case runs the binary and must end with its exit code (2: the run could not be done; 1: a
//! verdict with a named finding), say where and what in its output, and never panic.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use candle_core::{Device, Tensor};
use serde_json::{json, Map, Value};

use common::{copy_dir, fixtures};

/// A scratch directory holding writable copies of the fixtures a case breaks.
struct Ws(tempfile::TempDir);

impl Ws {
    /// Copies of the base, the good adapter and the training data; other fixtures on demand.
    fn new() -> Self {
        let w = Ws(tempfile::tempdir().unwrap());
        for rel in ["base", "adapters/good", "data/train.jsonl"] {
            w.copy(rel);
        }
        w
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.path().join(rel)
    }

    /// Copies fixture file or directory `rel` (once) and returns the copy.
    fn copy(&self, rel: &str) -> PathBuf {
        let to = self.path(rel);
        if !to.exists() {
            copy_dir(&fixtures().join(rel), &to);
        }
        to
    }

    fn base(&self) -> PathBuf {
        self.copy("base")
    }

    fn adapter(&self) -> PathBuf {
        self.copy("adapters/good")
    }

    fn data(&self) -> PathBuf {
        self.copy("data/train.jsonl")
    }

    fn write(&self, rel: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, bytes).unwrap();
        p
    }

    /// `glm4-verify --adapter good --base base --data train.jsonl --device cpu` on the copies, plus `extra`.
    fn verify(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["--adapter".into(), s(&self.adapter()), "--base".into(), s(&self.base())];
        args.extend(["--data".into(), s(&self.data()), "--device".into(), "cpu".into()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    }

    fn check(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["check".to_string()];
        args.extend(self.verify(extra));
        args
    }

    /// `inspect-data` on the copied data and `tokenizer` (a copied model directory).
    fn inspect(&self, tokenizer: &Path) -> Vec<String> {
        vec!["inspect-data".into(), "--data".into(), s(&self.data()), "--tokenizer".into(), s(tokenizer)]
    }

    /// A glm-4-9b-chat style base (ChatGLM layout) whose tokenizer is a hand-made tiktoken
    /// tokenizer.model (256 single bytes) with `line` (1-based) replaced by `bad`.
    fn chatglm_tiktoken(&self, line: usize, bad: &str) -> PathBuf {
        let dir = self.copy("base-chatglm");
        fs::remove_file(dir.join("tokenizer.json")).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut lines: Vec<String> = (0..=255u8).map(|b| format!("{} {b}", b64.encode([b]))).collect();
        if line > 0 {
            lines[line - 1] = bad.to_string();
        }
        fs::write(dir.join("tokenizer.model"), lines.join("\n") + "\n").unwrap();
        dir
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn edit_json(p: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap();
    edit(&mut v);
    fs::write(p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Keeps the first `n` bytes of a file.
fn cut(p: &Path, n: usize) {
    let b = fs::read(p).unwrap();
    fs::write(p, &b[..n]).unwrap();
}

/// Rewrites the JSON header of a safetensors file, keeping its data bytes.
fn edit_header(p: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let b = fs::read(p).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut h: Map<String, Value> = serde_json::from_slice(&b[8..8 + n]).unwrap();
    edit(&mut h);
    let h = serde_json::to_vec(&h).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(&b[8 + n..]);
    fs::write(p, out).unwrap();
}

/// Replaces the JSON header bytes of a safetensors file with `junk`.
fn junk_header(p: &Path, junk: &[u8]) {
    let b = fs::read(p).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut out = (junk.len() as u64).to_le_bytes().to_vec();
    out.extend(junk);
    out.extend(&b[8 + n..]);
    fs::write(p, out).unwrap();
}

/// Loads, edits and saves the tensors of a safetensors file.
fn edit_tensors(p: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut t = candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, p).unwrap();
}

fn set_tensor(t: &mut HashMap<String, Tensor>, name: &str, f: impl FnOnce(&Tensor) -> Tensor) {
    let new = f(&t[name]);
    t.insert(name.to_string(), new);
}

fn nan_like(t: &Tensor) -> Tensor {
    Tensor::full(f32::NAN, t.dims(), &Device::Cpu).unwrap()
}

const Q_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const EMBED: &str = "model.embed_tokens.weight";
const GATE_UP: &str = "model.layers.0.mlp.gate_up_proj.weight";

/// Splits the base into two shards with a model.safetensors.index.json; returns the base directory.
fn shard_base(w: &Ws) -> PathBuf {
    let dir = w.base();
    let all = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    fs::remove_file(dir.join("model.safetensors")).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let mut map = Map::new();
    for (i, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let shard: HashMap<&String, Tensor> = part.iter().map(|n| (*n, all[*n].clone())).collect();
        candle_core::safetensors::save(&shard, dir.join(&file)).unwrap();
        map.extend(part.iter().map(|n| (n.to_string(), json!(file))));
    }
    fs::write(dir.join("model.safetensors.index.json"), json!({"weight_map": map}).to_string()).unwrap();
    dir
}

/// A row of the fixture data format.
fn row(user: &str, assistant: &str) -> String {
    json!({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}).to_string()
}

/// The good rows with `line` (1-based) replaced by `bad`.
fn data_with_line(w: &Ws, line: usize, bad: &[u8]) {
    let p = w.data();
    let text = fs::read(&p).unwrap();
    let mut lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    lines[line - 1] = bad;
    fs::write(&p, lines.join(&b"\n"[..])).unwrap();
}

fn report_json(w: &Ws) -> PathBuf {
    let p = w.path("report.json");
    let out = bin().args(w.verify(&["--format", "json", "-o", &s(&p)])).output().unwrap();
    assert!(out.status.code() == Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    p
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_glm4-verify"))
}

/// One broken input: `setup` breaks copies in the scratch directory and returns the arguments;
/// the run must exit with `code` and its output must contain every string of `says`.
struct Case {
    name: &'static str,
    code: i32,
    says: &'static [&'static str],
    setup: fn(&Ws) -> Vec<String>,
}

fn c(name: &'static str, code: i32, says: &'static [&'static str], setup: fn(&Ws) -> Vec<String>) -> Case {
    Case { name, code, says, setup }
}

#[rustfmt::skip]
fn cases() -> Vec<Case> {
    vec![
        // Safetensors of the base model.
        c("base safetensors truncated", 2, &["model.safetensors", "lie outside the", "truncated"], |w| { cut(&w.base().join("model.safetensors"), 400_000); w.verify(&[]) }),
        c("base safetensors of 4 bytes", 2, &["model.safetensors", "not a valid safetensors"], |w| { cut(&w.base().join("model.safetensors"), 4); w.verify(&[]) }),
        c("base safetensors empty", 2, &["model.safetensors", "not a valid safetensors"], |w| { cut(&w.base().join("model.safetensors"), 0); w.verify(&[]) }),
        c("header length past the end of file", 2, &["model.safetensors", "header length is 1746416 bytes"], |w| {
            let p = w.base().join("model.safetensors");
            let mut b = fs::read(&p).unwrap();
            let past_end = (b.len() as u64 * 2).to_le_bytes();
            b[..8].copy_from_slice(&past_end);
            fs::write(&p, b).unwrap();
            w.verify(&[])
        }),
        c("header is not JSON", 2, &["model.safetensors", "not a valid safetensors"], |w| { junk_header(&w.base().join("model.safetensors"), b"{this is not json}"); w.verify(&[]) }),
        c("header is not UTF-8", 2, &["model.safetensors", "not a valid safetensors"], |w| { junk_header(&w.base().join("model.safetensors"), b"{\"\xff\xfe\": 1}"); w.verify(&[]) }),
        c("tensor offsets out of range", 2, &["model.safetensors", EMBED, "[262144, 9000000] lie outside"], |w| {
            edit_header(&w.base().join("model.safetensors"), |h| h[EMBED]["data_offsets"] = json!([262144, 9_000_000]));
            w.verify(&[])
        }),
        c("tensor offsets overlap", 2, &["model.safetensors", EMBED, "overlap"], |w| {
            edit_header(&w.base().join("model.safetensors"), |h| h[EMBED]["data_offsets"] = json!([0, 262144]));
            w.verify(&[])
        }),
        c("shape disagrees with the byte length", 2, &["model.safetensors", EMBED, "F32 [2048, 64] needs 524288 bytes"], |w| {
            edit_header(&w.base().join("model.safetensors"), |h| h[EMBED]["shape"] = json!([2048, 64]));
            w.verify(&[])
        }),
        c("dtype disagrees with the byte length", 2, &["model.safetensors", EMBED, "F16 [1024, 64] needs 131072 bytes"], |w| {
            edit_header(&w.base().join("model.safetensors"), |h| h[EMBED]["dtype"] = json!("F16"));
            w.verify(&[])
        }),
        c("unknown dtype", 2, &["model.safetensors", "unknown variant `F7`"], |w| {
            edit_header(&w.base().join("model.safetensors"), |h| h[EMBED]["dtype"] = json!("F7"));
            w.verify(&[])
        }),
        c("dtype glm4-verify does not read", 2, &["model.safetensors", EMBED, "I8"], |w| {
            edit_header(&w.base().join("model.safetensors"), |h| h[EMBED] = json!({"dtype": "I8", "shape": [262144], "data_offsets": [262144, 524288]}));
            w.verify(&[])
        }),
        c("tensor missing from the base", 2, &["model.safetensors", "model.norm.weight", "missing"], |w| {
            edit_header(&w.base().join("model.safetensors"), |h| { let t = h.remove("model.norm.weight").unwrap(); h.insert("model.nrm.weight".into(), t); });
            w.verify(&[])
        }),
        c("tensor shape disagrees with config.json", 2, &["model.safetensors", GATE_UP, "[64, 320]", "config"], |w| {
            edit_tensors(&w.base().join("model.safetensors"), |t| set_tensor(t, GATE_UP, |x| x.reshape((64, 320)).unwrap()));
            w.verify(&[])
        }),
        c("no weights in the base", 2, &["no model weights", "base"], |w| { fs::remove_file(w.base().join("model.safetensors")).unwrap(); w.verify(&[]) }),
        c("NaN in the base weights", 2, &["base", "NaN", GATE_UP], |w| {
            edit_tensors(&w.base().join("model.safetensors"), |t| set_tensor(t, GATE_UP, nan_like));
            w.verify(&[])
        }),
        // Shards.
        c("index names a missing shard", 2, &["model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing"], |w| {
            fs::remove_file(shard_base(w).join("model-00002-of-00002.safetensors")).unwrap();
            w.verify(&[])
        }),
        c("index is not JSON", 2, &["model.safetensors.index.json", "not valid JSON"], |w| { w.write("base/model.safetensors.index.json", "{\"weight_map\": "); w.verify(&[]) }),
        c("index without weight_map", 2, &["model.safetensors.index.json", "weight_map"], |w| { w.write("base/model.safetensors.index.json", "{\"metadata\": {}}"); w.verify(&[]) }),
        c("index maps a tensor that no shard holds", 2, &["model.safetensors.index.json", "model.extra.weight", "does not contain"], |w| {
            edit_json(&shard_base(w).join("model.safetensors.index.json"), |v| v["weight_map"]["model.extra.weight"] = json!("model-00002-of-00002.safetensors"));
            w.verify(&[])
        }),
        c("index names a shard outside the model directory", 2, &["model.safetensors.index.json", "../outside.safetensors", "not a file name inside"], |w| {
            let base = shard_base(w);
            fs::copy(base.join("model-00002-of-00002.safetensors"), base.join("../outside.safetensors")).unwrap();
            edit_json(&base.join("model.safetensors.index.json"), |v| {
                for (_, f) in v["weight_map"].as_object_mut().unwrap().iter_mut() {
                    if f == "model-00002-of-00002.safetensors" {
                        *f = json!("../outside.safetensors");
                    }
                }
            });
            w.verify(&[])
        }),
        c("shard truncated", 2, &["model-00002-of-00002.safetensors", "header length", "truncated"], |w| { cut(&shard_base(w).join("model-00002-of-00002.safetensors"), 1000); w.verify(&[]) }),
        // config.json of the base.
        c("config.json missing", 2, &["base (a directory, but without config.json)"], |w| { fs::remove_file(w.base().join("config.json")).unwrap(); w.verify(&[]) }),
        c("config.json not JSON", 2, &["config.json", "not valid JSON"], |w| { w.write("base/config.json", "{\"hidden_size\": 64,"); w.verify(&[]) }),
        c("config.json missing hidden_size", 2, &["config.json", "hidden_size"], |w| { edit_json(&w.base().join("config.json"), |v| { v.as_object_mut().unwrap().remove("hidden_size"); }); w.verify(&[]) }),
        c("config.json heads do not divide hidden size", 2, &["config.json", "hidden_size 64", "num_attention_heads 6"], |w| {
            edit_json(&w.base().join("config.json"), |v| { v["num_attention_heads"] = json!(6); v.as_object_mut().unwrap().remove("head_dim"); });
            w.verify(&[])
        }),
        c("config.json kv heads do not divide heads", 2, &["config.json", "not a multiple of 3 key/value heads"], |w| { edit_json(&w.base().join("config.json"), |v| v["num_key_value_heads"] = json!(3)); w.verify(&[]) }),
        c("config.json zero layers", 2, &["config.json", "number of layers is 0"], |w| { edit_json(&w.base().join("config.json"), |v| v["num_hidden_layers"] = json!(0)); w.verify(&[]) }),
        c("config.json string for a number", 2, &["config.json", "num_hidden_layers", "\"2\""], |w| { edit_json(&w.base().join("config.json"), |v| v["num_hidden_layers"] = json!("2")); w.verify(&[]) }),
        c("config.json string for a float", 2, &["config.json", "rms_norm_eps"], |w| { edit_json(&w.base().join("config.json"), |v| v["rms_norm_eps"] = json!("1e-5")); w.verify(&[]) }),
        c("config.json string for a bool", 2, &["config.json", "attention_bias"], |w| { edit_json(&w.base().join("config.json"), |v| v["attention_bias"] = json!("true")); w.verify(&[]) }),
        c("config.json negative vocabulary", 2, &["config.json", "vocab_size", "-5"], |w| { edit_json(&w.base().join("config.json"), |v| v["vocab_size"] = json!(-5)); w.verify(&[]) }),
        c("config.json implausible size", 2, &["config.json", "implausible"], |w| { edit_json(&w.base().join("config.json"), |v| v["vocab_size"] = json!(1u64 << 40)); w.verify(&[]) }),
        c("config.json unknown architecture", 2, &["config.json", "LlamaForCausalLM"], |w| {
            edit_json(&w.base().join("config.json"), |v| { v["architectures"] = json!(["LlamaForCausalLM"]); v["model_type"] = json!("llama"); });
            w.verify(&[])
        }),
        c("config.json is an array", 2, &["config.json", "expected a JSON object"], |w| { w.write("base/config.json", "[1, 2]"); w.verify(&[]) }),
        c("config.json unsupported rope_type", 2, &["config.json", "yarn"], |w| { edit_json(&w.base().join("config.json"), |v| v["rope_parameters"]["rope_type"] = json!("yarn")); w.verify(&[]) }),
        c("config.json pad_token_id past the vocabulary", 2, &["config.json", "pad_token_id 99999"], |w| { edit_json(&w.base().join("config.json"), |v| v["pad_token_id"] = json!(99999)); w.verify(&[]) }),
        c("tokenizer larger than the model's vocabulary", 2, &["tokenizer.json", "ids up to 1023", "only 1000"], |w| {
            edit_tensors(&w.base().join("model.safetensors"), |t| for n in [EMBED, "lm_head.weight"] { set_tensor(t, n, |x| x.narrow(0, 0, 1000).unwrap()) });
            edit_json(&w.base().join("config.json"), |v| { v["vocab_size"] = json!(1000); v["pad_token_id"] = json!(0); });
            w.verify(&[])
        }),
        c("merged model with truncated weights", 2, &["good-bf16/model.safetensors", "truncated"], |w| {
            let m = w.copy("merged/good-bf16");
            cut(&m.join("model.safetensors"), 100_000);
            vec!["--adapter".into(), s(&m), "--base".into(), s(&w.base()), "--data".into(), s(&w.data()), "--device".into(), "cpu".into()]
        }),
        c("ChatGLM config without multi_query_group_num", 2, &["config.json", "multi_query_group_num"], |w| {
            let b = w.copy("base-chatglm");
            edit_json(&b.join("config.json"), |v| { v.as_object_mut().unwrap().remove("multi_query_group_num"); });
            vec!["check".into(), "--adapter".into(), s(&w.copy("adapters/good-chatglm")), "--base".into(), s(&b)]
        }),
        // adapter_config.json and the adapter weights.
        c("adapter_config.json not JSON", 2, &["adapter_config.json", "not valid JSON"], |w| { w.write("adapters/good/adapter_config.json", "{\"r\": 8"); w.verify(&[]) }),
        c("adapter_config.json empty", 2, &["adapter_config.json", "not valid JSON"], |w| { w.write("adapters/good/adapter_config.json", ""); w.verify(&[]) }),
        c("adapter r = 0", 2, &["adapter_config.json", "\"r\" is 0"], |w| { edit_json(&w.adapter().join("adapter_config.json"), |v| v["r"] = json!(0)); w.verify(&[]) }),
        c("adapter r is a string", 2, &["adapter_config.json", "\"r\" must be a positive integer"], |w| { edit_json(&w.adapter().join("adapter_config.json"), |v| v["r"] = json!("8")); w.verify(&[]) }),
        c("adapter lora_alpha missing", 2, &["adapter_config.json", "lora_alpha"], |w| { edit_json(&w.adapter().join("adapter_config.json"), |v| { v.as_object_mut().unwrap().remove("lora_alpha"); }); w.verify(&[]) }),
        c("adapter unknown peft_type", 2, &["adapter_config.json", "PREFIX_TUNING", "not supported"], |w| { edit_json(&w.adapter().join("adapter_config.json"), |v| v["peft_type"] = json!("PREFIX_TUNING")); w.verify(&[]) }),
        c("adapter use_dora", 2, &["adapter_config.json", "DoRA"], |w| { edit_json(&w.adapter().join("adapter_config.json"), |v| v["use_dora"] = json!(true)); w.verify(&[]) }),
        c("adapter rank_pattern of 0", 2, &["adapter_config.json", "rank_pattern"], |w| { edit_json(&w.adapter().join("adapter_config.json"), |v| v["rank_pattern"] = json!({"q_proj": 0})); w.verify(&[]) }),
        c("adapter base_model_name_or_path not found", 2, &["adapter_config.json", "no/such-base", "tried"], |w| {
            edit_json(&w.adapter().join("adapter_config.json"), |v| v["base_model_name_or_path"] = json!("no/such-base"));
            vec!["--adapter".into(), s(&w.adapter()), "--data".into(), s(&w.data()), "--device".into(), "cpu".into()]
        }),
        c("adapter directory missing", 2, &["no-such-adapter", "no such directory"], |w| vec!["--adapter".into(), s(&w.path("no-such-adapter")), "--base".into(), s(&w.base())]),
        c("adapter directory empty", 2, &["empty-adapter", "neither a PEFT adapter"], |w| { fs::create_dir_all(w.path("empty-adapter")).unwrap(); vec!["--adapter".into(), s(&w.path("empty-adapter")), "--base".into(), s(&w.base())] }),
        c("adapter weights missing", 2, &["adapter_model.safetensors or adapter_model.bin"], |w| { fs::remove_file(w.adapter().join("adapter_model.safetensors")).unwrap(); w.verify(&[]) }),
        c("adapter_model.bin is not a PyTorch file", 2, &["adapter_model.bin"], |w| {
            fs::remove_file(w.adapter().join("adapter_model.safetensors")).unwrap();
            w.write("adapters/good/adapter_model.bin", "not a pickle");
            w.verify(&[])
        }),
        c("adapter safetensors truncated", 2, &["adapter_model.safetensors", "truncated"], |w| { cut(&w.adapter().join("adapter_model.safetensors"), 30_000); w.verify(&[]) }),
        c("adapter header is not JSON", 2, &["adapter_model.safetensors", "not a valid safetensors"], |w| { junk_header(&w.adapter().join("adapter_model.safetensors"), b"[[[["); w.verify(&[]) }),
        c("adapter holds no tensors", 2, &["adapter_model.safetensors", "holds no tensors"], |w| { edit_tensors(&w.adapter().join("adapter_model.safetensors"), |t| t.clear()); w.verify(&[]) }),
        c("adapter lora_A is 1-D", 1, &["adapter_shape_mismatch", Q_A, "[512]"], |w| {
            edit_tensors(&w.adapter().join("adapter_model.safetensors"), |t| set_tensor(t, Q_A, |x| x.flatten_all().unwrap()));
            w.verify(&[])
        }),
        c("adapter lora_A/lora_B rank mismatch", 1, &["adapter_shape_mismatch", "q_proj", "lora_A has rank 4 but lora_B has rank 8"], |w| {
            edit_tensors(&w.adapter().join("adapter_model.safetensors"), |t| set_tensor(t, Q_A, |x| x.narrow(0, 0, 4).unwrap()));
            w.verify(&[])
        }),
        c("adapter NaN weights", 1, &["adapter_nonfinite", Q_A], |w| { edit_tensors(&w.adapter().join("adapter_model.safetensors"), |t| set_tensor(t, Q_A, nan_like)); w.verify(&[]) }),
        c("adapter NaN weights (check)", 1, &["adapter_nonfinite", Q_A], |w| { edit_tensors(&w.adapter().join("adapter_model.safetensors"), |t| set_tensor(t, Q_A, nan_like)); w.check(&[]) }),
        c("trainer_state.json not JSON (check)", 2, &["trainer_state.json"], |w| { w.write("adapters/good/trainer_state.json", "{\"log_history\": ["); w.check(&[]) }),
        // Tokenizers and the chat template.
        c("tokenizer.json does not parse", 2, &["tokenizer.json", "does not parse"], |w| { w.write("base/tokenizer.json", "{\"model\": {\"type\": \"BPE\""); w.verify(&[]) }),
        c("tokenizer.json is not a tokenizer", 2, &["tokenizer.json", "does not parse"], |w| { w.write("base/tokenizer.json", "{}"); w.verify(&[]) }),
        // tokenizers 0.23 panics on this one (found by fuzzing): an error, and no panic message.
        c("tokenizer.json BPE merge longer than the vocabulary", 2, &["tokenizer.json", "does not parse", "failed on it internally"], |w| {
            w.write("base/tokenizer.json", r#"{"model":{"type":"BPE","vocab":{"a":0,"b":1},"merges":[["a","b"]]}}"#);
            w.verify(&[])
        }),
        c("no tokenizer", 2, &["no tokenizer in", "tokenizer.json"], |w| { fs::remove_file(w.base().join("tokenizer.json")).unwrap(); w.verify(&[]) }),
        c("tokenizer.model with a bad base64 line", 2, &["tokenizer.model, line 3", "bad base64", "not*base64"], |w| {
            let b = w.chatglm_tiktoken(3, "not*base64 2");
            vec!["inspect-data".into(), "--data".into(), s(&w.data()), "--tokenizer".into(), s(&b)]
        }),
        c("tokenizer.model with a bad base64 line (verify)", 2, &["tokenizer.model, line 7", "bad base64"], |w| {
            let b = w.chatglm_tiktoken(7, "@@@ 6");
            vec!["--adapter".into(), s(&w.copy("adapters/good-chatglm")), "--base".into(), s(&b), "--data".into(), s(&w.data()), "--device".into(), "cpu".into()]
        }),
        c("tokenizer.model with a missing rank", 2, &["tokenizer.model, line 5", "missing rank"], |w| { let b = w.chatglm_tiktoken(5, "YWI="); w.inspect(&b) }),
        c("tokenizer.model empty", 2, &["tokenizer.model", "empty"], |w| { let b = w.chatglm_tiktoken(0, ""); fs::write(b.join("tokenizer.model"), "").unwrap(); w.inspect(&b) }),
        c("tokenizer_config.json not JSON", 2, &["tokenizer_config.json"], |w| {
            let b = w.chatglm_tiktoken(0, "");
            fs::write(b.join("tokenizer_config.json"), "{\"added_tokens_decoder\": ").unwrap();
            w.inspect(&b)
        }),
        c("chat template does not compile", 2, &["chat_template.jinja", "does not compile"], |w| { w.write("base/chat_template.jinja", "{% for m in messages %}{{ m.content }}"); w.verify(&[]) }),
        c("chat template fails to render", 2, &["chat_template.jinja", "failed to render", "train.jsonl:1"], |w| { w.write("base/chat_template.jinja", "[gMASK]<sop>{{ raise_exception('no system message') }}"); w.verify(&[]) }),
        c("chat template fails to render (inspect-data)", 2, &["chat_template.jinja", "failed to render", "train.jsonl:1"], |w| { w.write("base/chat_template.jinja", "{{ messages[0].content.nope.deeper }}"); w.inspect(&w.base()) }),
        // Data.
        c("missing --data file", 2, &["no-such.jsonl", "no such file"], |w| { let mut a = w.verify(&[]); a[5] = s(&w.path("no-such.jsonl")); a }),
        c("data directory without data_config file", 2, &["train.jsonl", "data_config"], |w| { let mut a = w.verify(&[]); a[5] = s(&w.path("empty-dir")); fs::create_dir_all(w.path("empty-dir")).unwrap(); a }),
        c("jsonl empty file", 2, &["train.jsonl", "no rows (the file is empty)"], |w| { fs::write(w.data(), "").unwrap(); w.verify(&[]) }),
        c("jsonl only blank lines", 2, &["train.jsonl", "no rows"], |w| { fs::write(w.data(), "\n \n\r\n").unwrap(); w.verify(&[]) }),
        c("jsonl all invalid JSON", 2, &["train.jsonl:1", "invalid JSON"], |w| { fs::write(w.data(), "{not json\n[1, 2\n").unwrap(); w.verify(&[]) }),
        c("jsonl one invalid JSON line", 1, &["data_format", "train.jsonl:3", "invalid JSON"], |w| { data_with_line(w, 3, b"{\"messages\": [}"); w.verify(&[]) }),
        c("jsonl one invalid JSON line (check)", 1, &["data_format", "train.jsonl:3", "invalid JSON"], |w| { data_with_line(w, 3, b"{\"messages\": [}"); w.check(&[]) }),
        c("jsonl wrong role", 1, &["data_format", "train.jsonl:2", "unknown role", "gpt"], |w| { data_with_line(w, 2, row("q", "a").replace("assistant", "gpt").as_bytes()); w.verify(&[]) }),
        c("jsonl non-string content", 1, &["data_format", "train.jsonl:4", "non-string content"], |w| {
            data_with_line(w, 4, br#"{"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]}"#);
            w.verify(&[])
        }),
        c("jsonl only non-string content", 2, &["train.jsonl:1", "non-string content"], |w| { fs::write(w.data(), r#"{"messages": [{"role": "user", "content": 5}]}"#).unwrap(); w.verify(&[]) }),
        c("jsonl non-UTF-8 bytes", 1, &["data_format", "train.jsonl:5", "not valid UTF-8"], |w| { data_with_line(w, 5, b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}"); w.verify(&[]) }),
        c("jsonl non-UTF-8 bytes (inspect-data)", 2, &["train.jsonl:1", "UTF-8"], |w| { fs::write(w.data(), b"\xc3\x28\n").unwrap(); w.inspect(&w.base()) }),
        c("jsonl messages is not an array", 2, &["train.jsonl:1", "\"messages\" is not an array"], |w| { fs::write(w.data(), r#"{"messages": {"role": "user"}}"#).unwrap(); w.verify(&[]) }),
        c("jsonl Alpaca format", 2, &["train.jsonl:1", "Alpaca"], |w| { fs::write(w.data(), r#"{"instruction": "q", "output": "a"}"#).unwrap(); w.verify(&[]) }),
        c("jsonl no assistant turn anywhere", 1, &["data_format", "train.jsonl:1", "no non-empty assistant turn"], |w| { fs::write(w.data(), r#"{"messages": [{"role": "user", "content": "q"}]}"#).unwrap(); w.verify(&[]) }),
        c("jsonl nested 100000 deep", 2, &["train.jsonl:1", "recursion limit"], |w| { fs::write(w.data(), format!("{{\"messages\": {}{}}}", "[".repeat(100_000), "]".repeat(100_000))).unwrap(); w.verify(&[]) }),
        c("jsonl 100 MB single line", 2, &["train.jsonl:1", "MiB"], |w| {
            let mut big = row(&"word ".repeat(20 << 20), "a");
            big.push('\n');
            fs::write(w.data(), big).unwrap();
            w.verify(&[])
        }),
        c("jsonl 100 MB single line (check)", 1, &["data_format", "train.jsonl:1", "MiB"], |w| { fs::write(w.data(), "x".repeat(100 << 20)).unwrap(); w.check(&[]) }),
        c("jsonl row longer than the model's context", 2, &["train.jsonl:1", "context of 256 tokens"], |w| { fs::write(w.data(), row(&"word ".repeat(3000), "a")).unwrap(); w.verify(&[]) }),
        // lora.yaml (--config).
        c("lora.yaml missing", 2, &["no-lora.yaml"], |w| { let p = s(&w.path("no-lora.yaml")); w.verify(&["--config", &p]) }),
        c("lora.yaml not YAML", 2, &["lora.yaml", "not valid YAML"], |w| { let p = w.write("lora.yaml", "combine: [false\n"); w.verify(&["--config", &s(&p)]) }),
        c("lora.yaml string for max_input_length", 2, &["lora.yaml", "max_input_length"], |w| { let p = w.write("lora.yaml", "max_input_length: \"64\"\n"); w.verify(&["--config", &s(&p)]) }),
        c("lora.yaml negative max_output_length", 2, &["lora.yaml", "max_output_length"], |w| { let p = w.write("lora.yaml", "max_output_length: -1\n"); w.verify(&["--config", &s(&p)]) }),
        c("lora.yaml string for combine", 2, &["lora.yaml", "combine"], |w| { let p = w.write("lora.yaml", "combine: \"no\"\n"); w.verify(&["--config", &s(&p)]) }),
        c("lora.yaml is a list", 2, &["lora.yaml", "mapping"], |w| { let p = w.write("lora.yaml", "- combine\n- false\n"); w.verify(&["--config", &s(&p)]) }),
        c("lora.yaml alias bomb", 2, &["lora.yaml", "repetition limit"], |w| {
            let mut y = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
            for (p, n) in ('a'..'i').zip('b'..'j') { y += &format!("{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"); }
            let p = w.write("lora.yaml", y);
            w.verify(&["--config", &s(&p)])
        }),
        c("lora.yaml data_config.train_file not a string", 2, &["lora.yaml", "train_file"], |w| {
            let p = w.write("lora.yaml", "data_config:\n  train_file: 5\n");
            let mut a = w.verify(&["--config", &s(&p)]);
            a[5] = s(w.data().parent().unwrap());
            a
        }),
        // Suites.
        c("suite with an unknown key", 2, &["suite.yaml", "unknown field", "sample"], |w| { let p = w.write("suite.yaml", "sample: 3\n"); w.verify(&["--suite", &s(&p)]) }),
        c("suite with an unknown gate", 2, &["suite.yaml", "min_gain"], |w| { let p = w.write("suite.yaml", "gates:\n  min_gain: 1\n"); w.verify(&["--suite", &s(&p)]) }),
        c("suite with a string for a number", 2, &["suite.yaml", "samples"], |w| { let p = w.write("suite.yaml", "samples: ten\n"); w.verify(&["--suite", &s(&p)]) }),
        c("suite with a NaN gate", 2, &["suite.yaml", "min_answer_gain_per_token"], |w| { let p = w.write("suite.yaml", "gates:\n  min_answer_gain_per_token: .nan\n"); w.verify(&["--suite", &s(&p)]) }),
        c("suite with a bad gpu_memory", 2, &["suite.yaml", "gpu_memory", "expected a size"], |w| { let p = w.write("suite.yaml", "gpu_memory: lots\n"); w.verify(&["--suite", &s(&p)]) }),
        c("suite not YAML", 2, &["suite.yaml"], |w| { let p = w.write("suite.yaml", "gates: [\n"); w.verify(&["--suite", &s(&p)]) }),
        c("suite missing", 2, &["no-suite.yaml"], |w| { let p = s(&w.path("no-suite.yaml")); w.verify(&["--suite", &p]) }),
        c("suite names a missing data file", 2, &["suite.yaml: data", "gone.jsonl: no such file"], |w| {
            let p = w.write("suite.yaml", "data: [gone.jsonl]\n");
            vec!["--suite".into(), s(&p), "--adapter".into(), s(&w.adapter()), "--base".into(), s(&w.base()), "--device".into(), "cpu".into()]
        }),
        // Baselines.
        c("baseline of another schema", 2, &["report.json", "schema_version 2"], |w| {
            let p = report_json(w);
            edit_json(&p, |v| v["schema_version"] = json!(2));
            w.verify(&["--baseline", &s(&p)])
        }),
        c("baseline not JSON", 2, &["baseline.json", "not a JSON report"], |w| { let p = w.write("baseline.json", "<xml/>"); w.verify(&["--baseline", &s(&p)]) }),
        c("baseline missing", 2, &["no-baseline.json"], |w| { let p = s(&w.path("no-baseline.json")); w.verify(&["--baseline", &p]) }),
        c("baseline of another suite", 2, &["report.json", "suite"], |w| {
            let p = report_json(w);
            edit_json(&p, |v| v["run"]["suite"] = json!("nightly"));
            w.verify(&["--baseline", &s(&p)])
        }),
        c("baseline of other data", 2, &["report.json", "other data"], |w| {
            let p = report_json(w);
            edit_json(&p, |v| { v["samples"].as_array_mut().unwrap().pop(); });
            w.verify(&["--baseline", &s(&p)])
        }),
        c("baseline of several adapters", 2, &["baseline.json", "single-adapter"], |w| { let p = w.write("baseline.json", r#"{"schema_version": 1, "reports": []}"#); w.verify(&["--baseline", &s(&p)]) }),
        // Flags.
        c("--device cuda on a CPU build", 2, &["--device cuda", "without CUDA"], |w| { let mut a = w.verify(&[]); a[7] = "cuda".into(); a }),
        c("--device cuda:x", 2, &["cuda:x"], |w| { let mut a = w.verify(&[]); a[7] = "cuda:x".into(); a }),
        c("--device tpu", 2, &["--device tpu", "expected auto, cpu, cuda"], |w| { let mut a = w.verify(&[]); a[7] = "tpu".into(); a }),
        c("--dtype f8", 2, &["--dtype f8"], |w| w.verify(&["--dtype", "f8"])),
        c("--batch-size 0", 2, &["--batch-size 0"], |w| w.verify(&["--batch-size", "0"])),
        c("--samples 0", 2, &["--samples"], |w| w.verify(&["--samples", "0"])),
        c("--split dev", 2, &["--split", "dev"], |w| w.verify(&["--split", "dev"])),
        c("-o in a missing directory", 2, &["cannot write the report", "no-dir/report.json"], |w| { let p = s(&w.path("no-dir/report.json")); w.verify(&["-o", &p]) }),
        c("no --adapter", 2, &["no --adapter"], |w| vec!["--base".into(), s(&w.base()), "--data".into(), s(&w.data())]),
        c("compare a directory without checkpoints", 2, &["no-checkpoints"], |w| {
            fs::create_dir_all(w.path("no-checkpoints")).unwrap();
            vec!["compare".into(), s(&w.path("no-checkpoints")), "--base".into(), s(&w.base()), "--data".into(), s(&w.data())]
        }),
        c("compare with a broken checkpoint", 2, &["checkpoint-20", "adapter_config.json"], |w| {
            copy_dir(&fixtures().join("adapters/good"), &w.path("out/checkpoint-10"));
            copy_dir(&fixtures().join("adapters/good"), &w.path("out/checkpoint-20"));
            fs::write(w.path("out/checkpoint-20/adapter_config.json"), "{").unwrap();
            vec!["compare".into(), s(&w.path("out")), "--base".into(), s(&w.base()), "--data".into(), s(&w.data()), "--device".into(), "cpu".into()]
        }),
        c("inspect-data without a tokenizer", 2, &["no tokenizer in"], |w| { let d = w.path("empty"); fs::create_dir_all(&d).unwrap(); w.inspect(&d) }),
    ]
}

#[test]
fn every_broken_input_is_refused_clearly() {
    let cases = cases();
    assert!(cases.len() >= 50, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let ws = Ws::new();
        let args = (case.setup)(&ws);
        let t = std::time::Instant::now();
        let out = bin().args(&args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
        let code = out.status.code();
        let missing: Vec<&&str> = case.says.iter().filter(|m| !text.contains(**m)).collect();
        if code != Some(case.code) || !missing.is_empty() || text.contains("panicked") {
            let shown: String = text.chars().take(3000).collect();
            failures.push(format!(
                "{}: exit {code:?} (want {}), missing {missing:?}, {:.1}s\n{shown}",
                case.name,
                case.code,
                t.elapsed().as_secs_f64()
            ));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n\n{}", failures.len(), cases.len(), failures.join("\n\n"));
}
