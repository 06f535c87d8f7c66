"""rms_norm: every backend against the reference (values and gradients), fp32, bf16 and mixed
dtypes, odd sizes; opcheck."""
import importlib

import pytest
import torch

from _tolerances import BACKENDS, assert_close, use_backend
from ernie_core import ops
from ernie_core.ops import reference as ref

rms_mod = importlib.import_module("ernie_core.ops.rms_norm")
OP = "rms_norm"

DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=["fp32", "bf16", "bf16x-fp32w"])
@pytest.mark.parametrize("shape", [(3, 97, 64), (1, 1, 1024), (5, 33)], ids=str)
def test_matches_reference(monkeypatch, backend, dtypes, shape):
    use_backend(monkeypatch, OP, backend)
    xdt, wdt = dtypes
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(xdt).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(wdt).requires_grad_()
    y = ops.rms_norm(x, w, 1e-5)
    want = ref.rms_norm_reference(x, w, 1e-5)
    assert y.dtype == want.dtype
    out_dt = want.dtype
    assert_close(y, want, "pointwise", out_dt, "y")
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w), dy)
    # Oracle gradients in fp32 (the bf16 autograd of the reference rounds every intermediate).
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    want_g = torch.autograd.grad(ref.rms_norm_reference(x32, w32, 1e-5), (x32, w32), dy.float())
    assert_close(got[0].float(), want_g[0], "reduction", xdt, "dx")
    # dw sums over rows: compare relative to its scale.
    scale = want_g[1].abs().max().clamp_min(1.0)
    assert_close(got[1].float() / scale, want_g[1] / scale, "reduction", xdt, "dw")  # dw rounds n to x's dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(monkeypatch, backend):
    use_backend(monkeypatch, OP, backend)
    x, w = torch.randn(4, 7, 48, requires_grad=True), torch.randn(48, requires_grad=True)
    torch.library.opcheck(rms_mod.rms_norm_op, (x, w, 1e-6))
    _, rstd = rms_mod.rms_norm_op(x.detach(), w.detach(), 1e-6)
    torch.library.opcheck(rms_mod.rms_norm_backward_op, (torch.randn(4, 7, 48), x.detach(), w.detach(), rstd))


def test_frozen_weight_and_strided_input(monkeypatch):
    use_backend(monkeypatch, OP, "cpu")
    base = torch.randn(6, 80)
    x = base[:, :64].requires_grad_()  # rows with a stride of 80
    w = torch.randn(64)
    y = ops.rms_norm(x, w)
    assert_close(y, ref.rms_norm_reference(x, w), "pointwise", torch.float32)
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert dx.shape == x.shape and torch.isfinite(dx).all()
