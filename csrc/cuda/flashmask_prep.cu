// FlashMask workspace: per-column masked spans and their per-64-column min/max table, plus the
// entry points that pick a kernel per architecture.
#include "common.cuh"
#include "flashmask_mask.cuh"

namespace ernie_cuda {
namespace {

// One thread per (batch*mask head, column). Same rewrite as ernie_core/ops/triton/_mask.py.
__global__ void spans_kernel(FlashMaskParams p, int hm_count) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int bhm = int(t / p.s_pad), j = int(t % p.s_pad);
  if (bhm >= p.B * hm_count) return;
  int ls = -kBig, le = kBig, us = kBig, ue = -kBig;  // padding column: masked for every row
  if (j < p.S) {
    int a[4] = {kBig, kBig, kBig, kBig};
    if (p.idx != nullptr) {
      const int32_t* col = p.idx + (int64_t(bhm) * p.S + j) * p.n_idx;
      for (int i = 0; i < p.n_idx; ++i) a[i] = col[i];
    }
    if (p.causal) {
      ls = p.idx ? a[0] : kBig, le = (p.idx && p.n_idx == 2) ? a[1] : kBig;
      us = 0, ue = kBig;  // the whole upper triangle
    } else if (p.idx == nullptr) {
      ls = kBig, le = kBig, us = 0, ue = 0;
    } else if (p.n_idx == 2) {
      ls = a[0], le = kBig, us = 0, ue = a[1];
    } else {
      ls = a[0], le = a[1], us = a[2], ue = a[3];
    }
    ls = max(ls, j), ue = min(ue, j);
    if (ls >= le) ls = kBig, le = -kBig;  // empty spans never move a block's min start / max end
    if (us >= ue) us = kBig, ue = -kBig;
  }
  int32_t* out = p.spans + int64_t(bhm) * 4 * p.s_pad + j;
  out[0] = ls, out[p.s_pad] = le, out[2 * p.s_pad] = us, out[3 * p.s_pad] = ue;
}

__global__ void table_kernel(FlashMaskParams p, int hm_count) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int ncb = p.s_pad / kMaskBlock;
  const int bhm = int(t / ncb), cb = int(t % ncb);
  if (bhm >= p.B * hm_count) return;
  int v[8];
  for (int i = 0; i < 8; ++i) v[i] = (i % 2 == 0) ? kBig : -kBig;
  const int32_t* sp = p.spans + int64_t(bhm) * 4 * p.s_pad + cb * kMaskBlock;
  for (int c = 0; c < kMaskBlock; ++c)
    for (int a = 0; a < 4; ++a) {
      const int x = sp[a * p.s_pad + c];
      v[2 * a] = min(v[2 * a], x), v[2 * a + 1] = max(v[2 * a + 1], x);
    }
  for (int i = 0; i < 8; ++i) p.table[t * 8 + i] = v[i];
}

}  // namespace

void flashmask_workspace_sizes(const FlashMaskParams& p, int64_t* spans_elems, int64_t* table_elems) {
  const int64_t s_pad = cdiv(p.S, kSpanPad) * kSpanPad;
  const int64_t bhm = int64_t(p.B) * (p.idx ? p.idx_heads : 1);
  *spans_elems = bhm * 4 * s_pad;
  *table_elems = bhm * (s_pad / kMaskBlock) * 8;
}

const char* flashmask_cuda_unsupported(const FlashMaskParams& p) {
  if (p.D != 64 && p.D != 128) return "head dim must be 64 or 128";
  if (p.sm_major < 8) return "needs sm_80 or newer";
  for (const int64_t* s : {p.q_stride, p.k_stride, p.v_stride, p.o_stride})
    for (int i = 0; i < 3; ++i)
      if (s[i] % 8) return "q/k/v/out strides must be multiples of 8 elements (16-byte rows)";
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

cudaError_t flashmask_fwd(const FlashMaskParams& p, cudaStream_t stream) {
  ERNIE_CUDA_CHECK(flashmask_prepare(p, stream));
  // The wgmma kernel is Hopper-only (sm_90a) and specialised for D = 128.
  if (p.sm_major == 9 && p.D == 128) return flashmask_fwd_sm90(p, stream);
  return flashmask_fwd_sm80(p, stream);
}

cudaError_t flashmask_bwd(const FlashMaskParams& p, cudaStream_t stream) {
  ERNIE_CUDA_CHECK(flashmask_prepare(p, stream));
  return flashmask_bwd_sm80(p, stream);
}

}  // namespace ernie_cuda
