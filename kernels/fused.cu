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

// out[r, c] = silu(gu[r, c]) * gu[r, m + c] for gu [rows, 2m]: the SwiGLU of a fused gate/up
// projection, rounded like transformers' `up * act_fn(gate)` (silu rounded, then the product).
template <typename T>
__device__ void swiglu(const T *gu, T *out, long long rows, long long m) {
  long long n = rows * m;
  for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n; k += (long long)gridDim.x * blockDim.x) {
    long long r = k / m, c = k - r * m;
    float g = to_f(gu[r * 2 * m + c]);
    float s = round_t<T>(g / (1.0f + expf(-g)));
    out[k] = from_f<T>(s * to_f(gu[r * 2 * m + m + c]));
  }
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

// In place over attention scores x [B, H, T, S] (row-major, one block per row): scale, causal and
// left-padding mask, softmax accumulated in f32. Query i of row b sees keys pad[b] <= j <= offset + i;
// other keys get probability 0 (a query with no key, inside the padding, gets all zeros).
template <typename T>
__device__ void masked_softmax(T *x, const unsigned int *pad, int heads, int t, int s, int offset, float scale) {
  __shared__ float shared[32];
  long long row = blockIdx.x;
  int i = (int)(row % t);
  int b = (int)(row / ((long long)t * heads));
  int lo = (int)pad[b];
  int hi = min(offset + i + 1, s);
  T *xr = x + row * (long long)s;
  float mx = -INFINITY;
  for (int j = lo + threadIdx.x; j < hi; j += blockDim.x) mx = fmaxf(mx, round_t<T>(to_f(xr[j]) * scale));
  mx = block_reduce(mx, true, shared);
  float sum = 0.0f;
  for (int j = lo + threadIdx.x; j < hi; j += blockDim.x) sum += expf(round_t<T>(to_f(xr[j]) * scale) - mx);
  sum = block_reduce(sum, false, shared);
  float inv = hi > lo ? 1.0f / sum : 0.0f;
  for (int j = threadIdx.x; j < s; j += blockDim.x) {
    float p = (j >= lo && j < hi) ? expf(round_t<T>(to_f(xr[j]) * scale) - mx) * inv : 0.0f;
    xr[j] = from_f<T>(p);
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
  extern "C" __global__ void swiglu_##SUFFIX(const T *gu, T *out, long long rows, long long m) {           \
    swiglu<T>(gu, out, rows, m);                                                                            \
  }                                                                                                         \
  extern "C" __global__ void masked_softmax_##SUFFIX(T *x, const unsigned int *pad, int heads, int t, int s, \
                                                     int offset, float scale) {                             \
    masked_softmax<T>(x, pad, heads, t, s, offset, scale);                                                  \
  }                                                                                                         \
  extern "C" __global__ void qkv_rope_##SUFFIX(const T *qkv, const T *cos, const T *sin, T *out, int b, int t,  \
                                               int nh, int kvh, int d, int rd) {                            \
    qkv_rope<T>(qkv, cos, sin, out, b, t, nh, kvh, d, rd);                                                  \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
