"""SwiGLU activation: the public op `ernie_core::swiglu`, y = silu(gate) * up (fp32 math).

`ernie_core::swiglu_backward` is its own op. A backend registers `fwd(g, u) -> y` and
`bwd(dy, g, u) -> (dg, du)`. gate/up may be strided halves of one fused gate_up projection.
"""
import torch

from . import _backend, _dtypes
from . import reference as ref

OP = "swiglu"


@torch.library.custom_op("ernie_core::swiglu", mutates_args=())
def swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    backend = _backend.choose_backend(OP, gate, up)
    with _dtypes.no_autocast(gate):
        return _backend.kernel(OP, backend, "fwd")(gate, up)


@swiglu_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("ernie_core::swiglu_backward", mutates_args=())
def swiglu_backward_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _backend.choose_backend(OP, gate, up, fn_name="bwd")
    with _dtypes.no_autocast(gate):
        return _backend.kernel(OP, backend, "bwd")(dy, gate, up)


@swiglu_backward_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return swiglu_backward_op(dy, gate, up)


swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def _reference_fwd(gate, up):
    return ref.swiglu_reference(gate, up).contiguous()


_backend.register(OP, "reference", "fwd", _reference_fwd)
_backend.register(OP, "reference", "bwd", ref.swiglu_backward_reference)


def _fwd_contract(gate, up): ...


def _bwd_contract(dy, gate, up): ...


def _supports_contract(gate, up): ...


_backend.declare(OP, "fwd", _fwd_contract)
_backend.declare(OP, "bwd", _bwd_contract)
_backend.declare(OP, "supports", _supports_contract)


def _example():
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(5, 77, generator=g).mul(3).requires_grad_() for _ in range(2))
    y = swiglu_op(gate, up)
    dg, du = torch.autograd.grad((y * torch.randn(y.shape, generator=g)).sum(), (gate, up))
    return dict(y=y, dgate=dg, dup=du)


_backend.example(OP, _example)


def swiglu(gate, up):
    """silu(gate) * up, same shape; inputs are cast to their common dtype (autocast or not)."""
    gate, up = _dtypes.common_inputs(gate, up)
    return swiglu_op(gate, up)
