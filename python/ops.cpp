// The raw kernel ops of ernie_core._C: every schema of the private namespace ernie_core_C, the
// Python module init, and the CPU/Meta impls of RoPE, RMSNorm, SwiGLU and the fused LM head +
// cross-entropy (FlashMask attention's impls are in flashmask.cpp).
#include <Python.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "binding.h"
#include "cpu/pointwise.h"

// Loading the extension (import ernie_core._C) runs the registrations below; the module itself is
// empty: everything is reached through torch.ops.ernie_core_C.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "ernie_core C++ kernels (torch.ops.ernie_core_C)", -1,
                               nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(ernie_core_C, m) {
  // dropout_p > 0: attention-probability dropout with the counter-based keep mask of (seed, offset)
  // (csrc/cpu/flashmask.h); the backward takes the forward's dropout_p, seed and offset.
  m.def("flashmask_fwd(Tensor q, Tensor k, Tensor v, Tensor startend_row_indices, bool causal, float scale, "
        "float dropout_p=0., int seed=0, int offset=0) -> (Tensor out, Tensor lse)");
  m.def("flashmask_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor startend_row_indices, bool causal, float scale, Tensor? dlse=None, float dropout_p=0., int seed=0, "
        "int offset=0) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("rope(Tensor x, Tensor position_ids, Tensor inv_freq, bool inverse) -> Tensor");
  m.def("rope_qk(Tensor q, Tensor k, Tensor position_ids, Tensor inv_freq, bool inverse) -> (Tensor, Tensor)");
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor dx, Tensor dweight)");
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor dgate, Tensor dup)");
  m.def("fused_head_ce(Tensor hidden, Tensor weight, Tensor labels, int ignore_index, int chunk_tokens, "
        "bool grad_hidden, bool grad_weight) -> (Tensor loss_sum, Tensor n_tokens, Tensor dhidden, Tensor dweight)");
}

namespace ernie_bind {
namespace {

// ---- RoPE ---------------------------------------------------------------------------------------

ernie_cpu::RopeTensor rope_tensor(const at::Tensor& x, const at::Tensor& y) {
  ernie_cpu::RopeTensor t;
  t.x = x.data_ptr(), t.y = y.data_ptr(), t.H = int(x.size(2));
  strides3(x, t.x_stride), strides3(y, t.y_stride);
  return t;
}

std::vector<at::Tensor> rope_impl(const std::vector<at::Tensor>& xs_, const at::Tensor& pos_,
                                  const at::Tensor& inv_freq_, bool inverse) {
  const at::Tensor& x0 = xs_[0];
  TORCH_CHECK(x0.dim() == 4 && x0.size(3) % 2 == 0, "rope: inputs must be [B, S, H, D] with even D, got ", x0.sizes());
  TORCH_CHECK(pos_.dim() == 2 && pos_.size(0) == x0.size(0) && pos_.size(1) == x0.size(1),
              "rope: position_ids must be [B, S] = [", x0.size(0), ", ", x0.size(1), "], got ", pos_.sizes());
  TORCH_CHECK(inv_freq_.numel() == x0.size(3) / 2, "rope: inv_freq must have D/2 entries");
  ernie_cpu::RopeParams p;
  p.dtype = kernel_dtype(x0, "rope input");
  p.B = int(x0.size(0)), p.S = int(x0.size(1)), p.D = int(x0.size(3));
  const at::Tensor pos = pos_.to(at::kLong), inv_freq = inv_freq_.to(at::kFloat).contiguous();
  p.pos = pos.data_ptr<int64_t>(), p.pos_stride[0] = pos.stride(0), p.pos_stride[1] = pos.stride(1);
  p.inv_freq = inv_freq.data_ptr<float>(), p.inverse = inverse, p.num_threads = num_threads();
  std::vector<at::Tensor> xs, ys;
  for (const at::Tensor& x_ : xs_) {
    check_cpu(x_, "rope input");
    TORCH_CHECK(x_.dim() == 4 && x_.size(0) == x0.size(0) && x_.size(1) == x0.size(1) && x_.size(3) == x0.size(3) &&
                    x_.scalar_type() == x0.scalar_type(),
                "rope: q and k must agree on batch, sequence, head dim and dtype: ", x0.sizes(), " vs ", x_.sizes());
    xs.push_back(last_dim_contiguous(x_));
    ys.push_back(at::empty(x_.sizes(), x_.options()));
    p.t[xs.size() - 1] = rope_tensor(xs.back(), ys.back());
  }
  p.n_tensors = int(xs.size());
  if (x0.numel() > 0) ernie_cpu::rope(p);
  return ys;
}

at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& inv_freq, bool inverse) {
  return rope_impl({x}, pos, inv_freq, inverse)[0];
}

std::tuple<at::Tensor, at::Tensor> rope_qk_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                               const at::Tensor& inv_freq, bool inverse) {
  auto ys = rope_impl({q, k}, pos, inv_freq, inverse);
  return {ys[0], ys[1]};
}

// ---- RMSNorm ------------------------------------------------------------------------------------

at::ScalarType promoted(const at::Tensor& x, const at::Tensor& w) {
  return x.scalar_type() == w.scalar_type() ? x.scalar_type() : at::kFloat;
}

// [..., cols] -> [rows, cols] with a contiguous last dim (a view when the strides allow it).
at::Tensor as_rows(const at::Tensor& t, int64_t cols) { return last_dim_contiguous(t).reshape({-1, cols}); }

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_cpu(x, "rms_norm x"), check_cpu(w, "rms_norm weight");
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1), "rms_norm: weight ", w.sizes(),
              " must be [H] for x ", x.sizes());
  const int64_t cols = x.size(-1);
  const at::Tensor x2 = as_rows(x, cols), wc = w.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(promoted(x, w)));
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor rstd = at::empty(lead, x.options().dtype(at::kFloat));
  ernie_cpu::RmsNormParams p;
  p.x_dtype = kernel_dtype(x, "rms_norm x"), p.w_dtype = kernel_dtype(w, "rms_norm weight");
  p.rows = x2.size(0), p.cols = cols, p.x = x2.data_ptr(), p.x_row_stride = x2.stride(0), p.w = wc.data_ptr();
  p.y = y.data_ptr(), p.y_row_stride = cols, p.rstd = rstd.data_ptr<float>(), p.eps = float(eps);
  p.num_threads = num_threads();
  if (x.numel() > 0) ernie_cpu::rms_norm_fwd(p);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                                    const at::Tensor& rstd) {
  TORCH_CHECK(dy.sizes() == x.sizes(), "rms_norm backward: dy ", dy.sizes(), " must have x's shape ", x.sizes());
  const int64_t cols = x.size(-1);
  const at::Tensor x2 = as_rows(x, cols), wc = w.contiguous(), rs = rstd.to(at::kFloat).contiguous();
  const at::Tensor dy2 = as_rows(dy.to(promoted(x, w)), cols);
  at::Tensor dx = at::empty(x.sizes(), x.options()), dw = at::empty(w.sizes(), w.options());
  if (x.numel() == 0) return {dx, dw.zero_()};
  ernie_cpu::RmsNormParams p;
  p.x_dtype = kernel_dtype(x, "rms_norm x"), p.w_dtype = kernel_dtype(w, "rms_norm weight");
  p.rows = x2.size(0), p.cols = cols, p.x = x2.data_ptr(), p.x_row_stride = x2.stride(0), p.w = wc.data_ptr();
  p.rstd = const_cast<float*>(rs.data_ptr<float>()), p.dy = dy2.data_ptr(), p.dy_row_stride = dy2.stride(0);
  p.dx = dx.data_ptr(), p.dw = dw.data_ptr(), p.num_threads = num_threads();
  ernie_cpu::rms_norm_bwd(p);
  return {dx, dw};
}

// ---- SwiGLU -------------------------------------------------------------------------------------

ernie_cpu::SwigluParams swiglu_params(const at::Tensor& g2, const at::Tensor& u2) {
  ernie_cpu::SwigluParams p;
  p.dtype = kernel_dtype(g2, "swiglu gate");
  p.rows = g2.size(0), p.cols = g2.size(1), p.g = g2.data_ptr(), p.u = u2.data_ptr();
  p.g_row_stride = g2.stride(0), p.u_row_stride = u2.stride(0), p.num_threads = num_threads();
  return p;
}

void check_swiglu(const at::Tensor& g, const at::Tensor& u) {
  check_cpu(g, "swiglu gate"), check_cpu(u, "swiglu up");
  TORCH_CHECK(g.sizes() == u.sizes() && g.scalar_type() == u.scalar_type() && g.dim() >= 1,
              "swiglu: gate and up must share shape and dtype, got ", g.sizes(), " ", g.scalar_type(), " and ",
              u.sizes(), " ", u.scalar_type());
}

at::Tensor swiglu_fwd_cpu(const at::Tensor& g, const at::Tensor& u) {
  check_swiglu(g, u);
  at::Tensor y = at::empty(g.sizes(), g.options());
  if (g.numel() == 0) return y;
  const at::Tensor g2 = as_rows(g, g.size(-1)), u2 = as_rows(u, u.size(-1));
  ernie_cpu::SwigluParams p = swiglu_params(g2, u2);
  p.y = y.data_ptr(), p.y_row_stride = p.cols;
  ernie_cpu::swiglu_fwd(p);
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cpu(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u) {
  check_swiglu(g, u);
  TORCH_CHECK(dy.sizes() == g.sizes(), "swiglu backward: dy ", dy.sizes(), " must have gate's shape ", g.sizes());
  at::Tensor dg = at::empty(g.sizes(), g.options()), du = at::empty(u.sizes(), u.options());
  if (g.numel() == 0) return {dg, du};
  const at::Tensor g2 = as_rows(g, g.size(-1)), u2 = as_rows(u, u.size(-1));
  const at::Tensor dy2 = as_rows(dy.to(g.scalar_type()), g.size(-1));
  ernie_cpu::SwigluParams p = swiglu_params(g2, u2);
  p.dy = dy2.data_ptr(), p.dy_row_stride = dy2.stride(0), p.dg = dg.data_ptr(), p.du = du.data_ptr();
  ernie_cpu::swiglu_bwd(p);
  return {dg, du};
}

// ---- fused LM head + cross-entropy --------------------------------------------------------------

// Tokens per chunk when the caller passes 0: about 256 MiB of fp32 logits (640 tokens at a 103k vocab),
// a multiple of 16 rows. Smaller chunks save memory but the logits GEMM (M = chunk) loses speed on
// CPU BLAS below a few hundred rows.
int64_t default_chunk(int64_t vocab) { return std::max<int64_t>(16, ((int64_t(256) << 20) / (4 * vocab)) / 16 * 16); }

void check_head_ce(const at::Tensor& h, const at::Tensor& w, const at::Tensor& labels) {
  check_cpu(h, "fused_head_ce hidden"), check_cpu(w, "fused_head_ce weight"), check_cpu(labels, "labels");
  TORCH_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1), "fused_head_ce: hidden must be [N, H] and ",
              "weight [V, H], got ", h.sizes(), " and ", w.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == h.size(0), "fused_head_ce: labels must be [N] = [", h.size(0),
              "], got ", labels.sizes());
  TORCH_CHECK(h.scalar_type() == w.scalar_type(), "fused_head_ce: hidden and weight must share a dtype, got ",
              h.scalar_type(), " and ", w.scalar_type());
}

// Per chunk of tokens: logits = h W^T (one GEMM), the CE kernel turns them into d loss / d logits in
// place, then dh = dlogits W and dW += dlogits^T h (fp32 accumulator) -- [N, V] never exists.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_head_ce_cpu(
    const at::Tensor& hidden_, const at::Tensor& weight, const at::Tensor& labels_, int64_t ignore_index,
    int64_t chunk_tokens, bool grad_hidden, bool grad_weight) {
  check_head_ce(hidden_, weight, labels_);
  const ernie_cpu::DType dt = kernel_dtype(hidden_, "fused_head_ce hidden");
  const at::Tensor hidden = hidden_.contiguous(), labels = labels_.to(at::kLong).contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const int64_t chunk = std::min<int64_t>(std::max<int64_t>(N, 1), chunk_tokens > 0 ? chunk_tokens : default_chunk(V));
  const bool fp32 = hidden.scalar_type() == at::kFloat, need_grad = grad_hidden || grad_weight;
  at::Tensor loss_rows = at::empty({N}, hidden.options().dtype(at::kFloat));
  at::Tensor dhidden = grad_hidden ? at::empty({N, H}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor dw_acc = grad_weight ? at::zeros({V, H}, weight.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor logits = at::empty({chunk, V}, hidden.options());
  const int64_t* lab = labels.data_ptr<int64_t>();
  for (int64_t s = 0; s < N; s += chunk) {
    const int64_t c = std::min(chunk, N - s);
    const at::Tensor h = hidden.narrow(0, s, c);
    at::Tensor lg = logits.narrow(0, 0, c);
    at::mm_out(lg, h, weight.t());
    ernie_cpu::CrossEntropyParams p;
    p.dtype = dt, p.rows = c, p.vocab = V, p.ld = V, p.logits = lg.data_ptr(), p.labels = lab + s;
    p.ignore_index = ignore_index, p.loss = loss_rows.data_ptr<float>() + s, p.write_grad = need_grad;
    p.num_threads = num_threads();
    const int64_t bad = ernie_cpu::cross_entropy_chunk(p);
    TORCH_CHECK(bad < 0, "fused_head_ce: label ", lab[s + bad], " at token ", s + bad, " is outside [0, ", V,
                ") and is not ignore_index (", ignore_index, ")");
    if (grad_hidden) {
      at::Tensor dh = dhidden.narrow(0, s, c);
      at::mm_out(dh, lg, weight);
    }
    if (grad_weight) {
      // bf16: accumulate in fp32 so dW is rounded once, as a single [N, V] GEMM would be.
      fp32 ? dw_acc.addmm_(lg.t(), h) : dw_acc.addmm_(lg.t().to(at::kFloat), h.to(at::kFloat));
    }
  }
  int64_t count = 0;
  for (int64_t i = 0; i < N; ++i) count += lab[i] != ignore_index;
  at::Tensor loss_sum = loss_rows.sum(at::kDouble).to(at::kFloat);
  at::Tensor n_tokens = at::empty({}, labels.options().dtype(at::kLong));
  n_tokens.fill_(count);
  at::Tensor dweight = !grad_weight ? at::empty({0}, weight.options()) : (fp32 ? dw_acc : dw_acc.to(weight.scalar_type()));
  return {loss_sum, n_tokens, dhidden, dweight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_head_ce_meta(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, int64_t ignore_index,
    int64_t chunk_tokens, bool grad_hidden, bool grad_weight) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "fused_head_ce: hidden must be [N, H], weight [V, H]");
  return {at::empty({}, hidden.options().dtype(at::kFloat)), at::empty({}, labels.options().dtype(at::kLong)),
          grad_hidden ? at::empty(hidden.sizes(), hidden.options()) : at::empty({0}, hidden.options()),
          grad_weight ? at::empty(weight.sizes(), weight.options()) : at::empty({0}, weight.options())};
}

// ---- Meta impls (shapes and dtypes only) --------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> rope_qk_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor&,
                                                const at::Tensor&, bool) {
  return {at::empty(q.sizes(), q.options()), at::empty(k.sizes(), k.options())};
}
at::Tensor rope_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, bool) {
  return at::empty(x.sizes(), x.options());
}
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_meta(const at::Tensor& x, const at::Tensor& w, double) {
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  return {at::empty(x.sizes(), x.options().dtype(promoted(x, w))), at::empty(lead, x.options().dtype(at::kFloat))};
}
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_meta(const at::Tensor&, const at::Tensor& x, const at::Tensor& w,
                                                     const at::Tensor&) {
  return {at::empty(x.sizes(), x.options()), at::empty(w.sizes(), w.options())};
}
at::Tensor swiglu_fwd_meta(const at::Tensor& g, const at::Tensor&) { return at::empty(g.sizes(), g.options()); }
std::tuple<at::Tensor, at::Tensor> swiglu_bwd_meta(const at::Tensor&, const at::Tensor& g, const at::Tensor& u) {
  return {at::empty(g.sizes(), g.options()), at::empty(u.sizes(), u.options())};
}

}  // namespace
}  // namespace ernie_bind

using namespace ernie_bind;

TORCH_LIBRARY_IMPL(ernie_core_C, CPU, m) {
  m.impl("rope", &rope_cpu);
  m.impl("rope_qk", &rope_qk_cpu);
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
  m.impl("swiglu_fwd", &swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &swiglu_bwd_cpu);
  m.impl("fused_head_ce", &fused_head_ce_cpu);
}

TORCH_LIBRARY_IMPL(ernie_core_C, Meta, m) {
  m.impl("rope", &rope_meta);
  m.impl("rope_qk", &rope_qk_meta);
  m.impl("rms_norm_fwd", &rms_norm_fwd_meta);
  m.impl("rms_norm_bwd", &rms_norm_bwd_meta);
  m.impl("swiglu_fwd", &swiglu_fwd_meta);
  m.impl("swiglu_bwd", &swiglu_bwd_meta);
  m.impl("fused_head_ce", &fused_head_ce_meta);
}
