//! CPU benchmarks on ../shared/fixtures/glm4-tiny: teacher-forced scoring throughput (base and
//! tuned rows in one batch through the unmerged side path), greedy generation, both with and without
//! sharing the prompts' pass, and the LoRA merge.

use std::path::PathBuf;

use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use glm4_verify::adapter::{match_to_base, Adapter};
use glm4_verify::data::read_jsonl;
use glm4_verify::model;
use glm4_verify::score::engine::{generate, score_and_generate, score_targets, BatchLimits, GenOptions};
use glm4_verify::tokenizer::recipe::{encode, prompt_and_answer, Recipe};
use glm4_verify::tokenizer::GlmTokenizer;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/glm4-tiny")
}

fn bench(c: &mut Criterion) {
    let fx = fixtures();
    let tok = GlmTokenizer::from_dir(&fx.join("base")).expect("tokenizer");
    let recipe = Recipe::from_file(&fx.join("lora.yaml")).expect("lora.yaml");
    let rows = read_jsonl(&fx.join("data/train.jsonl")).expect("data");
    let items: Vec<(Vec<u32>, Vec<i64>)> = rows
        .iter()
        .map(|r| encode(&tok, &r.messages, &recipe).map(|e| (e.input_ids, e.labels)))
        .collect::<anyhow::Result<_>>()
        .expect("encode");
    let prompts: Vec<Vec<u32>> =
        rows.iter().map(|r| prompt_and_answer(&tok, &r.messages).expect("prompt").expect("answer").0).collect();
    let tokens: usize = items.iter().map(|(i, _)| i.len()).sum();
    let mut m = model::load_dir(&fx.join("base"), DType::F32, &Device::Cpu).expect("model");
    let adapter = Adapter::open(&fx.join("adapters/good")).expect("adapter");
    let deltas = match_to_base(&adapter, &m.cfg).expect("match").deltas;
    m.attach(std::slice::from_ref(&deltas)).expect("attach");
    let lim = BatchLimits::default();

    let mut g = c.benchmark_group("tiny");
    g.throughput(Throughput::Elements(2 * tokens as u64));
    g.bench_function("score base+tuned (tokens)", |b| {
        b.iter(|| score_targets(&m, &items, &[None, Some(0)], lim).expect("score"))
    });
    g.throughput(Throughput::Elements(2 * 16 * prompts.len() as u64));
    g.bench_function("generate 16 tokens base+tuned (tokens)", |b| {
        let max_new = vec![16; prompts.len()];
        let gen = GenOptions { stop_at_eos: false };
        b.iter(|| generate(&m, &prompts, &max_new, &[None, Some(0)], lim, gen).expect("generate"))
    });
    // The verification's real work: both, separately and sharing the prompts' pass (generation
    // continuing from the scoring pass's KV cache), in samples.
    g.throughput(Throughput::Elements(items.len() as u64));
    let max_new = vec![16; prompts.len()];
    let gen = GenOptions { stop_at_eos: false };
    g.bench_function("score then generate, separately (samples)", |b| {
        b.iter(|| {
            score_targets(&m, &items, &[None, Some(0)], lim).expect("score");
            generate(&m, &prompts, &max_new, &[None, Some(0)], lim, gen).expect("generate")
        })
    });
    g.bench_function("score and generate, shared prompt pass (samples)", |b| {
        b.iter(|| score_and_generate(&m, &items, &prompts, &max_new, &[None, Some(0)], lim, gen).expect("both"))
    });
    g.throughput(Throughput::Elements(deltas.len() as u64));
    g.bench_function("merge LoRA into weights (modules)", |b| {
        b.iter_batched(
            || model::load_dir(&fx.join("base"), DType::F32, &Device::Cpu).expect("model"),
            |mut base| base.merge(&deltas).expect("merge"),
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
