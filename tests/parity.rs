//! The engine against transformers + PEFT ground truth (../shared/fixtures/glm4-tiny, f32, CPU).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use glm4_verify::adapter::{match_to_base, Adapter};
use glm4_verify::data::read_jsonl;
use glm4_verify::model::{self, glm::Glm, lora::RowSelection};
use glm4_verify::score::engine::{generate, score_and_generate, score_targets, BatchLimits, GenOptions, Variant};
use glm4_verify::tokenizer::recipe::{encode, prompt_and_answer, Recipe};
use glm4_verify::tokenizer::GlmTokenizer;

fn load(dir: &str) -> Glm {
    model::load_dir(&fixtures().join(dir), DType::F32, &Device::Cpu).expect("model loads")
}

fn adapter_deltas(model: &Glm, name: &str) -> Vec<(usize, model::Target, glm4_verify::model::lora::LoraDelta)> {
    let a = Adapter::open(&fixtures().join("adapters").join(name)).expect("adapter opens");
    let m = match_to_base(&a, &model.cfg).expect("matches");
    assert!(m.unmatched_modules.is_empty() && m.shape_mismatch.is_empty(), "{name}: {:?}", m.unmatched_modules);
    m.deltas
}

/// Training items of both splits in reference order (train then dev), as (input_ids, labels).
fn items(refj: &serde_json::Value) -> Vec<(Vec<u32>, Vec<i64>)> {
    refj["samples"].as_array().unwrap().iter().map(|s| (ids(&s["train_input_ids"]), i64s(&s["train_labels"]))).collect()
}

fn check_variant(refj: &serde_json::Value, name: &str, got_lp: &[Vec<f32>], got_gen: &[Vec<u32>]) {
    let mut worst = 0f64;
    for (i, s) in refj["samples"].as_array().unwrap().iter().enumerate() {
        let want = f64s(&s[name]["target_logprobs"]);
        assert_eq!(want.len(), got_lp[i].len(), "{name} sample {i}: number of target tokens");
        let ws: f64 = want.iter().sum();
        let gs: f64 = got_lp[i].iter().map(|&x| x as f64).sum();
        let rel = (ws - gs).abs() / ws.abs().max(1e-6);
        worst = worst.max(rel);
        assert!(rel < 1e-4, "{name} sample {i}: sum log p {gs} vs transformers {ws} (rel {rel:e})");
        assert_eq!(got_gen[i], ids(&s[name]["greedy_ids"]), "{name} sample {i}: greedy ids differ");
    }
    eprintln!("{name}: worst relative error of per-sample sums {worst:e}");
}

/// [variant][sample][token]
type PerVariant<T> = Vec<Vec<Vec<T>>>;

fn run_variants(model: &Glm, refj: &serde_json::Value, variants: &[Variant]) -> (PerVariant<f32>, PerVariant<u32>) {
    let it = items(refj);
    let lp = score_targets(model, &it, variants, BatchLimits::default()).expect("scores");
    let prompts: Vec<Vec<u32>> = refj["samples"].as_array().unwrap().iter().map(|s| ids(&s["prompt_ids"])).collect();
    let max_new = vec![24; prompts.len()];
    let gen = generate(model, &prompts, &max_new, variants, BatchLimits::default(), GenOptions::default())
        .expect("generates");
    // Scoring and generation sharing the prompts' KV caches give the same numbers.
    let both =
        score_and_generate(model, &it, &prompts, &max_new, variants, BatchLimits::default(), GenOptions::default())
            .expect("scores and generates");
    for (a, b) in lp.iter().flatten().flatten().zip(both.scores.iter().flatten().flatten()) {
        assert!((a - b).abs() < 1e-4, "shared pass: log p {b} vs {a}");
    }
    assert_eq!(gen, both.gens, "shared pass: greedy ids");
    (lp, gen)
}

fn first_row_logits(model: &Glm, refj: &serde_json::Value, adapter: Variant) -> Vec<f32> {
    let prompt = ids(&refj["samples"][0]["prompt_ids"]);
    let n = prompt.len();
    let x = Tensor::from_vec(prompt, (1, n), &Device::Cpu).unwrap();
    let sel = RowSelection::new(vec![adapter], &Device::Cpu, DType::F32);
    let h = model.forward(&x, &[0], &sel, None).unwrap();
    model.last_logits(&h).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn check_logits(refj: &serde_json::Value, name: &str, got: &[f32]) {
    let want = f64s(&refj["samples"][0][name]["logits_first_row"]);
    assert_eq!(want.len(), got.len());
    let worst = want.iter().zip(got).map(|(w, g)| (w - *g as f64).abs()).fold(0f64, f64::max);
    assert!(worst < 1e-4, "{name}: logits_first_row differs by {worst:e}");
}

#[test]
fn base_and_adapters_on_glm_layout_match_transformers_peft() {
    let refj = reference();
    let mut m = load("base");
    let names = ["good", "untrained", "truncated", "tiny-delta"];
    let deltas: Vec<_> = names.iter().map(|n| adapter_deltas(&m, n)).collect();
    m.attach(&deltas).unwrap();
    let variants: Vec<Variant> = std::iter::once(None).chain((0..names.len()).map(Some)).collect();
    let (lp, gen) = run_variants(&m, &refj, &variants);
    check_variant(&refj, "base", &lp[0], &gen[0]);
    for (k, n) in names.iter().enumerate() {
        check_variant(&refj, n, &lp[k + 1], &gen[k + 1]);
    }
    check_logits(&refj, "base", &first_row_logits(&m, &refj, None));
    check_logits(&refj, "good", &first_row_logits(&m, &refj, Some(0)));
}

#[test]
fn glm4_0414_layout_matches() {
    let refj = reference();
    let mut m = load("base-0414");
    let d = adapter_deltas(&m, "good-0414");
    m.attach(&[d]).unwrap();
    let (lp, gen) = run_variants(&m, &refj, &[None, Some(0)]);
    check_variant(&refj, "base-0414", &lp[0], &gen[0]);
    check_variant(&refj, "good-0414", &lp[1], &gen[1]);
    check_logits(&refj, "good-0414", &first_row_logits(&m, &refj, Some(0)));
}

#[test]
fn chatglm_layout_with_fused_qkv_lora_equals_good_on_base() {
    let refj = reference();
    let mut m = load("base-chatglm");
    let d = adapter_deltas(&m, "good-chatglm");
    m.attach(&[d]).unwrap();
    let (lp, gen) = run_variants(&m, &refj, &[None, Some(0)]);
    check_variant(&refj, "base", &lp[0], &gen[0]);
    check_variant(&refj, "good", &lp[1], &gen[1]);
}

#[test]
fn merged_bf16_checkpoint_matches() {
    let refj = reference();
    let m = load("merged/good-bf16");
    let (lp, gen) = run_variants(&m, &refj, &[None]);
    check_variant(&refj, "merged-good-bf16", &lp[0], &gen[0]);
    check_logits(&refj, "merged-good-bf16", &first_row_logits(&m, &refj, None));
}

#[test]
fn merged_and_unmerged_agree_in_f32_and_bf16_merge_difference_is_measured() {
    let refj = reference();
    let it = items(&refj);
    let mut side = load("base");
    let d = adapter_deltas(&side, "good");
    side.attach(std::slice::from_ref(&d)).unwrap();
    let unmerged = score_targets(&side, &it, &[Some(0)], BatchLimits::default()).unwrap().remove(0);
    let mut merged = load("base");
    merged.merge(&d).unwrap();
    let merged_lp = score_targets(&merged, &it, &[None], BatchLimits::default()).unwrap().remove(0);
    let sum = |v: &Vec<Vec<f32>>| v.iter().flatten().map(|&x| x as f64).sum::<f64>();
    let (su, sm) = (sum(&unmerged), sum(&merged_lp));
    assert!((su - sm).abs() / su.abs() < 1e-5, "merged {sm} vs unmerged {su}");
    // The bf16-merged checkpoint (PEFT's merge_and_unload, saved in bf16) differs measurably.
    let bf16 = load("merged/good-bf16");
    let sb = sum(&score_targets(&bf16, &it, &[None], BatchLimits::default()).unwrap().remove(0));
    let n = it.iter().map(|(_, l)| l.iter().filter(|&&x| x != -100).count()).sum::<usize>() as f64;
    let diff = (sb - su).abs() / n;
    eprintln!(
        "bf16 merge changes mean log p per token by {diff:.2e} (f32 unmerged {:.4}, bf16 merged {:.4})",
        su / n,
        sb / n
    );
    assert!(diff > 1e-6 && diff < 0.05, "bf16 merge difference per token {diff}");
}

#[test]
fn small_batches_give_the_same_numbers_as_large_ones() {
    let refj = reference();
    let it = items(&refj);
    let mut m = load("base");
    m.attach(&[adapter_deltas(&m, "good")]).unwrap();
    let big = score_targets(&m, &it, &[None, Some(0)], BatchLimits::default()).unwrap();
    let tiny =
        BatchLimits { max_rows: 2, max_tokens: 64, max_logit_rows: 7, max_cache_tokens: 1 << 16, first_passes: 1 };
    let small = score_targets(&m, &it, &[None, Some(0)], tiny).unwrap();
    for (a, b) in big.iter().flatten().flatten().zip(small.iter().flatten().flatten()) {
        assert!((a - b).abs() < 1e-4);
    }
    // Prefill in chunks of 2 rows, decode all rows together: the same greedy ids.
    let prompts: Vec<Vec<u32>> = refj["samples"].as_array().unwrap().iter().map(|s| ids(&s["prompt_ids"])).collect();
    let max_new = vec![24; prompts.len()];
    let chunked =
        BatchLimits { max_rows: 64, max_tokens: 40, max_logit_rows: 7, max_cache_tokens: 1 << 16, first_passes: 1 };
    let a = generate(&m, &prompts, &max_new, &[None, Some(0)], BatchLimits::default(), GenOptions::default()).unwrap();
    let b = generate(&m, &prompts, &max_new, &[None, Some(0)], chunked, GenOptions::default()).unwrap();
    assert_eq!(a, b);
    // Shared passes in small batches whose caches are stacked into decode groups of other lengths
    // (and one sample whose prompt is not a prefix of its scored row, so it takes its own prefill).
    let prefixes = it.iter().zip(&prompts).filter(|((ids, _), p)| ids.starts_with(p)).count();
    assert!(prefixes >= it.len() / 2, "only {prefixes} prompts are prefixes of their scored rows");
    let mut prompts2 = prompts.clone();
    prompts2[3].push(0);
    let mut want =
        generate(&m, &prompts2, &max_new, &[None, Some(0)], BatchLimits::default(), GenOptions::default()).unwrap();
    let groups = BatchLimits { max_rows: 8, max_tokens: 60, max_logit_rows: 7, max_cache_tokens: 400, first_passes: 1 };
    let both =
        score_and_generate(&m, &it, &prompts2, &max_new, &[None, Some(0)], groups, GenOptions::default()).unwrap();
    for (a, b) in big.iter().flatten().flatten().zip(both.scores.iter().flatten().flatten()) {
        assert!((a - b).abs() < 1e-4);
    }
    assert_eq!(want, both.gens);
    // The first passes run together, layer by layer (as while weights stream in): the same bits,
    // and a first group cut where a decode group would overflow (max_rows 8: two 2-sample batches).
    for first in [3, 50] {
        let layered = BatchLimits { first_passes: first, ..groups };
        let l =
            score_and_generate(&m, &it, &prompts2, &max_new, &[None, Some(0)], layered, GenOptions::default()).unwrap();
        assert_eq!(l.scores, both.scores, "first_passes {first}: log-probs");
        assert_eq!(l.gens, both.gens, "first_passes {first}: greedy ids");
    }
    // max_new = 0 generates nothing for that sample.
    let mut none = max_new.clone();
    none[0] = 0;
    let both = score_and_generate(&m, &it, &prompts2, &none, &[None, Some(0)], groups, GenOptions::default()).unwrap();
    want[0][0].clear();
    want[1][0].clear();
    assert_eq!(want, both.gens);
}

#[test]
fn labels_prompts_and_template_reproduce_finetune_demo() {
    let refj = reference();
    let tok = GlmTokenizer::from_dir(&fixtures().join("base")).unwrap();
    let recipe = Recipe::from_file(&fixtures().join("lora.yaml")).unwrap();
    let trunc = Recipe::from_file(&fixtures().join("lora-truncated.yaml")).unwrap();
    let combine = Recipe { combine: true, ..recipe.clone() };
    let mut rows = read_jsonl(&fixtures().join("data/train.jsonl")).unwrap();
    rows.extend(read_jsonl(&fixtures().join("data/dev.jsonl")).unwrap());
    let samples = refj["samples"].as_array().unwrap();
    assert_eq!(rows.len(), samples.len());
    for (row, s) in rows.iter().zip(samples) {
        let e = encode(&tok, &row.messages, &recipe).unwrap();
        assert_eq!(e.input_ids, ids(&s["train_input_ids"]), "line {}", row.line);
        assert_eq!(e.labels, i64s(&s["train_labels"]), "line {}", row.line);
        let c = encode(&tok, &row.messages, &combine).unwrap();
        assert_eq!(c.input_ids, ids(&s["combine_input_ids"]));
        assert_eq!(c.labels, i64s(&s["combine_labels"]));
        let t = encode(&tok, &row.messages, &trunc).unwrap();
        assert_eq!(t.labels, i64s(&s["truncated_labels"]));
        let (prompt, answer) = prompt_and_answer(&tok, &row.messages).unwrap().unwrap();
        assert_eq!(prompt, ids(&s["prompt_ids"]));
        assert_eq!(answer, s["target_text"].as_str().unwrap());
        let targets: Vec<u32> = e.labels.iter().filter(|&&l| l != -100).map(|&l| l as u32).collect();
        assert_eq!(targets, ids(&s["target_ids"]));
    }
}

#[test]
fn sharded_checkpoint_loads_with_the_same_numbers() {
    use std::collections::HashMap;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("base");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(fixtures().join("base").join(f), dir.join(f)).unwrap();
    }
    let all = candle_core::safetensors::load(fixtures().join("base/model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (mut a, mut b, mut map) = (HashMap::new(), HashMap::new(), serde_json::Map::new());
    for (i, n) in names.into_iter().enumerate() {
        let (shard, file) = if i % 2 == 0 {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        shard.insert(n.clone(), all[n].clone());
        map.insert(n.clone(), file.into());
    }
    candle_core::safetensors::save(&a, dir.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, dir.join("model-00002-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let sharded = model::load_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let refj = reference();
    let (lp, gen) = run_variants(&sharded, &refj, &[None]);
    check_variant(&refj, "base", &lp[0], &gen[0]);
}

#[test]
fn forward_at_gives_the_hidden_states_of_forward_at_those_positions() {
    let refj = reference();
    let mut m = load("base");
    m.attach(&[adapter_deltas(&m, "good")]).unwrap();
    let p = ids(&refj["samples"][0]["prompt_ids"]);
    let n = p.len();
    let x = Tensor::from_vec([p.clone(), p].concat(), (2, n), &Device::Cpu).unwrap();
    let sel = RowSelection::new(vec![None, Some(0)], &Device::Cpu, DType::F32);
    let all = m.forward(&x, &[0, 0], &sel, None).unwrap().reshape((2 * n, ())).unwrap();
    // Positions of both rows (base and adapter), so a wrong row selection would show.
    let keep: Vec<u32> = vec![0, (n - 1) as u32, n as u32, (2 * n - 1) as u32];
    let got = m.forward_at(&x, &[0, 0], &sel, None, &keep).unwrap();
    assert_eq!(got.dims(), &[keep.len(), 1, all.dim(1).unwrap()]);
    for (i, &p) in keep.iter().enumerate() {
        let a: Vec<f32> = all.get(p as usize).unwrap().to_vec1().unwrap();
        let b: Vec<f32> = got.get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "position {p}: differs by {worst:e}");
    }
    // The adapter's rows differ from the base's: the kept positions took their own variant.
    let base_last: Vec<f32> = got.get(1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let tuned_last: Vec<f32> = got.get(3).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(base_last.iter().zip(&tuned_last).any(|(a, b)| (a - b).abs() > 1e-3));
    assert!(m.forward_at(&x, &[0, 0], &sel, None, &[(2 * n) as u32]).is_err(), "a position outside the batch");
}

/// The pipeline loads the base with room for its adapters' columns and writes them in place on
/// attach: the same numbers as attaching to a plainly loaded base, on all three layouts.
#[test]
fn weights_loaded_with_room_for_the_adapters_give_the_same_numbers() {
    let refj = reference();
    for (base, adapters, names) in [
        ("base", vec!["good", "tiny-delta"], ["base", "good", "tiny-delta"]),
        ("base-0414", vec!["good-0414"], ["base-0414", "good-0414", ""]),
        ("base-chatglm", vec!["good-chatglm"], ["base", "good", ""]),
    ] {
        let plain = load(base);
        let deltas: Vec<_> = adapters.iter().map(|a| adapter_deltas(&plain, a)).collect();
        let dir = fixtures().join(base);
        let weights = model::weights::Weights::open_dir(&dir).unwrap();
        let room = model::glm::side_room(&deltas, &Device::Cpu).unwrap();
        assert!(!room.is_empty(), "{base}: the adapters target some linears");
        let mut m = model::load_streamed(&dir, &weights, DType::F32, &Device::Cpu, &room).unwrap();
        m.attach(&deltas).unwrap();
        let variants: Vec<Variant> = std::iter::once(None).chain((0..deltas.len()).map(Some)).collect();
        let (lp, gen) = run_variants(&m, &refj, &variants);
        for (k, name) in names.iter().take(variants.len()).enumerate() {
            check_variant(&refj, name, &lp[k], &gen[k]);
        }
        // Attaching again (another stack width) rebuilds the weights from the base's columns.
        m.attach(&deltas[..1]).unwrap();
        let (lp, gen) = run_variants(&m, &refj, &[None, Some(0)]);
        check_variant(&refj, names[0], &lp[0], &gen[0]);
        check_variant(&refj, names[1], &lp[1], &gen[1]);
    }
}
