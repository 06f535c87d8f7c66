"""swiglu: every backend against the reference (values and gradients), fp32 and bf16, odd sizes,
strided halves of a fused gate_up projection; opcheck."""
import importlib

import pytest
import torch

from _tolerances import BACKENDS, assert_close, use_backend
from ernie_core import ops
from ernie_core.ops import reference as ref

swiglu_mod = importlib.import_module("ernie_core.ops.swiglu")
OP = "swiglu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 97, 67), (1, 1, 1), (3, 256)], ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused_gate_up"])
def test_matches_reference(monkeypatch, backend, dtype, shape, fused):
    use_backend(monkeypatch, OP, backend)
    g = torch.Generator().manual_seed(0)
    if fused:
        gate_up = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 4).to(dtype).requires_grad_()
        gate, up = gate_up.chunk(2, dim=-1)
        leaves = (gate_up,)
    else:
        gate = (torch.randn(shape, generator=g) * 4).to(dtype).requires_grad_()
        up = torch.randn(shape, generator=g).to(dtype).requires_grad_()
        leaves = (gate, up)
    y = ops.swiglu(gate, up)
    g32, u32 = (t.detach().float().requires_grad_() for t in (gate, up))
    want = ref.swiglu_reference(g32, u32)
    assert y.dtype == dtype
    assert_close(y.float(), want, "pointwise", dtype, "y")
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, dy)
    want_g = torch.autograd.grad(want, (g32, u32), dy.float())
    if fused:
        want_g = (torch.cat(want_g, dim=-1),)
    for name, a, b in zip(["dgate", "dup"], got, want_g):
        assert_close(a.float(), b, "pointwise", dtype, name)


def test_extreme_inputs(monkeypatch):
    use_backend(monkeypatch, OP, "cpu")
    gate = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4])
    up = torch.ones_like(gate)
    assert_close(ops.swiglu(gate, up), ref.swiglu_reference(gate, up), "pointwise", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(monkeypatch, backend):
    use_backend(monkeypatch, OP, backend)
    gate, up = torch.randn(3, 5, 40, requires_grad=True), torch.randn(3, 5, 40, requires_grad=True)
    torch.library.opcheck(swiglu_mod.swiglu_op, (gate, up))
    torch.library.opcheck(swiglu_mod.swiglu_backward_op, (torch.randn(3, 5, 40), gate.detach(), up.detach()))
