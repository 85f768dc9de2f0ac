#![no_main]
//! A chat template and messages → GlmTokenizer::render and apply_chat_template. The template is
//! written as chat_template.jinja next to a small fixed tokenizer.json and loaded with
//! GlmTokenizer::from_dir (the template is private to the tokenizer).
//!
//! Input: `template \0 message \0 message ...`; each message is a role byte (`s` system, `u` user,
//! `a` assistant, `o` observation, `t` tool, any other byte one of these by its value % 5) and the
//! content (lossy UTF-8), except that a segment starting with `T` is JSON set as the previous
//! message's `tools`. Without message segments, a fixed
//! system/user/assistant chat is rendered.
use std::sync::OnceLock;

use glm4_verify::data::Message;
use glm4_verify::tokenizer::GlmTokenizer;
use glm4_verify_fuzz::{debug, fixed_dir};
use libfuzzer_sys::fuzz_target;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

const TOKENIZER: &[u8] = include_bytes!("../corpus/tokenizer_json/seed-bpe-small.json");
const ROLES: [&str; 5] = ["system", "user", "assistant", "observation", "tool"];

fn msg(role: &str, content: &str) -> Message {
    Message { role: role.into(), content: content.into(), tools: None }
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let template = parts.next().unwrap_or_default();
    let mut messages: Vec<Message> = Vec::new();
    for p in parts {
        match p.split_first() {
            Some((b'T', json)) => {
                if let (Some(last), Ok(v)) = (messages.last_mut(), serde_json::from_slice(json)) {
                    last.tools = Some(v);
                }
            }
            Some((&r, content)) => {
                let role = match r {
                    b's' => "system",
                    b'u' => "user",
                    b'a' => "assistant",
                    b'o' => "observation",
                    b't' => "tool",
                    _ => ROLES[r as usize % ROLES.len()],
                };
                messages.push(msg(role, &String::from_utf8_lossy(content)))
            }
            None => messages.push(msg("user", "")),
        }
    }
    if messages.is_empty() {
        messages = vec![
            msg("system", "Answer briefly."),
            msg("user", "Who leads the team?"),
            msg("assistant", "Mira, since 2019."),
        ];
    }
    let dir = fixed_dir(&DIR, || vec![("tokenizer.json", TOKENIZER.to_vec())]);
    std::fs::write(dir.join("chat_template.jinja"), template).expect("write chat_template.jinja");
    let tok = match GlmTokenizer::from_dir(dir) {
        Ok(t) => t,
        Err(e) => return debug(|| format!("error: {e:#}")),
    };
    let r = tok.render(&messages, true);
    debug(|| format!("render: {r:?}"));
    let ids = tok.apply_chat_template(&messages, false);
    debug(|| format!("apply_chat_template: {ids:?}"));
});
