// CUDA impls of ernie_core_C::rope / rope_qk / fused_head_ce (schemas in ops.cpp). The fused head
// runs per chunk of tokens: logits = h W^T (cuBLAS), the ce_rows kernel turns them into
// d loss / d logits in place, then dh = G W and dW += G^T h (cuBLAS), as the CPU impl does.
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/pointwise.h"

namespace ernie_bind_cuda {
namespace {

ernie_cuda::DType cuda_dtype(const at::Tensor& t, const char* what) {
  if (t.scalar_type() == at::kFloat) return ernie_cuda::DType::kFloat32;
  if (t.scalar_type() == at::kBFloat16) return ernie_cuda::DType::kBFloat16;
  TORCH_CHECK(false, what, " must be float32 or bfloat16 for the CUDA kernel, got ", t.scalar_type());
}

at::Tensor rope_one(const at::Tensor& x_, const at::Tensor& pos_, const at::Tensor& inv_freq_, bool inverse) {
  TORCH_CHECK(x_.is_cuda() && x_.dim() == 4 && x_.size(3) % 2 == 0, "rope: x must be a CUDA [B, S, H, D] tensor with even D");
  TORCH_CHECK(pos_.dim() == 2 && pos_.size(0) == x_.size(0) && pos_.size(1) == x_.size(1),
              "rope: position_ids must be [B, S] = [", x_.size(0), ", ", x_.size(1), "], got ", pos_.sizes());
  TORCH_CHECK(inv_freq_.numel() == x_.size(3) / 2, "rope: inv_freq must have D/2 entries");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.stride(-1) == 1 ? x_ : x_.contiguous();
  const at::Tensor pos = pos_.to(x.device(), at::kLong), inv_freq = inv_freq_.to(x.device(), at::kFloat).contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  ernie_cuda::RopeParams p;
  p.dtype = cuda_dtype(x, "rope input");
  p.B = int(x.size(0)), p.S = int(x.size(1)), p.H = int(x.size(2)), p.D = int(x.size(3));
  p.x = x.data_ptr(), p.y = y.data_ptr();
  for (int i = 0; i < 3; ++i) p.x_stride[i] = x.stride(i), p.y_stride[i] = y.stride(i);
  p.pos = pos.data_ptr<int64_t>(), p.pos_stride[0] = pos.stride(0), p.pos_stride[1] = pos.stride(1);
  p.inv_freq = inv_freq.data_ptr<float>(), p.inverse = inverse;
  const cudaError_t err = ernie_cuda::rope(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "rope: CUDA error ", cudaGetErrorString(err));
  return y;
}

std::tuple<at::Tensor, at::Tensor> rope_qk_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                                const at::Tensor& inv_freq, bool inverse) {
  return {rope_one(q, pos, inv_freq, inverse), rope_one(k, pos, inv_freq, inverse)};
}

// Tokens per chunk when the caller passes 0: about 256 MiB of logits, a multiple of 16 rows.
int64_t default_chunk(int64_t vocab, int64_t elem) { return std::max<int64_t>(16, ((int64_t(256) << 20) / (elem * vocab)) / 16 * 16); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_head_ce_cuda(
    const at::Tensor& hidden_, const at::Tensor& weight_, const at::Tensor& labels_, int64_t ignore_index,
    int64_t chunk_tokens, bool grad_hidden, bool grad_weight) {
  TORCH_CHECK(hidden_.is_cuda() && hidden_.dim() == 2 && weight_.dim() == 2 && hidden_.size(1) == weight_.size(1),
              "fused_head_ce: hidden must be CUDA [N, H] and weight [V, H], got ", hidden_.sizes(), " and ", weight_.sizes());
  TORCH_CHECK(labels_.dim() == 1 && labels_.size(0) == hidden_.size(0), "fused_head_ce: labels must be [N]");
  TORCH_CHECK(hidden_.scalar_type() == weight_.scalar_type(), "fused_head_ce: hidden and weight must share a dtype");
  const c10::cuda::CUDAGuard guard(hidden_.device());
  const at::Tensor hidden = hidden_.contiguous(), weight = weight_.contiguous();
  const at::Tensor labels = labels_.to(hidden.device(), at::kLong).contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0);
  const at::Tensor live = labels.ne(ignore_index);
  const at::Tensor bad = live.logical_and(labels.lt(0).logical_or(labels.ge(V)));
  TORCH_CHECK(!bad.any().item<bool>(), "fused_head_ce: a label is outside [0, ", V, ") and is not ignore_index (",
              ignore_index, ")");
  const int64_t chunk = std::min<int64_t>(std::max<int64_t>(N, 1),
                                          chunk_tokens > 0 ? chunk_tokens : default_chunk(V, hidden.element_size()));
  at::Tensor loss_rows = at::empty({N}, hidden.options().dtype(at::kFloat));
  at::Tensor dhidden = grad_hidden ? at::empty(hidden.sizes(), hidden.options()) : at::empty({0}, hidden.options());
  // fp32 running sum of the per-chunk dW products (each rounds once, as the naive dW does).
  at::Tensor dweight = grad_weight ? at::zeros(weight.sizes(), weight.options().dtype(at::kFloat))
                                   : at::empty({0}, weight.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t s = 0; s < N; s += chunk) {
    const int64_t c = std::min(chunk, N - s);
    const at::Tensor h = hidden.narrow(0, s, c);
    at::Tensor logits = at::mm(h, weight.t());
    ernie_cuda::CeRowsParams p;
    p.dtype = cuda_dtype(logits, "fused_head_ce logits");
    p.rows = c, p.V = V, p.row_stride = logits.stride(0), p.logits = logits.data_ptr();
    p.labels = labels.data_ptr<int64_t>() + s, p.ignore_index = ignore_index, p.loss = loss_rows.data_ptr<float>() + s;
    const cudaError_t err = ernie_cuda::ce_rows(p, stream);
    TORCH_CHECK(err == cudaSuccess, "fused_head_ce: CUDA error ", cudaGetErrorString(err));
    if (grad_hidden) {
      at::Tensor dh = dhidden.narrow(0, s, c);
      at::mm_out(dh, logits, weight);
    }
    if (grad_weight) dweight.add_(at::mm(logits.t(), h));
  }
  return {loss_rows.sum(), live.sum(), dhidden, grad_weight ? dweight.to(weight.scalar_type()) : dweight};
}

}  // namespace
}  // namespace ernie_bind_cuda

TORCH_LIBRARY_IMPL(ernie_core_C, CUDA, m) {
  m.impl("rope", &ernie_bind_cuda::rope_one);
  m.impl("rope_qk", &ernie_bind_cuda::rope_qk_cuda);
  m.impl("fused_head_ce", &ernie_bind_cuda::fused_head_ce_cuda);
}
