//! Converter load time and encode throughput of the tiktoken → tokenizers conversion.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use glm4_verify::tokenizer::tiktoken::load_tiktoken;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/glm4-tokenizer").join(name)
}

/// ~20 KB of chat-like text: Chinese, English, code, numbers, emoji, CRLF and whitespace runs.
fn mixed_corpus() -> String {
    let paragraph = concat!(
        "GLM-4是智谱AI推出的新一代预训练模型，支持多轮对话、网页浏览、代码执行和长文本推理。\n",
        "The LoRA adapter was trained for 3 epochs at lr=2e-4; eval loss fell from 2.35 to 1.87.\r\n",
        "fn main() {\n    let v: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    println!(\"{v:?}\");\n}\n",
        "I'm sure they'll say it's fine 🙂👍🏽 — 数字 1234567890, 3.14159.\n\n",
        "    indented\tand\ttabbed   text with trailing spaces   \n",
    );
    paragraph.repeat(40)
}

fn bench(c: &mut Criterion) {
    let model = fixture("tokenizer.model");
    let config = fixture("tokenizer_config.json");

    let mut load = c.benchmark_group("load");
    load.sample_size(10);
    load.bench_function("load_tiktoken", |b| b.iter(|| load_tiktoken(black_box(&model), Some(&config)).expect("load")));
    load.finish();

    let tokenizer = load_tiktoken(&model, Some(&config)).expect("load");
    let text = mixed_corpus();
    let mut encode = c.benchmark_group("encode");
    encode.throughput(Throughput::Bytes(text.len() as u64));
    encode.bench_function("mixed_corpus", |b| {
        b.iter(|| tokenizer.encode(black_box(text.as_str()), false).expect("encode"))
    });
    // Reference point: the tiktoken crate on the same text (same ids, different engine).
    let oracle = tiktoken::get_encoding("glm4").expect("tiktoken glm4 encoding");
    encode.bench_function("mixed_corpus_tiktoken_crate", |b| b.iter(|| oracle.encode(black_box(text.as_str()))));
    encode.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
