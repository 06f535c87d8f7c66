"""Rotary position embedding on q and k together: the public op `ernie_core::rope`.

Interleaved pairs (2i, 2i+1), angle pos * theta^(-2i/D), fp32 math, results in the inputs' dtypes
(docs/behaviour.md#model); per-sample position ids [B, S]. The backward (`ernie_core::rope_backward`,
its own op) is the same rotation by -angle, the transpose of the forward. A backend registers
`fwd(x, position_ids, theta, inverse=False) -> y` and may add `fwd_qk(q, k, position_ids, theta,
inverse=False) -> (q, k)` to do both tensors in one pass (angles computed once per token).
"""
import torch

from . import _backend, _dtypes
from . import reference as ref

OP = "rope"


def _rotate(q, k, position_ids, theta, inverse):
    backend = _backend.choose_backend(OP, q, k)
    with _dtypes.no_autocast(q):
        if _backend.has_kernel(OP, backend, "fwd_qk"):
            return _backend.kernel(OP, backend, "fwd_qk")(q, k, position_ids, theta, inverse=inverse)
        fwd = _backend.kernel(OP, backend, "fwd")
        return fwd(q, position_ids, theta, inverse=inverse), fwd(k, position_ids, theta, inverse=inverse)


@torch.library.custom_op("ernie_core::rope", mutates_args=())
def rope_op(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, k, position_ids, theta, inverse=False)


@rope_op.register_fake
def _(q, k, position_ids, theta):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("ernie_core::rope_backward", mutates_args=())
def rope_backward_op(
    dq: torch.Tensor, dk: torch.Tensor, position_ids: torch.Tensor, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(dq, dk, position_ids, theta, inverse=True)


@rope_backward_op.register_fake
def _(dq, dk, position_ids, theta):
    return dq.new_empty(dq.shape), dk.new_empty(dk.shape)


def _setup_context(ctx, inputs, output):
    _, _, position_ids, theta = inputs
    ctx.save_for_backward(position_ids)
    ctx.theta = theta


def _backward(ctx, dq, dk):
    (position_ids,) = ctx.saved_tensors
    gq, gk = rope_backward_op(dq, dk, position_ids, ctx.theta)
    return gq, gk, None, None


rope_op.register_autograd(_backward, setup_context=_setup_context)


def _reference_fwd(x, position_ids, theta, inverse=False):
    return ref.rope_reference_one(x, position_ids, theta, inverse)


_backend.register(OP, "reference", "fwd", _reference_fwd)


def _fwd_contract(x, position_ids, theta, *, inverse): ...


def _fwd_qk_contract(q, k, position_ids, theta, *, inverse): ...


def _supports_contract(q, k): ...


_backend.declare(OP, "fwd", _fwd_contract)
_backend.declare(OP, "fwd_qk", _fwd_qk_contract)
_backend.declare(OP, "supports", _supports_contract)


def _example():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 7, 4, 16, generator=g).requires_grad_(), torch.randn(2, 7, 2, 16, generator=g).requires_grad_()
    pos = torch.randint(0, 4096, (2, 7), generator=g)
    rq, rk = rope_op(q, k, pos, 10000.0)
    w_q, w_k = torch.randn(rq.shape, generator=g), torch.randn(rk.shape, generator=g)
    dq, dk = torch.autograd.grad((rq * w_q).sum() + (rk * w_k).sum(), (q, k))
    return dict(q=rq, k=rk, dq=dq, dk=dk)


_backend.example(OP, _example)


def rope(q, k, position_ids=None, theta=500000.0):
    """Rotated (q, k): q [B, S, Hq, D], k [B, S, Hkv, D], position_ids int [B, S] (None: 0..S-1).
    Each output keeps its input's dtype, autocast or not (the math is fp32 inside)."""
    if position_ids is None:
        position_ids = torch.arange(q.shape[1], device=q.device).expand(q.shape[0], -1)
    return rope_op(q, k, position_ids, float(theta))
