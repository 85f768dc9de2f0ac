//! finetune_demo jsonl data: lines that cannot be used at all, and rows that parse but train
//! wrongly under GLM-4's chat template. Every finding has code `data_format`.
//!
//! Severity: `error` when a line or row contributes nothing or garbage to training (it is
//! skipped, has no assistant turn to supervise, or has a role the template renders as plain
//! text); `warning` when the row still trains but part of it is dropped or deviates from what
//! GLM-4 expects (empty message, misplaced system or tools, trailing non-assistant turn).
//!
//! Findings are grouped per file and problem kind: one finding lists the first line numbers and
//! the count, so a 100k-line file with one repeated mistake gives one readable finding.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::data::{parse_row, Row};
use crate::finding::{Finding, Severity};

pub const CODE: &str = "data_format";

/// Roles the GLM-4 chat template gives a special token; any other role is rendered as the
/// literal text `<|role|>` and, in finetune_demo, supervised as if it were the assistant.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "observation"];

/// Line numbers kept in a finding's evidence (the count says how many there are in all).
const EVIDENCE_LINES: usize = 20;
/// Line numbers quoted in the message itself.
const MESSAGE_LINES: usize = 5;
/// Distinct unknown role names kept in the evidence.
const EVIDENCE_ROLES: usize = 10;
/// Longest line read as a row. A 128k-token GLM-4 conversation is a few MiB even with every
/// character escaped; a longer line is a broken file, and replaying it would take minutes.
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// The kinds of problem, in the order their findings are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Problem {
    EmptyFile,
    LineTooLong,
    NotUtf8,
    InvalidJson,
    NoMessages,
    MessagesNotArray,
    BadRole,
    BadContent,
    Unusable,
    UnknownRole,
    NoAssistant,
    EmptyContent,
    ToolsNotOnSystem,
    SystemPlacement,
    NotEndingWithAssistant,
    ByteOrderMark,
}

impl Problem {
    /// Stable key for `evidence.problem`.
    fn key(self) -> &'static str {
        match self {
            Problem::EmptyFile => "empty_file",
            Problem::LineTooLong => "line_too_long",
            Problem::NotUtf8 => "not_utf8",
            Problem::InvalidJson => "invalid_json",
            Problem::NoMessages => "no_messages",
            Problem::MessagesNotArray => "messages_not_array",
            Problem::BadRole => "missing_role",
            Problem::BadContent => "bad_content",
            Problem::Unusable => "unusable_line",
            Problem::UnknownRole => "unknown_role",
            Problem::NoAssistant => "no_assistant_turn",
            Problem::EmptyContent => "empty_content",
            Problem::ToolsNotOnSystem => "tools_not_on_system",
            Problem::SystemPlacement => "system_not_first",
            Problem::NotEndingWithAssistant => "not_ending_with_assistant",
            Problem::ByteOrderMark => "byte_order_mark",
        }
    }

    fn severity(self) -> Severity {
        match self {
            Problem::EmptyContent
            | Problem::ToolsNotOnSystem
            | Problem::SystemPlacement
            | Problem::NotEndingWithAssistant
            | Problem::ByteOrderMark => Severity::Warning,
            _ => Severity::Error,
        }
    }

    /// What is wrong, as the head of the message.
    fn what(self) -> &'static str {
        match self {
            Problem::EmptyFile => "no rows (the file is empty)",
            Problem::LineTooLong => "line longer than 16 MiB (skipped)",
            Problem::NotUtf8 => "not valid UTF-8 (skipped)",
            Problem::InvalidJson => "invalid JSON (skipped)",
            Problem::NoMessages => "no \"messages\" array (skipped)",
            Problem::MessagesNotArray => "\"messages\" is not an array (skipped)",
            Problem::BadRole => "a message without a string \"role\" (skipped)",
            Problem::BadContent => "a message whose \"content\" is missing or not a string (skipped)",
            Problem::Unusable => "unusable line (skipped)",
            Problem::UnknownRole => "unknown role (GLM-4 renders it as plain text and finetune_demo trains on it)",
            Problem::NoAssistant => "no non-empty assistant turn, so nothing in the row is trained",
            Problem::EmptyContent => "empty message (the GLM-4 chat template drops messages with empty content)",
            Problem::ToolsNotOnSystem => "\"tools\" on a non-system message (finetune_demo deletes them there)",
            Problem::SystemPlacement => "system message not first, or more than one",
            Problem::NotEndingWithAssistant => {
                "conversation does not end with an assistant turn (the last turn trains nothing)"
            }
            Problem::ByteOrderMark => "file starts with a UTF-8 byte order mark (some JSON loaders reject it)",
        }
    }

    /// What to do about it.
    fn fix(self) -> &'static str {
        match self {
            Problem::EmptyFile => "expected one {\"messages\": [{\"role\": ..., \"content\": ...}]} object per line",
            Problem::LineTooLong => "no conversation is this long: are newlines missing between rows?",
            Problem::NotUtf8 => "save the file as UTF-8",
            Problem::InvalidJson => "each line must be one complete JSON object; fix or delete these lines",
            Problem::NoMessages | Problem::MessagesNotArray | Problem::Unusable => {
                "convert to finetune_demo format: {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}"
            }
            Problem::BadRole => "give every message a \"role\" (system, user, assistant or observation)",
            Problem::BadContent => "make every \"content\" a string",
            Problem::UnknownRole => "use only system, user, assistant or observation (lowercase)",
            Problem::NoAssistant => "add the assistant reply to train on, or delete these rows",
            Problem::EmptyContent => "fill in or remove the empty messages",
            Problem::ToolsNotOnSystem => "move \"tools\" to the first (system) message",
            Problem::SystemPlacement => "keep a single system message, as the first message",
            Problem::NotEndingWithAssistant => "end each conversation with the assistant reply",
            Problem::ByteOrderMark => "save the file as UTF-8 without BOM",
        }
    }
}

#[derive(Default)]
struct Group {
    /// Detail of the first occurrence, quoted in the message.
    example: String,
    lines: Vec<usize>,
    count: usize,
    /// Distinct offending values (unknown role names).
    values: BTreeSet<String>,
}

/// Occurrences grouped by (file, problem); BTreeMap keeps the report order stable.
#[derive(Default)]
struct Groups(BTreeMap<(PathBuf, Problem), Group>);

impl Groups {
    fn add(&mut self, file: &Path, line: usize, problem: Problem, detail: impl FnOnce() -> String) {
        let g = self.0.entry((file.to_path_buf(), problem)).or_default();
        if g.count == 0 {
            g.example = detail();
        }
        g.count += 1;
        if g.lines.len() < EVIDENCE_LINES {
            g.lines.push(line);
        }
    }

    /// A problem of the whole file, with no line to point at.
    fn add_file(&mut self, file: &Path, problem: Problem) {
        self.0.entry((file.to_path_buf(), problem)).or_default().count += 1;
    }

    fn add_value(&mut self, file: &Path, problem: Problem, value: &str) {
        if let Some(g) = self.0.get_mut(&(file.to_path_buf(), problem)) {
            if g.values.len() < EVIDENCE_ROLES {
                g.values.insert(value.to_string());
            }
        }
    }

    fn into_findings(self) -> Vec<Finding> {
        self.0.into_iter().map(|((file, problem), g)| finding(&file, problem, g)).collect()
    }
}

fn finding(file: &Path, problem: Problem, g: Group) -> Finding {
    let at = match g.lines.first() {
        Some(l) => format!("{}:{l}", file.display()),
        None => file.display().to_string(),
    };
    let example = if g.example.is_empty() { String::new() } else { format!(": {}", g.example) };
    let more = if g.count > 1 {
        let shown: Vec<String> = g.lines.iter().take(MESSAGE_LINES).map(|l| l.to_string()).collect();
        let ellipsis = if g.count > MESSAGE_LINES { ", ..." } else { "" };
        format!(" ({} lines in all: {}{ellipsis})", g.count, shown.join(", "))
    } else {
        String::new()
    };
    let message = format!("{at}: {}{example}{more}; {}", problem.what(), problem.fix());
    let mut evidence = json!({
        "file": file.display().to_string(),
        "lines": g.lines,
        "count": g.count,
        "problem": problem.key(),
        "example": g.example,
    });
    if !g.values.is_empty() {
        evidence["roles"] = json!(g.values);
    }
    Finding::new(CODE, problem.severity(), message).with_evidence(evidence)
}

/// Reads every line of a jsonl file, keeping the usable rows and reporting (grouped) the lines
/// that cannot be used; it never stops at the first bad line. Blank lines are skipped silently,
/// as `data::read_jsonl` does. Content checks on the rows are `check_rows`'s job: callers run
/// both. Errs only when the file cannot be read.
pub fn scan_jsonl(path: &Path) -> Result<(Vec<Row>, Vec<Finding>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read data file {}", path.display()))?;
    let mut groups = Groups::default();
    let mut body = bytes.as_slice();
    // Editors on Windows add a BOM; the rest of the file is still fine, so strip and warn.
    if let Some(rest) = body.strip_prefix(b"\xEF\xBB\xBF") {
        body = rest;
        groups.add(path, 1, Problem::ByteOrderMark, String::new);
    }
    let mut rows = Vec::new();
    let mut seen_line = false;
    // Split on bytes, not chars: one line with bad UTF-8 must not hide the others.
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.len() > MAX_LINE_BYTES {
            seen_line = true;
            let mib = raw.len() as f64 / (1 << 20) as f64;
            groups.add(path, line, Problem::LineTooLong, || format!("the line is {mib:.1} MiB"));
            continue;
        }
        let text = match std::str::from_utf8(raw) {
            Ok(t) => t,
            Err(e) => {
                seen_line = true;
                groups.add(path, line, Problem::NotUtf8, || {
                    format!("first bad byte is byte {} of the line", e.valid_up_to() + 1)
                });
                continue;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        seen_line = true;
        match parse_row(text, path, line) {
            Ok(row) => rows.push(row),
            Err(e) => {
                let (problem, hint) = classify(text);
                // parse_row's message starts with "file:line: "; the finding says where itself.
                let msg = e.to_string();
                let prefix = format!("{}:{line}: ", path.display());
                let detail = hint.unwrap_or_else(|| msg.strip_prefix(&prefix).unwrap_or(&msg).to_string());
                groups.add(path, line, problem, || detail);
            }
        }
    }
    if !seen_line {
        groups.add_file(path, Problem::EmptyFile);
    }
    Ok((rows, groups.into_findings()))
}

/// The error for data files without one usable row: names the problems `scan_jsonl` found.
pub fn no_usable_rows(files: &[PathBuf], findings: &[Finding]) -> anyhow::Error {
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let problems: Vec<&str> = findings
        .iter()
        .filter(|f| f.code == CODE && f.severity == Severity::Error)
        .map(|f| f.message.as_str())
        .collect();
    anyhow::anyhow!("no usable rows in {}:\n  {}", names.join(", "), problems.join("\n  "))
}

/// Names the reason `parse_row` rejected a line (it only says so in prose), with a hint when
/// the line is in another well-known format. Runs on rejected lines only.
fn classify(raw: &str) -> (Problem, Option<String>) {
    let v: Value = match serde_json::from_str(raw) {
        Ok(v) => v,
        // serde's own words, minus its "at line 1" (each jsonl line is parsed alone).
        Err(e) => {
            let msg = e.to_string();
            let at = format!(" at line {} column {}", e.line(), e.column());
            let msg = msg.strip_suffix(&at).unwrap_or(&msg);
            return (Problem::InvalidJson, Some(format!("{msg} at column {}", e.column())));
        }
    };
    let Some(msgs) = v.get("messages").or_else(|| v.get("conversations")) else {
        let hint = (v.get("instruction").is_some() || v.get("output").is_some())
            .then(|| "this looks like Alpaca format (instruction/input/output)".to_string());
        return (Problem::NoMessages, hint);
    };
    let Some(arr) = msgs.as_array() else {
        return (Problem::MessagesNotArray, None);
    };
    for (j, m) in arr.iter().enumerate() {
        if m.get("role").and_then(Value::as_str).is_none() {
            let hint = (m.get("from").is_some() || m.get("value").is_some()).then(|| {
                format!("message {} uses ShareGPT keys (\"from\"/\"value\") instead of \"role\"/\"content\"", j + 1)
            });
            return (Problem::BadRole, hint);
        }
        if !matches!(m.get("content"), Some(Value::String(_))) {
            return (Problem::BadContent, None);
        }
    }
    (Problem::Unusable, None)
}

/// Checks rows that parsed for what finetune_demo / GLM-4 get wrong silently. Each problem is
/// counted once per row; findings are grouped per source file and problem.
pub fn check_rows(rows: &[Row]) -> Vec<Finding> {
    let mut groups = Groups::default();
    for row in rows {
        let file = row.source.as_path();
        let msgs = &row.messages;
        let mut found: Vec<(Problem, String)> = Vec::new();

        let unknown: Vec<usize> = (0..msgs.len()).filter(|&j| !ROLES.contains(&msgs[j].role.as_str())).collect();
        if let Some(&j) = unknown.first() {
            found.push((Problem::UnknownRole, format!("message {} has role {:?}", j + 1, msgs[j].role)));
        }

        // The template's `{% if item['content'] %}` drops only "", but whitespace trains nothing either.
        if let Some(j) = msgs.iter().position(|m| m.content.trim().is_empty()) {
            found.push((Problem::EmptyContent, format!("message {} ({}) is empty", j + 1, msgs[j].role)));
        }

        // `tools: null` is as good as no tools.
        let tools_at = msgs.iter().position(|m| m.role != "system" && m.tools.as_ref().is_some_and(|t| !t.is_null()));
        if let Some(j) = tools_at {
            found.push((Problem::ToolsNotOnSystem, format!("message {} ({}) has \"tools\"", j + 1, msgs[j].role)));
        }

        let systems: Vec<usize> = (0..msgs.len()).filter(|&j| msgs[j].role == "system").collect();
        if systems.len() > 1 {
            found.push((Problem::SystemPlacement, format!("{} system messages", systems.len())));
        } else if let Some(&j) = systems.first().filter(|&&j| j > 0) {
            found.push((Problem::SystemPlacement, format!("the system message is message {}", j + 1)));
        }

        // An assistant turn with empty content supervises nothing, so it does not count.
        let has_assistant = msgs.iter().any(|m| m.role == "assistant");
        let trains = msgs.iter().any(|m| m.role == "assistant" && !m.content.trim().is_empty());
        if !trains {
            let detail = if msgs.is_empty() {
                "\"messages\" is empty"
            } else if has_assistant {
                "every assistant message is empty"
            } else {
                "no message has role \"assistant\""
            };
            found.push((Problem::NoAssistant, detail.to_string()));
        } else if let Some(last) = msgs.last().filter(|m| m.role != "assistant") {
            // Only reported when the row trains at all: otherwise NoAssistant says it already.
            found.push((Problem::NotEndingWithAssistant, format!("the last message is {:?}", last.role)));
        }

        for (problem, detail) in found {
            groups.add(file, row.line, problem, || detail);
        }
        for &j in &unknown {
            groups.add_value(file, Problem::UnknownRole, &msgs[j].role);
        }
    }
    groups.into_findings()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.path().join(name);
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(bytes).unwrap();
        p
    }

    fn by_problem<'a>(fs: &'a [Finding], key: &str) -> &'a Finding {
        fs.iter().find(|f| f.evidence["problem"] == key).unwrap_or_else(|| panic!("no {key} finding in {fs:#?}"))
    }

    const GOOD: &str =
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;

    #[test]
    fn good_file_has_no_findings() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "ok.jsonl", format!("{GOOD}\n\n{GOOD}\r\n").as_bytes());
        let (rows, fs) = scan_jsonl(&p).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].line, 3, "blank line 2 still counts as a line");
        assert!(fs.is_empty(), "{fs:#?}");
        assert!(check_rows(&rows).is_empty());
    }

    #[test]
    fn unusable_lines_are_skipped_and_grouped() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = Vec::new();
        text.extend_from_slice(GOOD.as_bytes());
        text.extend_from_slice(b"\n{not json\n");
        text.extend_from_slice(b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}\n");
        text.extend_from_slice(b"{\"instruction\": \"a\", \"output\": \"b\"}\n");
        text.extend_from_slice(b"{\"messages\": {\"role\": \"user\"}}\n");
        text.extend_from_slice(b"{\"conversations\": [{\"from\": \"human\", \"value\": \"hi\"}]}\n");
        text.extend_from_slice(b"{\"messages\": [{\"role\": \"user\", \"content\": [1]}]}\n");
        text.extend_from_slice(b"[1, 2\n");
        text.extend_from_slice(GOOD.as_bytes());
        let p = write(&dir, "mixed.jsonl", &text);
        let (rows, fs) = scan_jsonl(&p).unwrap();
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), vec![1, 9]);
        assert!(fs.iter().all(|f| f.code == CODE && f.severity == Severity::Error));

        let json = by_problem(&fs, "invalid_json");
        assert_eq!(json.evidence["lines"], json!([2, 8]));
        assert_eq!(json.evidence["count"], 2);
        assert!(json.message.starts_with(&format!("{}:2: invalid JSON", p.display())), "{}", json.message);
        assert!(json.message.contains("2 lines in all: 2, 8"), "{}", json.message);

        assert_eq!(json.evidence["example"], "key must be a string at column 2");
        let utf8 = by_problem(&fs, "not_utf8");
        assert_eq!(utf8.evidence["lines"], json!([3]));
        assert!(utf8.message.contains("byte 44 of the line"), "{}", utf8.message);
        let alpaca = by_problem(&fs, "no_messages");
        assert!(alpaca.message.contains("Alpaca"), "{}", alpaca.message);
        assert_eq!(by_problem(&fs, "messages_not_array").evidence["lines"], json!([5]));
        let sharegpt = by_problem(&fs, "missing_role");
        assert!(sharegpt.message.contains("ShareGPT"), "{}", sharegpt.message);
        let content = by_problem(&fs, "bad_content");
        assert!(content.message.contains("non-string content"), "{}", content.message);
        assert_eq!(fs.len(), 6);
    }

    #[test]
    fn repeated_problem_in_large_file_gives_one_finding() {
        let dir = tempfile::tempdir().unwrap();
        let bad = r#"{"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]}"#;
        let mut text = String::new();
        for i in 0..100_000 {
            text.push_str(if i % 2 == 0 { bad } else { GOOD });
            text.push('\n');
        }
        let p = write(&dir, "big.jsonl", text.as_bytes());
        let (rows, fs) = scan_jsonl(&p).unwrap();
        assert!(fs.is_empty());
        assert_eq!(rows.len(), 100_000);
        let fs = check_rows(&rows);
        // No assistant turn either: "gpt" is not "assistant".
        assert_eq!(fs.len(), 2, "{fs:#?}");
        let f = by_problem(&fs, "unknown_role");
        assert_eq!(f.severity, Severity::Error);
        assert_eq!(f.evidence["count"], 50_000);
        assert_eq!(f.evidence["lines"].as_array().unwrap().len(), EVIDENCE_LINES);
        assert_eq!(f.evidence["roles"], json!(["gpt", "human"]));
        assert!(f.message.len() < 400, "message stays readable: {}", f.message);
        assert!(f.message.contains("50000 lines in all: 1, 3, 5, 7, 9, ..."), "{}", f.message);
        assert_eq!(by_problem(&fs, "no_assistant_turn").evidence["count"], 50_000);
    }

    #[test]
    fn row_content_problems() {
        let dir = tempfile::tempdir().unwrap();
        let lines = [
            // 1: empty assistant content, and nothing else trains
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}"#,
            // 2: tools on a user message
            r#"{"messages": [{"role": "user", "content": "q", "tools": [{"type": "function"}]}, {"role": "assistant", "content": "a"}]}"#,
            // 3: system not first
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}"#,
            // 4: two system messages
            r#"{"messages": [{"role": "system", "content": "s", "tools": []}, {"role": "system", "content": "t"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#,
            // 5: trailing user turn
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "more"}]}"#,
            // 6: no messages at all
            r#"{"messages": []}"#,
            // 7: fine, with observation and tools on system; tools: null elsewhere is no tools
            r#"{"messages": [{"role": "system", "content": "s", "tools": [{}]}, {"role": "user", "content": "q", "tools": null}, {"role": "assistant", "content": "call"}, {"role": "observation", "content": "42"}, {"role": "assistant", "content": "a"}]}"#,
        ];
        let p = write(&dir, "rows.jsonl", lines.join("\n").as_bytes());
        let (rows, fs) = scan_jsonl(&p).unwrap();
        assert!(fs.is_empty(), "{fs:#?}");
        let fs = check_rows(&rows);

        let empty = by_problem(&fs, "empty_content");
        assert_eq!((empty.severity, empty.evidence["lines"].clone()), (Severity::Warning, json!([1])));
        assert!(empty.message.contains("message 2 (assistant) is empty"), "{}", empty.message);
        let none = by_problem(&fs, "no_assistant_turn");
        assert_eq!((none.severity, none.evidence["lines"].clone()), (Severity::Error, json!([1, 6])));
        let tools = by_problem(&fs, "tools_not_on_system");
        assert_eq!((tools.severity, tools.evidence["lines"].clone()), (Severity::Warning, json!([2])));
        let sys = by_problem(&fs, "system_not_first");
        assert_eq!(sys.evidence["lines"], json!([3, 4]));
        assert_eq!(sys.evidence["file"], json!(p.display().to_string()));
        let last = by_problem(&fs, "not_ending_with_assistant");
        assert_eq!((last.severity, last.evidence["lines"].clone()), (Severity::Warning, json!([5])));
        assert!(last.message.starts_with(&format!("{}:5: ", p.display())), "{}", last.message);
        assert_eq!(fs.len(), 5, "{fs:#?}");
    }

    #[test]
    fn empty_and_blank_files_give_one_finding() {
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in [("empty.jsonl", &b""[..]), ("blank.jsonl", &b"\n  \n\r\n"[..])] {
            let p = write(&dir, name, body);
            let (rows, fs) = scan_jsonl(&p).unwrap();
            assert!(rows.is_empty());
            assert_eq!(fs.len(), 1, "{fs:#?}");
            assert_eq!(fs[0].evidence["problem"], "empty_file");
            assert_eq!(fs[0].evidence["lines"], json!([]));
            assert_eq!(fs[0].severity, Severity::Error);
            assert!(fs[0].message.starts_with(&format!("{}: no rows", p.display())));
        }
    }

    #[test]
    fn bom_is_stripped_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "bom.jsonl", format!("\u{feff}{GOOD}\n").as_bytes());
        let (rows, fs) = scan_jsonl(&p).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(fs.len(), 1);
        assert_eq!(fs[0].evidence["problem"], "byte_order_mark");
        assert_eq!(fs[0].severity, Severity::Warning);
    }

    #[test]
    fn unreadable_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing.jsonl");
        let e = scan_jsonl(&p).unwrap_err();
        assert!(format!("{e:#}").contains("missing.jsonl"), "{e:#}");
    }

    #[test]
    fn rows_from_two_files_are_grouped_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let bad = r#"{"messages": [{"role": "user", "content": "q"}]}"#;
        let a = write(&dir, "a.jsonl", bad.as_bytes());
        let b = write(&dir, "b.jsonl", format!("{GOOD}\n{bad}").as_bytes());
        let mut rows = scan_jsonl(&a).unwrap().0;
        rows.extend(scan_jsonl(&b).unwrap().0);
        let fs = check_rows(&rows);
        assert_eq!(fs.len(), 2);
        assert_eq!(fs[0].evidence["file"], json!(a.display().to_string()));
        assert_eq!(fs[1].evidence["lines"], json!([2]));
    }
}
