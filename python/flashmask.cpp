// Bindings of the FlashMask attention kernels: ernie_core_C::flashmask_fwd / flashmask_bwd
// (schemas in ops.cpp). CPU impls fill a FlashMaskParams; Meta impls give shapes for fake tensors.
// Dropout's seed and offset arrive as int64 and are read as the kernel's uint64 key words.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "binding.h"
#include "cpu/flashmask.h"

namespace ernie_bind {
namespace {

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
                            bool causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "flashmask_attention: q, k, v must be [B, S, H, D], got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "flashmask_attention: k and v shapes differ: ", k.sizes(), " vs ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "flashmask_attention: q ", q.sizes(), " and k ", k.sizes(), " must agree on batch, sequence and head dim");
  TORCH_CHECK(q.size(2) % k.size(2) == 0, "flashmask_attention: query heads (", q.size(2),
              ") must be a multiple of key/value heads (", k.size(2), ")");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "flashmask_attention: q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(idx.scalar_type() == at::kInt, "flashmask_attention: startend_row_indices must be int32, got ",
              idx.scalar_type());
  TORCH_CHECK(idx.dim() == 4 && idx.size(0) == q.size(0) && idx.size(2) == q.size(1) &&
                  (idx.size(1) == 1 || idx.size(1) == k.size(2)),
              "flashmask_attention: startend_row_indices must be [B, 1 or Hkv, S, n], got ", idx.sizes());
  const int64_t n = idx.size(3);
  TORCH_CHECK(causal ? (n == 1 || n == 2) : (n == 2 || n == 4), "flashmask_attention: ",
              causal ? "causal" : "bidirectional", " masks take ", causal ? "1 or 2" : "2 or 4",
              " indices per column, got ", n);
}

ernie_cpu::FlashMaskParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& idx, bool causal, double scale, double dropout_p,
                                       int64_t seed, int64_t offset) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "flashmask_attention: dropout_p must be in [0, 1], got ",
              dropout_p);
  ernie_cpu::FlashMaskParams p;
  p.dtype = kernel_dtype(q, "q");
  p.B = int(q.size(0)), p.S = int(q.size(1)), p.Hq = int(q.size(2)), p.Hkv = int(k.size(2)), p.D = int(q.size(3));
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  strides3(q, p.q_stride), strides3(k, p.k_stride), strides3(v, p.v_stride);
  p.idx = idx.data_ptr<int32_t>(), p.idx_heads = int(idx.size(1)), p.n_idx = int(idx.size(3));
  p.causal = causal, p.scale = float(scale), p.num_threads = num_threads();
  p.dropout_p = dropout_p, p.seed = uint64_t(seed), p.offset = uint64_t(offset);
  return p;
}

std::tuple<at::Tensor, at::Tensor> flashmask_fwd_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                                     const at::Tensor& v_, const at::Tensor& idx_, bool causal,
                                                     double scale, double dropout_p, int64_t seed, int64_t offset) {
  for (auto* t : {&q_, &k_, &v_, &idx_}) check_cpu(*t, "flashmask_attention input");
  check_attention_inputs(q_, k_, v_, idx_, causal);
  const at::Tensor q = last_dim_contiguous(q_), k = last_dim_contiguous(k_), v = last_dim_contiguous(v_);
  const at::Tensor idx = idx_.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  ernie_cpu::FlashMaskParams p = make_params(q, k, v, idx, causal, scale, dropout_p, seed, offset);
  TORCH_CHECK(*ernie_cpu::flashmask_check(p) == 0, "flashmask_attention: ", ernie_cpu::flashmask_check(p));
  p.out = out.data_ptr(), p.lse = lse.data_ptr<float>();
  strides3(out, p.o_stride);
  ernie_cpu::flashmask_fwd(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flashmask_bwd_cpu(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, const at::Tensor& idx_, bool causal, double scale,
    const std::optional<at::Tensor>& dlse_, double dropout_p, int64_t seed, int64_t offset) {
  for (auto* t : {&dout_, &q_, &k_, &v_, &out_, &lse_, &idx_}) check_cpu(*t, "flashmask_attention input");
  check_attention_inputs(q_, k_, v_, idx_, causal);
  TORCH_CHECK(dout_.sizes() == q_.sizes() && out_.sizes() == q_.sizes(),
              "flashmask_attention backward: dout and out must have q's shape ", q_.sizes());
  TORCH_CHECK(dout_.scalar_type() == q_.scalar_type() && out_.scalar_type() == q_.scalar_type(),
              "flashmask_attention backward: dout and out must have q's dtype ", q_.scalar_type());
  const at::Tensor q = last_dim_contiguous(q_), k = last_dim_contiguous(k_), v = last_dim_contiguous(v_);
  const at::Tensor dout = last_dim_contiguous(dout_), out = last_dim_contiguous(out_);
  const at::Tensor lse = lse_.to(at::kFloat).contiguous(), idx = idx_.contiguous();
  TORCH_CHECK(lse.numel() == q.size(0) * q.size(2) * q.size(1), "flashmask_attention backward: lse must be [B, Hq, S]");
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0) return {dq, dk, dv};
  ernie_cpu::FlashMaskParams p = make_params(q, k, v, idx, causal, scale, dropout_p, seed, offset);
  TORCH_CHECK(*ernie_cpu::flashmask_check(p) == 0, "flashmask_attention: ", ernie_cpu::flashmask_check(p));
  at::Tensor dlse;
  if (dlse_.has_value() && dlse_->defined()) {
    dlse = dlse_->to(at::kFloat).contiguous();
    TORCH_CHECK(dlse.numel() == lse.numel(), "flashmask_attention backward: dlse must be [B, Hq, S]");
    p.dlse = dlse.data_ptr<float>();
  }
  p.out = const_cast<void*>(out.data_ptr()), p.lse = const_cast<float*>(lse.data_ptr<float>());
  strides3(out, p.o_stride);
  p.dout = dout.data_ptr(), p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  strides3(dout, p.do_stride), strides3(dq, p.dq_stride), strides3(dk, p.dk_stride), strides3(dv, p.dv_stride);
  ernie_cpu::flashmask_bwd(p);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> flashmask_fwd_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& idx, bool causal, double scale,
                                                      double dropout_p, int64_t seed, int64_t offset) {
  check_attention_inputs(q, k, v, idx, causal);
  return {at::empty(q.sizes(), q.options()),
          at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flashmask_bwd_meta(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& idx, bool causal, double scale, const std::optional<at::Tensor>& dlse,
    double dropout_p, int64_t seed, int64_t offset) {
  return {at::empty(q.sizes(), q.options()), at::empty(k.sizes(), k.options()), at::empty(v.sizes(), v.options())};
}

}  // namespace
}  // namespace ernie_bind

using namespace ernie_bind;

TORCH_LIBRARY_IMPL(ernie_core_C, CPU, m) {
  m.impl("flashmask_fwd", &flashmask_fwd_cpu);
  m.impl("flashmask_bwd", &flashmask_bwd_cpu);
}

TORCH_LIBRARY_IMPL(ernie_core_C, Meta, m) {
  m.impl("flashmask_fwd", &flashmask_fwd_meta);
  m.impl("flashmask_bwd", &flashmask_bwd_meta);
}
