//! Shared helper: the fuzz input as a file, for entry points that take a path.

use std::io::Write;
use std::path::PathBuf;

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
