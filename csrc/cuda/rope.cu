// RoPE on CUDA: one thread per (batch, position, pair), looping over heads so that each angle's
// sine and cosine are computed once. The angle is the reference's fp32 product; sin/cos run in
// double precision because the extension builds with --use_fast_math, whose single-precision sinf
// is inaccurate for angles of tens of thousands of radians (positions up to 32K x inv_freq 1).
#include <cuda_bf16.h>

#include "common.cuh"
#include "pointwise.h"

namespace ernie_cuda {
namespace {

template <class T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f(float x) { return x; }
template <>
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16(x); }

template <class T>
__global__ void rope_kernel(const RopeParams p) {
  const int half = p.D / 2;
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= int64_t(p.B) * p.S * half) return;
  const int i = int(t % half), s = int(t / half % p.S), b = int(t / half / p.S);
  const float angle = float(p.pos[b * p.pos_stride[0] + s * p.pos_stride[1]]) * p.inv_freq[i];
  double sd, cd;
  sincos(double(angle), &sd, &cd);
  const float c = float(cd), sn = p.inverse ? -float(sd) : float(sd);
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride[0] + s * p.x_stride[1] + 2 * i;
  T* y = static_cast<T*>(p.y) + b * p.y_stride[0] + s * p.y_stride[1] + 2 * i;
  for (int h = 0; h < p.H; ++h) {
    const float x1 = to_f(x[h * p.x_stride[2]]), x2 = to_f(x[h * p.x_stride[2] + 1]);
    y[h * p.y_stride[2]] = from_f<T>(x1 * c - x2 * sn);
    y[h * p.y_stride[2] + 1] = from_f<T>(x1 * sn + x2 * c);
  }
}

}  // namespace

cudaError_t rope(const RopeParams& p, cudaStream_t stream) {
  const int64_t n = int64_t(p.B) * p.S * (p.D / 2);
  if (n == 0) return cudaSuccess;
  const unsigned blocks = unsigned((n + 255) / 256);
  if (p.dtype == DType::kBFloat16) rope_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(p);
  else rope_kernel<float><<<blocks, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace ernie_cuda
