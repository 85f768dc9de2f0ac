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

// The LoRA columns of a linear's input row, appended by the kernel that produced the row: the block
// has just written x (`in` values) to o, whose row holds ld >= in + R values; h = x·Aᵀ (A [R, in], the
// scaling folded in; f32 sums rounded to T, as a GEMM) goes to o[in, in + R), kept where the batch
// row's mask [B, R] is 1 (mode 1), always (mode 0) or never (mode 2), and zeros fill o[in + R, ld)
// (padding that keeps the GEMM's k a multiple of 64). Row n belongs to batch row n / t.
template <typename T>
__device__ void lora_tail(T *o, const T *A, const T *mask, int in, int R, int ld, long long n, int t, int mode) {
  __shared__ float shared[8][32];
  constexpr int V = Pack<T>::N;
  __syncthreads();  // the row written by the whole block is read back (from L1/L2)
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  bool packed = in % V == 0 && reinterpret_cast<size_t>(o) % 16 == 0 && reinterpret_cast<size_t>(A) % 16 == 0;
  for (int r0 = 0; r0 < R; r0 += 8) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int nr = min(8, R - r0);
    if (mode != 2 && packed) {
      for (int c = threadIdx.x; c < in / V; c += blockDim.x) {
        Pack<T> xp = reinterpret_cast<const Pack<T> *>(o)[c];
#pragma unroll
        for (int j = 0; j < 8; j++) {
          if (j >= nr) break;
          Pack<T> a = reinterpret_cast<const Pack<T> *>(A + (long long)(r0 + j) * in)[c];
#pragma unroll
          for (int e = 0; e < V; e++) acc[j] += to_f(xp.v[e]) * to_f(a.v[e]);
        }
      }
    } else if (mode != 2) {
      for (int c = threadIdx.x; c < in; c += blockDim.x) {
        float v = to_f(o[c]);
#pragma unroll
        for (int j = 0; j < 8; j++)
          if (j < nr) acc[j] += v * to_f(A[(long long)(r0 + j) * in + c]);
      }
    }
#pragma unroll
    for (int j = 0; j < 8; j++)
      for (int off = 16; off > 0; off >>= 1) acc[j] += __shfl_xor_sync(0xffffffff, acc[j], off);
    __syncthreads();
    if (lane == 0)
#pragma unroll
      for (int j = 0; j < 8; j++) shared[j][warp] = acc[j];
    __syncthreads();
    if (threadIdx.x < nr) {
      float v = 0.0f;
      for (int k = 0; k < warps; k++) v += shared[threadIdx.x][k];
      int r = r0 + threadIdx.x;
      bool keep = mode == 0 || (mode == 1 && to_f(mask[(n / t) * R + r]) != 0.0f);
      o[in + r] = from_f<T>(keep ? v : 0.0f);
    }
  }
  for (int c = in + R + threadIdx.x; c < ld; c += blockDim.x) o[c] = from_f<T>(0.0f);
}

// A producer's optional LoRA columns (see lora_tail): A == nullptr for none, then ld = the row width.
template <typename T> struct Tail {
  const T *A;
  const T *mask;
  int R, ld, t, mode;
};

template <typename T>
__device__ void swiglu(const T *gu, T *out, long long rows, long long m, Tail<T> tl) {
  constexpr int V = Pack<T>::N;
  long long ld = tl.A ? tl.ld : m;
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
    if (tl.A) lora_tail(o, tl.A, tl.mask, (int)m, tl.R, tl.ld, r, tl.t, tl.mode);
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
__device__ void add_rms_norm(const T *x, const T *a, const T *w, T *sum, T *out, int cols, float eps, Tail<T> tl) {
  __shared__ float shared[32];
  constexpr int V = Pack<T>::N;
  long long row = blockIdx.x;
  const Pack<T> *xr = reinterpret_cast<const Pack<T> *>(x + row * cols);
  const Pack<T> *ar = a ? reinterpret_cast<const Pack<T> *>(a + row * cols) : nullptr;
  Pack<T> *sr = sum ? reinterpret_cast<Pack<T> *>(sum + row * cols) : nullptr;
  T *o = out + row * (tl.A ? (long long)tl.ld : cols);
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
  if (tl.A) lora_tail(o, tl.A, tl.mask, cols, tl.R, tl.ld, row, tl.t, tl.mode);
}

// The LoRA input of a linear with stacked adapters: out [N, in + R] = [x | h], h = x·Aᵀ (A [R, in],
// scaling folded in; f32 sums rounded to T, as a GEMM) kept where mask [B, R] is 1 (row n belongs to
// batch row n / t), 0 elsewhere. mode: 0 = every row keeps h, 1 = per mask, 2 = h = 0.
// One block per token row: the row is copied once and its R dot products summed on the way.
// With hd > 0, x is attention's output heads-first, [B, in / hd, t, hd], and is read as its merged
// [N, in] form (the head merge and the copy in one pass).
template <typename T>
__device__ void lora_input(const T *x, const T *A, const T *mask, T *out, int in, int R, int ld, int t, int mode,
                           int hd) {
  long long n = blockIdx.x;
  T *o = out + n * (long long)ld;
  if (hd > 0) {
    long long b = n / t, ti = n - b * t, nh = in / hd;
    for (int c = threadIdx.x; c < in; c += blockDim.x) {
      int h = c / hd;
      o[c] = x[((b * nh + h) * t + ti) * hd + (c - h * hd)];
    }
  } else {
    for (int c = threadIdx.x; c < in; c += blockDim.x) o[c] = x[n * in + c];
  }
  lora_tail(o, A, mask, in, R, ld, n, t, mode);
}

// As lora_input, for shapes in whole 16-byte packs (in, ld and hd multiples of Pack::N): ROWS
// token rows per block share each load of A, and every access is 16 bytes wide.
template <typename T, int ROWS>
__device__ void lora_input_packed(const T *x, const T *A, const T *mask, T *out, long long n_rows, int in, int R,
                                  int ld, int t, int mode, int hd) {
  constexpr int V = Pack<T>::N;
  __shared__ float shared[ROWS * 8][32];
  long long n0 = (long long)blockIdx.x * ROWS;
  int nv = in / V, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  long long nh = hd > 0 ? in / hd : 0;
  const T *row_src[ROWS];
  Pack<T> *row_dst[ROWS];
#pragma unroll
  for (int k = 0; k < ROWS; k++) {
    long long n = min(n0 + k, n_rows - 1);
    if (hd > 0) {
      long long b = n / t, ti = n - b * t;
      row_src[k] = x + (b * nh * t + ti) * hd;  // head h of this token at + h * t * hd
    } else {
      row_src[k] = x + n * in;
    }
    row_dst[k] = reinterpret_cast<Pack<T> *>(out + n * (long long)ld);
  }
  bool dots = mode != 2;
  for (int r0 = 0; r0 < R; r0 += 8) {
    int nr = min(8, R - r0);
    float acc[ROWS][8];
#pragma unroll
    for (int k = 0; k < ROWS; k++)
#pragma unroll
      for (int j = 0; j < 8; j++) acc[k][j] = 0.0f;
    if (r0 == 0 || dots) {
      for (int c = threadIdx.x; c < nv; c += blockDim.x) {
        long long off = (long long)c * V;
        if (hd > 0) {
          long long h = off / hd;
          off = h * t * hd + (off - h * hd);
        }
        Pack<T> xp[ROWS];
#pragma unroll
        for (int k = 0; k < ROWS; k++) {
          if (n0 + k < n_rows) {
            xp[k] = *reinterpret_cast<const Pack<T> *>(row_src[k] + off);
            if (r0 == 0) row_dst[k][c] = xp[k];
          }
        }
        if (dots)
#pragma unroll
          for (int j = 0; j < 8; j++) {
            if (j >= nr) break;
            Pack<T> a = reinterpret_cast<const Pack<T> *>(A + (long long)(r0 + j) * in)[c];
#pragma unroll
            for (int k = 0; k < ROWS; k++)
#pragma unroll
              for (int e = 0; e < V; e++) acc[k][j] += to_f(xp[k].v[e]) * to_f(a.v[e]);
          }
      }
    }
#pragma unroll
    for (int k = 0; k < ROWS; k++)
#pragma unroll
      for (int j = 0; j < 8; j++)
        for (int o = 16; o > 0; o >>= 1) acc[k][j] += __shfl_xor_sync(0xffffffff, acc[k][j], o);
    __syncthreads();
    if (lane == 0)
#pragma unroll
      for (int k = 0; k < ROWS; k++)
#pragma unroll
        for (int j = 0; j < 8; j++) shared[k * 8 + j][warp] = acc[k][j];
    __syncthreads();
    if (threadIdx.x < ROWS * 8) {
      int k = threadIdx.x / 8, j = threadIdx.x % 8;
      long long n = n0 + k;
      if (j < nr && n < n_rows) {
        float v = 0.0f;
        for (int w = 0; w < warps; w++) v += shared[threadIdx.x][w];
        int r = r0 + j;
        bool keep = mode == 0 || (mode == 1 && to_f(mask[(n / t) * R + r]) != 0.0f);
        out[n * (long long)ld + in + r] = from_f<T>(keep ? v : 0.0f);
      }
    }
  }
  for (int k = 0; k < ROWS; k++) {
    long long n = n0 + k;
    if (n < n_rows)
      for (int c = in + R + threadIdx.x; c < ld; c += blockDim.x) out[n * (long long)ld + c] = from_f<T>(0.0f);
  }
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
  extern "C" __global__ void swiglu_##SUFFIX(const T *gu, T *out, long long rows, long long m, const T *A,     \
                                             const T *mask, int R, int ld, int t, int mode) {               \
    swiglu<T>(gu, out, rows, m, Tail<T>{A, mask, R, ld, t, mode});                                          \
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
                                                   float eps, const T *A, const T *mask, int R, int ld, int t, \
                                                   int mode) {                                              \
    add_rms_norm<T>(x, a, w, sum, out, cols, eps, Tail<T>{A, mask, R, ld, t, mode});                        \
  }                                                                                                         \
  extern "C" __global__ void lora_input_##SUFFIX(const T *x, const T *A, const T *mask, T *out, int in, int R, \
                                                 int ld, int t, int mode, int hd) {                         \
    lora_input<T>(x, A, mask, out, in, R, ld, t, mode, hd);                                                 \
  }                                                                                                         \
  extern "C" __global__ void lora_input_packed_##SUFFIX(const T *x, const T *A, const T *mask, T *out,           \
                                                        long long n_rows, int in, int R, int ld, int t, int mode, \
                                                        int hd) {                                           \
    lora_input_packed<T, 2>(x, A, mask, out, n_rows, in, R, ld, t, mode, hd);                               \
  }                                                                                                         \
  extern "C" __global__ void target_logprob_##SUFFIX(const T *logits, const unsigned int *tgt, float *out, int v) { \
    target_logprob<T>(logits, tgt, out, v);                                                                 \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
