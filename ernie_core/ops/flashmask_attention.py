"""FlashMask attention: the public op `ernie_core::flashmask_attention` (ernie_reference §5.3).

Two registered ops: `ernie_core::flashmask_attention` (forward, returns out and the fp32
log-sum-exp) and `ernie_core::flashmask_attention_backward` (its own op, called by the autograd
formula). Each call picks a backend (`_backend.choose_backend`): the C++ CPU kernel for CPU
tensors where built, CUDA/Triton kernels for CUDA tensors once they register, else the reference.
A backend registers `fwd(q, k, v, idx, causal, scale) -> (out, lse)` and
`bwd(dout, q, k, v, out, lse, idx, causal, scale[, dlse=]) -> (dq, dk, dv)`, and optionally
`supports(q, k, v) -> bool`.
"""
import math
from typing import Optional

import torch

from . import _backend, _dtypes
from . import reference as ref

OP = "flashmask_attention"


def default_indices(q: torch.Tensor, causal: bool) -> torch.Tensor:
    """FlashMask indices for plain causal (LTS = S) or full (LTS = S, UTE = 0) attention."""
    B, S = q.shape[0], q.shape[1]
    if causal:
        return torch.full((B, 1, S, 1), S, dtype=torch.int32, device=q.device)
    idx = torch.zeros((B, 1, S, 2), dtype=torch.int32, device=q.device)
    idx[..., 0] = S
    return idx


@torch.library.custom_op("ernie_core::flashmask_attention", mutates_args=())
def flashmask_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, startend_row_indices: torch.Tensor, causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _backend.choose_backend(OP, q, k, v)
    with _dtypes.no_autocast(q):
        return _backend.kernel(OP, backend, "fwd")(q, k, v, startend_row_indices, causal, softmax_scale)


@flashmask_attention_op.register_fake
def _(q, k, v, startend_row_indices, causal, softmax_scale):
    B, S, Hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, Hq, S), dtype=torch.float32)


@torch.library.custom_op("ernie_core::flashmask_attention_backward", mutates_args=())
def flashmask_attention_backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    startend_row_indices: torch.Tensor, causal: bool, softmax_scale: float, dlse: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = _backend.choose_backend(OP, q, k, v, fn_name="bwd")
    bwd = _backend.kernel(OP, backend, "bwd")
    extra = {} if dlse is None else {"dlse": dlse}
    with _dtypes.no_autocast(q):
        return bwd(dout, q, k, v, out, lse, startend_row_indices, causal, softmax_scale, **extra)


@flashmask_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, startend_row_indices, causal, softmax_scale, dlse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, idx, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, idx, out, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, dout, dlse):
    q, k, v, idx, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = flashmask_attention_backward_op(dout, q, k, v, out, lse, idx, ctx.causal, ctx.scale, dlse)
    return dq, dk, dv, None, None, None


flashmask_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _reference_fwd(q, k, v, idx, causal, scale):
    out, lse = ref.flashmask_attention_reference(q, k, v, idx, causal, scale, return_lse=True)
    return out.contiguous(), lse.contiguous()


_backend.register(OP, "reference", "fwd", _reference_fwd)
_backend.register(OP, "reference", "bwd", ref.flashmask_attention_backward_reference)


def flashmask_attention(q, k, v, startend_row_indices=None, causal=True, softmax_scale=None, dropout_p=0.0):
    """Attention with a FlashMask start/end-row-index mask; out [B, S, Hq, D] in the inputs' dtype.

    q [B, S, Hq, D], k/v [B, S, Hkv, D] (Hq a multiple of Hkv: GQA); startend_row_indices int32
    [B, 1 | Hkv, S, n]: causal n = 1 (LTS) or 2 (LTS, LTE); bidirectional n = 2 (LTS, UTE) or 4
    (LTS, LTE, UTS, UTE); None = plain causal / full attention. softmax_scale defaults to
    1/sqrt(D). Rows that may attend no column give 0 (zero gradients), never NaN.
    Under autocast q, k, v are cast to the autocast dtype (bf16 on CPU), else to their common
    dtype; kernels accumulate in fp32 either way.
    dropout_p > 0 runs the reference (materialises [S, S] probabilities): no kernel has dropout yet.
    """
    q, k, v = _dtypes.matmul_inputs(q, k, v)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if startend_row_indices is None:
        idx = default_indices(q, causal)
    else:
        idx = startend_row_indices if startend_row_indices.dtype == torch.int32 else startend_row_indices.int()
    if dropout_p > 0.0:  # fp32 scores/softmax inside, as the kernels: autocast must not make them bf16
        with _dtypes.no_autocast(q):
            return ref.flashmask_attention_reference(q, k, v, idx, causal, scale, dropout_p)
    out, _ = flashmask_attention_op(q, k, v, idx, causal, scale)
    return out
