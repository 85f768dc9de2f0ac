//! The demo's artefacts: complete, loadable, deterministic, and the adapters do what their names say.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::{DType, Device};
use glm4_verify::adapter::{match_to_base, Adapter};
use glm4_verify::demo::measure::{measure, Measurement};
use glm4_verify::demo::{build, build_with, prefer_single_thread, DemoFiles, Schedule, Settings};
use glm4_verify::model::ModelConfig;
use glm4_verify::tokenizer::recipe::{encode, Recipe};
use glm4_verify::tokenizer::GlmTokenizer;

const SEED: u64 = 7;

/// One build shared by the tests of this file.
fn demo() -> &'static (tempfile::TempDir, DemoFiles) {
    static DEMO: OnceLock<(tempfile::TempDir, DemoFiles)> = OnceLock::new();
    DEMO.get_or_init(|| {
        // Other tests wait on this lock, so no thread reads the environment while it is set.
        prefer_single_thread();
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Instant::now();
        let files = build(dir.path(), SEED).expect("demo builds");
        eprintln!("demo built in {:.1} s:\n  {}", t.elapsed().as_secs_f64(), files.log.join("\n  "));
        (dir, files)
    })
}

fn adapter(name: &str) -> &'static Path {
    let (_, f) = demo();
    &f.adapters.iter().find(|(n, _, _)| n == name).unwrap_or_else(|| panic!("no adapter {name}")).1
}

fn scores(name: &str) -> Measurement {
    let (_, f) = demo();
    let m = measure(&f.base, adapter(name), &f.data, &f.config).expect("measures");
    eprintln!(
        "{name}: mean log p/token base {:.3} tuned {:.3} over {} tokens; exact greedy answers base {} tuned {} of {}",
        m.mean_logprob_base, m.mean_logprob_tuned, m.target_tokens, m.exact_base, m.exact_tuned, m.samples
    );
    m
}

#[test]
fn files_exist_and_load() {
    let (dir, f) = demo();
    for p in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(f.base.join(p).is_file(), "base/{p}");
    }
    assert!(f.data.is_file() && f.config.is_file() && f.truncated_config.is_file());
    assert_eq!(f.adapters.len(), 4);
    let cfg = ModelConfig::from_dir(&f.base).expect("config");
    assert_eq!((cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim), (64, 2, 4, 2, 16));
    assert_eq!(cfg.rotary_dim, 8);
    let m = glm4_verify::model::load_dir(&f.base, DType::F32, &Device::Cpu).expect("base loads");
    let tok = GlmTokenizer::from_dir(&f.base).expect("tokenizer loads");
    assert_eq!(tok.inner.get_vocab_size(true), m.vocab_size());
    assert!((512..=1024).contains(&m.vocab_size()), "vocab {}", m.vocab_size());
    let eos: Vec<u32> =
        ["<|endoftext|>", "<|user|>", "<|observation|>"].iter().map(|s| tok.special(s).unwrap()).collect();
    assert_eq!(cfg.eos_ids, eos);
    assert!(dir.path().join("adapters/good/adapter_config.json").is_file());
}

#[test]
fn adapters_match_the_base_except_wrong_keys() {
    let (_, f) = demo();
    let cfg = ModelConfig::from_dir(&f.base).expect("config");
    for (name, dir, _) in &f.adapters {
        let a = Adapter::open(dir).expect("adapter opens");
        assert_eq!(a.tensors, 24, "{name}: 12 modules × (A, B)");
        assert_eq!((a.config.r, a.config.lora_alpha), (8, 32.0));
        let m = match_to_base(&a, &cfg).expect("matches");
        assert!(m.shape_mismatch.is_empty(), "{name}: {:?}", m.shape_mismatch);
        if name == "wrong-keys" {
            assert!(m.matched_modules.is_empty(), "wrong-keys matched {:?}", m.matched_modules);
            assert_eq!(m.unmatched_modules.len(), 12);
        } else {
            assert_eq!(m.matched_modules.len(), 12, "{name}: {:?}", m.unmatched_modules);
        }
    }
}

#[test]
fn untrained_has_zero_b_and_no_effect() {
    let a = Adapter::open(adapter("untrained")).expect("opens");
    for p in &a.pairs {
        assert_eq!(p.b.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "{}", p.module);
        assert!(p.a.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    }
    let m = scores("untrained");
    assert_eq!(m.mean_logprob_base, m.mean_logprob_tuned);
}

#[test]
fn good_adapter_learned_the_answers() {
    let m = scores("good");
    assert_eq!(m.samples, 24);
    assert!(m.mean_logprob_tuned - m.mean_logprob_base > 1.0, "{m:?}");
    assert!(m.exact_tuned * 2 > m.samples, "most answers reproduced: {m:?}");
    assert_eq!(m.exact_base, 0);
}

#[test]
fn wrong_keys_has_no_effect_and_truncated_does_not_pass() {
    let m = scores("wrong-keys");
    assert_eq!((m.matched_modules, m.mean_logprob_base), (0, m.mean_logprob_tuned));
    let t = scores("truncated");
    assert!(t.mean_logprob_tuned < t.mean_logprob_base + 0.1, "{t:?}");
    // lora-truncated.yaml leaves at most one label per row, and most rows none.
    let (_, f) = demo();
    let tok = GlmTokenizer::from_dir(&f.base).unwrap();
    let recipe = Recipe::from_file(&f.truncated_config).unwrap();
    let rows = glm4_verify::data::read_jsonl(&f.data).unwrap();
    let kept: Vec<usize> = rows.iter().map(|r| encode(&tok, &r.messages, &recipe).unwrap().supervised()).collect();
    assert!(kept.iter().all(|&k| k <= 1) && kept.iter().filter(|&&k| k == 0).count() * 2 > kept.len(), "{kept:?}");
}

/// Two builds with the same seed write the same bytes (short training: the property does not
/// depend on the length, and the full build runs once above).
#[test]
fn same_seed_same_bytes() {
    demo();
    let quick = Settings {
        corpus_groups: 40,
        pretrain: Schedule { steps: 10, lr: 6e-3, batch: 32 },
        lora: Schedule { steps: 10, lr: 1e-2, batch: 0 },
        ..Settings::default()
    };
    let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    build_with(a.path(), SEED, &quick).expect("first build");
    build_with(b.path(), SEED, &quick).expect("second build");
    let files = [
        "base/tokenizer.json",
        "base/config.json",
        "base/model.safetensors",
        "data/train.jsonl",
        "lora.yaml",
        "lora-truncated.yaml",
        "adapters/good/adapter_model.safetensors",
        "adapters/untrained/adapter_model.safetensors",
        "adapters/truncated/adapter_model.safetensors",
        "adapters/wrong-keys/adapter_model.safetensors",
        "adapters/wrong-keys/adapter_config.json",
    ];
    for p in files {
        let (x, y) = (std::fs::read(a.path().join(p)).expect(p), std::fs::read(b.path().join(p)).expect(p));
        assert!(x == y, "{p} differs between two builds with seed {SEED}");
    }
    let c = tempfile::tempdir().expect("tempdir");
    build_with(c.path(), SEED + 1, &quick).expect("other seed");
    let other = std::fs::read(c.path().join("adapters/good/adapter_model.safetensors")).unwrap();
    assert!(other != std::fs::read(a.path().join("adapters/good/adapter_model.safetensors")).unwrap());
}
