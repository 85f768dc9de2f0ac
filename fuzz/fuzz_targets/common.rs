//! Shared helpers: the fuzz input as a file, for entry points that take a path; a directory kept for
//! the whole run, for entry points that take a directory.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A temporary file holding `data`; removed when dropped.
pub struct InputFile {
    _file: tempfile::NamedTempFile,
    pub path: PathBuf,
}

pub fn input_file(data: &[u8], suffix: &str) -> InputFile {
    let mut f = tempfile::Builder::new().prefix("glm4-fuzz-").suffix(suffix).tempfile().expect("temp file");
    f.write_all(data).expect("write temp file");
    f.flush().expect("flush temp file");
    let path = f.path().to_path_buf();
    InputFile { _file: f, path }
}

/// A temporary directory created once per fuzzing process with the fixed `files()` in it (the
/// per-input file is then rewritten into it on every run; libFuzzer runs inputs one at a time).
/// Removed when the process exits normally.
pub fn fixed_dir(
    cell: &'static std::sync::OnceLock<tempfile::TempDir>,
    files: impl FnOnce() -> Vec<(&'static str, Vec<u8>)>,
) -> &'static Path {
    cell.get_or_init(|| {
        let d = tempfile::Builder::new().prefix("glm4-fuzz-dir-").tempdir().expect("temp dir");
        for (name, bytes) in files() {
            std::fs::write(d.path().join(name), bytes).expect("write fixed file");
        }
        d
    })
    .path()
}

/// Prints when GLM4_FUZZ_DEBUG is set (to check by hand what the seeds reach: `-runs=0`).
pub fn debug(what: impl FnOnce() -> String) {
    if std::env::var_os("GLM4_FUZZ_DEBUG").is_some() {
        eprintln!("{}", what());
    }
}

/// A valid safetensors file of `(name, dtype, shape, data)` tensors, in the order given.
pub fn safetensors_bytes(tensors: &[(&str, &str, &[usize], &[u8])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, dtype, shape, data) in tensors {
        header.insert(
            (*name).into(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + data.len()]}),
        );
        offset += data.len();
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    for (_, _, _, data) in tensors {
        out.extend_from_slice(data);
    }
    out
}

/// For a target whose entry point turns a dependency's panic into an error with `catch_unwind`
/// (`GlmTokenizer::from_dir` does for tokenizers' parse): replaces libfuzzer-sys's panic hook, which
/// aborts on every panic, caught or not, with one that only prints each panic location once (every
/// time with GLM4_FUZZ_DEBUG). A panic that escapes the library is still a crash: libfuzzer-sys
/// catches it around the target and aborts.
pub fn allow_caught_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let seen = std::sync::Mutex::new(std::collections::HashSet::new());
        std::panic::set_hook(Box::new(move |info| {
            let at = info.location().map(|l| l.to_string()).unwrap_or_default();
            let first = seen.lock().map(|mut s| s.insert(at)).unwrap_or(true);
            if first || std::env::var_os("GLM4_FUZZ_DEBUG").is_some() {
                eprintln!("panic (caught by the library unless a crash follows): {info}");
            }
        }));
    });
}
