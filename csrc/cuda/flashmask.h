// FlashMask attention on CUDA (torch-free): params and launchers.
//
// Layouts: q/out/dout/dq [B, S, Hq, D], k/v/dk/dv [B, S, Hkv, D], bf16, any batch/seq/head strides
// (elements), contiguous last dim; lse/delta [B, Hq, S] fp32; idx int32 [B, Hm, S, n] contiguous.
// The mask of each key column becomes two masked row spans (lower [ls, le), upper [us, ue)) whose
// per-64-column-block min/max classify tiles as skipped / unmasked / partial (the FlashMask paper's
// test); `flashmask_prepare` builds both into caller-allocated workspace.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ernie_cuda {

constexpr int kMaskBlock = 64;   // columns per min/max table entry
constexpr int kSpanPad = 128;    // spans are padded to a multiple of this many columns

struct FlashMaskParams {
  int B = 0, S = 0, Hq = 0, Hkv = 0, D = 0;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  int64_t q_stride[3] = {}, k_stride[3] = {}, v_stride[3] = {}, o_stride[3] = {};  // batch, seq, head
  const int32_t* idx = nullptr;  // null: plain causal / full attention
  int idx_heads = 1, n_idx = 1;
  bool causal = true;
  float scale = 1.0f;
  // Workspace (flashmask_workspace_sizes): spans [B*Hm][4][s_pad], table [B*Hm][s_pad/64][8].
  int32_t* spans = nullptr;
  int32_t* table = nullptr;
  int s_pad = 0;
  // Backward.
  const void* dout = nullptr;
  float* delta = nullptr;  // workspace [B, Hq, S]
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t do_stride[3] = {}, dq_stride[3] = {}, dk_stride[3] = {}, dv_stride[3] = {};
  int sm_major = 8;  // compute capability of the device the tensors live on
};

// Element counts of the int32 workspace buffers.
void flashmask_workspace_sizes(const FlashMaskParams& p, int64_t* spans_elems, int64_t* table_elems);
// Empty string when the params are usable by these kernels, else the reason (caller may fall back).
const char* flashmask_cuda_unsupported(const FlashMaskParams& p);

cudaError_t flashmask_prepare(const FlashMaskParams& p, cudaStream_t stream);
cudaError_t flashmask_fwd(const FlashMaskParams& p, cudaStream_t stream);  // prepare + forward
cudaError_t flashmask_bwd(const FlashMaskParams& p, cudaStream_t stream);  // prepare + backward

// Internal launchers (one per file).
cudaError_t flashmask_fwd_sm90(const FlashMaskParams& p, cudaStream_t stream);
cudaError_t flashmask_fwd_sm80(const FlashMaskParams& p, cudaStream_t stream);
cudaError_t flashmask_bwd_sm80(const FlashMaskParams& p, cudaStream_t stream);

}  // namespace ernie_cuda
