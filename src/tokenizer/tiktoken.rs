//! Loads GLM-4's tiktoken `tokenizer.model` as a `tokenizers::Tokenizer`.
//!
//! glm-4-9b-chat ships only a tiktoken rank file (`base64(bytes) rank` per line) and a
//! Python tokenizer class, no `tokenizer.json`. This rebuilds what transformers'
//! `TikTokenConverter` produces: a byte-level BPE whose ids equal tiktoken's ranks, with
//! the special tokens appended after the last rank.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use base64::Engine as _;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Pre-tokenization regex of ChatGLM4Tokenizer (identical to cl100k_base's).
pub const GLM4_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GLM-4's special tokens, in id order right after the last rank (tokenization_chatglm.py).
/// Used only when no tokenizer_config.json with `added_tokens_decoder` is given.
pub use super::SPECIALS as GLM4_SPECIAL_TOKENS;

/// Loads a tiktoken `tokenizer.model` (one `base64 rank` line per token) as an id-exact byte-level BPE.
///
/// Special tokens come from `tokenizer_config`'s `added_tokens_decoder` when it has one,
/// otherwise from [`GLM4_SPECIAL_TOKENS`]; either way they get the ids right after the last rank.
pub fn load_tiktoken(model_path: &Path, tokenizer_config: Option<&Path>) -> Result<Tokenizer> {
    let tokens = read_ranks(model_path)?;
    let specials = match tokenizer_config {
        Some(path) => read_added_tokens(path)?,
        None => None,
    }
    .unwrap_or_else(|| {
        GLM4_SPECIAL_TOKENS.iter().zip(tokens.len() as u32..).map(|(s, id)| (id, AddedToken::from(*s, true))).collect()
    });
    build_tokenizer(&tokens, specials).with_context(|| format!("converting {} to a tokenizer", model_path.display()))
}

/// Parses the rank file into token bytes indexed by rank, checking that ranks are exactly 0..N-1.
fn read_ranks(path: &Path) -> Result<Vec<Vec<u8>>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let b64 = base64::engine::general_purpose::STANDARD;

    // Each message names the file and 1-based line, so it reads fine without a cause chain.
    let mut entries: Vec<(Vec<u8>, u32, usize)> = Vec::new(); // (token, rank, line)
    let mut token_line: HashMap<Vec<u8>, usize> = HashMap::new();
    for (index, line) in data.split(|&b| b == b'\n').enumerate() {
        let line_no = index + 1;
        let fail = |msg: String| anyhow!("{}, line {line_no}: {msg}", path.display());
        let lossy = |field: &[u8]| String::from_utf8_lossy(field).into_owned();
        let mut fields = line.split(u8::is_ascii_whitespace).filter(|f| !f.is_empty());
        // Blank lines (e.g. a trailing newline) are skipped, as tiktoken does.
        let Some(token_field) = fields.next() else {
            continue;
        };
        let rank_field = fields.next().ok_or_else(|| fail("missing rank after the base64 token".into()))?;
        if let Some(extra) = fields.next() {
            let extra = lossy(extra);
            return Err(fail(format!("unexpected extra field {extra:?} (expected `base64 rank`)")));
        }
        let token = b64.decode(token_field).map_err(|e| fail(format!("bad base64 {:?}: {e}", lossy(token_field))))?;
        let rank = std::str::from_utf8(rank_field).ok().and_then(|s| s.parse::<u32>().ok()).ok_or_else(|| {
            let rank = lossy(rank_field);
            fail(format!("rank {rank:?} is not a non-negative integer"))
        })?;
        if token.is_empty() {
            return Err(fail("empty token".into()));
        }
        if let Some(first) = token_line.insert(token.clone(), line_no) {
            return Err(fail(format!("duplicate token {:?} (first at line {first})", lossy(&token))));
        }
        entries.push((token, rank, line_no));
    }
    ensure!(!entries.is_empty(), "{}: empty tiktoken file (no `base64 rank` lines)", path.display());

    // With no rank duplicated and every rank < N, the N ranks are exactly 0..N-1.
    let n = entries.len();
    let mut by_rank: Vec<Option<(Vec<u8>, usize)>> = vec![None; n];
    for (token, rank, line_no) in entries {
        let at = format!("{}, line {line_no}", path.display());
        let Some(slot) = by_rank.get_mut(rank as usize) else {
            bail!("{at}: ranks are not contiguous: rank {rank}, but the file has {n} tokens (ranks 0..={})", n - 1);
        };
        if let Some((_, first)) = slot {
            bail!("{at}: duplicate rank {rank} (first at line {first})");
        }
        *slot = Some((token, line_no));
    }
    let tokens: Vec<Vec<u8>> = by_rank.into_iter().flatten().map(|(t, _)| t).collect();

    // Byte-level BPE without an unk token silently drops bytes it has no token for;
    // tiktoken vocabularies always hold all 256, so a missing one means a broken file.
    if let Some(b) = (0..=255u8).find(|b| !token_line.contains_key(&[*b][..])) {
        bail!("{}: no token for the single byte 0x{b:02x}; text containing it could not be encoded", path.display());
    }
    Ok(tokens)
}

/// Reads `added_tokens_decoder` (id → token) from a tokenizer_config.json; `None` when absent.
fn read_added_tokens(path: &Path) -> Result<Option<Vec<(u32, AddedToken)>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let Some(decoder) = config.get("added_tokens_decoder") else {
        return Ok(None);
    };
    let decoder =
        decoder.as_object().with_context(|| format!("{}: added_tokens_decoder is not an object", path.display()))?;
    let flag = |v: &serde_json::Value, key: &str, default: bool| {
        v.get(key).and_then(serde_json::Value::as_bool).unwrap_or(default)
    };
    let mut tokens = decoder
        .iter()
        .map(|(id, v)| {
            let id: u32 = id
                .parse()
                .with_context(|| format!("{}: added_tokens_decoder id {id:?} is not an integer", path.display()))?;
            let content = v
                .get("content")
                .and_then(|c| c.as_str())
                .with_context(|| format!("{}: added_tokens_decoder[{id}] has no string content", path.display()))?;
            let token = AddedToken::from(content, flag(v, "special", true))
                .lstrip(flag(v, "lstrip", false))
                .rstrip(flag(v, "rstrip", false))
                .single_word(flag(v, "single_word", false))
                .normalized(flag(v, "normalized", false));
            Ok((id, token))
        })
        .collect::<Result<Vec<_>>>()?;
    tokens.sort_by_key(|(id, _)| *id);
    Ok(Some(tokens))
}

/// Builds the tokenizer from token bytes indexed by rank plus (id, special token) pairs.
fn build_tokenizer(tokens: &[Vec<u8>], specials: Vec<(u32, AddedToken)>) -> Result<Tokenizer> {
    let rank_of: HashMap<&[u8], u32> = tokens.iter().zip(0u32..).map(|(t, r)| (&t[..], r)).collect();

    // transformers' TikTokenConverter: every split of a token into two tokens is a merge,
    // ordered by the merged token's rank, ties by (rank(left), rank(right)). One merge per
    // token is not enough: BPE may reach a token through any of its splits. Walking tokens
    // in rank order keeps the merge list sorted by merged rank.
    let mut merge_ranks: Vec<(u32, u32)> = Vec::new();
    let mut local = Vec::new();
    for token in tokens {
        local.clear();
        local.extend((1..token.len()).filter_map(|i| Some((*rank_of.get(&token[..i])?, *rank_of.get(&token[i..])?))));
        local.sort_unstable();
        merge_ranks.extend_from_slice(&local);
    }

    let byte_chars = bytes_to_unicode();
    let strings: Vec<String> = tokens.iter().map(|t| t.iter().map(|&b| byte_chars[b as usize]).collect()).collect();
    let vocab: Vocab = strings.iter().cloned().zip(0u32..).collect();
    let merges: Merges =
        merge_ranks.iter().map(|&(l, r)| (strings[l as usize].clone(), strings[r as usize].clone())).collect();

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(false)
        // tiktoken returns a pre-token that is itself a token as that one id without running
        // BPE; ignore_merges does the same. transformers' converter leaves it off, which gets
        // 893 GLM-4 tokens (e.g. " 系统") wrong: no merge sequence reaches them.
        .ignore_merges(true)
        .build()
        .map_err(|e| anyhow!("building BPE model: {e}"))?;

    let split = Split::new(SplitPattern::Regex(GLM4_PATTERN.to_string()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| anyhow!("compiling the pre-tokenizer regex: {e}"))?;
    // The regex already split the text, so ByteLevel must only map bytes to chars.
    let byte_level = ByteLevel::new(false, false, false);

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_pre_tokenizer(Some(Sequence::new(vec![split.into(), byte_level.into()])))
        .with_decoder(Some(byte_level))
        .with_post_processor(Some(byte_level));

    // The added vocabulary hands out ids sequentially after the model's, so the configured
    // ids must continue the ranks without gaps.
    for (expected, (id, token)) in (tokens.len() as u32..).zip(&specials) {
        ensure!(
            *id == expected,
            "special token {:?} has id {id}, but special ids must continue the ranks contiguously (expected {expected})",
            token.content
        );
    }
    tokenizer.add_tokens(specials.iter().map(|(_, t)| t.clone())).map_err(|e| anyhow!("adding special tokens: {e}"))?;
    // A special token spelled like a regular token would silently take that token's id.
    for (id, token) in &specials {
        let got = tokenizer.token_to_id(&token.content);
        ensure!(got == Some(*id), "special token {:?} maps to {got:?} instead of id {id}", token.content);
    }
    Ok(tokenizer)
}

/// GPT-2's reversible byte → printable char table used by byte-level BPE vocabularies:
/// printable Latin-1 bytes stand for themselves, the rest are shifted to U+0100 onwards.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut next_shifted = 256u32;
    for b in 0..=255u8 {
        table[b as usize] = if printable(b) {
            char::from(b)
        } else {
            next_shifted += 1;
            char::from_u32(next_shifted - 1).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A valid rank file: the 256 single bytes, then `extra` multi-byte tokens.
    fn valid_lines(extra: &[&[u8]]) -> Vec<String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        (0..=255u8)
            .map(|b| vec![b])
            .chain(extra.iter().map(|t| t.to_vec()))
            .enumerate()
            .map(|(rank, t)| format!("{} {rank}", b64.encode(t)))
            .collect()
    }

    fn write_file(content: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(content.as_bytes()).expect("write temp file");
        file
    }

    /// Loads `content` and returns the full error chain, asserting it names the file.
    fn load_err(content: &str) -> String {
        let file = write_file(content);
        let err = load_tiktoken(file.path(), None).expect_err("load should fail");
        // Plain Display must already say everything (file, line, what is wrong).
        let msg = err.to_string();
        assert!(msg.contains(&file.path().display().to_string()), "no file name in: {msg}");
        msg
    }

    fn assert_contains(msg: &str, parts: &[&str]) {
        for part in parts {
            assert!(msg.contains(part), "{part:?} not in: {msg}");
        }
    }

    #[test]
    fn byte_table_matches_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[0xAD], 'Ń');
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn small_vocab_round_trip_and_specials() {
        let lines = valid_lines(&[b"ab", b"abc", b" a"]);
        let file = write_file(&(lines.join("\n") + "\n"));
        let tok = load_tiktoken(file.path(), None).expect("load");
        // " ab": the merge a+b (rank 256) wins over ' '+a (rank 258), as in tiktoken.
        let enc = tok.encode("abc ab<sop>", false).expect("encode");
        assert_eq!(enc.get_ids(), &[257, b' ' as u32, 256, 259 + 4]);
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(259));
        assert_eq!(tok.token_to_id("<|end_of_video|>"), Some(259 + 13));
        assert_eq!(tok.decode(enc.get_ids(), false).expect("decode"), "abc ab<sop>");
    }

    #[test]
    fn crlf_and_unordered_ranks_are_accepted() {
        let mut lines = valid_lines(&[b"ab"]);
        lines.reverse();
        let file = write_file(&lines.join("\r\n"));
        let tok = load_tiktoken(file.path(), None).expect("load");
        assert_eq!(tok.encode("ab", false).expect("encode").get_ids(), &[256]);
    }

    #[test]
    fn empty_file() {
        assert_contains(&load_err(""), &["empty"]);
        assert_contains(&load_err("\n \n"), &["empty"]);
    }

    #[test]
    fn bad_base64() {
        let mut lines = valid_lines(&[]);
        lines[2] = "not*base64 2".into();
        assert_contains(&load_err(&lines.join("\n")), &["line 3", "bad base64", "not*base64"]);
    }

    #[test]
    fn missing_rank() {
        let mut lines = valid_lines(&[]);
        lines[4] = "YWI=".into();
        assert_contains(&load_err(&lines.join("\n")), &["line 5", "missing rank"]);
    }

    #[test]
    fn rank_not_integer() {
        let mut lines = valid_lines(&[]);
        lines[1] = "YWI= one".into();
        assert_contains(&load_err(&lines.join("\n")), &["line 2", "\"one\"", "integer"]);
        lines[1] = "YWI= -1".into();
        assert_contains(&load_err(&lines.join("\n")), &["line 2", "\"-1\""]);
    }

    #[test]
    fn extra_field() {
        let mut lines = valid_lines(&[]);
        lines[0].push_str(" 7");
        assert_contains(&load_err(&lines.join("\n")), &["line 1", "extra field"]);
    }

    #[test]
    fn duplicate_rank() {
        let mut lines = valid_lines(&[b"ab"]);
        lines.push("YWJj 256".into()); // "abc" reusing the rank of "ab"
        assert_contains(&load_err(&lines.join("\n")), &["line 258", "duplicate rank 256", "line 257"]);
    }

    #[test]
    fn duplicate_token() {
        let mut lines = valid_lines(&[b"ab"]);
        lines.push("YWI= 257".into()); // "ab" again
        assert_contains(&load_err(&lines.join("\n")), &["line 258", "duplicate token", "line 257"]);
    }

    #[test]
    fn ranks_not_contiguous() {
        let mut lines = valid_lines(&[]);
        lines.push("YWI= 300".into());
        assert_contains(&load_err(&lines.join("\n")), &["line 257", "not contiguous", "rank 300"]);
    }

    #[test]
    fn missing_single_byte() {
        let lines = valid_lines(&[]);
        // Drop byte 0xff (rank 255), leaving ranks 0..254 contiguous.
        assert_contains(&load_err(&lines[..255].join("\n")), &["0xff"]);
    }

    #[test]
    fn config_specials_must_continue_ranks() {
        let model = write_file(&valid_lines(&[]).join("\n"));
        let config = write_file(r#"{"added_tokens_decoder": {"300": {"content": "<x>", "special": true}}}"#);
        let err = load_tiktoken(model.path(), Some(config.path())).expect_err("gap in ids");
        assert_contains(&format!("{err:#}"), &["<x>", "300", "expected 256"]);

        let config = write_file(r#"{"added_tokens_decoder": {"257": {"content": "<y>"}, "256": {"content": "<x>"}}}"#);
        let tok = load_tiktoken(model.path(), Some(config.path())).expect("load");
        assert_eq!(tok.token_to_id("<x>"), Some(256));
        assert_eq!(tok.token_to_id("<y>"), Some(257));
        assert_eq!(tok.token_to_id("<sop>"), None);

        // A config without added_tokens_decoder falls back to the GLM-4 list.
        let config = write_file(r#"{"eos_token": "<|endoftext|>"}"#);
        let tok = load_tiktoken(model.path(), Some(config.path())).expect("load");
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(256));
    }

    #[test]
    fn special_token_spelled_like_a_regular_token_is_rejected() {
        let model = write_file(&valid_lines(&[b"ab"]).join("\n"));
        let config = write_file(r#"{"added_tokens_decoder": {"257": {"content": "ab", "special": true}}}"#);
        let err = load_tiktoken(model.path(), Some(config.path())).expect_err("collision");
        assert_contains(&format!("{err:#}"), &["\"ab\"", "Some(256)"]);
    }
}
