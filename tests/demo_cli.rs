//! README's first command: `glm4-verify demo` builds real artefacts and every verdict is the expected one.

use std::process::Command;

#[test]
fn demo_runs_end_to_end_with_the_expected_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_glm4-verify"))
        .args(["demo", "--dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for line in [
        "good        expected pass       got pass       ok",
        "untrained   expected no_effect  got no_effect  ok  no effect: every lora_B tensor is zero",
        "truncated   expected fail       got fail       ok  not a pass: labels truncated",
        "wrong-keys  expected no_effect  got no_effect  ok  no effect: 0 of 12 adapter modules",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }
    // Real artefacts in the real formats.
    for f in ["base/config.json", "base/model.safetensors", "base/tokenizer.json", "adapters/good/adapter_config.json"]
    {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    assert!(dir.path().join("adapters/good/adapter_model.safetensors").is_file());
}
