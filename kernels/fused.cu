// Fused kernels for the CUDA build (compiled to PTX by build.rs, loaded by src/model/cuda_ops.rs).
// Each replaces a chain of candle ops that would make several passes over a large tensor.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

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
// One block per row (no per-element division); 16-byte loads when m allows. In bf16/f16 the sigmoid
// takes the fast exp and division (a few f32 ulps, far below the rounding to 16 bits that follows; the
// 9B benchmark's outputs are bit-identical): 12% less time than with the IEEE ones on an H200.
template <typename T>
__device__ __forceinline__ T swiglu_one(T g, T u) {
  float x = to_f(g);
  float silu = sizeof(T) == 2 ? __fdividef(x, 1.0f + __expf(-x)) : x / (1.0f + expf(-x));
  return from_f<T>(round_t<T>(silu) * to_f(u));
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

// out[r, :] = src[idx[r], :] for src [R, cols] (rows of a hidden-state or weight matrix). candle's
// index_select uploads its index layout from host memory at every call, and such a copy waits for
// everything queued before it: this one reads only device memory. One block per output row.
template <typename T>
__device__ void gather_rows(const T *src, const unsigned int *idx, T *out, long long n, long long cols) {
  constexpr int V = Pack<T>::N;
  for (long long r = blockIdx.x; r < n; r += gridDim.x) {
    const T *s = src + (long long)idx[r] * cols;
    T *o = out + r * cols;
    if (cols % V == 0) {
      for (long long c = threadIdx.x; c < cols / V; c += blockDim.x)
        reinterpret_cast<Pack<T> *>(o)[c] = reinterpret_cast<const Pack<T> *>(s)[c];
    } else {
      for (long long c = threadIdx.x; c < cols; c += blockDim.x) o[c] = s[c];
    }
  }
}

// Splits a fused q/k/v projection qkv [B, T, (nh + 2·kvh)·D] into heads-first q [B, nh, T, D],
// k and v [B, kvh, T, D] (written one after the other to `out`), applying interleaved RoPE to the
// first `rd` dims of every q and k head with cos/sin [B, T, rd/2]. Rounded after every product and
// sum, as candle's rope_i and transformers' bf16 rotary code are. One block per token (grid-stride),
// 32-bit index arithmetic: 64-bit divisions per element made this kernel compute-bound.
template <typename T> struct alignas(2 * sizeof(T)) Two { T a, b; };
template <typename T> __device__ __forceinline__ void rope_pair(T &a, T &b, T cos, T sin) {
  float x0 = to_f(a), x1 = to_f(b), c = to_f(cos), s = to_f(sin);
  a = from_f<T>(round_t<T>(x0 * c) - round_t<T>(x1 * s));
  b = from_f<T>(round_t<T>(x0 * s) + round_t<T>(x1 * c));
}
template <typename T>
__device__ void qkv_rope(const T *qkv, const T *cos, const T *sin, T *out, int b, int t, int nh, int kvh, int d, int rd) {
  const int heads = nh + 2 * kvh, half = d / 2, rh = rd / 2;
  const long long q_len = (long long)b * nh * t * d, kv_len = (long long)b * kvh * t * d;
  for (long long bt = blockIdx.x; bt < (long long)b * t; bt += gridDim.x) {
    const int bi = (int)(bt / t), ti = (int)(bt - (long long)bi * t);
    const Two<T> *src = reinterpret_cast<const Two<T> *>(qkv + bt * heads * d);
    const T *cr = cos + bt * rh, *sr = sin + bt * rh;
    // 16-byte chunks of P pairs (one head each) when the head and rotary sizes allow, else pairs.
    constexpr int P = Pack<T>::N / 2;
    const int w = (half % P == 0 && rh % P == 0 && reinterpret_cast<uintptr_t>(qkv) % 16 == 0) ? P : 1;
    for (int k = threadIdx.x * w; k < heads * half; k += blockDim.x * w) {
      const int h = k / half, p = k - h * half;
      T *dst;
      if (h < nh) {
        dst = out + (((long long)bi * nh + h) * t + ti) * d;
      } else if (h < nh + kvh) {
        dst = out + q_len + (((long long)bi * kvh + (h - nh)) * t + ti) * d;
      } else {
        dst = out + q_len + kv_len + (((long long)bi * kvh + (h - nh - kvh)) * t + ti) * d;
      }
      const bool rot = h < nh + kvh && p < rh;
      if (w == P) {
        Pack<T> x = reinterpret_cast<const Pack<T> *>(src + k)[0];
        if (rot)
#pragma unroll
          for (int e = 0; e < P; e++) rope_pair(x.v[2 * e], x.v[2 * e + 1], cr[p + e], sr[p + e]);
        reinterpret_cast<Pack<T> *>(dst)[p / P] = x;
      } else {
        Two<T> x = src[k];
        if (rot) rope_pair(x.a, x.b, cr[p], sr[p]);
        reinterpret_cast<Two<T> *>(dst)[p] = x;
      }
    }
  }
}

// Flash attention: softmax(scale · q·kᵀ + mask)·v without writing the scores, tensor cores through
// mma.sync m16n8k16 (bf16/f16 in, f32 accumulators); sm_80 and newer.
// q [B, nh, t, D] contiguous; k, v [B, kvh, s, D] with rows of D and heads kv_hs elements apart (a
// KV-cache view); query i (position s - t + i) of batch row b sees keys pad[b] <= j <= s - t + i.
// Scores and softmax in f32 (online: running max and sum; probabilities to T for the p·v product), as
// fused attention kernels do (the eager path rounds the scores to T first), output to T. Output rows
// out[(b·t + i)·ld + h·D + d] (the o projection's input, heads merged), zeros in columns [nh·D, ld)
// (its LoRA columns, see zero_tail).
// Grid (nh / pk, B, ceil(pk·t / 64)), 128 threads: the block's rows are the queries of pk heads one
// after the other (pk = 1 for prefill; for decoding, t = 1, the heads sharing a key/value head, which
// then is read once for all of them); warp w takes rows 16w..16w+15 of the block's 64.
// Key/value tiles of 64 rows go to shared memory by cp.async, the values' copy overlapping q·kᵀ and
// the next keys' copy overlapping p·v; fragments come out of shared memory by ldmatrix.
template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Two values of T in one 32-bit register (the first in the low half), as mma.sync takes them.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // one cvt for both
  return *reinterpret_cast<uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}

// Four 8×8 matrices of 16-bit values from shared memory (lane l gives the address of row l % 8 of
// matrix l / 8); `.trans` hands each lane a column pair instead of a row pair.
__device__ __forceinline__ void ldsm_x4(uint32_t *r, const void *p) {
  unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void ldsm_x2(uint32_t *r, const void *p) {
  unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t *r, const void *p) {
  unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void cp_async16(void *dst, const void *src) {
  unsigned a = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(a), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// Rows j0..j0+R-1 of a [s, D] key or value head into tile[R][SP] (asynchronously); rows past s are zeros.
// NTH threads (the block's size, a compile-time constant); UNROLL rounds at a time: unrolled the
// copies go out back to back (prefill), but their addresses take registers, which decoding (bound by
// memory, needing its blocks per SM) cannot spare: unrolled there it took 158 registers and ran 20%
// slower. Offsets within the head in 32 bits (s·D < 2^31): one address computation per tile, not per row.
template <typename T, int D, int R, int SP, int NTH = 128, int UNROLL = R * D / 8 / NTH>
__device__ __forceinline__ void load_tile(T *tile, const T *head, int j0, int s) {
  static_assert((R * D / 8) % NTH == 0, "whole rounds of 16-byte copies");
  constexpr int STEP = NTH / (D / 8);  // rows apart from one round to the next
  const int r0 = threadIdx.x / (D / 8), c = (threadIdx.x % (D / 8)) * 8;
  T *dst = tile + r0 * SP + c;
  const T *src = head + ((j0 + r0) * D + c);
  if (j0 + R <= s) {
#pragma unroll UNROLL
    for (int i = 0; i < R * D / 8 / NTH; i++) cp_async16(dst + i * STEP * SP, src + i * STEP * D);
  } else {
#pragma unroll UNROLL
    for (int i = 0; i < R * D / 8 / NTH; i++) {
      if (j0 + r0 + i * STEP < s) cp_async16(dst + i * STEP * SP, src + i * STEP * D);
      else *reinterpret_cast<uint4 *>(dst + i * STEP * SP) = make_uint4(0, 0, 0, 0);
    }
  }
  cp_async_commit();
}

// 2^x by the special function unit alone (flushing subnormal results to 0, which no softmax sum or
// p·v product of magnitude ≥ 1 can see); exp2f adds a range check and two multiplies around it.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// This thread's part of 16 query rows (its rows g and g + 8: head hd[r], query qi[r], zeros where not
// valid) as the A fragments of q·kᵀ, row-major 16×16 per k step.
template <typename T, int D>
__device__ __forceinline__ void load_q(uint32_t (&qa)[D / 16][4], const T *q, int b, int nh, int t, const int *hd,
                                       const int *qi, const bool *valid, int tq) {
#pragma unroll
  for (int kk = 0; kk < D / 16; kk++)
#pragma unroll
    for (int r = 0; r < 4; r++) {
      int c = kk * 16 + tq * 2 + (r >> 1) * 8;
      const T *qr = q + (((long long)b * nh + hd[r & 1]) * t + qi[r & 1]) * D + c;
      qa[kk][r] = valid[r & 1] ? *reinterpret_cast<const uint32_t *>(qr) : 0u;
    }
}

// sc = scores of those 16 rows against the 8 keys of one n tile in shared memory (kr: this lane's
// ldmatrix address), one 16×8 accumulator.
template <typename T, int KS>
__device__ __forceinline__ void qk_ntile(float *sc, const uint32_t (&qa)[KS][4], const T *kr) {
  if constexpr (KS == 1) {
    uint32_t kb[2];
    ldsm_x2(kb, kr);
    Mma<T>::run(sc, qa[0], kb[0], kb[1]);
  } else {
#pragma unroll
    for (int kk = 0; kk < KS; kk += 2) {
      uint32_t kb[4];  // b0, b1 of k steps kk and kk + 1
      ldsm_x4(kb, kr + kk * 16);
      Mma<T>::run(sc, qa[kk], kb[0], kb[1]);
      Mma<T>::run(sc, qa[kk + 1], kb[2], kb[3]);
    }
  }
}

template <typename T, int D>
__device__ void flash_attn(const T *q, const T *k, const T *v, const unsigned int *pad, T *out, int nh, int kvh,
                           int t, int s, long long kv_hs, int ld, float scale, int pk) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int BR = 64, BC = 64, KS = D / 16, ND = D / 8, NT = BC / 8, SP = D + 8;
  __shared__ __align__(16) T ks[BC * SP];
  __shared__ __align__(16) T vs[BC * SP];
  // Query tiles in reverse launch order: the causal mask makes late tiles the longest, and starting
  // them first leaves short blocks for the last wave.
  const int b = blockIdx.y, q0 = (gridDim.z - 1 - blockIdx.z) * BR, rows = pk * t;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int offset = s - t, lo = (int)pad[b];
  const float scale_log2 = scale * 1.4426950408889634f;  // exp(scale·x) = 2^(x·scale·log2 e)
  const int kv = blockIdx.x * pk / (nh / kvh);
  const T *kh = k + ((long long)b * kvh + kv) * kv_hs;
  const T *vh = v + ((long long)b * kvh + kv) * kv_hs;
  // This thread's two rows (g, g + 8 of the warp's 16): head hd[r], query qi[r]; valid when < rows.
  bool valid[2];
  int hd[2], qi[2];
#pragma unroll
  for (int r = 0; r < 2; r++) {
    int R = q0 + warp * 16 + g + r * 8;
    valid[r] = R < rows;
    hd[r] = blockIdx.x * pk + (valid[r] ? R / t : 0);
    qi[r] = valid[r] ? R % t : 0;
  }
  // The query range of a span of rows: exact within one head, all of [0, t) across heads.
  auto span = [&](int r0, int r1, int &first, int &last) {
    r1 = min(r1, rows - 1);
    if (r0 > r1) first = 1, last = 0;
    else if (r0 / t == r1 / t) first = r0 % t, last = r1 % t;
    else first = 0, last = t - 1;
  };
  // This thread's part of the warp's 16 query rows, as A fragments (row-major 16×16 per k step).
  uint32_t qa[KS][4];
  load_q<T, D>(qa, q, b, nh, t, hd, qi, valid, tq);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[ND][4];
#pragma unroll
  for (int n = 0; n < ND; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  int first, last, warp_first, warp_last;  // query ranges of the block and of this warp
  span(q0, q0 + BR - 1, first, last);
  span(q0 + warp * 16, q0 + warp * 16 + 15, warp_first, warp_last);
  const int j_end = min(offset + last + 1, s);  // keys past this are seen by no row of the block
  const int j_begin = (lo / BC) * BC;
  if (j_begin < j_end) load_tile<T, D, BC, SP>(ks, kh, j_begin, s);
  for (int j0 = j_begin; j0 < j_end; j0 += BC) {
    load_tile<T, D, BC, SP>(vs, vh, j0, s);  // vs is free: the previous p·v ended with a barrier
    cp_async_wait<1>();                      // this thread's key copies landed...
    __syncthreads();                         // ...and everyone's
    const bool active = warp_last >= warp_first && j0 <= offset + warp_last;  // a row of the warp sees the tile
    uint32_t pa[BC / 16][4];
    float alpha[2] = {1.0f, 1.0f};
    if (active) {
      // Scores of this warp's 16 rows against the tile's 64 keys: NT accumulators of 16×8.
      float sc[NT][4];
#pragma unroll
      for (int n = 0; n < NT; n++) {
        sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
        qk_ntile<T, KS>(sc[n], qa, ks + (n * 8 + (lane & 7)) * SP + (lane >> 3) * 8);
      }
      // Mask, where some row of the warp does not see some key of the tile (causal diagonal, padding,
      // the end of the keys, rows past the queries); the tile's row maxima. Most tiles need no mask:
      // a separate loop for them keeps its ~300 compares and selects off the issue slots.
      const bool full = j0 >= lo && j0 + BC <= s && j0 + BC - 1 <= offset + warp_first;
      float tmax[2] = {-INFINITY, -INFINITY};
      if (full) {
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
          for (int e = 0; e < 4; e++) tmax[e >> 1] = fmaxf(tmax[e >> 1], sc[n][e]);
      } else {
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
          for (int e = 0; e < 4; e++) {
            int i = qi[e >> 1], j = j0 + n * 8 + tq * 2 + (e & 1);
            if (!(valid[e >> 1] && j < s && j >= lo && j <= offset + i)) sc[n][e] = -INFINITY;
            tmax[e >> 1] = fmaxf(tmax[e >> 1], sc[n][e]);
          }
      }
#pragma unroll
      for (int r = 0; r < 2; r++) {
        tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffff, tmax[r], 1));
        tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffff, tmax[r], 2));
      }
      // exp(scale·(x - max)) as one FFMA and ex2; a row with no key seen yet keeps max -inf and p = 0.
      float ms[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
      for (int r = 0; r < 2; r++) {
        float mn = fmaxf(m[r], tmax[r]);
        alpha[r] = mn == -INFINITY ? 1.0f : ex2((m[r] - mn) * scale_log2);
        m[r] = mn;
        ms[r] = mn == -INFINITY ? 0.0f : mn * scale_log2;
      }
      // Probabilities relative to the running max, packed as the A fragments of p·v (k16 = two n8 tiles).
#pragma unroll
      for (int n = 0; n < NT; n++) {
        float p[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
          p[e] = ex2(fmaf(sc[n][e], scale_log2, -ms[e >> 1]));
          sum[e >> 1] += p[e];
        }
        pa[n >> 1][(n & 1) * 2 + 0] = pack2<T>(p[0], p[1]);
        pa[n >> 1][(n & 1) * 2 + 1] = pack2<T>(p[2], p[3]);
      }
#pragma unroll
      for (int r = 0; r < 2; r++) {
        sum[r] += __shfl_xor_sync(0xffffffff, sum[r], 1);
        sum[r] += __shfl_xor_sync(0xffffffff, sum[r], 2);
        l[r] = l[r] * alpha[r] + sum[r];
      }
    }
    cp_async_wait<0>();  // the values landed...
    __syncthreads();     // ...everyone's, and nobody reads ks any more
    if (j0 + BC < j_end) load_tile<T, D, BC, SP>(ks, kh, j0 + BC, s);
    if (active) {
#pragma unroll
      for (int n = 0; n < ND; n++) {
        o[n][0] *= alpha[0];
        o[n][1] *= alpha[0];
        o[n][2] *= alpha[1];
        o[n][3] *= alpha[1];
      }
      // o += p·v: B fragments of two n8 tiles per ldmatrix.trans (keys kk·16 + 0..7 and + 8..15).
#pragma unroll
      for (int kk = 0; kk < BC / 16; kk++) {
        const T *vr = vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SP + (lane >> 4) * 8;
#pragma unroll
        for (int n = 0; n < ND; n += 2) {
          uint32_t vb[4];  // b0, b1 of n tile n, then of n + 1
          ldsm_x4_t(vb, vr + n * 8);
          Mma<T>::run(o[n], pa[kk], vb[0], vb[1]);
          Mma<T>::run(o[n + 1], pa[kk], vb[2], vb[3]);
        }
      }
    }
    __syncthreads();  // vs is read by everyone before the next tile's copy
  }
  // Normalise and write the heads-merged rows.
#pragma unroll
  for (int r = 0; r < 2; r++) {
    if (!valid[r]) continue;
    float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    T *dst = out + ((long long)b * t + qi[r]) * ld + hd[r] * D + tq * 2;
#pragma unroll
    for (int n = 0; n < ND; n++)
      *reinterpret_cast<uint32_t *>(dst + n * 8) = pack2<T>(o[n][r * 2] * inv, o[n][r * 2 + 1] * inv);
  }
  // The rows of head 0 (rows [0, t) of blockIdx.x 0) also write the token rows' zero tails.
  if (blockIdx.x == 0)
    for (int R = q0 + warp * 16; R < min(q0 + warp * 16 + 16, t); R++)
      for (int c = nh * D + lane; c < ld; c += 32) out[((long long)b * t + R) * ld + c] = from_f<T>(0.0f);
#else
  __trap();  // compiled for an older GPU: cuda_ops::flash_fits keeps this kernel from being launched
#endif
}

// Decoding (pk·t <= 16 query rows, e.g. the 16 query heads of a key/value head at t = 1): one warp's
// worth of rows, so instead of one busy warp the four warps split each 64-key tile, 16 keys each,
// with their own running max, sum and output; the four partial results are merged through shared
// memory at the end (flash-decoding inside a block). Same arguments and grid as flash_attn.
template <typename T, int D>
__device__ void flash_decode(const T *q, const T *k, const T *v, const unsigned int *pad, T *out, int nh, int kvh,
                             int t, int s, long long kv_hs, int ld, float scale, int pk) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int BC = 64, KS = D / 16, ND = D / 8, SP = D + 8, W = 4;
  // Key and value tiles, then (after the loop) the warps' partial outputs [W][16][D] and m, l [W][16].
  static_assert(2 * BC * SP * sizeof(T) >= (W * 16 * D + 2 * W * 16) * sizeof(float), "merge buffer");
  __shared__ __align__(16) T kvs[2 * BC * SP];
  T *ks = kvs, *vs = kvs + BC * SP;
  const int b = blockIdx.y, rows = pk * t;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int offset = s - t, lo = (int)pad[b];
  const float scale_log2 = scale * 1.4426950408889634f;
  const int kv = blockIdx.x * pk / (nh / kvh);
  const T *kh = k + ((long long)b * kvh + kv) * kv_hs;
  const T *vh = v + ((long long)b * kvh + kv) * kv_hs;
  bool valid[2];
  int hd[2], qi[2];
#pragma unroll
  for (int r = 0; r < 2; r++) {
    int R = g + r * 8;
    valid[r] = R < rows;
    hd[r] = blockIdx.x * pk + (valid[r] ? R / t : 0);
    qi[r] = valid[r] ? R % t : 0;
  }
  uint32_t qa[KS][4];
  load_q<T, D>(qa, q, b, nh, t, hd, qi, valid, tq);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[ND][4];
#pragma unroll
  for (int n = 0; n < ND; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  // The rows' query indices run from 0 to `last` (one head: rows - 1; several heads: t - 1).
  const int last = rows <= t ? rows - 1 : t - 1;
  const int j_end = min(offset + last + 1, s);
  for (int j0 = (lo / BC) * BC; j0 < j_end; j0 += BC) {
    load_tile<T, D, BC, SP, 128, 1>(ks, kh, j0, s);
    load_tile<T, D, BC, SP, 128, 1>(vs, vh, j0, s);
    cp_async_wait<0>();
    __syncthreads();
    // This warp's 16 keys of the tile: n tiles 2·warp and 2·warp + 1.
    float sc[2][4];
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int n = 2 * warp + h;
      sc[h][0] = sc[h][1] = sc[h][2] = sc[h][3] = 0.0f;
      qk_ntile<T, KS>(sc[h], qa, ks + (n * 8 + (lane & 7)) * SP + (lane >> 3) * 8);
    }
    const int jw = j0 + warp * 16;
    const bool full = jw >= lo && jw + 16 <= s && jw + 15 <= offset;  // every row sees all 16 keys
    float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        int i = qi[e >> 1], j = jw + h * 8 + tq * 2 + (e & 1);
        if (!full && !(valid[e >> 1] && j < s && j >= lo && j <= offset + i)) sc[h][e] = -INFINITY;
        tmax[e >> 1] = fmaxf(tmax[e >> 1], sc[h][e]);
      }
    float alpha[2], ms[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; r++) {
      tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffff, tmax[r], 1));
      tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffff, tmax[r], 2));
      float mn = fmaxf(m[r], tmax[r]);
      alpha[r] = mn == -INFINITY ? 1.0f : ex2((m[r] - mn) * scale_log2);
      m[r] = mn;
      ms[r] = mn == -INFINITY ? 0.0f : mn * scale_log2;
    }
    uint32_t pa[4];
#pragma unroll
    for (int h = 0; h < 2; h++) {
      float p[4];
#pragma unroll
      for (int e = 0; e < 4; e++) {
        p[e] = ex2(fmaf(sc[h][e], scale_log2, -ms[e >> 1]));
        sum[e >> 1] += p[e];
      }
      pa[h * 2 + 0] = pack2<T>(p[0], p[1]);
      pa[h * 2 + 1] = pack2<T>(p[2], p[3]);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
      sum[r] += __shfl_xor_sync(0xffffffff, sum[r], 1);
      sum[r] += __shfl_xor_sync(0xffffffff, sum[r], 2);
      l[r] = l[r] * alpha[r] + sum[r];
    }
#pragma unroll
    for (int n = 0; n < ND; n++) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }
    // o += p·v over this warp's 16 keys (one k16 step).
    const T *vr = vs + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SP + (lane >> 4) * 8;
#pragma unroll
    for (int n = 0; n < ND; n += 2) {
      uint32_t vb[4];
      ldsm_x4_t(vb, vr + n * 8);
      Mma<T>::run(o[n], pa, vb[0], vb[1]);
      Mma<T>::run(o[n + 1], pa, vb[2], vb[3]);
    }
    __syncthreads();  // the tiles are read by everyone before the next copies
  }
  // Merge the warps: out = Σ_w 2^((m_w − M)·c) o_w / Σ_w 2^((m_w − M)·c) l_w.
  float *ow = reinterpret_cast<float *>(kvs), *mw = ow + W * 16 * D, *lw = mw + W * 16;
#pragma unroll
  for (int r = 0; r < 2; r++) {
    const int row = g + r * 8;
    if (tq == 0) mw[warp * 16 + row] = m[r], lw[warp * 16 + row] = l[r];
#pragma unroll
    for (int n = 0; n < ND; n++) {
      ow[(warp * 16 + row) * D + n * 8 + tq * 2] = o[n][r * 2];
      ow[(warp * 16 + row) * D + n * 8 + tq * 2 + 1] = o[n][r * 2 + 1];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < min(rows, 16) * (D / 2); idx += blockDim.x) {
    const int row = idx / (D / 2), c = (idx % (D / 2)) * 2;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < W; w++) mx = fmaxf(mx, mw[w * 16 + row]);
    float lsum = 0.0f, o0 = 0.0f, o1 = 0.0f;
#pragma unroll
    for (int w = 0; w < W; w++) {
      const float mv = mw[w * 16 + row];
      const float f = mv == -INFINITY ? 0.0f : ex2((mv - mx) * scale_log2);
      lsum += f * lw[w * 16 + row];
      o0 += f * ow[(w * 16 + row) * D + c];
      o1 += f * ow[(w * 16 + row) * D + c + 1];
    }
    const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
    const int h = blockIdx.x * pk + row / t, i = row % t;
    *reinterpret_cast<uint32_t *>(out + ((long long)b * t + i) * ld + h * D + c) = pack2<T>(o0 * inv, o1 * inv);
  }
  if (blockIdx.x == 0)
    for (int R = 0; R < min(16, t); R++)
      for (int c = nh * D + threadIdx.x; c < ld; c += blockDim.x) out[((long long)b * t + R) * ld + c] = from_f<T>(0.0f);
#else
  __trap();
#endif
}

// Three blocks per SM (168 registers, a few bytes spilled): ~9% faster than two on the 9B shape.
#define FLASH(T, SUFFIX, D)                                                                                     \
  extern "C" __global__ void __launch_bounds__(128, 3)                                                          \
      flash_attn_##SUFFIX##_##D(const T *q, const T *k, const T *v, const unsigned int *pad, T *out, int nh,    \
                                int kvh, int t, int s, long long kv_hs, int ld, float scale, int pk) {          \
    flash_attn<T, D>(q, k, v, pad, out, nh, kvh, t, s, kv_hs, ld, scale, pk);                                   \
  }
// Four blocks per SM (128 registers, a few bytes spilled): decoding reads keys and values at the
// memory's rate only with enough blocks in flight.
#define FLASH_DECODE(T, SUFFIX, D)                                                                              \
  extern "C" __global__ void __launch_bounds__(128, 4)                                                          \
      flash_decode_##SUFFIX##_##D(const T *q, const T *k, const T *v, const unsigned int *pad, T *out, int nh,  \
                                  int kvh, int t, int s, long long kv_hs, int ld, float scale, int pk) {        \
    flash_decode<T, D>(q, k, v, pad, out, nh, kvh, t, s, kv_hs, ld, scale, pk);                                 \
  }
FLASH_DECODE(__nv_bfloat16, bf16, 16)
FLASH_DECODE(__nv_bfloat16, bf16, 32)
FLASH_DECODE(__nv_bfloat16, bf16, 64)
FLASH_DECODE(__nv_bfloat16, bf16, 128)
FLASH_DECODE(__half, f16, 16)
FLASH_DECODE(__half, f16, 32)
FLASH_DECODE(__half, f16, 64)
FLASH_DECODE(__half, f16, 128)
FLASH(__nv_bfloat16, bf16, 16)
FLASH(__nv_bfloat16, bf16, 32)
FLASH(__nv_bfloat16, bf16, 64)
FLASH(__nv_bfloat16, bf16, 128)
FLASH(__half, f16, 16)
FLASH(__half, f16, 32)
FLASH(__half, f16, 64)
FLASH(__half, f16, 128)

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
  extern "C" __global__ void gather_rows_##SUFFIX(const T *src, const unsigned int *idx, T *out, long long n,  \
                                                 long long cols) {                                          \
    gather_rows<T>(src, idx, out, n, cols);                                                                 \
  }                                                                                                         \
  extern "C" __global__ void target_logprob_##SUFFIX(const T *logits, const unsigned int *tgt, float *out, int v) { \
    target_logprob<T>(logits, tgt, out, v);                                                                 \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
