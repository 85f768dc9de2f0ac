//! Fused CUDA kernels (kernels/fused.cu) as candle ops, used by the forward pass on CUDA devices
//! instead of chains of candle ops that each pass over a large tensor.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp3, DType, InplaceOp2, Layout, Shape, Tensor,
};
use half::{bf16, f16};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "glm4_verify_fused";

fn suffix(dtype: DType) -> candle_core::Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        d => candle_core::bail!("fused kernels take f32, bf16 or f16, not {d:?}"),
    }
}

fn contiguous(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))
}

/// silu(gate) · up for a fused gate/up output [.., 2m] → [.., m].
pub fn swiglu(gu: &Tensor) -> candle_core::Result<Tensor> {
    gu.apply_op1_no_bwd(&SwiGlu)
}

struct SwiGlu;

impl SwiGlu {
    fn run<T: DeviceRepr>(
        &self,
        src: &CudaSlice<T>,
        (start, end): (usize, usize),
        dev: &CudaDevice,
        rows: usize,
        m: usize,
        name: &str,
    ) -> candle_core::Result<CudaSlice<T>> {
        let src = src.slice(start..end);
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(rows * m)? };
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let n = (rows * m) as u32;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 65535 * 8), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        let (rows, m) = (rows as i64, m as i64);
        b.arg(&src);
        b.arg(&out);
        b.arg(&rows);
        b.arg(&m);
        // SAFETY: argument types match the kernel's signature.
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused swiglu kernel runs on CUDA only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let offs = contiguous(l, "swiglu")?;
        let mut dims = l.dims().to_vec();
        let two_m = dims.pop().unwrap_or(0);
        let m = two_m / 2;
        let rows = l.shape().elem_count() / two_m.max(1);
        dims.push(m);
        let dev = s.device();
        let name = format!("swiglu_{}", suffix(s.dtype())?);
        let out = match s.dtype() {
            DType::BF16 => CudaStorage::wrap_cuda_slice(
                self.run(s.as_cuda_slice::<bf16>()?, offs, dev, rows, m, &name)?,
                dev.clone(),
            ),
            DType::F16 => CudaStorage::wrap_cuda_slice(
                self.run(s.as_cuda_slice::<f16>()?, offs, dev, rows, m, &name)?,
                dev.clone(),
            ),
            _ => CudaStorage::wrap_cuda_slice(
                self.run(s.as_cuda_slice::<f32>()?, offs, dev, rows, m, &name)?,
                dev.clone(),
            ),
        };
        Ok((out, Shape::from(dims)))
    }
}

/// In place over scores [B, H, T, S] (contiguous): × scale, causal + left-padding mask (`pad` [B]
/// u32 on the device, `offset` = positions already cached), softmax over S in f32.
pub fn masked_softmax_(scores: &Tensor, pad: &Tensor, offset: usize, scale: f32) -> candle_core::Result<()> {
    scores.inplace_op2(pad, &MaskedSoftmax { offset, scale })
}

struct MaskedSoftmax {
    offset: usize,
    scale: f32,
}

impl MaskedSoftmax {
    #[allow(clippy::too_many_arguments)]
    fn run<T: DeviceRepr>(
        &self,
        x: &mut CudaSlice<T>,
        (start, end): (usize, usize),
        pad: &CudaView<u32>,
        dev: &CudaDevice,
        dims: (usize, usize, usize, usize),
        name: &str,
    ) -> candle_core::Result<()> {
        let (b, h, t, s) = dims;
        let mut x = x.slice_mut(start..end);
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let cfg = LaunchConfig { grid_dim: ((b * h * t) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let mut bld = func.builder();
        let (h, t, s, off) = (h as i32, t as i32, s as i32, self.offset as i32);
        bld.arg(&mut x);
        bld.arg(pad);
        bld.arg(&h);
        bld.arg(&t);
        bld.arg(&s);
        bld.arg(&off);
        bld.arg(&self.scale);
        // SAFETY: argument types match the kernel's signature; one block per row of S elements.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(())
    }
}

impl InplaceOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("the fused masked softmax kernel runs on CUDA only")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout, p: &CudaStorage, pl: &Layout) -> candle_core::Result<()> {
        let offs = contiguous(l, "masked softmax")?;
        let (pstart, pend) = contiguous(pl, "masked softmax pads")?;
        let (b, h, t, sl) = l.shape().dims4()?;
        if pend - pstart != b {
            candle_core::bail!("masked softmax: {} pads for {b} rows", pend - pstart);
        }
        let dev = s.device().clone();
        let pad = p.as_cuda_slice::<u32>()?.slice(pstart..pend);
        let name = format!("masked_softmax_{}", suffix(s.dtype())?);
        let dims = (b, h, t, sl);
        match s.dtype() {
            DType::BF16 => self.run(s.as_cuda_slice_mut::<bf16>()?, offs, &pad, &dev, dims, &name),
            DType::F16 => self.run(s.as_cuda_slice_mut::<f16>()?, offs, &pad, &dev, dims, &name),
            _ => self.run(s.as_cuda_slice_mut::<f32>()?, offs, &pad, &dev, dims, &name),
        }
    }
}

/// Splits qkv [B, T, (nh + 2·kvh)·D] into q [B, nh, T, D], k, v [B, kvh, T, D] (contiguous), with
/// interleaved RoPE on the first `rd` dims of q and k heads (cos/sin [B, T, rd/2], model dtype).
pub fn qkv_rope(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: (usize, usize, usize),
    rd: usize,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (nh, kvh, d) = heads;
    let (b, t, _) = qkv.dims3()?;
    let flat = qkv.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &QkvRope { nh, kvh, d, rd })?;
    let (q_len, kv_len) = (b * nh * t * d, b * kvh * t * d);
    let q = flat.narrow(0, 0, q_len)?.reshape((b, nh, t, d))?;
    let k = flat.narrow(0, q_len, kv_len)?.reshape((b, kvh, t, d))?;
    let v = flat.narrow(0, q_len + kv_len, kv_len)?.reshape((b, kvh, t, d))?;
    Ok((q, k, v))
}

struct QkvRope {
    nh: usize,
    kvh: usize,
    d: usize,
    rd: usize,
}

impl QkvRope {
    #[allow(clippy::too_many_arguments)]
    fn run<T: DeviceRepr>(
        &self,
        x: (&CudaSlice<T>, (usize, usize)),
        cos: (&CudaSlice<T>, (usize, usize)),
        sin: (&CudaSlice<T>, (usize, usize)),
        dev: &CudaDevice,
        (b, t): (usize, usize),
        name: &str,
    ) -> candle_core::Result<CudaSlice<T>> {
        let n = b * t * (self.nh + 2 * self.kvh) * self.d;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(n)? };
        let (x, cos, sin) =
            (x.0.slice(x.1 .0..x.1 .1), cos.0.slice(cos.1 .0..cos.1 .1), sin.0.slice(sin.1 .0..sin.1 .1));
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let pairs = (n / 2) as u64;
        let grid = pairs.div_ceil(256).clamp(1, 65535 * 16) as u32;
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut bld = func.builder();
        let ints = [b, t, self.nh, self.kvh, self.d, self.rd].map(|v| v as i32);
        bld.arg(&x);
        bld.arg(&cos);
        bld.arg(&sin);
        bld.arg(&out);
        for v in &ints {
            bld.arg(v);
        }
        // SAFETY: argument types match the kernel's signature.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(out)
    }
}

/// The three inputs of `QkvRope` with their contiguous offsets.
type Inputs<'a> = (&'a CudaStorage, (usize, usize), &'a CudaStorage, (usize, usize), &'a CudaStorage, (usize, usize));

impl QkvRope {
    fn typed<T: CudaDType + DeviceRepr>(
        &self,
        (x, xo, c, co, s, so): Inputs,
        dev: &CudaDevice,
        bt: (usize, usize),
        name: &str,
    ) -> candle_core::Result<CudaStorage> {
        let out = self.run(
            (x.as_cuda_slice::<T>()?, xo),
            (c.as_cuda_slice::<T>()?, co),
            (s.as_cuda_slice::<T>()?, so),
            dev,
            bt,
            name,
        )?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp3 for QkvRope {
    fn name(&self) -> &'static str {
        "fused-qkv-rope"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused qkv/rope kernel runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        c: &CudaStorage,
        cl: &Layout,
        s: &CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, t, w) = xl.shape().dims3()?;
        if w != (self.nh + 2 * self.kvh) * self.d
            || self.rd > self.d
            || !self.d.is_multiple_of(2)
            || !self.rd.is_multiple_of(2)
        {
            candle_core::bail!(
                "qkv/rope: width {w} for {} + 2·{} heads of {} ({} rotary)",
                self.nh,
                self.kvh,
                self.d,
                self.rd
            );
        }
        if cl.shape().elem_count() != b * t * self.rd / 2 || sl.shape().elem_count() != b * t * self.rd / 2 {
            candle_core::bail!("qkv/rope: cos/sin of {:?} for [{b}, {t}, {}]", cl.dims(), self.rd / 2);
        }
        let (xo, co, so) =
            (contiguous(xl, "qkv/rope")?, contiguous(cl, "qkv/rope cos")?, contiguous(sl, "qkv/rope sin")?);
        let dev = x.device().clone();
        let name = format!("qkv_rope_{}", suffix(x.dtype())?);
        let n = b * t * (self.nh + 2 * self.kvh) * self.d;
        let args = (x, xo, c, co, s, so);
        let out = match x.dtype() {
            DType::BF16 => self.typed::<bf16>(args, &dev, (b, t), &name)?,
            DType::F16 => self.typed::<f16>(args, &dev, (b, t), &name)?,
            _ => self.typed::<f32>(args, &dev, (b, t), &name)?,
        };
        Ok((out, Shape::from(n)))
    }
}
