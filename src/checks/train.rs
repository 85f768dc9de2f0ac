//! The training run's own record: HF Trainer's `trainer_state.json` (did the optimiser move
//! anything, did the loss stay finite) and the precision the run trained in.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::finding::Finding;

pub const CODE_LOSS_NONFINITE: &str = "train_loss_nonfinite";
pub const CODE_GRAD_NORM_ZERO: &str = "train_grad_norm_zero";
pub const CODE_LOSS_COLLAPSED: &str = "train_loss_collapsed";
pub const CODE_LR_ZERO: &str = "train_lr_zero";
/// Not a failure by itself, but every other check here had nothing to look at.
pub const CODE_LOG_EMPTY: &str = "train_log_empty";

/// A per-token cross-entropy under this means p > 0.99 on every supervised token.
const COLLAPSED_LOSS: f64 = 0.01;
/// After collapsing the loss must stay under this, so one lucky batch is not reported.
const COLLAPSED_STAYS_UNDER: f64 = 0.1;
/// "Early": within this many steps, or the first tenth of the run if that is longer.
const COLLAPSED_EARLY_STEPS: u64 = 10;
/// Config files larger than this are not DeepSpeed configs (tokenizer.json is megabytes).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The floating-point format a run trained in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Bf16,
    Fp16,
    Fp32,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
            Precision::Fp32 => "fp32",
        }
    }

    /// As `(bf16, fp16)` flags, the form `hardware::check_precision` takes.
    pub fn flags(self) -> (Option<bool>, Option<bool>) {
        (Some(self == Precision::Bf16), Some(self == Precision::Fp16))
    }
}

/// One `log_history` entry; every field is optional because train, eval and the final
/// summary entries carry different keys.
struct LogEntry {
    step: Option<u64>,
    loss: Option<f64>,
    eval_loss: Option<f64>,
    train_loss: Option<f64>,
    grad_norm: Option<f64>,
    learning_rate: Option<f64>,
}

struct TrainerState {
    /// The run's length: max_steps, else global_step.
    total_steps: Option<u64>,
    log: Vec<LogEntry>,
}

/// `trainer_state.json` in `dir`, else the one of its highest-numbered `checkpoint-N`
/// directory (a training output directory; the last checkpoint has the whole history).
pub fn find_trainer_state(dir: &Path) -> Option<PathBuf> {
    let direct = dir.join("trainer_state.json");
    if direct.is_file() {
        return Some(direct);
    }
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let n: u64 = name.to_str()?.strip_prefix("checkpoint-")?.parse().ok()?;
            let state = e.path().join("trainer_state.json");
            state.is_file().then_some((n, state))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}

/// Findings about a run from its `trainer_state.json`. Errs when the file cannot be read or
/// is not a trainer state; a missing file is the caller's to report (see `find_trainer_state`).
pub fn check_trainer_state(path: &Path) -> Result<Vec<Finding>> {
    let state = read_state(path)?;
    let file = path.display().to_string();
    let mut findings = Vec::new();

    let train: Vec<&LogEntry> = state.log.iter().filter(|e| e.loss.is_some()).collect();
    if train.is_empty() {
        findings.push(
            Finding::warning(
                CODE_LOG_EMPTY,
                format!(
                    "{file}: no training loss logged ({} log entries); the loss, grad_norm and \
                     learning-rate checks could not run: log more often (logging_steps below max_steps)",
                    state.log.len()
                ),
            )
            .with_evidence(json!({"file": file, "log_entries": state.log.len()})),
        );
    }

    findings.extend(nonfinite_loss(&file, &state));
    findings.extend(all_zero(
        &file,
        &train,
        |e| e.grad_norm,
        CODE_GRAD_NORM_ZERO,
        "grad_norm",
        "the adapter received no gradient and is unchanged: check that peft_config.target_modules \
         name modules the model has, that some labels are not -100 (see data_labels_truncated), and \
         that the LoRA parameters are trainable",
    ));
    findings.extend(all_zero(
        &file,
        &train,
        |e| e.learning_rate,
        CODE_LR_ZERO,
        "learning_rate",
        "the weights never moved: check training_args.learning_rate and the scheduler \
         (a DeepSpeed scheduler or warmup settings can override it)",
    ));
    findings.extend(collapsed(&file, &train, state.total_steps));
    Ok(findings)
}

/// The training loss curve as (step, loss), in log order, for reports. Eval entries and the
/// final summary are left out; non-finite losses are kept (a plot shows them as gaps).
pub fn loss_curve(path: &Path) -> Result<Vec<(u64, f64)>> {
    let state = read_state(path)?;
    Ok(state.log.iter().filter_map(|e| Some((e.step?, e.loss?))).collect())
}

/// The precision a run trained in, from the files that say so in `dir` (not its parents):
/// `training_args.json` (HF's `training_args.bin` is a pickle and is not read),
/// `training_args.yaml` (LLaMA-Factory), or a DeepSpeed json config (`bf16.enabled` /
/// `fp16.enabled`). None when nothing there decides it (including DeepSpeed's "auto").
pub fn training_precision(dir: &Path) -> Option<Precision> {
    let args_json = read_small(&dir.join("training_args.json"))
        .and_then(|t| serde_json::from_str::<Value>(&quote_nonfinite(&t)).ok());
    let args_yaml = || {
        ["training_args.yaml", "training_args.yml"]
            .iter()
            .find_map(|n| read_small(&dir.join(n)))
            .and_then(|t| serde_yaml::from_str::<Value>(&t).ok())
    };
    if let Some(p) = args_json.or_else(args_yaml).and_then(|v| precision_from_args(&v)) {
        return Some(p);
    }
    // DeepSpeed configs have no fixed name (ds_config.json, ds_zero3.json ...): try every small
    // json file, in name order so the answer does not depend on directory order.
    let mut jsons: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    jsons.sort();
    jsons.iter().find_map(|p| {
        let v: Value = serde_json::from_str(&read_small(p)?).ok()?;
        precision_from_deepspeed(&v)
    })
}

/// HF TrainingArguments (or LLaMA-Factory's yaml) `bf16` / `fp16` flags.
fn precision_from_args(v: &Value) -> Option<Precision> {
    let bf16 = v.get("bf16").and_then(as_bool);
    let fp16 = v.get("fp16").and_then(as_bool);
    match (bf16, fp16) {
        // HF refuses both at once: such a file describes no run.
        (Some(true), Some(true)) => None,
        (Some(true), _) => Some(Precision::Bf16),
        (_, Some(true)) => Some(Precision::Fp16),
        (None, None) => v.get("deepspeed").filter(|d| d.is_object()).and_then(precision_from_deepspeed),
        _ => Some(Precision::Fp32),
    }
}

/// DeepSpeed `bf16` (alias `bfloat16`) / `fp16` sections; "auto" defers to the HF arguments.
fn precision_from_deepspeed(v: &Value) -> Option<Precision> {
    let enabled = |key: &str| v.get(key)?.get("enabled").and_then(as_bool);
    let bf16 = enabled("bf16").or_else(|| enabled("bfloat16"));
    match (bf16, enabled("fp16")) {
        (Some(true), Some(true)) => None,
        (Some(true), _) => Some(Precision::Bf16),
        (_, Some(true)) => Some(Precision::Fp16),
        (Some(false), Some(false)) => Some(Precision::Fp32),
        _ => None,
    }
}

fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => s.to_ascii_lowercase().parse().ok(),
        _ => None,
    }
}

fn read_small(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > MAX_CONFIG_BYTES {
        return None;
    }
    std::fs::read_to_string(path).ok()
}

fn read_state(path: &Path) -> Result<TrainerState> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read trainer state {}", path.display()))?;
    let v: Value = serde_json::from_str(&quote_nonfinite(&text)).with_context(|| {
        format!("{}: not valid JSON; expected the trainer_state.json that Hugging Face Trainer writes", path.display())
    })?;
    let Some(history) = v.get("log_history").and_then(Value::as_array) else {
        bail!(
            "{}: no \"log_history\" array; expected the trainer_state.json that Hugging Face Trainer writes",
            path.display()
        );
    };
    let log = history
        .iter()
        .map(|e| LogEntry {
            step: e.get("step").and_then(as_step),
            loss: e.get("loss").and_then(as_num),
            eval_loss: e.get("eval_loss").and_then(as_num),
            train_loss: e.get("train_loss").and_then(as_num),
            grad_norm: e.get("grad_norm").and_then(as_num),
            learning_rate: e.get("learning_rate").and_then(as_num),
        })
        .collect();
    let total_steps =
        v.get("max_steps").and_then(as_step).filter(|&n| n > 0).or_else(|| v.get("global_step").and_then(as_step));
    Ok(TrainerState { total_steps, log })
}

/// Python's json module writes NaN, Infinity and -Infinity as bare tokens, which serde_json
/// rejects. Quote them (outside strings only) so they parse as strings that `as_num` maps back.
fn quote_nonfinite(text: &str) -> Cow<'_, str> {
    if !text.contains("NaN") && !text.contains("Infinity") {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 64);
    let (mut i, mut copied) = (0, 0);
    let (mut in_string, mut escaped) = (false, false);
    'scan: while i < bytes.len() {
        let c = bytes[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
        } else if c == b'"' {
            in_string = true;
        } else {
            for token in ["NaN", "-Infinity", "Infinity"] {
                if bytes[i..].starts_with(token.as_bytes()) {
                    // i and i + len are ASCII positions, so these slices are on char boundaries.
                    out.push_str(&text[copied..i]);
                    out.push('"');
                    out.push_str(token);
                    out.push('"');
                    i += token.len();
                    copied = i;
                    continue 'scan;
                }
            }
        }
        i += 1;
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

fn as_num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
}

fn as_step(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        let f = v.as_f64()?;
        (f.is_finite() && f >= 0.0).then_some(f as u64)
    })
}

fn fmt_step(step: Option<u64>) -> String {
    step.map_or_else(|| "?".to_string(), |s| s.to_string())
}

fn nonfinite_loss(file: &str, state: &TrainerState) -> Option<Finding> {
    let bad = |e: &LogEntry| -> Option<(&'static str, f64)> {
        [("loss", e.loss), ("eval_loss", e.eval_loss), ("train_loss", e.train_loss)]
            .into_iter()
            .find_map(|(k, v)| v.filter(|x| !x.is_finite()).map(|x| (k, x)))
    };
    let (first, (key, value)) = state.log.iter().find_map(|e| Some((e, bad(e)?)))?;
    let count = state.log.iter().filter(|e| bad(e).is_some()).count();
    let message = format!(
        "{file}: {key} is {value} from step {} on ({count} of {} log entries); the run diverged \
         or overflowed and the adapter is garbage: fp16 overflow is the usual cause, so train in \
         bf16 (compute capability 8.0 or newer) or fp32, or lower the learning rate",
        fmt_step(first.step),
        state.log.len()
    );
    Some(Finding::error(CODE_LOSS_NONFINITE, message).with_evidence(json!({
        "file": file,
        "first_step": first.step,
        "key": key,
        "value": value.to_string(),
        "nonfinite_entries": count,
        "log_entries": state.log.len(),
    })))
}

/// One finding when `field` is logged at least once and is exactly 0 every time it is.
fn all_zero(
    file: &str,
    train: &[&LogEntry],
    field: impl Fn(&LogEntry) -> Option<f64>,
    code: &str,
    name: &str,
    why: &str,
) -> Option<Finding> {
    let logged: Vec<&LogEntry> = train.iter().copied().filter(|e| field(e).is_some()).collect();
    if logged.is_empty() || logged.iter().any(|e| field(e) != Some(0.0)) {
        return None;
    }
    let (first, last) = (logged[0].step, logged[logged.len() - 1].step);
    let message = format!(
        "{file}: {name} is 0 at every one of the {} logged steps (steps {} to {}); {why}",
        logged.len(),
        fmt_step(first),
        fmt_step(last)
    );
    Some(Finding::error(code, message).with_evidence(json!({
        "file": file,
        "logged_steps": logged.len(),
        "first_step": first,
        "last_step": last,
    })))
}

/// The loss reaching ~0 early and staying there: a run that learned nothing real
/// (targets leaked into the input, a few rows repeated, almost nothing supervised).
fn collapsed(file: &str, train: &[&LogEntry], total_steps: Option<u64>) -> Option<Finding> {
    let curve: Vec<(u64, f64)> =
        train.iter().filter_map(|e| Some((e.step?, e.loss?))).filter(|(_, l)| l.is_finite()).collect();
    let i = curve.iter().position(|&(_, l)| l <= COLLAPSED_LOSS)?;
    let (step, loss) = curve[i];
    let total = total_steps.or(curve.last().map(|c| c.0)).unwrap_or(step);
    let early = COLLAPSED_EARLY_STEPS.max(total / 10);
    if step > early || curve[i..].iter().any(|&(_, l)| l >= COLLAPSED_STAYS_UNDER) {
        return None;
    }
    let (first_step, first_loss) = curve[0];
    let how = if i == 0 {
        format!("training loss is {loss:.4} already at the first logged step ({step})")
    } else {
        format!("training loss fell from {first_loss:.4} (step {first_step}) to {loss:.4} by step {step}")
    };
    let message = format!(
        "{file}: {how} and stayed near 0; this early it usually means the targets leak into the \
         input, a few rows repeat, or almost no tokens are supervised: check the labels \
         (data_labels_truncated) and the data, and judge the adapter on held-out data"
    );
    Some(Finding::warning(CODE_LOSS_COLLAPSED, message).with_evidence(json!({
        "file": file,
        "step": step,
        "loss": loss,
        "first_step": first_step,
        "first_loss": first_loss,
        "total_steps": total,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A trainer_state.json with one train entry per (step, loss, grad_norm, lr) given as raw
    /// JSON tokens (so NaN can be written as Python writes it), an eval entry and the summary.
    fn state(entries: &[(u64, &str, &str, &str)]) -> String {
        let log: Vec<String> = entries
            .iter()
            .map(|(s, l, g, r)| {
                format!(r#"{{"epoch": 0.1, "grad_norm": {g}, "learning_rate": {r}, "loss": {l}, "step": {s}}}"#)
            })
            .collect();
        let last = entries.last().map_or(0, |e| e.0);
        format!(
            r#"{{"best_metric": null, "global_step": {last}, "max_steps": {last}, "log_history": [{},
              {{"eval_loss": 1.5, "eval_runtime": 1.0, "step": {last}}},
              {{"step": {last}, "total_flos": 1e12, "train_loss": 1.0, "train_runtime": 9.5}}],
              "trial_name": "NaN and Infinity inside a \"string\" stay"}}"#,
            log.join(",\n")
        )
    }

    fn codes(fs: &[Finding]) -> Vec<&str> {
        fs.iter().map(|f| f.code.as_str()).collect()
    }

    fn healthy() -> Vec<(u64, &'static str, &'static str, &'static str)> {
        (1..=10)
            .map(|i| {
                let loss: &'static str = ["2.9", "2.5", "2.2", "2.0", "1.8", "1.7", "1.6", "1.5", "1.4", "1.3"][i - 1];
                (i as u64 * 10, loss, "1.25", "0.0001")
            })
            .collect()
    }

    #[test]
    fn healthy_run_has_no_findings_and_a_curve() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "trainer_state.json", &state(&healthy()));
        assert!(check_trainer_state(&p).unwrap().is_empty());
        let curve = loss_curve(&p).unwrap();
        assert_eq!(curve.len(), 10, "eval and summary entries are not training loss");
        assert_eq!(curve[0], (10, 2.9));
        assert_eq!(curve[9], (100, 1.3));
    }

    #[test]
    fn nan_loss_is_found_with_its_first_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut entries = healthy();
        entries[2].1 = "NaN";
        entries[3].1 = "Infinity";
        entries[4] = (50, "NaN", "NaN", "-Infinity");
        let p = write(dir.path(), "trainer_state.json", &state(&entries));
        let fs = check_trainer_state(&p).unwrap();
        assert_eq!(codes(&fs), vec![CODE_LOSS_NONFINITE]);
        let f = &fs[0];
        assert_eq!(f.severity, crate::finding::Severity::Error);
        assert_eq!(f.evidence["first_step"], 30);
        assert_eq!(f.evidence["nonfinite_entries"], 3);
        assert!(f.message.starts_with(&format!("{}: loss is NaN from step 30", p.display())), "{}", f.message);
        let curve = loss_curve(&p).unwrap();
        assert!(curve[2].1.is_nan() && curve[3].1 == f64::INFINITY);
    }

    #[test]
    fn quoting_leaves_strings_alone() {
        let text = r#"{"a": NaN, "b": "NaN \"Infinity\" \\", "c": [-Infinity, Infinity], "d": "é"}"#;
        let v: Value = serde_json::from_str(&quote_nonfinite(text)).unwrap();
        assert_eq!(v["b"], r#"NaN "Infinity" \"#);
        assert!(as_num(&v["a"]).unwrap().is_nan());
        assert_eq!(as_num(&v["c"][0]), Some(f64::NEG_INFINITY));
        assert_eq!(as_num(&v["c"][1]), Some(f64::INFINITY));
        assert_eq!(v["d"], "é");
    }

    #[test]
    fn zero_grad_norm_and_zero_lr() {
        let dir = tempfile::tempdir().unwrap();
        let entries: Vec<_> = healthy().into_iter().map(|(s, l, _, _)| (s, l, "0.0", "0")).collect();
        let p = write(dir.path(), "trainer_state.json", &state(&entries));
        let fs = check_trainer_state(&p).unwrap();
        assert_eq!(codes(&fs), vec![CODE_GRAD_NORM_ZERO, CODE_LR_ZERO]);
        assert!(fs[0].message.contains("grad_norm is 0 at every one of the 10 logged steps (steps 10 to 100)"));
        assert_eq!(fs[1].evidence["logged_steps"], 10);

        // One non-zero value means something moved.
        let mut entries = entries;
        entries[9].2 = "0.5";
        entries[9].3 = "1e-5";
        let p = write(dir.path(), "trainer_state.json", &state(&entries));
        assert!(check_trainer_state(&p).unwrap().is_empty());
    }

    #[test]
    fn early_collapse_is_a_warning_late_convergence_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut entries: Vec<_> = (1..=100u64).map(|s| (s, "0.001", "0.01", "1e-4")).collect();
        entries[0].1 = "2.5";
        entries[1].1 = "0.3";
        let p = write(dir.path(), "trainer_state.json", &state(&entries));
        let fs = check_trainer_state(&p).unwrap();
        assert_eq!(codes(&fs), vec![CODE_LOSS_COLLAPSED]);
        assert_eq!(fs[0].severity, crate::finding::Severity::Warning);
        assert_eq!(fs[0].evidence["step"], 3);
        assert!(fs[0].message.contains("fell from 2.5000 (step 1) to 0.0010 by step 3"), "{}", fs[0].message);

        // Loss exactly 0 from the start (nothing supervised in some HF versions).
        let zero: Vec<_> = (1..=20u64).map(|s| (s, "0.0", "0.0", "1e-4")).collect();
        let p = write(dir.path(), "trainer_state.json", &state(&zero));
        let fs = check_trainer_state(&p).unwrap();
        assert_eq!(codes(&fs), vec![CODE_GRAD_NORM_ZERO, CODE_LOSS_COLLAPSED]);
        assert!(fs[1].message.contains("already at the first logged step"), "{}", fs[1].message);

        // Reaching ~0 after most of the run is memorisation of a small set, not a collapse.
        let late: Vec<_> = (1..=100u64).map(|s| (s, if s > 60 { "0.005" } else { "1.0" }, "0.3", "1e-4")).collect();
        let p = write(dir.path(), "trainer_state.json", &state(&late));
        assert!(check_trainer_state(&p).unwrap().is_empty());

        // A single dip that bounces back is noise.
        let mut dip = healthy();
        dip[0].1 = "0.005";
        let p = write(dir.path(), "trainer_state.json", &state(&dip));
        assert!(check_trainer_state(&p).unwrap().is_empty());
    }

    #[test]
    fn empty_log_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "trainer_state.json", r#"{"global_step": 5, "log_history": []}"#);
        let fs = check_trainer_state(&p).unwrap();
        assert_eq!(codes(&fs), vec![CODE_LOG_EMPTY]);
    }

    #[test]
    fn bad_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope").join("trainer_state.json");
        let e = format!("{:#}", check_trainer_state(&missing).unwrap_err());
        assert!(e.contains("nope"), "{e}");
        let p = write(dir.path(), "broken.json", "{\"log_history\": [");
        let e = format!("{:#}", check_trainer_state(&p).unwrap_err());
        assert!(e.contains("broken.json") && e.contains("not valid JSON"), "{e}");
        let p = write(dir.path(), "other.json", r#"{"log_history": 3}"#);
        let e = format!("{:#}", loss_curve(&p).unwrap_err());
        assert!(e.contains("other.json") && e.contains("log_history"), "{e}");
    }

    #[test]
    fn finds_the_latest_checkpoint_state() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(find_trainer_state(d), None);
        for n in ["checkpoint-500", "checkpoint-999", "checkpoint-1000"] {
            write(d, &format!("{n}/trainer_state.json"), "{}");
        }
        std::fs::create_dir_all(d.join("checkpoint-2000")).unwrap(); // no state inside
        std::fs::create_dir_all(d.join("checkpoint-final/trainer_state.json")).unwrap(); // a dir, not a file
        assert_eq!(find_trainer_state(d), Some(d.join("checkpoint-1000/trainer_state.json")));
        let own = write(d, "trainer_state.json", "{}");
        assert_eq!(find_trainer_state(d), Some(own));
        assert_eq!(find_trainer_state(&d.join("absent")), None);
    }

    #[test]
    fn precision_from_args_yaml_and_deepspeed() {
        let dir = tempfile::tempdir().unwrap();
        let d = |name: &str| {
            let p = dir.path().join(name);
            std::fs::create_dir_all(&p).unwrap();
            p
        };

        let empty = d("empty");
        write(&empty, "training_args.bin", "\u{80}pickle");
        assert_eq!(training_precision(&empty), None);
        assert_eq!(training_precision(&dir.path().join("absent")), None);

        let hf = d("hf");
        write(&hf, "training_args.json", r#"{"bf16": true, "fp16": false, "learning_rate": NaN}"#);
        assert_eq!(training_precision(&hf), Some(Precision::Bf16));

        let fp32 = d("fp32");
        write(&fp32, "training_args.json", r#"{"bf16": false, "fp16": false}"#);
        assert_eq!(training_precision(&fp32), Some(Precision::Fp32));

        let both = d("both");
        write(&both, "training_args.json", r#"{"bf16": true, "fp16": true}"#);
        assert_eq!(training_precision(&both), None);

        let lf = d("llama-factory");
        write(&lf, "training_args.yaml", "stage: sft\nfp16: true\n");
        assert_eq!(training_precision(&lf), Some(Precision::Fp16));

        let ds = d("deepspeed");
        write(&ds, "adapter_config.json", r#"{"r": 8}"#);
        write(&ds, "ds_zero2.json", r#"{"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}"#);
        assert_eq!(training_precision(&ds), None, "auto defers to args we do not have");
        write(&ds, "ds_zero3.json", r#"{"fp16": {"enabled": true, "loss_scale": 0}}"#);
        assert_eq!(training_precision(&ds), Some(Precision::Fp16));

        let inline = d("inline");
        write(&inline, "training_args.json", r#"{"deepspeed": {"bfloat16": {"enabled": true}}}"#);
        assert_eq!(training_precision(&inline), Some(Precision::Bf16));

        assert_eq!(Precision::Bf16.flags(), (Some(true), Some(false)));
        assert_eq!(Precision::Fp32.as_str(), "fp32");
    }
}
