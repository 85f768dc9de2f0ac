//! The dense GEMMs of the linears, y = x·Wᵀ (+ bias), through cuBLASLt on CUDA (bf16/f16; f32 for
//! the LoRA columns).
//!
//! candle's matmul calls cublasGemmStridedBatchedEx, which picks its kernel with no say from us;
//! cuBLASLt lists the candidate algorithms for a shape, takes the bias add into the GEMM's epilogue,
//! and lets a plan (descriptors + chosen algorithm) be built once per shape and reused: decoding
//! runs the same few shapes thousands of times.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, InplaceOp2, Layout, Shape, Tensor};
use half::{bf16, f16};

use super::cuda_ops::{by_dtype, cuda_only};

/// cuBLASLt's recommended workspace on Hopper (32 MiB; 4 MiB is enough before it).
const WORKSPACE: usize = 32 << 20;

/// x [M, K] · w [N, K]ᵀ (+ bias [N]) → [M, N], both inputs contiguous, of one dtype.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    linear_algo(x, w, bias, choice())
}

/// As `linear` with the `algo`-th candidate of cuBLASLt's heuristic (0 = its first pick).
pub fn linear_algo(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, algo: usize) -> candle_core::Result<Tensor> {
    let op = LtLinear { algo };
    match bias {
        None => x.apply_op2_no_bwd(w, &op),
        Some(b) => x.apply_op3_no_bwd(w, b, &op),
    }
}

/// How many algorithms the heuristic offers for this shape (for benchmarks).
pub fn candidates(m: usize, n: usize, k: usize, dtype: DType, dev: &candle_core::Device) -> candle_core::Result<usize> {
    let candle_core::Device::Cuda(cuda) = dev else { candle_core::bail!("cuBLASLt needs a CUDA device") };
    with_state(cuda, |st, _| Ok(st.plan(Key::dense(m, n, k, dtype))?.count))
}

/// The `algo`-th candidate's configuration (algorithm id, tile, split-K, reduction, swizzle,
/// custom option, stages, cluster), for benchmarks that compare candidates.
pub fn candidate_config(
    m: usize,
    n: usize,
    k: usize,
    dtype: DType,
    algo: usize,
    dev: &candle_core::Device,
) -> candle_core::Result<String> {
    use sys::cublasLtMatmulAlgoConfigAttributes_t as A;
    let candle_core::Device::Cuda(cuda) = dev else { candle_core::bail!("cuBLASLt needs a CUDA device") };
    with_state(cuda, |st, _| {
        let p = st.plan(Key { algo, ..Key::dense(m, n, k, dtype) })?;
        // Each attribute has its documented size (the cluster shape is 16-bit); "?" where it is not read.
        let get = |attr: A, size: usize| -> String {
            let mut v = 0u32;
            let mut written = 0usize;
            // SAFETY: cuBLASLt writes at most `size` ≤ 4 bytes into v.
            let status = unsafe {
                sys::cublasLtMatmulAlgoConfigGetAttribute(
                    &p.algo,
                    attr,
                    &mut v as *mut u32 as *mut c_void,
                    size,
                    &mut written,
                )
            };
            if status.result().is_ok() {
                v.to_string()
            } else {
                "?".into()
            }
        };
        Ok(format!(
            "id {} tile {} splitk {} red {} swz {} opt {} stages {} cluster {}",
            get(A::CUBLASLT_ALGO_CONFIG_ID, 4),
            get(A::CUBLASLT_ALGO_CONFIG_TILE_ID, 4),
            get(A::CUBLASLT_ALGO_CONFIG_SPLITK_NUM, 4),
            get(A::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, 4),
            get(A::CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, 4),
            get(A::CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, 4),
            get(A::CUBLASLT_ALGO_CONFIG_STAGES_ID, 4),
            get(A::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, 2),
        ))
    })
}

/// GLM4_VERIFY_GEMM_ALGO=i picks the heuristic's i-th candidate everywhere (to compare them).
fn choice() -> usize {
    static C: OnceLock<usize> = OnceLock::new();
    *C.get_or_init(|| std::env::var("GLM4_VERIFY_GEMM_ALGO").ok().and_then(|v| v.parse().ok()).unwrap_or(0))
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    /// Row strides of x and y (≥ k and n: x and y may be column ranges of wider rows).
    ldx: usize,
    ldy: usize,
    dtype: DType,
    bias: bool,
    algo: usize,
    /// The pointers' common alignment in bytes (≤ 256): algorithms needing more are left out.
    align: usize,
}

impl Key {
    fn dense(m: usize, n: usize, k: usize, dtype: DType) -> Self {
        Key { m, n, k, ldx: k, ldy: n, dtype, bias: false, algo: 0, align: 256 }
    }
}

/// Descriptors and algorithm for one shape. Column-major, as cuBLAS sees row-major data:
/// yᵀ [N, M] (ld ldy) = W [N, K] (stored as Wᵀ: K×N, ld K, transposed) · xᵀ (K×M, ld ldx).
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
    /// Candidates the heuristic returned.
    count: usize,
}

struct State {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: HashMap<Key, Plan>,
}

// SAFETY: the raw cuBLASLt handles are only used under the state's mutex.
unsafe impl Send for State {}

/// Runs `f` with the device's cuBLASLt state (created on first use) locked, and the device's stream.
fn with_state<R>(
    dev: &candle_core::CudaDevice,
    f: impl FnOnce(&mut State, &Arc<CudaStream>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    static STATES: OnceLock<Mutex<HashMap<usize, Arc<Mutex<State>>>>> = OnceLock::new();
    let stream = dev.cuda_stream();
    let st = {
        let all = STATES.get_or_init(|| Mutex::new(HashMap::new()));
        let mut all = all.lock().map_err(|_| err("state poisoned"))?;
        match all.get(&stream.context().ordinal()) {
            Some(s) => s.clone(),
            None => {
                let handle = lt::create_handle().map_err(err)?;
                // SAFETY: scratch memory, never read before cuBLASLt writes it.
                let workspace = unsafe { dev.alloc::<u8>(WORKSPACE)? };
                let s = Arc::new(Mutex::new(State { handle, workspace, plans: HashMap::new() }));
                all.insert(stream.context().ordinal(), s.clone());
                s
            }
        }
    };
    let mut st = st.lock().map_err(|_| err("state poisoned"))?;
    f(&mut st, &stream)
}

fn err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuBLASLt: {e:?}"))
}

impl State {
    fn plan(&mut self, key: Key) -> candle_core::Result<&Plan> {
        if !self.plans.contains_key(&key) {
            let plan = self.new_plan(key)?;
            self.plans.insert(key, plan);
        }
        self.plans.get(&key).ok_or_else(|| err("plan missing"))
    }

    fn new_plan(&self, key: Key) -> candle_core::Result<Plan> {
        // f32 runs in full f32 (no TF32), as candle's matmul does by default.
        let ty = match key.dtype {
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
            DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
            d => candle_core::bail!("cuBLASLt linear takes bf16, f16 or f32, not {d:?}"),
        };
        let (m, n, k) = (key.m as u64, key.n as u64, key.k as u64);
        let desc =
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
                .map_err(err)?;
        let trans = candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T;
        set_desc(desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &trans)?;
        if key.bias {
            let epi = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
            set_desc(desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi)?;
        }
        let a = lt::create_matrix_layout(ty, k, n, k as i64).map_err(err)?;
        let b = lt::create_matrix_layout(ty, k, m, key.ldx as i64).map_err(err)?;
        let c = lt::create_matrix_layout(ty, n, m, key.ldy as i64).map_err(err)?;
        let pref = lt::create_matmul_pref().map_err(err)?;
        const MAX: usize = 16;
        // SAFETY: plain-data results array of MAX entries, filled up to `count` by cuBLASLt.
        let (results, count) = unsafe {
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            let ws = WORKSPACE as u64;
            let align = key.align as u32;
            let set = |attr: P, v: *const c_void, size: usize| lt::set_matmul_pref_attribute(pref, attr, v, size);
            set(P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws as *const _ as *const c_void, 8).map_err(err)?;
            for attr in [
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ] {
                set(attr, &align as *const _ as *const c_void, 4).map_err(err)?;
            }
            let mut results: [sys::cublasLtMatmulHeuristicResult_t; MAX] = std::mem::zeroed();
            let mut count = 0i32;
            let status = sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                desc,
                a,
                b,
                c,
                c,
                pref,
                MAX as i32,
                results.as_mut_ptr(),
                &mut count,
            );
            lt::destroy_matmul_pref(pref).map_err(err)?;
            status.result().map_err(err)?;
            (results, count.max(0) as usize)
        };
        if count == 0 {
            candle_core::bail!("cuBLASLt has no algorithm for a {m}×{k} · ({n}×{k})ᵀ GEMM");
        }
        let pick = key.algo.min(count - 1);
        Ok(Plan { desc, a, b, c, algo: results[pick].algo, count })
    }
}

/// Sets a matmul descriptor attribute to a plain value (a field of the descriptor's documented type).
fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> candle_core::Result<()> {
    // SAFETY: `v` is live for the call and its size is passed with it; cuBLASLt copies the value.
    unsafe { lt::set_matmul_desc_attribute(desc, attr, v as *const T as *const c_void, std::mem::size_of::<T>()) }
        .map_err(err)
}

/// Alignment in bytes (≤ 256) common to device addresses.
fn alignment(ptrs: &[u64]) -> usize {
    ptrs.iter().map(|&p| if p == 0 { 256 } else { 1usize << p.trailing_zeros().min(8) }).min().unwrap_or(256)
}

impl State {
    /// y = x·Wᵀ (+ bias) on raw device addresses; `key` gives the shape, strides and dtype.
    fn launch(
        &mut self,
        mut key: Key,
        stream: &CudaStream,
        w: u64,
        x: u64,
        y: u64,
        bias: u64,
    ) -> candle_core::Result<()> {
        let ws = {
            let (p, _g) = self.workspace.device_ptr_mut(stream);
            p
        };
        key.align = alignment(&[w, x, y, bias, ws]);
        let (desc, la, lb, lc, algo) = {
            let p = self.plan(key)?;
            (p.desc, p.a, p.b, p.c, p.algo)
        };
        let (alpha, beta) = (1f32, 0f32);
        if key.bias {
            set_desc(desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)?;
        }
        // SAFETY: the plan's layouts describe these buffers (checked by the callers); they outlive the
        // call, which is queued on `stream` like every other use of them.
        unsafe {
            lt::matmul(
                self.handle,
                desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w as *const c_void,
                la,
                x as *const c_void,
                lb,
                y as *const c_void,
                lc,
                y as *mut c_void,
                lc,
                &algo,
                ws as *mut c_void,
                WORKSPACE,
                stream.cu_stream() as sys::cudaStream_t,
            )
            .map_err(err)
        }
    }
}

struct LtLinear {
    algo: usize,
}

impl LtLinear {
    fn run(
        &self,
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        bias: Option<(&CudaStorage, &Layout)>,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (xs, xl) = x;
        let (ws, wl) = w;
        let (m, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("cuBLASLt linear: x has {k} columns, the weight {k2}");
        }
        if let Some((_, bl)) = bias {
            if bl.shape().elem_count() != n {
                candle_core::bail!("cuBLASLt linear: bias of {} for {n} outputs", bl.shape().elem_count());
            }
        }
        let dev = xs.device().clone();
        let key = Key { bias: bias.is_some(), algo: self.algo, ..Key::dense(m, n, k, xs.dtype()) };
        macro_rules! go {
            ($t:ty, $st:ident, $stream:ident) => {{
                let (st, stream) = ($st, $stream);
                let xv = slice::<$t>(xs, xl, "x")?;
                let wv = slice::<$t>(ws, wl, "weight")?;
                let bv = bias.map(|(bs, bl)| slice::<$t>(bs, bl, "bias")).transpose()?;
                // SAFETY: every element is written by the GEMM (beta = 0).
                let mut out = unsafe { dev.alloc::<$t>(m * n)? };
                {
                    let (xp, _g1) = xv.device_ptr(&stream);
                    let (wp, _g2) = wv.device_ptr(&stream);
                    let (yp, _g3) = out.device_ptr_mut(&stream);
                    let bg = bv.as_ref().map(|b| b.device_ptr(&stream));
                    let bp = bg.as_ref().map_or(0, |g| g.0);
                    st.launch(key, &stream, wp, xp, yp, bp)?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = with_state(&dev, |st, stream| Ok(by_dtype!(xs.dtype(), T => go!(T, st, stream))))?;
        Ok((out, Shape::from((m, n))))
    }
}

/// In place over xh [N, ld]: xh[:, k + col, k + col + R) = xh[:, 0, k) · aᵀ for a [R, k] — (some of)
/// the LoRA columns h of a linear's input rows [x | h | 0], computed where the rows were written
/// (one skinny GEMM, x read once). xh may be a range of rows, a a range of the stack's rows.
pub fn lora_h_(xh: &Tensor, a: &Tensor, col: usize) -> candle_core::Result<()> {
    xh.inplace_op2(a, &LoraH { col })
}

struct LoraH {
    col: usize,
}

impl InplaceOp2 for LoraH {
    cuda_only!(inplace2, "lt-lora-h");

    fn cuda_fwd(&self, xs: &mut CudaStorage, xl: &Layout, a: &CudaStorage, al: &Layout) -> candle_core::Result<()> {
        let (m, ld) = xl.shape().dims2()?;
        let (r, k) = al.shape().dims2()?;
        if k + self.col + r > ld {
            candle_core::bail!("LoRA h: rows of {ld} cannot hold {k} + {} + {r} columns", self.col);
        }
        let (start, _) = xl
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("LoRA h: the rows must be contiguous".into()))?;
        let dev = xs.device().clone();
        let key = Key { ldx: ld, ldy: ld, ..Key::dense(m, r, k, xs.dtype()) };
        macro_rules! go {
            ($t:ty, $st:ident, $stream:ident) => {{
                let (st, stream) = ($st, $stream);
                let av = slice::<$t>(a, al, "lora A")?;
                let size = std::mem::size_of::<$t>() as u64;
                let xv = xs.as_cuda_slice_mut::<$t>()?;
                let (base, _g1) = xv.device_ptr_mut(&stream);
                let (ap, _g2) = av.device_ptr(&stream);
                let x = base + start as u64 * size;
                st.launch(key, &stream, ap, x, x + (k + self.col) as u64 * size, 0)?;
            }};
        }
        with_state(&dev, |st, stream| {
            by_dtype!(xs.dtype(), T => go!(T, st, stream));
            Ok(())
        })
    }
}

fn slice<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("cuBLASLt linear: {what} must be contiguous")))?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

impl CustomOp2 for LtLinear {
    cuda_only!(op2, "lt-linear");

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.run((xs, xl), (ws, wl), None)
    }
}

impl CustomOp3 for LtLinear {
    cuda_only!(op3, "lt-linear-bias");

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.run((xs, xl), (ws, wl), Some((bs, bl)))
    }
}
