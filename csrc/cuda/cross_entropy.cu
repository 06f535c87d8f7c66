// Cross-entropy rows of the fused LM head on CUDA: one 256-thread block per token row. Pass 1 keeps
// a per-thread running max and rescaled sum of exp (fp32), merged across the block; pass 2 writes
// softmax - onehot over the logits. The GEMMs around it (logits = h W^T, dh, dW) are cuBLAS calls
// made by the binding, per chunk of tokens, so the [N, V] logits never exist at once.
#include <cuda_bf16.h>

#include "common.cuh"
#include "pointwise.h"

namespace ernie_cuda {
namespace {

constexpr int kThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;

template <class T>
__device__ __forceinline__ float load_f(const T* p);
template <>
__device__ __forceinline__ float load_f(const float* p) { return *p; }
template <>
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }

// Merge (max, sum of exp2(x - max)) pairs; -inf maxima carry no mass.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;
  s = s * exp2f(m - mn) + s2 * exp2f(m2 - mn);
  m = mn;
}

template <class T>
__global__ void __launch_bounds__(kThreads) ce_rows_kernel(const CeRowsParams p) {
  const int64_t row = blockIdx.x;
  T* x = static_cast<T*>(p.logits) + row * p.row_stride;
  const int64_t label = p.labels[row];
  if (label == p.ignore_index) {
    for (int64_t c = threadIdx.x; c < p.V; c += kThreads) store_f(x + c, 0.f);
    if (threadIdx.x == 0) p.loss[row] = 0.f;
    return;
  }
  float m = -INFINITY, s = 0.f;  // in log2 units
  for (int64_t c = threadIdx.x; c < p.V; c += kThreads) merge(m, s, load_f(x + c) * kLog2e, 1.f);
  for (int o = 16; o > 0; o /= 2) merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
  __shared__ float sm_m[kThreads / 32], sm_s[kThreads / 32], sm_lse2;
  if (threadIdx.x % 32 == 0) sm_m[threadIdx.x / 32] = m, sm_s[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float mm = sm_m[0], ss = sm_s[0];
    for (int w = 1; w < kThreads / 32; ++w) merge(mm, ss, sm_m[w], sm_s[w]);
    sm_lse2 = mm + log2f(ss);
    p.loss[row] = sm_lse2 / kLog2e - load_f(x + label);
  }
  __syncthreads();
  const float lse2 = sm_lse2;
  for (int64_t c = threadIdx.x; c < p.V; c += kThreads)
    store_f(x + c, exp2f(load_f(x + c) * kLog2e - lse2) - (c == label ? 1.f : 0.f));
}

}  // namespace

cudaError_t ce_rows(const CeRowsParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.dtype == DType::kBFloat16) ce_rows_kernel<__nv_bfloat16><<<unsigned(p.rows), kThreads, 0, stream>>>(p);
  else ce_rows_kernel<float><<<unsigned(p.rows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace ernie_cuda
