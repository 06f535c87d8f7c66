// FlashMask workspace: per-column masked spans and their per-64-column min/max table, plus the
// entry points that pick a kernel per architecture.
#include <cuda_bf16.h>

#include "common.cuh"
#include "flashmask_mask.cuh"

namespace ernie_cuda {
namespace {

// One thread per (batch*mask head, column): the column's spans (column_spans, flashmask_mask.cuh).
__global__ void spans_kernel(FlashMaskParams p, int hm_count) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int bhm = int(t / p.s_pad), j = int(t % p.s_pad);
  if (bhm >= p.B * hm_count) return;
  const int32_t* col = (p.idx != nullptr && j < p.S) ? p.idx + (int64_t(bhm) * p.S + j) * p.n_idx : nullptr;
  int sp[4];
  column_spans(col, p.n_idx, p.causal, j, p.S, sp);
  int32_t* out = p.spans + int64_t(bhm) * 4 * p.s_pad + j;
  out[0] = sp[0], out[p.s_pad] = sp[1], out[2 * p.s_pad] = sp[2], out[3 * p.s_pad] = sp[3];
}

__global__ void table_kernel(FlashMaskParams p, int hm_count) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int ncb = p.s_pad / kMaskBlock;
  const int bhm = int(t / ncb), cb = int(t % ncb);
  if (bhm >= p.B * hm_count) return;
  int v[8];
  table_entry(p.spans + int64_t(bhm) * 4 * p.s_pad + cb * kMaskBlock, p.s_pad, v);
  for (int i = 0; i < 8; ++i) p.table[t * 8 + i] = v[i];
}

// One warp per (batch, head, row): delta [B, Hq, S] fp32 = sum_d dO O - dlse. The dlse term is the
// gradient through lse (d lse_i / d s_ij = P_ij folds into the softmax Jacobian's row term); with
// dropout O already holds the dropped, rescaled probabilities, so delta needs no mask.
__global__ void delta_kernel(const FlashMaskParams p) {
  const int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= int64_t(p.B) * p.Hq * p.S) return;
  const int s = int(r % p.S), h = int(r / p.S % p.Hq), b = int(r / p.S / p.Hq);
  const __nv_bfloat16* dout =
      static_cast<const __nv_bfloat16*>(p.dout) + b * p.do_stride[0] + s * p.do_stride[1] + h * p.do_stride[2];
  const __nv_bfloat16* out =
      static_cast<const __nv_bfloat16*>(p.out) + b * p.o_stride[0] + s * p.o_stride[1] + h * p.o_stride[2];
  float acc = 0.f;
  for (int d = threadIdx.x % 32; d < p.D; d += 32) acc += __bfloat162float(dout[d]) * __bfloat162float(out[d]);
  for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (threadIdx.x % 32 == 0) p.delta[r] = acc - (p.dlse != nullptr ? p.dlse[r] : 0.f);
}

}  // namespace

cudaError_t flashmask_delta(const FlashMaskParams& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.B) * p.Hq * p.S;
  delta_kernel<<<unsigned((rows + 3) / 4), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

void flashmask_set_dropout(FlashMaskParams& p) {
  p.drop_on = p.dropout_p > 0.0;
  p.drop_threshold = p.drop_on ? ernie_common::dropout_threshold(p.dropout_p) : 0u;
  p.drop_rescale = p.drop_on ? ernie_common::dropout_rescale(p.dropout_p) : 1.0f;
  p.drop_seed_key = ernie_common::dropout_seed_key(p.seed, p.offset);
}

// The Hopper backward (D = 128) accumulates dQ in fp32 with atomics across key blocks.
static bool use_bwd_sm90(const FlashMaskParams& p) { return p.sm_major == 9 && p.D == 128; }

int64_t flashmask_bwd_accum_elems(const FlashMaskParams& p) {
  return use_bwd_sm90(p) ? int64_t(p.B) * p.Hq * p.S * p.D : 0;
}

void flashmask_workspace_sizes(const FlashMaskParams& p, int64_t* spans_elems, int64_t* table_elems) {
  const int64_t s_pad = cdiv(p.S, kSpanPad) * kSpanPad;
  const int64_t bhm = int64_t(p.B) * (p.idx ? p.idx_heads : 1);
  *spans_elems = bhm * 4 * s_pad;
  *table_elems = bhm * (s_pad / kMaskBlock) * 8;
}

const char* flashmask_cuda_unsupported(const FlashMaskParams& p) {
  if (p.D != 64 && p.D != 128) return "head dim must be 64 or 128";
  if (p.sm_major < 8) return "needs sm_80 or newer";
  if (!(p.dropout_p >= 0.0 && p.dropout_p <= 1.0)) return "dropout_p must be in [0, 1]";
  for (const int64_t* s : {p.q_stride, p.k_stride, p.v_stride, p.o_stride})
    for (int i = 0; i < 3; ++i)
      if (s[i] % 8) return "q/k/v/out strides must be multiples of 8 elements (16-byte rows)";
  // cp.async and TMA move 16-byte chunks: the tensors' first elements must be 16-byte aligned.
  for (const void* ptr : {p.q, p.k, p.v, static_cast<const void*>(p.out)})
    if (reinterpret_cast<uintptr_t>(ptr) % 16) return "q/k/v/out must start at 16-byte aligned addresses";
  return "";
}

cudaError_t flashmask_prepare(const FlashMaskParams& p, cudaStream_t stream) {
  const int hm = p.idx ? p.idx_heads : 1;
  const int64_t n_spans = int64_t(p.B) * hm * p.s_pad, n_tab = int64_t(p.B) * hm * (p.s_pad / kMaskBlock);
  spans_kernel<<<unsigned(cdiv(int(n_spans), 256)), 256, 0, stream>>>(p, hm);
  ERNIE_CUDA_CHECK(cudaGetLastError());
  table_kernel<<<unsigned(cdiv(int(n_tab), 128)), 128, 0, stream>>>(p, hm);
  return cudaGetLastError();
}

cudaError_t flashmask_fwd(const FlashMaskParams& params, cudaStream_t stream) {
  FlashMaskParams p = params;
  flashmask_set_dropout(p);
  ERNIE_CUDA_CHECK(flashmask_prepare(p, stream));
  // The wgmma kernels are Hopper-only (sm_90a) and specialised for D = 128; sm_80 WMMA otherwise.
  if (p.sm_major == 9 && p.D == 128) return flashmask_fwd_sm90(p, stream);
  return flashmask_fwd_sm80(p, stream);
}

cudaError_t flashmask_bwd(const FlashMaskParams& params, cudaStream_t stream) {
  FlashMaskParams p = params;
  flashmask_set_dropout(p);
  ERNIE_CUDA_CHECK(flashmask_prepare(p, stream));
  ERNIE_CUDA_CHECK(flashmask_delta(p, stream));
  if (use_bwd_sm90(p) && p.dq_accum != nullptr) return flashmask_bwd_sm90(p, stream);
  return flashmask_bwd_sm80(p, stream);
}

}  // namespace ernie_cuda
