//! finetune_demo jsonl data: `{"messages": [{"role": ..., "content": ...}, ...]}` rows with line numbers.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// Tool definitions; finetune_demo allows them on the system message only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<serde_json::Value>,
}

/// One conversation of a data file. `line` is 1-based.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub source: PathBuf,
    pub line: usize,
    pub messages: Vec<Message>,
}

/// Reads a jsonl file. A line that cannot be used is an error naming file and line;
/// blank lines are skipped. Content checks that still let a row be used live in `checks::data`.
pub fn read_jsonl(path: &Path) -> Result<Vec<Row>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read data file {}", path.display()))?;
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
            bail!("{}:{}: not valid UTF-8 (byte offset {at}); save the file as UTF-8", path.display(), line);
        }
    };
    let mut rows = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        rows.push(parse_row(raw, path, line)?);
    }
    if rows.is_empty() {
        bail!("{}: no rows (the file is empty); expected one {{\"messages\": [...]}} object per line", path.display());
    }
    Ok(rows)
}

/// Parses one jsonl line into a row; errors name the file and line.
pub fn parse_row(raw: &str, path: &Path, line: usize) -> Result<Row> {
    let where_ = || format!("{}:{}", path.display(), line);
    let v: serde_json::Value =
        serde_json::from_str(raw).map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", where_()))?;
    let msgs = v
        .get("messages")
        .or_else(|| v.get("conversations"))
        .ok_or_else(|| anyhow::anyhow!("{}: no \"messages\" array (finetune_demo format is {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}})", where_()))?;
    let arr = msgs.as_array().ok_or_else(|| anyhow::anyhow!("{}: \"messages\" is not an array", where_()))?;
    let mut messages = Vec::with_capacity(arr.len());
    for (j, m) in arr.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(|r| r.as_str())
            .ok_or_else(|| anyhow::anyhow!("{}: message {} has no string \"role\"", where_(), j + 1))?;
        let content = match m.get("content") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => bail!(
                "{}: message {} ({role}) has non-string content ({}); content must be a string",
                where_(),
                j + 1,
                json_kind(other)
            ),
            None => bail!("{}: message {} ({role}) has no \"content\"", where_(), j + 1),
        };
        messages.push(Message { role: role.to_string(), content, tools: m.get("tools").cloned() });
    }
    Ok(Row { source: path.to_path_buf(), line, messages })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
