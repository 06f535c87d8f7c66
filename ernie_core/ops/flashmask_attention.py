"""FlashMask attention: the public op `ernie_core::flashmask_attention` (docs/behaviour.md#flashmask-row-indices).

Two registered ops: `ernie_core::flashmask_attention` (forward, returns out and the fp32
log-sum-exp) and `ernie_core::flashmask_attention_backward` (its own op, called by the autograd
formula). Each call picks a backend (`_backend.choose_backend`): the C++ CPU kernel for CPU
tensors where built, CUDA/Triton kernels for CUDA tensors once they register, else the reference.
A backend registers `fwd(q, k, v, idx, causal, scale) -> (out, lse)` and
`bwd(dout, q, k, v, out, lse, idx, causal, scale[, dlse=]) -> (dq, dk, dv)`, and optionally
`supports(q, k, v) -> bool` (the declared contracts below, checked for every backend by
tests/test_backend_conformance.py).

Attention dropout (dropout_p > 0) is a separate capability: a backend that has it registers
`fwd_dropout(q, k, v, idx, causal, scale, dropout_p, rng_state)` and `bwd_dropout(dout, q, k, v,
out, lse, idx, causal, scale, dropout_p=, rng_state=[, dlse=])`. rng_state is int64 [2] (seed,
offset) on CPU, drawn from the default CPU generator by the front door and saved for backward; the
keep mask is a hash of (seed, offset, b, h, i, j) (reference.dropout_keep_mask), so backward
regenerates it. The C++ CPU kernel and the Triton kernels have it (the same mask bit for bit), and
the CUDA backend passes it to its kernels; where no kernel does the reference runs it, with a
one-time warning.
"""
import math
import warnings
from typing import Optional

import torch

from . import _backend, _dtypes
from . import reference as ref

OP = "flashmask_attention"
_WARNED_DROPOUT_FALLBACK: set[str] = set()  # device types already warned about (once per process)


def _choose(q, k, v, fn_name: str, dropout: bool) -> str:
    """The backend for this call; dropout needs a `<fn_name>_dropout` kernel, else the reference."""
    if not dropout:
        return _backend.choose_backend(OP, q, k, v, fn_name=fn_name)
    fn_name += "_dropout"
    forced = _backend.forced_backend()
    if forced not in (None, "reference") and not _backend.has_kernel(OP, forced, fn_name):
        backend = "reference"  # a forced kernel backend without dropout: the reference, as below
    else:
        backend = _backend.choose_backend(OP, q, k, v, fn_name=fn_name)
    if backend == "reference" and forced != "reference" and q.device.type not in _WARNED_DROPOUT_FALLBACK:
        _WARNED_DROPOUT_FALLBACK.add(q.device.type)
        warnings.warn(
            f"flashmask_attention: dropout_p > 0 with {q.dtype} {q.device.type} tensors runs the pure-PyTorch "
            "reference, because no attention kernel built here implements dropout for them: it materialises [B, H, S, S] probabilities, so time and memory grow as S^2. Set "
            "attention_probs_dropout_prob=0 to use the kernels.", stacklevel=2)
    return backend


def default_indices(q: torch.Tensor, causal: bool) -> torch.Tensor:
    """FlashMask indices for plain causal (LTS = S) or full (LTS = S, UTE = 0) attention."""
    B, S = q.shape[0], q.shape[1]
    if causal:
        return torch.full((B, 1, S, 1), S, dtype=torch.int32, device=q.device)
    idx = torch.zeros((B, 1, S, 2), dtype=torch.int32, device=q.device)
    idx[..., 0] = S
    return idx


def _check_dropout(dropout_p: float, rng_state: Optional[torch.Tensor]) -> bool:
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"flashmask_attention: dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p > 0.0 and (rng_state is None or rng_state.dtype != torch.int64 or rng_state.numel() != 2):
        raise ValueError("flashmask_attention: dropout_p > 0 needs rng_state, an int64 tensor (seed, offset)")
    return dropout_p > 0.0


@torch.library.custom_op("ernie_core::flashmask_attention", mutates_args=())
def flashmask_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, startend_row_indices: torch.Tensor, causal: bool,
    softmax_scale: float, dropout_p: float = 0.0, rng_state: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    dropout = _check_dropout(dropout_p, rng_state)
    backend = _choose(q, k, v, "fwd", dropout)
    with _dtypes.no_autocast(q):
        if dropout:
            fwd = _backend.kernel(OP, backend, "fwd_dropout")
            return fwd(q, k, v, startend_row_indices, causal, softmax_scale, dropout_p, rng_state)
        return _backend.kernel(OP, backend, "fwd")(q, k, v, startend_row_indices, causal, softmax_scale)


@flashmask_attention_op.register_fake
def _(q, k, v, startend_row_indices, causal, softmax_scale, dropout_p=0.0, rng_state=None):
    B, S, Hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, Hq, S), dtype=torch.float32)


@torch.library.custom_op("ernie_core::flashmask_attention_backward", mutates_args=())
def flashmask_attention_backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    startend_row_indices: torch.Tensor, causal: bool, softmax_scale: float, dlse: Optional[torch.Tensor],
    dropout_p: float = 0.0, rng_state: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dropout = _check_dropout(dropout_p, rng_state)
    backend = _choose(q, k, v, "bwd", dropout)
    extra = {} if dlse is None else {"dlse": dlse}
    if dropout:
        bwd = _backend.kernel(OP, backend, "bwd_dropout")
        extra.update(dropout_p=dropout_p, rng_state=rng_state)
    else:
        bwd = _backend.kernel(OP, backend, "bwd")
    with _dtypes.no_autocast(q):
        return bwd(dout, q, k, v, out, lse, startend_row_indices, causal, softmax_scale, **extra)


@flashmask_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, startend_row_indices, causal, softmax_scale, dlse, dropout_p=0.0, rng_state=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, idx, causal, scale, dropout_p, rng_state = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, idx, out, lse, rng_state)
    ctx.causal, ctx.scale, ctx.dropout_p = causal, scale, dropout_p


def _backward(ctx, dout, dlse):
    q, k, v, idx, out, lse, rng_state = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = flashmask_attention_backward_op(dout, q, k, v, out, lse, idx, ctx.causal, ctx.scale, dlse,
                                                 ctx.dropout_p, rng_state)
    return dq, dk, dv, None, None, None, None, None


flashmask_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _reference_fwd(q, k, v, idx, causal, scale, dropout_p=0.0, rng_state=None):
    out, lse = ref.flashmask_attention_reference(q, k, v, idx, causal, scale, dropout_p, return_lse=True,
                                                 rng_state=rng_state)
    return out.contiguous(), lse.contiguous()


_backend.register(OP, "reference", "fwd", _reference_fwd)
_backend.register(OP, "reference", "bwd", ref.flashmask_attention_backward_reference)
_backend.register(OP, "reference", "fwd_dropout", _reference_fwd)
_backend.register(OP, "reference", "bwd_dropout", ref.flashmask_attention_backward_reference)


# ---- the kernel contract: the calls above, one stub per function name (see _backend.declare) -----
def _fwd_contract(q, k, v, startend_row_indices, causal, softmax_scale): ...


def _bwd_contract(dout, q, k, v, out, lse, startend_row_indices, causal, softmax_scale, *, dlse=None): ...


def _fwd_dropout_contract(q, k, v, startend_row_indices, causal, softmax_scale, dropout_p, rng_state): ...


def _bwd_dropout_contract(dout, q, k, v, out, lse, startend_row_indices, causal, softmax_scale, *, dropout_p,
                          rng_state, dlse=None): ...


def _supports_contract(q, k, v): ...


_backend.declare(OP, "fwd", _fwd_contract)
_backend.declare(OP, "bwd", _bwd_contract)
_backend.declare(OP, "fwd_dropout", _fwd_dropout_contract)
_backend.declare(OP, "bwd_dropout", _bwd_dropout_contract)
_backend.declare(OP, "supports", _supports_contract)


def _example():
    """Front door with autograd: GQA, two documents, a gradient on lse too (dlse), and dropout."""
    g = torch.Generator().manual_seed(0)
    B, S, Hq, Hkv, D = 2, 40, 4, 2, 32
    q, k, v = (torch.randn(B, S, h, D, generator=g).requires_grad_() for h in (Hq, Hkv, Hkv))
    idx = torch.full((B, 1, S, 1), S, dtype=torch.int32)
    idx[:, :, :23] = 23  # columns of the first document are hidden from rows >= 23
    w_out, w_lse = torch.randn(B, S, Hq, D, generator=g), torch.randn(B, Hq, S, generator=g)
    out, lse = flashmask_attention_op(q, k, v, idx, True, 0.2)
    grads = torch.autograd.grad((out * w_out).sum() + (lse * w_lse).sum(), (q, k, v))
    out_d, lse_d = flashmask_attention_op(q, k, v, idx, True, 0.2, 0.25, torch.tensor([-(2**62) - 7, 123456789]))
    grads_d = torch.autograd.grad((out_d * w_out).sum() + (lse_d * w_lse).sum(), (q, k, v))
    return dict(out=out, lse=lse, dq=grads[0], dk=grads[1], dv=grads[2], out_dropout=out_d, lse_dropout=lse_d,
                dq_dropout=grads_d[0], dk_dropout=grads_d[1], dv_dropout=grads_d[2])


_backend.example(OP, _example)


def flashmask_attention(q, k, v, startend_row_indices=None, causal=True, softmax_scale=None, dropout_p=0.0):
    """Attention with a FlashMask start/end-row-index mask; out [B, S, Hq, D] in the inputs' dtype.

    q [B, S, Hq, D], k/v [B, S, Hkv, D] (Hq a multiple of Hkv: GQA); startend_row_indices int32
    [B, 1 | Hkv, S, n]: causal n = 1 (LTS) or 2 (LTS, LTE); bidirectional n = 2 (LTS, UTE) or 4
    (LTS, LTE, UTS, UTE); None = plain causal / full attention. softmax_scale defaults to
    1/sqrt(D). Rows that may attend no column give 0 (zero gradients), never NaN.
    Under autocast q, k, v are cast to the autocast dtype (bf16 on CPU), else to their common
    dtype; kernels accumulate in fp32 either way.
    dropout_p > 0: out = dropout(softmax(s)) v (training-time attention-probability dropout, kept
    entries scaled by 1/(1-p)); the keep mask's (seed, offset) come from torch's default CPU
    generator at this call, so `torch.manual_seed` / `torch.set_rng_state` reproduce it. The CPU,
    Triton and CUDA kernels run it in O(S) memory; without them the reference does (materialises
    [S, S], warns once).
    """
    q, k, v = _dtypes.matmul_inputs(q, k, v)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if startend_row_indices is None:
        idx = default_indices(q, causal)
    else:
        idx = startend_row_indices if startend_row_indices.dtype == torch.int32 else startend_row_indices.int()
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"flashmask_attention: dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p > 0.0:
        out, _ = flashmask_attention_op(q, k, v, idx, causal, scale, float(dropout_p), ref.draw_dropout_rng_state())
        return out
    out, _ = flashmask_attention_op(q, k, v, idx, causal, scale)
    return out
