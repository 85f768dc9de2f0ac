//! Tokenizers (tokenizer.json or tiktoken tokenizer.model), the model's chat template, and
//! finetune_demo's label construction (`recipe`).

pub mod recipe;
pub mod tiktoken;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::data::Message;

/// GLM-4's chat template as glm-4-9b-chat's tokenizer_config.json ships it (messages with empty
/// content are dropped), used when a model directory carries none.
pub const GLM4_TEMPLATE: &str = "[gMASK]<sop>{% for item in messages %}{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

/// The GLM-4 special tokens in id order (tokenization_chatglm.py: right after the last BPE rank), looked
/// up by name everywhere else (ids differ between real GLM-4 and test models).
pub const SPECIALS: [&str; 14] = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
];

pub struct GlmTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub source: PathBuf,
    template: String,
    pub template_source: String,
    specials: HashMap<String, u32>,
}

impl GlmTokenizer {
    /// Loads the tokenizer and chat template of a model (or tokenizer) directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let tm = dir.join("tokenizer.model");
        let tc = dir.join("tokenizer_config.json");
        let (inner, source) = if tj.is_file() {
            let text = std::fs::read_to_string(&tj).with_context(|| format!("cannot read {}", tj.display()))?;
            let t = check_tokenizer_json(&text)
                .and_then(|()| parse_tokenizer(&text))
                .map_err(|e| anyhow!("{} does not parse as a tokenizers file: {e}", tj.display()))?;
            (t, tj)
        } else if tm.is_file() {
            (tiktoken::load_tiktoken(&tm, tc.is_file().then_some(tc.as_path()))?, tm)
        } else {
            bail!(
                "no tokenizer in {}: expected tokenizer.json (GLM-4 -hf / 0414) or tokenizer.model (glm-4-9b-chat)",
                dir.display()
            );
        };
        let (template, template_source) = find_template(dir)?;
        let mut specials = HashMap::new();
        for name in SPECIALS {
            if let Some(id) = inner.token_to_id(name) {
                specials.insert(name.to_string(), id);
            }
        }
        for needed in ["[gMASK]", "<sop>", "<|user|>", "<|assistant|>"] {
            if !specials.contains_key(needed) {
                bail!("{}: the tokenizer has no {needed} token; is this a GLM-4 tokenizer?", source.display());
            }
        }
        Ok(GlmTokenizer { inner, source, template, template_source, specials })
    }

    pub fn special(&self, name: &str) -> Result<u32> {
        self.specials.get(name).copied().ok_or_else(|| anyhow!("the tokenizer has no {name} token"))
    }

    /// Tokenises text without adding special tokens (as `apply_chat_template(tokenize=True)`:
    /// the template already writes `[gMASK]<sop>`, so a post-processor must not add it twice).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizer failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| anyhow!("cannot decode: {e}"))
    }

    /// Renders messages with the chat template.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.add_filter("tojson", tojson);
        env.add_template("chat", &self.template)
            .map_err(|e| anyhow!("chat template from {} does not compile: {e}", self.template_source))?;
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                let mut v = serde_json::json!({"role": m.role, "content": m.content, "metadata": ""});
                if let Some(t) = &m.tools {
                    v["tools"] = t.clone();
                }
                v
            })
            .collect();
        let tmpl = env.get_template("chat").map_err(|e| anyhow!("{e}"))?;
        tmpl.render(minijinja::context! { messages => msgs, add_generation_prompt => add_generation_prompt })
            .map_err(|e| anyhow!("chat template from {} failed to render: {e}", self.template_source))
    }

    /// Template + tokenise.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        self.encode(&self.render(messages, add_generation_prompt)?)
    }
}

/// What tokenizers 0.23 panics on instead of returning an error (found by fuzzing): a JSON error
/// inside "decoder" (a file cut off there, a control character in a string, nesting past serde_json's
/// depth limit) and a "Precompiled" normalizer whose charsmap does not parse.
fn check_tokenizer_json(text: &str) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(default)]
        normalizer: Value,
        #[serde(default)]
        #[allow(dead_code)]
        decoder: Value,
    }
    fn precompiled(v: &Value) -> Result<()> {
        match v {
            Value::Object(m) => {
                if m.get("type").and_then(Value::as_str) == Some("Precompiled") {
                    serde_json::from_str::<tokenizers::normalizers::Precompiled>(&v.to_string())
                        .map_err(|e| anyhow!("its Precompiled normalizer is invalid: {e}"))?;
                }
                m.values().try_for_each(precompiled)
            }
            Value::Array(a) => a.iter().try_for_each(precompiled),
            _ => Ok(()),
        }
    }
    let head: Head = serde_json::from_str(text)?;
    precompiled(&head.normalizer)
}

/// tokenizers' own parse, with a panic in it turned into an error: 0.23 has more than
/// `check_tokenizer_json` catches, e.g. a BPE merge whose pair is longer than every vocabulary entry
/// indexes past a buffer (found by fuzzing).
fn parse_tokenizer(text: &str) -> Result<tokenizers::Tokenizer> {
    match quiet_catch_unwind(|| text.parse::<tokenizers::Tokenizer>()) {
        Ok(t) => t.map_err(|e| anyhow!("{e}")),
        Err(p) => {
            let why = p.downcast_ref::<&str>().copied().or(p.downcast_ref::<String>().map(String::as_str));
            bail!("the tokenizers library failed on it internally ({})", why.unwrap_or("no message"))
        }
    }
}

thread_local! {
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `catch_unwind` without the panic message on stderr (the error says it instead): a process-wide
/// hook, installed once, stays silent for panics on a thread inside this call and hands every other
/// panic to the hook that was there before.
fn quiet_catch_unwind<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> std::thread::Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                previous(info)
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let r = std::panic::catch_unwind(f);
    QUIET.with(|q| q.set(false));
    r
}

fn tojson(v: minijinja::Value, kwargs: minijinja::value::Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let j = serde_json::to_value(&v)
        .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string()))?;
    let s = match indent {
        Some(n) => {
            let buf = Vec::new();
            let ind = " ".repeat(n);
            let fmt = serde_json::ser::PrettyFormatter::with_indent(ind.as_bytes());
            let mut ser = serde_json::Serializer::with_formatter(buf, fmt);
            serde::Serialize::serialize(&j, &mut ser)
                .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string()))?;
            String::from_utf8(ser.into_inner()).unwrap_or_default()
        }
        None => j.to_string(),
    };
    Ok(s)
}

/// chat_template.jinja, else tokenizer_config.json's chat_template, else GLM-4's.
fn find_template(dir: &Path) -> Result<(String, String)> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let t = std::fs::read_to_string(&jinja).with_context(|| format!("cannot read {}", jinja.display()))?;
        return Ok((t, jinja.display().to_string()));
    }
    let tc = dir.join("tokenizer_config.json");
    if tc.is_file() {
        let text = std::fs::read_to_string(&tc).with_context(|| format!("cannot read {}", tc.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", tc.display()))?;
        match v.get("chat_template") {
            Some(Value::String(s)) => return Ok((s.clone(), tc.display().to_string())),
            Some(Value::Array(a)) => {
                // [{name: "default", template: ...}, ...]
                if let Some(t) = a
                    .iter()
                    .find(|x| x.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|x| x.get("template"))
                    .and_then(|t| t.as_str())
                {
                    return Ok((t.to_string(), tc.display().to_string()));
                }
            }
            _ => {}
        }
    }
    Ok((GLM4_TEMPLATE.to_string(), "the built-in GLM-4 template".to_string()))
}
