//! The dense GEMMs of the linears, y = x·Wᵀ (+ bias), through cuBLASLt for bf16/f16 on CUDA.
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
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

/// cuBLASLt's recommended workspace on Hopper (32 MiB; 4 MiB is enough before it).
const WORKSPACE: usize = 32 << 20;

/// x [M, K] · w [N, K]ᵀ (+ bias [N]) → [M, N], both inputs contiguous, bf16 or f16.
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
    let st = state(cuda)?;
    let mut st = st.lock().map_err(|_| candle_core::Error::Msg("cuBLASLt state poisoned".into()))?;
    let key = Key { m, n, k, dtype, bias: false, algo: 0 };
    Ok(st.plan(key)?.count)
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
    dtype: DType,
    bias: bool,
    algo: usize,
}

/// Descriptors and algorithm for one shape. Column-major, as cuBLAS sees row-major data:
/// yᵀ [N, M] = W [N, K] (stored as Wᵀ: K×N, ld K, transposed) · xᵀ (K×M, ld K).
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

fn state(dev: &candle_core::CudaDevice) -> candle_core::Result<Arc<Mutex<State>>> {
    static STATES: OnceLock<Mutex<HashMap<usize, Arc<Mutex<State>>>>> = OnceLock::new();
    let all = STATES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut all = all.lock().map_err(|_| candle_core::Error::Msg("cuBLASLt state poisoned".into()))?;
    let ordinal = dev.cuda_stream().context().ordinal();
    if let Some(s) = all.get(&ordinal) {
        return Ok(s.clone());
    }
    let handle = lt::create_handle().map_err(err)?;
    // SAFETY: scratch memory, never read before cuBLASLt writes it.
    let workspace = unsafe { dev.alloc::<u8>(WORKSPACE)? };
    let s = Arc::new(Mutex::new(State { handle, workspace, plans: HashMap::new() }));
    all.insert(ordinal, s.clone());
    Ok(s)
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
        let ty = match key.dtype {
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
            d => candle_core::bail!("cuBLASLt linear takes bf16 or f16, not {d:?}"),
        };
        let (m, n, k) = (key.m as u64, key.n as u64, key.k as u64);
        let desc =
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
                .map_err(err)?;
        let trans = candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T;
        // SAFETY: attribute buffers are live locals of the sizes given.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &trans as *const _ as *const c_void,
                std::mem::size_of_val(&trans),
            )
            .map_err(err)?;
            if key.bias {
                let epi = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
                lt::set_matmul_desc_attribute(
                    desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    &epi as *const _ as *const c_void,
                    std::mem::size_of_val(&epi),
                )
                .map_err(err)?;
            }
        }
        let a = lt::create_matrix_layout(ty, k, n, k as i64).map_err(err)?;
        let b = lt::create_matrix_layout(ty, k, m, k as i64).map_err(err)?;
        let c = lt::create_matrix_layout(ty, n, m, n as i64).map_err(err)?;
        let pref = lt::create_matmul_pref().map_err(err)?;
        const MAX: usize = 16;
        // SAFETY: plain-data results array of MAX entries, filled up to `count` by cuBLASLt.
        let (results, count) = unsafe {
            let ws = WORKSPACE as u64;
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const _ as *const c_void,
                std::mem::size_of_val(&ws),
            )
            .map_err(err)?;
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
        let key = Key { m, n, k, dtype: xs.dtype(), bias: bias.is_some(), algo: self.algo };
        let st = state(&dev)?;
        let mut st = st.lock().map_err(|_| err("state poisoned"))?;
        macro_rules! go {
            ($t:ty) => {{
                let xv = slice::<$t>(xs, xl, "x")?;
                let wv = slice::<$t>(ws, wl, "weight")?;
                let bv = match bias {
                    Some((bs, bl)) => Some(slice::<$t>(bs, bl, "bias")?),
                    None => None,
                };
                // SAFETY: every element is written by the GEMM (beta = 0).
                let mut out = unsafe { dev.alloc::<$t>(m * n)? };
                let stream = dev.cuda_stream();
                let (desc, la, lb, lc, algo) = {
                    let p = st.plan(key)?;
                    (p.desc, p.a, p.b, p.c, p.algo)
                };
                let handle = st.handle;
                let (wsp, _g0) = st.workspace.device_ptr_mut(&stream);
                let (xp, _g1) = xv.device_ptr(&stream);
                let (wp, _g2) = wv.device_ptr(&stream);
                let (op, _g3) = out.device_ptr_mut(&stream);
                let (alpha, beta) = (1f32, 0f32);
                // SAFETY: the plan's layouts match these buffers' shapes; all live for the call.
                unsafe {
                    if let Some(bv) = &bv {
                        let (bp, _g4) = bv.device_ptr(&stream);
                        lt::set_matmul_desc_attribute(
                            desc,
                            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                            &bp as *const _ as *const c_void,
                            std::mem::size_of_val(&bp),
                        )
                        .map_err(err)?;
                    }
                    lt::matmul(
                        handle,
                        desc,
                        &alpha as *const f32 as *const c_void,
                        &beta as *const f32 as *const c_void,
                        wp as *const c_void,
                        la,
                        xp as *const c_void,
                        lb,
                        op as *const c_void,
                        lc,
                        op as *mut c_void,
                        lc,
                        &algo,
                        wsp as *mut c_void,
                        WORKSPACE,
                        stream.cu_stream() as sys::cudaStream_t,
                    )
                    .map_err(err)?;
                }
                drop((_g0, _g1, _g2, _g3));
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match xs.dtype() {
            DType::BF16 => go!(bf16),
            DType::F16 => go!(f16),
            d => candle_core::bail!("cuBLASLt linear takes bf16 or f16, not {d:?}"),
        };
        Ok((out, Shape::from((m, n))))
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
    fn name(&self) -> &'static str {
        "lt-linear"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("lt-linear runs on CUDA only")
    }
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
    fn name(&self) -> &'static str {
        "lt-linear-bias"
    }
    #[rustfmt::skip]
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout)
        -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("lt-linear runs on CUDA only")
    }
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
