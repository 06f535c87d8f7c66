"""RMSNorm: the public op `ernie_core::rms_norm` (docs/behaviour.md#model).

y = weight * cast_x(x * rsqrt(mean(x^2) + eps)), fp32 statistics. Forward returns (y, rstd fp32);
`ernie_core::rms_norm_backward` is its own op. A backend registers `fwd(x, w, eps) -> (y, rstd)`
and `bwd(dy, x, w, rstd) -> (dx, dw)`.
"""
import torch

from . import _backend, _dtypes
from . import reference as ref

OP = "rms_norm"


@torch.library.custom_op("ernie_core::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _backend.choose_backend(OP, x, weight)
    with _dtypes.no_autocast(x):
        return _backend.kernel(OP, backend, "fwd")(x, weight, eps)


@rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)), x.new_empty(
        x.shape[:-1], dtype=torch.float32
    )


@torch.library.custom_op("ernie_core::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _backend.choose_backend(OP, x, weight, fn_name="bwd")
    with _dtypes.no_autocast(x):
        return _backend.kernel(OP, backend, "bwd")(dy, x, weight, rstd)


@rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_backward_op(dy, x, weight, rstd)
    return dx, dw, None


rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def _reference_fwd(x, weight, eps):
    return ref.rms_norm_reference(x, weight, eps), ref.rms_norm_rstd_reference(x, eps)


_backend.register(OP, "reference", "fwd", _reference_fwd)
_backend.register(OP, "reference", "bwd", ref.rms_norm_backward_reference)


def _fwd_contract(x, weight, eps): ...


def _bwd_contract(dy, x, weight, rstd): ...


def _supports_contract(x, weight): ...


_backend.declare(OP, "fwd", _fwd_contract)
_backend.declare(OP, "bwd", _bwd_contract)
_backend.declare(OP, "supports", _supports_contract)


def _example():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 48, generator=g).requires_grad_()
    w = (1 + 0.1 * torch.randn(48, generator=g)).requires_grad_()
    y, _ = rms_norm_op(x, w, 1e-6)
    dx, dw = torch.autograd.grad((y * torch.randn(y.shape, generator=g)).sum(), (x, w))
    return dict(y=y, dx=dx, dw=dw)


_backend.example(OP, _example)


def rms_norm(x, weight, eps=1e-5):
    """x [..., H], weight [H] -> y [..., H] in promote(x, weight) dtype (x's when they agree).
    Dtypes are kept under autocast (statistics are fp32 inside)."""
    y, _ = rms_norm_op(x, weight, float(eps))
    return y
