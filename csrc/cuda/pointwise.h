// RoPE and the cross-entropy row kernel of the fused LM head on CUDA (torch-free).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ernie_cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1 };

// Interleaved-pair rotary embedding: y[..., 2i], y[..., 2i+1] = rotate(x pair, pos * inv_freq[i]).
struct RopeParams {
  DType dtype = DType::kBFloat16;
  int B = 0, S = 0, H = 0, D = 0;
  const void* x = nullptr;
  void* y = nullptr;
  int64_t x_stride[3] = {}, y_stride[3] = {};  // batch, seq, head (elements); last dim contiguous
  const int64_t* pos = nullptr;
  int64_t pos_stride[2] = {};
  const float* inv_freq = nullptr;  // [D / 2], computed by the caller exactly as the reference does
  bool inverse = false;             // rotate by -angle: the backward
};
cudaError_t rope(const RopeParams& p, cudaStream_t stream);

// In place over a [rows, V] logits chunk: logits -> d(sum of CE)/d logits (softmax - onehot, zero
// for ignored rows); loss[r] = logsumexp(row) - row[label] (0 for ignored rows). fp32 math.
struct CeRowsParams {
  DType dtype = DType::kBFloat16;
  int64_t rows = 0, V = 0, row_stride = 0;
  void* logits = nullptr;
  const int64_t* labels = nullptr;
  int64_t ignore_index = -100;
  float* loss = nullptr;
};
cudaError_t ce_rows(const CeRowsParams& p, cudaStream_t stream);

}  // namespace ernie_cuda
