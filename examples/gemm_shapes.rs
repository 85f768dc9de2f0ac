//! GEMM throughput of the linears' shapes on the GPU: candle's matmul (cuBLAS) against cuBLASLt's
//! candidates, and the LoRA column count k = in + 8 against k padded. Run on the GPU machine:
//! `gemm_shapes [M]` (default M = 16384 tokens, a scoring batch). CUDA build only.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use glm4_verify::model::cuda_gemm;

fn time(dev: &Device, iters: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

fn main() -> Result<()> {
    let m: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(16384);
    let dev = Device::new_cuda(0)?;
    let shapes: &[(&str, usize, usize)] = &[
        ("qkv k=4096", 4608, 4096),
        ("qkv k=4104", 4608, 4104),
        ("qkv k=4112", 4608, 4112),
        ("qkv k=4160", 4608, 4160),
        ("o k=4104", 4096, 4104),
        ("o k=4160", 4096, 4160),
        ("gate_up k=4096", 27392, 4096),
        ("gate_up k=4104", 27392, 4104),
        ("gate_up k=4160", 27392, 4160),
        ("down k=13696", 4096, 13696),
        ("down k=13704", 4096, 13704),
        ("down k=13760", 4096, 13760),
    ];
    println!("M = {m}");
    for &(name, n, k) in shapes {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?.to_dtype(DType::BF16)?;
        let w = (Tensor::randn(0f32, 1.0, (n, k), &dev)? * 0.02)?.to_dtype(DType::BF16)?;
        let flop = 2.0 * (m * n * k) as f64;
        let iters = 10;
        let c = time(&dev, iters, || Ok(x.matmul(&w.t()?)?))?;
        let mut line = format!("{name:<16} n={n:<6} candle {:6.0}", flop / c / 1e12);
        let count = cuda_gemm::candidates(m, n, k, DType::BF16, &dev)?;
        let reference = x.matmul(&w.t()?)?.to_dtype(DType::F32)?;
        for a in 0..count.min(8) {
            let s = time(&dev, iters, || Ok(cuda_gemm::linear_algo(&x, &w, None, a)?))?;
            let y = cuda_gemm::linear_algo(&x, &w, None, a)?.to_dtype(DType::F32)?;
            let diff = (y - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            line += &format!(" | lt{a} {:6.0}{}", flop / s / 1e12, if diff > 0.05 { "!" } else { "" });
        }
        println!("{line}  TFLOP/s ({count} candidates)");
    }
    Ok(())
}
