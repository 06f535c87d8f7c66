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

#include "common/dropout_hash.h"

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
  // Attention-probability dropout (0 = off), the CPU kernel's keep mask (common/dropout_hash.h):
  // out = (keep / (1 - p) * softmax) V with lse the undropped normaliser. The launchers derive the
  // drop_* fields from (dropout_p, seed, offset) (flashmask_set_dropout); kernels read only those.
  double dropout_p = 0.0;
  uint64_t seed = 0, offset = 0;
  bool drop_on = false;
  uint32_t drop_threshold = 0;  // keep u >= threshold
  float drop_rescale = 1.0f;    // 1 / (1 - p), 0 for p = 1
  uint64_t drop_seed_key = 0;   // mix64(mix64(seed) ^ offset)
  // Workspace (flashmask_workspace_sizes): spans [B*Hm][4][s_pad], table [B*Hm][s_pad/64][8].
  int32_t* spans = nullptr;
  int32_t* table = nullptr;
  int s_pad = 0;
  // Backward.
  const void* dout = nullptr;
  const float* dlse = nullptr;  // optional upstream gradient of lse [B, Hq, S] fp32 contiguous
  float* delta = nullptr;       // workspace [B, Hq, S]: rowsum(dO * O) - dlse
  float* dq_accum = nullptr;    // workspace [B, Hq, S, D] fp32 (flashmask_bwd_accum_elems), or null
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t do_stride[3] = {}, dq_stride[3] = {}, dk_stride[3] = {}, dv_stride[3] = {};
  int sm_major = 8;  // compute capability of the device the tensors live on
};

// Element counts of the int32 workspace buffers.
void flashmask_workspace_sizes(const FlashMaskParams& p, int64_t* spans_elems, int64_t* table_elems);
// fp32 elements of the dQ accumulator the backward needs for these params (0: none).
int64_t flashmask_bwd_accum_elems(const FlashMaskParams& p);
// Fills the drop_* fields from dropout_p, seed, offset.
void flashmask_set_dropout(FlashMaskParams& p);
// Empty string when the params are usable by these kernels, else the reason (caller may fall back).
const char* flashmask_cuda_unsupported(const FlashMaskParams& p);

cudaError_t flashmask_prepare(const FlashMaskParams& p, cudaStream_t stream);
cudaError_t flashmask_fwd(const FlashMaskParams& p, cudaStream_t stream);  // prepare + forward
cudaError_t flashmask_bwd(const FlashMaskParams& p, cudaStream_t stream);  // prepare + backward

// Internal launchers (one per file).
cudaError_t flashmask_fwd_sm90(const FlashMaskParams& p, cudaStream_t stream);
cudaError_t flashmask_fwd_sm80(const FlashMaskParams& p, cudaStream_t stream);
cudaError_t flashmask_bwd_sm80(const FlashMaskParams& p, cudaStream_t stream);
cudaError_t flashmask_bwd_sm90(const FlashMaskParams& p, cudaStream_t stream);
cudaError_t flashmask_delta(const FlashMaskParams& p, cudaStream_t stream);  // delta = rowsum(dO O) - dlse

}  // namespace ernie_cuda
