//! The flash-attention kernel against attention in f32 (candle ops), on the GPU: random q, k, v with
//! left padding, cached keys (s > t) and grouped heads, every head size the kernel takes; then its time
//! on a GLM-4-9B scoring shape against the eager path's three steps. Run on the GPU machine:
//! `flash_check` (exit 1 when an error is over the bound). CUDA build only.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use glm4_verify::model::cuda_ops::flash_attention;

/// softmax(scale · q·kᵀ, keys pad[b] <= j <= s - t + i) · v in f32 → rows [B·t, nh·D].
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, pads: &[u32], scale: f64) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let (_, kvh, s, _) = k.dims4()?;
    let g = nh / kvh;
    let (q, k, v) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
    let mut mask = vec![0f32; b * t * s];
    for bi in 0..b {
        for i in 0..t {
            for j in 0..s {
                if j < pads[bi] as usize || j > s - t + i {
                    mask[(bi * t + i) * s + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    let mask = Tensor::from_vec(mask, (b, 1, t, s), q.device())?;
    let q = q.reshape((b, kvh, g * t, d))?;
    let scores = (q.matmul(&k.t()?.contiguous()?)?.reshape((b, nh, t, s))? * scale)?.broadcast_add(&mask)?;
    let mx = scores.max_keepdim(D::Minus1)?;
    // Rows with no key (inside the padding) give zeros, as the kernel does.
    let mx = mx.ne(f32::NEG_INFINITY)?.where_cond(&mx, &mx.zeros_like()?)?;
    let e = scores.broadcast_sub(&mx)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let sum = sum.gt(0f32)?.where_cond(&sum, &sum.ones_like()?)?;
    let p = e.broadcast_div(&sum)?.reshape((b, kvh, g * t, s))?;
    let out = p.matmul(&v)?.reshape((b, nh, t, d))?; // [B, nh, t, D]
    Ok(out.transpose(1, 2)?.reshape((b * t, nh * d))?)
}

/// (B, nh, kvh, t, s, D).
type Shape = (usize, usize, usize, usize, usize, usize);

fn case(dev: &Device, (b, nh, kvh, t, s, d): Shape, pads: &[u32]) -> Result<f32> {
    let dt = DType::BF16;
    let q = Tensor::randn(0f32, 1.0, (b, nh, t, d), dev)?.to_dtype(dt)?;
    let k = Tensor::randn(0f32, 1.0, (b, kvh, s, d), dev)?.to_dtype(dt)?;
    let v = Tensor::randn(0f32, 1.0, (b, kvh, s, d), dev)?.to_dtype(dt)?;
    let scale = 1.0 / (d as f64).sqrt();
    let pad = Tensor::new(pads, dev)?;
    let ld = nh * d + 24;
    let got = flash_attention(&q, &k, &v, &pad, scale as f32, ld)?.to_dtype(DType::F32)?;
    let want = reference(&q, &k, &v, pads, scale)?;
    let head = got.narrow(1, 0, nh * d)?;
    let tail = got.narrow(1, nh * d, ld - nh * d)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let err = (head - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(err.max(tail))
}

fn main() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let mut ok = true;
    // (B, nh, kvh, t, s, D) and left paddings: one block and several, s > t (cached keys), t not a
    // multiple of 64, a row fully inside its padding for its first queries.
    let cases: &[(Shape, &[u32])] = &[
        ((2, 4, 2, 37, 37, 16), &[0, 5]),
        ((2, 4, 1, 130, 130, 32), &[3, 70]),
        ((3, 8, 2, 100, 164, 64), &[0, 64, 120]),
        ((2, 32, 2, 200, 200, 128), &[0, 77]),
        ((1, 32, 2, 64, 1000, 128), &[0]),
        ((2, 2, 2, 1, 50, 128), &[0, 10]),
        // Decoding shapes: the query heads of a key/value head packed into one block (g·t <= 64).
        ((3, 32, 2, 1, 700, 128), &[0, 100, 650]),
        ((2, 32, 2, 2, 300, 128), &[0, 299]),
        ((2, 8, 2, 16, 100, 64), &[0, 30]),
        ((2, 8, 2, 20, 100, 64), &[5, 0]),
        // Up to 16 query rows (the decoding kernel, warps splitting the keys): several heads and
        // queries, one head and several queries, D = 16, a row whose first queries see no key.
        ((2, 8, 2, 4, 90, 64), &[88, 0]),
        ((2, 4, 4, 8, 40, 32), &[0, 7]),
        ((2, 4, 2, 1, 33, 16), &[0, 32]),
        ((4, 32, 2, 1, 1100, 128), &[0, 63, 64, 1000]),
        // Prefill: several 64-row blocks with a partial last one, cached keys, a row whose
        // first 130 queries see no key, one head per key/value head.
        ((2, 4, 2, 300, 420, 128), &[0, 250]),
        ((1, 2, 2, 129, 129, 128), &[1]),
        ((2, 4, 2, 260, 260, 64), &[0, 131]),
    ];
    for &(shape, pads) in cases {
        let err = case(&dev, shape, pads)?;
        // bf16 inputs, probabilities rounded to bf16 for p·v, output rounded: ~1e-2 at |out| ~ 1.
        let pass = err < 3e-2;
        ok &= pass;
        println!(
            "flash (B, nh, kvh, t, s, D) = {shape:?} pads {pads:?}: max |err| {err:.2e} {}",
            if pass { "OK" } else { "FAIL" }
        );
    }
    // Time on a 9B scoring pass (14 rows of 1088 tokens) and a decoding step (256 rows, 1100 cached
    // positions): 32 heads, 2 key/value heads, D = 128.
    for (b, t, s) in [(14, 1088, 1088), (256, 1, 1100)] {
        let (nh, kvh, d) = (32, 2, 128);
        let q = Tensor::randn(0f32, 1.0, (b, nh, t, d), &dev)?.to_dtype(DType::BF16)?;
        let k = Tensor::randn(0f32, 1.0, (b, kvh, s, d), &dev)?.to_dtype(DType::BF16)?;
        let v = Tensor::randn(0f32, 1.0, (b, kvh, s, d), &dev)?.to_dtype(DType::BF16)?;
        let pad = Tensor::new(vec![0u32; b].as_slice(), &dev)?;
        let run = |n: usize| -> Result<f64> {
            dev.synchronize()?;
            let start = Instant::now();
            for _ in 0..n {
                flash_attention(&q, &k, &v, &pad, 0.088, nh * d + 64)?;
            }
            dev.synchronize()?;
            Ok(start.elapsed().as_secs_f64() / n as f64)
        };
        run(3)?;
        let sec = run(20)?;
        let pairs = (b * nh) as f64 * (0..t).map(|i| (s - t + i + 1) as f64).sum::<f64>();
        let kv_bytes = (2 * b * kvh * s * d * 2) as f64;
        println!(
            "flash (B, t, s) = {:?}: {:.3} ms, {:.0} TFLOP/s, key/value reads {:.2} TB/s",
            (b, t, s),
            sec * 1e3,
            4.0 * d as f64 * pairs / sec / 1e12,
            kv_bytes / sec / 1e12
        );
    }
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
