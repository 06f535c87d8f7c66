// Helpers shared by the binding files: tensor -> params-struct conversion and input checks.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "cpu/common.h"

namespace ernie_bind {

inline ernie_cpu::DType kernel_dtype(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kFloat) return ernie_cpu::DType::kFloat32;
  if (t.scalar_type() == at::kBFloat16) return ernie_cpu::DType::kBFloat16;
  TORCH_CHECK(false, "ernie_core: ", name, " must be float32 or bfloat16 for the CPU kernel, got ", t.scalar_type(),
              " (cast it, or use ERNIE_CORE_BACKEND=reference)");
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "ernie_core: ", name, " must be a CPU tensor for the CPU kernel, got ", t.device());
}

// The kernels take any outer strides but need the last dim contiguous.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.dim() == 0 || t.stride(-1) == 1 ? t : t.contiguous();
}

inline void strides3(const at::Tensor& t, int64_t* s) {
  for (int i = 0; i < 3; ++i) s[i] = t.stride(i);
}

inline int num_threads() { return at::get_num_threads(); }

}  // namespace ernie_bind
