// Helpers shared by the CUDA kernels (torch-free).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

// Launchers return cudaError_t; this macro returns early with the error so the binding can turn it
// into one clear exception (the kernels never abort the process).
#define ERNIE_CUDA_CHECK(expr)                \
  do {                                        \
    cudaError_t ernie_err_ = (expr);          \
    if (ernie_err_ != cudaSuccess) return ernie_err_; \
  } while (0)

namespace ernie_cuda {

__host__ __device__ inline int cdiv(int a, int b) { return (a + b - 1) / b; }

// 16-byte global -> shared copy that bypasses L1; src_bytes = 0 zero-fills (rows past the end).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ float warp_max_quad(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float warp_sum_quad(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace ernie_cuda
