// Fused kernels for the CUDA build (compiled to PTX by build.rs, loaded by src/model/cuda_ops.rs).
// Each replaces a chain of candle ops that would make several passes over a large tensor.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
// Rounds through T, as the unfused ops do between steps.
template <typename T> __device__ __forceinline__ float round_t(float x) { return to_f(from_f<T>(x)); }

// 16 bytes of T: one vector load or store (8 bf16/f16, 4 f32).
template <typename T> struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// out[r, c] = silu(gu[r, c]) * gu[r, m + c] for gu [rows, 2m]: the SwiGLU of a fused gate/up
// projection, rounded like transformers' `up * act_fn(gate)` (silu rounded, then the product).
// One block per row (no per-element division); 16-byte loads when m allows.
template <typename T>
__device__ __forceinline__ T swiglu_one(T g, T u) {
  float x = to_f(g);
  return from_f<T>(round_t<T>(x / (1.0f + expf(-x))) * to_f(u));
}

__device__ __forceinline__ float block_reduce(float v, bool is_max, float *shared) {
  for (int o = 16; o > 0; o >>= 1) {
    float w = __shfl_xor_sync(0xffffffff, v, o);
    v = is_max ? fmaxf(v, w) : v + w;
  }
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  __syncthreads();  // `shared` may still be read from the previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : (is_max ? -INFINITY : 0.0f);
  for (int o = 16; o > 0; o >>= 1) {
    float w = __shfl_xor_sync(0xffffffff, v, o);
    v = is_max ? fmaxf(v, w) : v + w;
  }
  return v;
}

// A linear with LoRA columns takes rows [x | h | 0] of ld values: producers write x with row stride ld
// and zero the columns after it; the side path's x·Aᵀ GEMM then fills h (src/model/lora.rs).
template <typename T> __device__ __forceinline__ void zero_tail(T *o, long long cols, long long ld) {
  for (long long c = cols + threadIdx.x; c < ld; c += blockDim.x) o[c] = from_f<T>(0.0f);
}

template <typename T>
__device__ void swiglu(const T *gu, T *out, long long rows, long long m, long long ld) {
  constexpr int V = Pack<T>::N;
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const T *g = gu + r * 2 * m, *u = g + m;
    T *o = out + r * ld;
    if (m % V == 0 && ld % V == 0) {
      for (long long c = threadIdx.x; c < m / V; c += blockDim.x) {
        Pack<T> gp = reinterpret_cast<const Pack<T> *>(g)[c], up = reinterpret_cast<const Pack<T> *>(u)[c], op;
#pragma unroll
        for (int j = 0; j < V; j++) op.v[j] = swiglu_one(gp.v[j], up.v[j]);
        reinterpret_cast<Pack<T> *>(o)[c] = op;
      }
    } else {
      for (long long c = threadIdx.x; c < m; c += blockDim.x) o[c] = swiglu_one(g[c], u[c]);
    }
    zero_tail(o, m, ld);
  }
}

// In place over attention scores x [B, H, T, S] (row-major, one block per row): scale, causal and
// left-padding mask, softmax accumulated in f32. Query i of row b sees keys pad[b] <= j <= offset + i;
// other keys get probability 0 (a query with no key, inside the padding, gets all zeros).
// With `cached` (dynamic shared memory of S floats) the row is read once and exp taken once.
template <typename T>
__device__ void masked_softmax(T *x, const unsigned int *pad, int heads, int t, int s, int offset, float scale,
                               bool cached) {
  __shared__ float shared[32];
  extern __shared__ float row_buf[];
  long long row = blockIdx.x;
  int i = (int)(row % t);
  int b = (int)(row / ((long long)t * heads));
  int lo = (int)pad[b];
  int hi = min(offset + i + 1, s);
  T *xr = x + row * (long long)s;
  float mx = -INFINITY;
  for (int j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    float v = round_t<T>(to_f(xr[j]) * scale);
    if (cached) row_buf[j] = v;
    mx = fmaxf(mx, v);
  }
  mx = block_reduce(mx, true, shared);
  float sum = 0.0f;
  for (int j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    float e = expf((cached ? row_buf[j] : round_t<T>(to_f(xr[j]) * scale)) - mx);
    if (cached) row_buf[j] = e;
    sum += e;
  }
  sum = block_reduce(sum, false, shared);
  float inv = hi > lo ? 1.0f / sum : 0.0f;
  for (int j = threadIdx.x; j < s; j += blockDim.x) {
    float p = 0.0f;
    if (j >= lo && j < hi) p = (cached ? row_buf[j] : expf(round_t<T>(to_f(xr[j]) * scale) - mx)) * inv;
    xr[j] = from_f<T>(p);
  }
}

// RMSNorm as transformers' Glm4RMSNorm: f32 statistics, normalised value rounded to T, then × weight
// in T. With `a`: the residual add first, sum = x + a (rounded to T, written to `sum`), normalised.
// One block per row of `cols`; 16-byte loads (the caller checks cols % Pack::N == 0).
template <typename T>
__device__ void add_rms_norm(const T *x, const T *a, const T *w, T *sum, T *out, int cols, float eps, int ld) {
  __shared__ float shared[32];
  constexpr int V = Pack<T>::N;
  long long row = blockIdx.x;
  const Pack<T> *xr = reinterpret_cast<const Pack<T> *>(x + row * cols);
  const Pack<T> *ar = a ? reinterpret_cast<const Pack<T> *>(a + row * cols) : nullptr;
  Pack<T> *sr = sum ? reinterpret_cast<Pack<T> *>(sum + row * cols) : nullptr;
  T *o = out + row * (long long)ld;
  Pack<T> *orow = reinterpret_cast<Pack<T> *>(o);
  const Pack<T> *wr = reinterpret_cast<const Pack<T> *>(w);
  float ss = 0.0f;
  for (int c = threadIdx.x; c < cols / V; c += blockDim.x) {
    Pack<T> p = xr[c];
    if (ar) {
      Pack<T> q = ar[c];
#pragma unroll
      for (int j = 0; j < V; j++) p.v[j] = from_f<T>(to_f(p.v[j]) + to_f(q.v[j]));
      sr[c] = p;
    }
#pragma unroll
    for (int j = 0; j < V; j++) ss += to_f(p.v[j]) * to_f(p.v[j]);
  }
  ss = block_reduce(ss, false, shared);
  float r = rsqrtf(ss / cols + eps);
  for (int c = threadIdx.x; c < cols / V; c += blockDim.x) {
    Pack<T> p = ar ? sr[c] : xr[c], q = wr[c];
#pragma unroll
    for (int j = 0; j < V; j++) p.v[j] = from_f<T>(to_f(q.v[j]) * round_t<T>(to_f(p.v[j]) * r));
    orow[c] = p;
  }
  zero_tail(o, cols, ld);
}

// Attention's heads-first output x [B, nh, t, hd] merged into token rows of out [B·t, ld]: the first
// nh·hd values are the heads side by side, the rest zeros (LoRA columns, see zero_tail). One block
// per token row; 16-byte accesses when hd and ld are whole packs.
template <typename T>
__device__ void merge_heads(const T *x, T *out, int nh, int hd, int t, int ld) {
  constexpr int V = Pack<T>::N;
  long long n = blockIdx.x, b = n / t, ti = n - b * t;
  int in = nh * hd;
  T *o = out + n * (long long)ld;
  const T *src = x + (b * nh * t + ti) * (long long)hd;  // head h at + h·t·hd
  if (hd % V == 0 && ld % V == 0) {
    for (int c = threadIdx.x; c < in / V; c += blockDim.x) {
      int h = c * V / hd, e = c * V - h * hd;
      reinterpret_cast<Pack<T> *>(o)[c] = *reinterpret_cast<const Pack<T> *>(src + (long long)h * t * hd + e);
    }
  } else {
    for (int c = threadIdx.x; c < in; c += blockDim.x) {
      int h = c / hd;
      o[c] = src[(long long)h * t * hd + (c - h * hd)];
    }
  }
  zero_tail(o, in, ld);
}

// Drops the LoRA columns h = xh[:, in, in + R) of the token rows whose batch row does not use them:
// mask [B, R] (1 keeps, 0 zeroes), token row n in batch row n / t. One thread per value.
template <typename T>
__device__ void lora_mask(T *xh, const T *mask, long long n_rows, int in, int R, int ld, int t) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n_rows * R) return;
  long long n = i / R;
  int r = i - n * R;
  if (to_f(mask[(n / t) * R + r]) == 0.0f) xh[n * ld + in + r] = from_f<T>(0.0f);
}

// log p(target) per row of logits [N, V]: logits[n, tgt[n]] - logsumexp(logits[n]) in f32 (as
// log_softmax(logits.float()) then gather). One block per row, an online max/sum in one read.
template <typename T>
__device__ void target_logprob(const T *logits, const unsigned int *tgt, float *out, int v) {
  __shared__ float shared[32];
  long long row = blockIdx.x;
  const T *x = logits + row * (long long)v;
  float mx = -INFINITY, sum = 0.0f;
  for (int j = threadIdx.x; j < v; j += blockDim.x) {
    float e = to_f(x[j]);
    if (e > mx) {
      sum = sum * expf(mx - e) + 1.0f;
      mx = e;
    } else {
      sum += expf(e - mx);
    }
  }
  float m_all = block_reduce(mx, true, shared);
  sum = mx == -INFINITY ? 0.0f : sum * expf(mx - m_all);
  sum = block_reduce(sum, false, shared);
  if (threadIdx.x == 0) {
    unsigned int k = tgt[row];
    out[row] = k < (unsigned int)v ? to_f(x[k]) - m_all - logf(sum) : NAN;
  }
}

// Splits a fused q/k/v projection qkv [B, T, (nh + 2·kvh)·D] into heads-first q [B, nh, T, D],
// k and v [B, kvh, T, D] (written one after the other to `out`), applying interleaved RoPE to the
// first `rd` dims of every q and k head with cos/sin [B, T, rd/2]. Rounded after every product and
// sum, as candle's rope_i and transformers' bf16 rotary code are.
template <typename T>
__device__ void qkv_rope(const T *qkv, const T *cos, const T *sin, T *out, int b, int t, int nh, int kvh, int d, int rd) {
  int heads = nh + 2 * kvh;
  long long pairs = (long long)b * t * heads * (d / 2);
  long long q_len = (long long)b * nh * t * d, kv_len = (long long)b * kvh * t * d;
  for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < pairs; k += (long long)gridDim.x * blockDim.x) {
    int p = (int)(k % (d / 2));
    long long rest = k / (d / 2);
    int h = (int)(rest % heads);
    long long bt = rest / heads;
    int bi = (int)(bt / t), ti = (int)(bt % t);
    const T *src = qkv + bt * heads * d + (long long)h * d + 2 * p;
    float x0 = to_f(src[0]), x1 = to_f(src[1]), y0 = x0, y1 = x1;
    if (h < nh + kvh && 2 * p < rd) {
      float c = to_f(cos[bt * (rd / 2) + p]), s = to_f(sin[bt * (rd / 2) + p]);
      y0 = round_t<T>(round_t<T>(x0 * c) - round_t<T>(x1 * s));
      y1 = round_t<T>(round_t<T>(x0 * s) + round_t<T>(x1 * c));
    }
    T *dst;
    if (h < nh) {
      dst = out + (((long long)bi * nh + h) * t + ti) * d;
    } else if (h < nh + kvh) {
      dst = out + q_len + (((long long)bi * kvh + (h - nh)) * t + ti) * d;
    } else {
      dst = out + q_len + kv_len + (((long long)bi * kvh + (h - nh - kvh)) * t + ti) * d;
    }
    dst[2 * p] = from_f<T>(y0);
    dst[2 * p + 1] = from_f<T>(y1);
  }
}

#define INSTANTIATE(T, SUFFIX)                                                                              \
  extern "C" __global__ void swiglu_##SUFFIX(const T *gu, T *out, long long rows, long long m, long long ld) { \
    swiglu<T>(gu, out, rows, m, ld);                                                                        \
  }                                                                                                         \
  extern "C" __global__ void masked_softmax_##SUFFIX(T *x, const unsigned int *pad, int heads, int t, int s, \
                                                     int offset, float scale, int cached) {                 \
    masked_softmax<T>(x, pad, heads, t, s, offset, scale, cached != 0);                                     \
  }                                                                                                         \
  extern "C" __global__ void qkv_rope_##SUFFIX(const T *qkv, const T *cos, const T *sin, T *out, int b, int t,  \
                                               int nh, int kvh, int d, int rd) {                            \
    qkv_rope<T>(qkv, cos, sin, out, b, t, nh, kvh, d, rd);                                                  \
  }                                                                                                         \
  extern "C" __global__ void add_rms_norm_##SUFFIX(const T *x, const T *a, const T *w, T *sum, T *out, int cols, \
                                                   float eps, int ld) {                                     \
    add_rms_norm<T>(x, a, w, sum, out, cols, eps, ld);                                                      \
  }                                                                                                         \
  extern "C" __global__ void merge_heads_##SUFFIX(const T *x, T *out, int nh, int hd, int t, int ld) {        \
    merge_heads<T>(x, out, nh, hd, t, ld);                                                                  \
  }                                                                                                         \
  extern "C" __global__ void lora_mask_##SUFFIX(T *xh, const T *mask, long long n_rows, int in, int R, int ld,  \
                                                int t) {                                                    \
    lora_mask<T>(xh, mask, n_rows, in, R, ld, t);                                                           \
  }                                                                                                         \
  extern "C" __global__ void target_logprob_##SUFFIX(const T *logits, const unsigned int *tgt, float *out, int v) { \
    target_logprob<T>(logits, tgt, out, v);                                                                 \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
