//! Shared helpers for tests that read ../shared/fixtures/glm4-tiny.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/glm4-tiny")
}

pub fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference.json parses")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

pub fn i64s(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().expect("array").iter().map(|x| x.as_i64().expect("int")).collect()
}

pub fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("float")).collect()
}

/// The glm4-verify binary of this build.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_glm4-verify"))
}

/// A fixture path as a string argument.
pub fn f(p: &str) -> String {
    fixtures().join(p).display().to_string()
}

/// Copies a file, or a directory tree, to `to` (writable copies).
pub fn copy_dir(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_dir(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
        // The fixtures are read-only; copies are made to be changed.
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}
