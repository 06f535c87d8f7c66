// CUDA impls of ernie_core_C::flashmask_fwd / flashmask_bwd (schemas in ops.cpp): input checks,
// tensor -> FlashMaskParams, workspace, stream. The kernels are in csrc/cuda/ and know no torch.
// The arguments are the CPU binding's (flashmask.cpp): dlse and the dropout triple (dropout_p, seed,
// offset; int64 seed/offset are read as the kernels' uint64 key words) reach the kernels, which draw
// the CPU kernel's keep mask (common/dropout_hash.h).
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/flashmask.h"

namespace ernie_bind_cuda {
namespace {

void strides3(const at::Tensor& t, int64_t* s) {
  for (int i = 0; i < 3; ++i) s[i] = t.stride(i);
}

// The kernels move 16-byte chunks (cp.async, TMA): a view with a strided last dim, strides that are
// not multiples of 8 elements or a start that is not 16-byte aligned is copied once (a fresh tensor
// is aligned), so any layout works and the usual [B, S, H, D] views cost nothing.
at::Tensor last_contig(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int i = 0; i + 1 < t.dim(); ++i) ok = ok && t.stride(i) % 8 == 0;
  return ok ? t : t.contiguous();
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx, bool causal) {
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kBFloat16,
                "flashmask_attention (CUDA kernel): q, k, v must be bfloat16 CUDA tensors, got ", t->scalar_type(),
                " on ", t->device(), " (use ERNIE_CORE_BACKEND=triton for other dtypes)");
  TORCH_CHECK(q.dim() == 4 && k.sizes() == v.sizes() && k.dim() == 4 && q.size(0) == k.size(0) &&
                  q.size(1) == k.size(1) && q.size(3) == k.size(3) && q.size(2) % k.size(2) == 0,
              "flashmask_attention: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(),
              " must be [B, S, Hq, D] / [B, S, Hkv, D] with Hq a multiple of Hkv");
  if (idx.numel() == 0) return;  // no mask tensor: plain causal / full attention
  TORCH_CHECK(idx.is_cuda() && idx.scalar_type() == at::kInt && idx.dim() == 4 && idx.size(0) == q.size(0) &&
                  idx.size(2) == q.size(1) && (idx.size(1) == 1 || idx.size(1) == k.size(2)),
              "flashmask_attention: startend_row_indices must be int32 [B, 1 or Hkv, S, n] on q's device, got ",
              idx.scalar_type(), " ", idx.sizes());
  const int64_t n = idx.size(3);
  TORCH_CHECK(causal ? (n == 1 || n == 2) : (n == 2 || n == 4), "flashmask_attention: ",
              causal ? "causal masks take 1 or 2" : "bidirectional masks take 2 or 4", " indices per column, got ", n);
}

// Fills the shared fields and allocates the mask workspace (kept alive by the returned tensors).
std::vector<at::Tensor> make_params(ernie_cuda::FlashMaskParams& p, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& idx, bool causal, double scale,
                                    double dropout_p, int64_t seed, int64_t offset) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "flashmask_attention: dropout_p must be in [0, 1], got ",
              dropout_p);
  p.B = int(q.size(0)), p.S = int(q.size(1)), p.Hq = int(q.size(2)), p.Hkv = int(k.size(2)), p.D = int(q.size(3));
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  strides3(q, p.q_stride), strides3(k, p.k_stride), strides3(v, p.v_stride);
  p.idx = idx.numel() ? idx.data_ptr<int32_t>() : nullptr;
  p.idx_heads = idx.numel() ? int(idx.size(1)) : 1, p.n_idx = idx.numel() ? int(idx.size(3)) : 1;
  p.causal = causal, p.scale = float(scale);
  p.dropout_p = dropout_p, p.seed = uint64_t(seed), p.offset = uint64_t(offset);
  int device = 0;
  TORCH_CHECK(cudaGetDevice(&device) == cudaSuccess && cudaDeviceGetAttribute(&p.sm_major, cudaDevAttrComputeCapabilityMajor,
                                                                               device) == cudaSuccess,
              "flashmask_attention: cannot read the device's compute capability");
  p.s_pad = (p.S + ernie_cuda::kSpanPad - 1) / ernie_cuda::kSpanPad * ernie_cuda::kSpanPad;
  int64_t n_spans = 0, n_table = 0;
  ernie_cuda::flashmask_workspace_sizes(p, &n_spans, &n_table);
  at::Tensor spans = at::empty({n_spans}, q.options().dtype(at::kInt));
  at::Tensor table = at::empty({n_table}, q.options().dtype(at::kInt));
  p.spans = spans.data_ptr<int32_t>(), p.table = table.data_ptr<int32_t>();
  return {spans, table};
}

void check_supported(const ernie_cuda::FlashMaskParams& p) {
  const char* why = ernie_cuda::flashmask_cuda_unsupported(p);
  TORCH_CHECK(*why == 0, "flashmask_attention (CUDA kernel): ", why, "; use ERNIE_CORE_BACKEND=triton");
}

std::tuple<at::Tensor, at::Tensor> flashmask_fwd_cuda(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                      const at::Tensor& idx_, bool causal, double scale,
                                                      double dropout_p, int64_t seed, int64_t offset) {
  check_inputs(q_, k_, v_, idx_, causal);
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = last_contig(q_), k = last_contig(k_), v = last_contig(v_), idx = idx_.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  ernie_cuda::FlashMaskParams p;
  auto workspace = make_params(p, q, k, v, idx, causal, scale, dropout_p, seed, offset);
  p.out = out.data_ptr(), p.lse = lse.data_ptr<float>();
  strides3(out, p.o_stride);
  check_supported(p);
  const cudaError_t err = ernie_cuda::flashmask_fwd(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "flashmask_attention forward: CUDA error ", cudaGetErrorString(err));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flashmask_bwd_cuda(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& out_,
    const at::Tensor& lse_, const at::Tensor& idx_, bool causal, double scale, const std::optional<at::Tensor>& dlse,
    double dropout_p, int64_t seed, int64_t offset) {
  check_inputs(q_, k_, v_, idx_, causal);
  TORCH_CHECK(dout_.sizes() == q_.sizes() && out_.sizes() == q_.sizes() && dout_.scalar_type() == q_.scalar_type() &&
                  out_.scalar_type() == q_.scalar_type(),
              "flashmask_attention backward: dout and out must have q's shape and dtype");
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = last_contig(q_), k = last_contig(k_), v = last_contig(v_), idx = idx_.contiguous();
  const at::Tensor dout = last_contig(dout_), out = last_contig(out_), lse = lse_.to(at::kFloat).contiguous();
  TORCH_CHECK(lse.numel() == q.size(0) * q.size(2) * q.size(1), "flashmask_attention backward: lse must be [B, Hq, S]");
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0) return {dq, dk.zero_(), dv.zero_()};
  ernie_cuda::FlashMaskParams p;
  auto workspace = make_params(p, q, k, v, idx, causal, scale, dropout_p, seed, offset);
  at::Tensor dlse_f;
  if (dlse.has_value() && dlse->defined()) {
    TORCH_CHECK(dlse->numel() == lse.numel() && dlse->device() == q.device(),
                "flashmask_attention backward: dlse must be [B, Hq, S] on q's device, got ", dlse->sizes(), " on ",
                dlse->device());
    dlse_f = dlse->to(at::kFloat).contiguous();
    p.dlse = dlse_f.data_ptr<float>();
  }
  at::Tensor delta = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  p.out = const_cast<void*>(out.data_ptr()), p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.dout = dout.data_ptr(), p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  strides3(out, p.o_stride), strides3(dout, p.do_stride), strides3(dq, p.dq_stride), strides3(dk, p.dk_stride),
      strides3(dv, p.dv_stride);
  check_supported(p);
  // Hopper backward: fp32 dQ accumulator (key blocks add into it), zeroed by the launcher.
  const int64_t n_accum = ernie_cuda::flashmask_bwd_accum_elems(p);
  at::Tensor dq_accum = at::empty({n_accum}, q.options().dtype(at::kFloat));
  p.dq_accum = n_accum ? dq_accum.data_ptr<float>() : nullptr;
  for (const int64_t* s : {p.do_stride, p.dq_stride, p.dk_stride, p.dv_stride})
    for (int i = 0; i < 3; ++i) TORCH_CHECK(s[i] % 8 == 0, "flashmask_attention backward: strides must be multiples of 8");
  const cudaError_t err = ernie_cuda::flashmask_bwd(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "flashmask_attention backward: CUDA error ", cudaGetErrorString(err));
  return {dq, dk, dv};
}

}  // namespace
}  // namespace ernie_bind_cuda

TORCH_LIBRARY_IMPL(ernie_core_C, CUDA, m) {
  m.impl("flashmask_fwd", &ernie_bind_cuda::flashmask_fwd_cuda);
  m.impl("flashmask_bwd", &ernie_bind_cuda::flashmask_bwd_cuda);
}
