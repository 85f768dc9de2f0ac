//! A small byte-level BPE with the GLM-4 special tokens appended after the learned vocabulary,
//! saved as transformers reads it (tokenizer.json + tokenizer_config.json + chat_template.jinja).

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::tokenizer::SPECIALS;

/// GLM-4's chat template without tools and metadata: what finetune_demo renders for plain chats.
pub const CHAT_TEMPLATE: &str = "[gMASK]<sop>{% for item in messages %}\
{% if item['role'] == 'system' %}<|system|>\n{{ item['content'] }}\
{% elif item['role'] == 'user' %}<|user|>\n{{ item['content'] }}\
{% elif item['role'] == 'assistant' %}<|assistant|>\n{{ item['content'] }}\
{% elif item['role'] == 'observation' %}<|observation|>\n{{ item['content'] }}\
{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

/// Trains the BPE on `corpus` up to `vocab` entries in all (specials included).
pub fn train(corpus: &[String], vocab: usize) -> Result<Tokenizer> {
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(vocab.saturating_sub(SPECIALS.len()))
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build()
        .into();
    tok.train(&mut trainer, corpus.iter()).map_err(|e| anyhow!("tokenizer training failed: {e}"))?;
    tok.add_special_tokens(SPECIALS.iter().map(|s| AddedToken::from(*s, true)))
        .map_err(|e| anyhow!("cannot add the GLM-4 special tokens: {e}"))?;
    Ok(tok)
}

/// Writes tokenizer.json, tokenizer_config.json and chat_template.jinja into `dir`.
pub fn save(tok: &Tokenizer, dir: &Path) -> Result<()> {
    let json = tok.to_string(true).map_err(|e| anyhow!("cannot serialise the tokenizer: {e}"))?;
    write(&dir.join("tokenizer.json"), &json)?;
    let cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "clean_up_tokenization_spaces": false,
        "model_max_length": 256,
        "chat_template": CHAT_TEMPLATE,
    });
    write(&dir.join("tokenizer_config.json"), &serde_json::to_string_pretty(&cfg)?)?;
    write(&dir.join("chat_template.jinja"), CHAT_TEMPLATE)
}

pub fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
