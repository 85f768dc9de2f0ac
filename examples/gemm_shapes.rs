//! GEMM throughput of the linears' shapes on the GPU: candle's matmul (cuBLAS) against cuBLASLt's
//! candidates, and the LoRA column count k = in + 8 against k padded. Run on the GPU machine:
//! `gemm_shapes [M…]` (default M = 16384 tokens; ALL_SHAPES=1 adds the unpadded k). CUDA build only.

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
    let ms: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let ms = if ms.is_empty() { vec![16384] } else { ms };
    let dev = Device::new_cuda(0)?;
    let all = std::env::var_os("ALL_SHAPES").is_some();
    let shapes: &[(&str, usize, usize)] = &[
        ("qkv k=4096", 4608, 4096),
        ("qkv k=4104", 4608, 4104),
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
    for m in ms {
        println!("M = {m}");
        // Without ALL_SHAPES: the padded shapes glm4-verify runs, every candidate with its configuration
        // and whether its output is bit-identical to the first candidate's.
        for &(name, n, k) in shapes.iter().filter(|s| all || s.0.ends_with("4160") || s.0.ends_with("13760")) {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?.to_dtype(DType::BF16)?;
            let w = (Tensor::randn(0f32, 1.0, (n, k), &dev)? * 0.02)?.to_dtype(DType::BF16)?;
            let flop = 2.0 * (m * n * k) as f64;
            // Bytes a bandwidth-bound (decoding-sized) product must move: x, w and y once each.
            let bytes = 2.0 * (m * k + n * k + m * n) as f64;
            let iters = 10;
            let c = time(&dev, iters, || Ok(x.matmul(&w.t()?)?))?;
            let count = cuda_gemm::candidates(m, n, k, DType::BF16, &dev)?;
            println!(
                "{name:<16} n={n:<6} candle {:6.0} TFLOP/s {:5.0} GB/s, {count} candidates",
                flop / c / 1e12,
                bytes / c / 1e9
            );
            let first = cuda_gemm::linear_algo(&x, &w, None, 0)?.to_dtype(DType::F32)?;
            for a in 0..count {
                let s = time(&dev, iters, || Ok(cuda_gemm::linear_algo(&x, &w, None, a)?))?;
                let y = cuda_gemm::linear_algo(&x, &w, None, a)?.to_dtype(DType::F32)?;
                let diff = (y - &first)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let cfg = cuda_gemm::candidate_config(m, n, k, DType::BF16, a, &dev)?;
                let same = if diff == 0.0 { "bit-identical".to_string() } else { format!("max diff {diff:.2e}") };
                println!("  lt{a:<2} {:6.0} TFLOP/s {:5.0} GB/s  {same:<22} {cfg}", flop / s / 1e12, bytes / s / 1e9);
            }
        }
    }
    Ok(())
}
