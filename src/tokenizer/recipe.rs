//! finetune_demo's `process_batch`: which tokens of a conversation are trained (the labels).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use super::GlmTokenizer;
use crate::data::Message;

pub const IGNORE: i64 = -100;

/// The settings of a finetune_demo lora.yaml that decide the labels.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Recipe {
    pub combine: bool,
    /// None = no cut.
    pub max_input_length: Option<usize>,
    pub max_output_length: Option<usize>,
}

impl Default for Recipe {
    /// combine=false, no cut: what the tool assumes without --config.
    fn default() -> Self {
        Recipe { combine: false, max_input_length: None, max_output_length: None }
    }
}

impl Recipe {
    /// Reads combine / max_input_length / max_output_length from a finetune_demo lora.yaml value.
    pub fn from_yaml(v: &serde_yaml::Value, path: &Path) -> Result<Self> {
        let found = match v {
            serde_yaml::Value::Mapping(_) => None,
            serde_yaml::Value::Null => Some("nothing (the file is empty)"),
            serde_yaml::Value::Sequence(_) => Some("a list"),
            _ => Some("a single value"),
        };
        if let Some(found) = found {
            bail!(
                "{}: expected a finetune_demo config, a YAML mapping (combine: ..., max_input_length: ...), found {found}",
                path.display()
            );
        }
        let int = |key: &str| -> Result<Option<usize>> {
            match v.get(key) {
                None | Some(serde_yaml::Value::Null) => Ok(None),
                Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                    anyhow!("{}: {key} must be a non-negative integer, found {}", path.display(), show(x))
                }),
            }
        };
        let combine = match v.get("combine") {
            None | Some(serde_yaml::Value::Null) => false,
            Some(x) => x
                .as_bool()
                .ok_or_else(|| anyhow!("{}: combine must be true or false, found {}", path.display(), show(x)))?,
        };
        Ok(Recipe { combine, max_input_length: int("max_input_length")?, max_output_length: int("max_output_length")? })
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        let v: serde_yaml::Value =
            serde_yaml::from_str(&text).with_context(|| format!("{} is not valid YAML", path.display()))?;
        Self::from_yaml(&v, path)
    }

    /// finetune_demo keeps `input_ids[:max_input_length + max_output_length + 1]`.
    pub fn max_length(&self) -> Option<usize> {
        match (self.max_input_length, self.max_output_length) {
            (None, None) => None,
            (i, o) => Some(i.unwrap_or(0) + o.unwrap_or(0) + 1),
        }
    }
}

/// A YAML value as written in the file.
fn show(v: &serde_yaml::Value) -> String {
    serde_yaml::to_string(v).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// One conversation as the trainer saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub input_ids: Vec<u32>,
    /// Aligned with input_ids; IGNORE where not trained.
    pub labels: Vec<i64>,
    /// Supervised tokens before the cut (how many the recipe lost).
    pub labels_before_cut: usize,
    /// Length before the cut.
    pub full_length: usize,
}

impl Encoded {
    pub fn supervised(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }
}

/// Replays process_batch for one conversation.
pub fn encode(tok: &GlmTokenizer, messages: &[Message], recipe: &Recipe) -> Result<Encoded> {
    let gmask = tok.special("[gMASK]")?;
    let sop = tok.special("<sop>")?;
    let user = tok.special("<|user|>")?;
    let (mut input_ids, mut masks) = if recipe.combine {
        // Only tokens after the last <|assistant|> are trained.
        let ids = tok.apply_chat_template(messages, false)?;
        let asst = tok.special("<|assistant|>")?;
        let last = ids.iter().rposition(|&t| t == asst);
        let masks = (0..ids.len()).map(|j| last.is_some_and(|l| j > l)).collect::<Vec<_>>();
        (ids, masks)
    } else {
        // Each message rendered alone ([gMASK]<sop> dropped), trained where the role is assistant.
        let mut ids = vec![gmask, sop];
        let mut masks = vec![false, false];
        for m in messages {
            let one = tok.apply_chat_template(std::slice::from_ref(m), false)?;
            let body = strip_prefix(&one, gmask, sop);
            let train = m.role == "assistant";
            ids.extend_from_slice(body);
            masks.extend(std::iter::repeat_n(train, body.len()));
        }
        (ids, masks)
    };
    input_ids.push(user);
    // The loss mask is shifted by one: the token after an assistant message (its end) is trained too.
    masks.insert(0, false);
    let labels_full: Vec<i64> =
        input_ids.iter().zip(masks.iter()).map(|(&t, &m)| if m { t as i64 } else { IGNORE }).collect();
    let full_length = input_ids.len();
    let labels_before_cut = labels_full.iter().filter(|&&l| l != IGNORE).count();
    let mut labels = labels_full;
    if let Some(n) = recipe.max_length() {
        input_ids.truncate(n);
        labels.truncate(n);
    }
    Ok(Encoded { input_ids, labels, labels_before_cut, full_length })
}

fn strip_prefix(ids: &[u32], gmask: u32, sop: u32) -> &[u32] {
    if ids.len() >= 2 && ids[0] == gmask && ids[1] == sop {
        &ids[2..]
    } else {
        ids
    }
}

/// The generation prompt for a conversation: everything before its last assistant message,
/// with the assistant prompt; and that message's text (the reference answer).
pub fn prompt_and_answer(tok: &GlmTokenizer, messages: &[Message]) -> Result<Option<(Vec<u32>, String)>> {
    let Some(last) = messages.iter().rposition(|m| m.role == "assistant") else {
        return Ok(None);
    };
    let ids = tok.apply_chat_template(&messages[..last], true)?;
    Ok(Some((ids, messages[last].content.clone())))
}
