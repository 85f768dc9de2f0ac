//! With the `cuda` feature: compiles kernels/fused.cu to PTX with nvcc (found as $NVCC, then in
//! $CUDA_HOME/bin, then on PATH) for compute capability $CUDA_COMPUTE_CAP (default 80).
//! The default CPU build needs no CUDA toolkit and runs nothing here.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels/fused.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("fused.ptx");
    let nvcc = std::env::var("NVCC")
        .ok()
        .or_else(|| std::env::var("CUDA_HOME").ok().map(|h| format!("{h}/bin/nvcc")))
        .unwrap_or_else(|| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap = cap.trim_end_matches(['a', 'f']);
    // The flash-attention kernel needs sm_80 (bf16 mma.sync, cp.async); src/model/cuda_ops.rs asks.
    println!("cargo:rustc-env=GLM4_VERIFY_PTX_CAP={cap}");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "-o"])
        .arg(&out)
        .arg("kernels/fused.cu")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed on kernels/fused.cu ({s})"),
        Err(e) => panic!(
            "cannot run {nvcc} ({e}): the cuda feature needs the CUDA toolkit (source ../shared/tools/cuda-env.sh)"
        ),
    }
}
