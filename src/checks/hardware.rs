//! Precision against hardware: bf16 where the GPU has none, fp16 where GLM-4 overflows.
//!
//! Severity of `hardware_no_bf16`: `error` when this verification run itself asks for bf16 on
//! a CUDA device below compute capability 8.0 (candle's bf16 CUDA kernels need sm_80, so the
//! run cannot give trustworthy numbers: run in f32); `warning` when only the training config
//! asks for bf16, because training may well have run on another machine.

use serde_json::json;

use crate::finding::Finding;

pub const CODE_NO_BF16: &str = "hardware_no_bf16";
pub const CODE_FP16: &str = "hardware_fp16";
pub const CODE_DEVICE: &str = "hardware_device";

/// Native bf16 arithmetic arrived with Ampere (compute capability 8.0).
const BF16_MIN_CAPABILITY: (u32, u32) = (8, 0);

/// The device a run uses, as the model loader found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: Option<(u32, u32)>,
    pub is_cuda: bool,
}

impl DeviceInfo {
    /// True only when we know it lacks bf16: an unknown capability gives no finding.
    fn lacks_bf16(&self) -> bool {
        self.is_cuda && self.compute_capability.is_some_and(|cc| cc < BF16_MIN_CAPABILITY)
    }

    fn describe(&self) -> String {
        match self.compute_capability {
            Some((major, minor)) => format!("{} (compute capability {major}.{minor})", self.name),
            None => self.name.clone(),
        }
    }
}

/// Canonical dtype name, accepting the spellings of candle, PyTorch and HF configs.
fn canonical_dtype(dtype: &str) -> Option<&'static str> {
    match dtype.trim().to_ascii_lowercase().trim_start_matches("torch.") {
        "bf16" | "bfloat16" => Some("bf16"),
        "f16" | "fp16" | "float16" | "half" => Some("f16"),
        "f32" | "fp32" | "float32" | "float" => Some("f32"),
        _ => None,
    }
}

/// Findings on the precision of this run (`run_dtype`) and of the training (`training_bf16` /
/// `training_fp16`, from lora.yaml or `train::training_precision`) on `device`. Always one info
/// finding naming the device and dtype.
pub fn check_precision(
    device: &DeviceInfo,
    run_dtype: &str,
    training_bf16: Option<bool>,
    training_fp16: Option<bool>,
) -> Vec<Finding> {
    let dtype = canonical_dtype(run_dtype);
    let shown_dtype = dtype.unwrap_or(run_dtype);
    let cc = device.compute_capability.map(|(a, b)| format!("{a}.{b}"));
    let base_evidence = json!({
        "device": device.name,
        "compute_capability": cc,
        "cuda": device.is_cuda,
        "dtype": shown_dtype,
        "training_bf16": training_bf16,
        "training_fp16": training_fp16,
    });
    let evidence = |source: &str| {
        let mut e = base_evidence.clone();
        e["source"] = json!(source);
        e
    };
    let mut findings = vec![Finding::info(CODE_DEVICE, format!("running on {} in {shown_dtype}", device.describe()))
        .with_evidence(base_evidence.clone())];

    if device.lacks_bf16() && dtype == Some("bf16") {
        findings.push(
            Finding::error(
                CODE_NO_BF16,
                format!(
                    "{} has no native bf16 (needs compute capability 8.0 or newer) but this run \
                     asks for bf16; run in f32 instead",
                    device.describe()
                ),
            )
            .with_evidence(evidence("run")),
        );
    }
    if device.lacks_bf16() && training_bf16 == Some(true) {
        findings.push(
            Finding::warning(
                CODE_NO_BF16,
                format!(
                    "the training config asks for bf16 (training_args.bf16: true), which {} lacks: \
                     training here fails or runs emulated, and switching to fp16 risks a NaN loss \
                     with GLM-4; train in fp32 or on compute capability 8.0 or newer (ignore this \
                     if training ran on another machine)",
                    device.describe()
                ),
            )
            .with_evidence(evidence("training_config")),
        );
    }
    // fp16's range ends at 65504; GLM-4's activations exceed it and the loss turns NaN.
    if training_fp16 == Some(true) {
        findings.push(
            Finding::warning(
                CODE_FP16,
                "the training config uses fp16 (training_args.fp16: true): GLM-4 activations can \
                 overflow fp16 and turn the loss NaN; train in bf16 (compute capability 8.0 or \
                 newer) or fp32",
            )
            .with_evidence(evidence("training_config")),
        );
    }
    if dtype == Some("f16") {
        findings.push(
            Finding::warning(
                CODE_FP16,
                "this run uses f16: GLM-4 activations can overflow it and give NaN log-probabilities; \
                 run in bf16 or f32",
            )
            .with_evidence(evidence("run")),
        );
    }
    findings
}

/// `(bf16, fp16)` from a finetune_demo lora.yaml (`training_args.bf16` / `.fp16`), falling
/// back to top-level keys (LLaMA-Factory puts them there). None where the key is absent or
/// not a boolean.
pub fn read_training_precision_from_yaml(v: &serde_yaml::Value) -> (Option<bool>, Option<bool>) {
    let flag = |key: &str| {
        let value = v.get("training_args").and_then(|t| t.get(key)).or_else(|| v.get(key))?;
        match value {
            serde_yaml::Value::Bool(b) => Some(*b),
            serde_yaml::Value::String(s) => s.to_ascii_lowercase().parse().ok(),
            _ => None,
        }
    };
    (flag("bf16"), flag("fp16"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finding::Severity;

    fn gpu(name: &str, cc: (u32, u32)) -> DeviceInfo {
        DeviceInfo { name: name.to_string(), compute_capability: Some(cc), is_cuda: true }
    }

    fn summary(fs: &[Finding]) -> Vec<(&str, Severity)> {
        fs.iter().map(|f| (f.code.as_str(), f.severity)).collect()
    }

    #[test]
    fn bf16_run_on_turing_is_an_error() {
        let fs = check_precision(&gpu("Tesla T4", (7, 5)), "bfloat16", None, None);
        assert_eq!(summary(&fs), vec![(CODE_DEVICE, Severity::Info), (CODE_NO_BF16, Severity::Error)]);
        assert_eq!(fs[0].message, "running on Tesla T4 (compute capability 7.5) in bf16");
        assert!(fs[1].message.starts_with("Tesla T4 (compute capability 7.5) has no native bf16"));
        assert_eq!(fs[1].evidence["source"], "run");
        assert_eq!(fs[1].evidence["compute_capability"], "7.5");
    }

    #[test]
    fn bf16_training_config_on_volta_is_a_warning() {
        let fs = check_precision(&gpu("Tesla V100", (7, 0)), "f32", Some(true), Some(false));
        assert_eq!(summary(&fs), vec![(CODE_DEVICE, Severity::Info), (CODE_NO_BF16, Severity::Warning)]);
        assert_eq!(fs[1].evidence["source"], "training_config");
    }

    #[test]
    fn bf16_is_fine_on_ampere_hopper_cpu_and_unknown() {
        for dev in [
            gpu("NVIDIA A100", (8, 0)),
            gpu("NVIDIA H100 80GB HBM3", (9, 0)),
            DeviceInfo { name: "cpu".into(), compute_capability: None, is_cuda: false },
            DeviceInfo { name: "cuda:0".into(), compute_capability: None, is_cuda: true },
        ] {
            let fs = check_precision(&dev, "bf16", Some(true), None);
            assert_eq!(summary(&fs), vec![(CODE_DEVICE, Severity::Info)], "{dev:?}");
        }
    }

    #[test]
    fn fp16_training_and_f16_run_are_warnings() {
        let fs = check_precision(&gpu("NVIDIA H100", (9, 0)), "torch.float16", Some(false), Some(true));
        assert_eq!(
            summary(&fs),
            vec![(CODE_DEVICE, Severity::Info), (CODE_FP16, Severity::Warning), (CODE_FP16, Severity::Warning)]
        );
        assert_eq!(fs[1].evidence["source"], "training_config");
        assert_eq!(fs[2].evidence["source"], "run");
        assert_eq!(fs[0].evidence["dtype"], "f16");
    }

    #[test]
    fn unknown_dtype_is_named_as_given() {
        let fs = check_precision(&gpu("Tesla T4", (7, 5)), "int8", None, None);
        assert_eq!(summary(&fs), vec![(CODE_DEVICE, Severity::Info)]);
        assert!(fs[0].message.ends_with("in int8"));
    }

    #[test]
    fn reads_precision_from_lora_yaml() {
        let yaml = |s: &str| -> serde_yaml::Value { serde_yaml::from_str(s).unwrap() };
        // finetune_demo's lora.yaml
        let demo =
            yaml("max_input_length: 512\ntraining_args:\n  output_dir: ./output\n  bf16: true\npeft_config:\n  r: 8\n");
        assert_eq!(read_training_precision_from_yaml(&demo), (Some(true), None));
        // LLaMA-Factory keeps the flags at the top level.
        let lf = yaml("stage: sft\nfp16: true\nbf16: false\n");
        assert_eq!(read_training_precision_from_yaml(&lf), (Some(false), Some(true)));
        let strings = yaml("training_args:\n  fp16: \"True\"\n  bf16: maybe\n");
        assert_eq!(read_training_precision_from_yaml(&strings), (None, Some(true)));
        assert_eq!(read_training_precision_from_yaml(&yaml("[1, 2]")), (None, None));
        assert_eq!(read_training_precision_from_yaml(&serde_yaml::Value::Null), (None, None));
    }
}
