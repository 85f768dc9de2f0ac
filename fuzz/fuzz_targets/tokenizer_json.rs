#![no_main]
//! tokenizer.json → GlmTokenizer::from_dir on a directory holding only it (so the built-in GLM-4
//! chat template), then a fixed string encoded and decoded, and a fixed chat rendered and tokenised.
//! `from_dir` contains panics of tokenizers' parse (an error instead), so only a panic that escapes
//! it is a finding.
use std::sync::OnceLock;

use glm4_verify::data::Message;
use glm4_verify::tokenizer::GlmTokenizer;
use glm4_verify_fuzz::{allow_caught_panics, debug, fixed_dir};
use libfuzzer_sys::fuzz_target;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

const TEXT: &str = "[gMASK]<sop><|user|>\nThe team's tea, \t twice!  Grüße 你好 🙂\r\n<|assistant|>\nok<|endoftext|>";

fuzz_target!(|data: &[u8]| {
    allow_caught_panics();
    let dir = fixed_dir(&DIR, Vec::new);
    std::fs::write(dir.join("tokenizer.json"), data).expect("write tokenizer.json");
    let tok = match GlmTokenizer::from_dir(dir) {
        Ok(t) => t,
        Err(e) => return debug(|| format!("error: {e:#}")),
    };
    for name in ["[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|endoftext|>", "<|observation|>"] {
        let _ = tok.special(name);
    }
    let ids = tok.encode(TEXT);
    debug(|| format!("encode: {ids:?}"));
    if let Ok(ids) = &ids {
        let _ = tok.decode(ids, false);
        let _ = tok.decode(ids, true);
    }
    let chat = [
        Message { role: "user".into(), content: "Who leads the team?".into(), tools: None },
        Message { role: "assistant".into(), content: "Mira, since 2019.".into(), tools: None },
    ];
    let r = tok.apply_chat_template(&chat, true);
    debug(|| format!("chat: {r:?}"));
});
