// Row-wise and element-wise CPU kernels (torch-free): RMSNorm, SwiGLU, interleaved RoPE, and the
// softmax cross-entropy of one chunk of logits. fp32 math for every dtype; OpenMP over rows.
// Tensors are 2-D [rows, cols] views with a row stride (elements) and contiguous rows.
#pragma once

#include <cstdint>

#include "common.h"

namespace ernie_cpu {

// y = w * cast_x(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps) (docs/behaviour.md#model: the normalised
// x is cast back to x's dtype before the weight multiply, like HF Ernie 4.5).
// y/dy dtype: x's when x and w share a dtype, else fp32 (torch type promotion); dx: x's; dw: w's.
struct RmsNormParams {
  DType x_dtype = DType::kFloat32, w_dtype = DType::kFloat32;
  int64_t rows = 0, cols = 0;
  const void* x = nullptr;
  int64_t x_row_stride = 0;
  const void* w = nullptr;
  void* y = nullptr;
  int64_t y_row_stride = 0;
  float* rstd = nullptr;  // [rows]
  float eps = 1e-6f;
  const void* dy = nullptr;
  int64_t dy_row_stride = 0;
  void* dx = nullptr;  // [rows, cols] contiguous
  void* dw = nullptr;  // [cols]
  int num_threads = 1;
};
void rms_norm_fwd(const RmsNormParams& p);
void rms_norm_bwd(const RmsNormParams& p);

// y = silu(g) * u; backward dg = dy * u * sig(g) * (1 + g * (1 - sig(g))), du = dy * silu(g).
struct SwigluParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, cols = 0;
  const void* g = nullptr;
  const void* u = nullptr;
  int64_t g_row_stride = 0, u_row_stride = 0;
  void* y = nullptr;  // contiguous outputs from here on
  int64_t y_row_stride = 0;
  const void* dy = nullptr;
  int64_t dy_row_stride = 0;
  void* dg = nullptr;
  void* du = nullptr;
  int num_threads = 1;
};
void swiglu_fwd(const SwigluParams& p);
void swiglu_bwd(const SwigluParams& p);

// Interleaved-pair rotary embedding of up to two tensors sharing position ids (q and k):
// (x[2i], x[2i+1]) -> (x0 c - x1 s, x0 s + x1 c), angle = float(pos) * inv_freq[i] in fp32.
// inverse = true rotates by -angle (the backward: the rotation's transpose).
struct RopeTensor {
  const void* x = nullptr;
  void* y = nullptr;
  int H = 0;
  int64_t x_stride[3] = {}, y_stride[3] = {};  // batch, seq, head
};
struct RopeParams {
  DType dtype = DType::kFloat32;
  int B = 0, S = 0, D = 0;
  const int64_t* pos = nullptr;
  int64_t pos_stride[2] = {};
  const float* inv_freq = nullptr;  // [D / 2]
  bool inverse = false;
  RopeTensor t[2];
  int n_tensors = 1;
  int num_threads = 1;
};
void rope(const RopeParams& p);

// Cross-entropy of a chunk of logits [rows, vocab] (row stride ld), in place: loss[r] =
// logsumexp(x_r) - x_r[label_r] (0 where label == ignore_index) and, when write_grad, the logits
// are replaced by d loss_r / d x_r = softmax(x_r) - onehot(label_r) (zeros for ignored rows).
struct CrossEntropyParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, vocab = 0, ld = 0;
  void* logits = nullptr;
  const int64_t* labels = nullptr;
  int64_t ignore_index = -100;
  float* loss = nullptr;  // [rows]
  bool write_grad = true;
  int num_threads = 1;
};
// Returns -1 when fine, else the first row whose label is outside [0, vocab) and not ignored.
int64_t cross_entropy_chunk(const CrossEntropyParams& p);

}  // namespace ernie_cpu
