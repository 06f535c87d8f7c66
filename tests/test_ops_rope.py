"""rope: every backend against the reference (values and gradients), fp32 and bf16, per-sample
position ids, q and k with different head counts; opcheck."""
import importlib

import pytest
import torch

from _tolerances import BACKENDS, assert_close, use_backend
from ernie_core import ops
from ernie_core.ops import reference as ref

rope_mod = importlib.import_module("ernie_core.ops.rope")
OP = "rope"


def packed_positions(B, S, seed=0):
    """Position ids that restart at 0 for each packed sample (docs/behaviour.md#position-ids), pads 0."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.zeros(B, S, dtype=torch.int64)
    for b in range(B):
        s = 0
        while s < S - 5:
            n = int(torch.randint(1, S - s, (1,), generator=g))
            pos[b, s : s + n] = torch.arange(n)
            s += n
    return pos


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 97, 4, 2, 64), (1, 33, 8, 1, 128), (3, 5, 2, 2, 16)],
                         ids=lambda s: "B{}S{}Hq{}Hkv{}D{}".format(*s))
def test_matches_reference(monkeypatch, backend, dtype, shape):
    use_backend(monkeypatch, OP, backend)
    B, S, Hq, Hkv, D = shape
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, S, Hq, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, S, Hkv, D, generator=g).to(dtype).requires_grad_()
    pos = packed_positions(B, S) * 97  # large angles: the fp32 angle must match the reference exactly
    qr, kr = ops.rope(q, k, pos)
    want_q, want_k = ref.rope_reference(q, k, pos)
    assert qr.dtype == dtype and kr.dtype == dtype
    assert_close(qr, want_q, "pointwise", dtype, "q")
    assert_close(kr, want_k, "pointwise", dtype, "k")
    dq_up, dk_up = torch.randn_like(qr), torch.randn_like(kr)
    got = torch.autograd.grad((qr, kr), (q, k), (dq_up, dk_up))
    want = torch.autograd.grad((want_q, want_k), (q, k), (dq_up, dk_up))
    assert_close(got[0], want[0], "pointwise", dtype, "dq")
    assert_close(got[1], want[1], "pointwise", dtype, "dk")


def test_default_positions_and_theta(monkeypatch):
    use_backend(monkeypatch, OP, "cpu")
    q, k = torch.randn(1, 20, 2, 32), torch.randn(1, 20, 1, 32)
    pos = torch.arange(20).view(1, 20)
    for got, want in zip(ops.rope(q, k, None, theta=10000.0), ref.rope_reference(q, k, pos, 10000.0)):
        assert_close(got, want, "pointwise", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(monkeypatch, backend):
    use_backend(monkeypatch, OP, backend)
    q, k = torch.randn(2, 9, 4, 16, requires_grad=True), torch.randn(2, 9, 2, 16, requires_grad=True)
    pos = packed_positions(2, 9)
    torch.library.opcheck(rope_mod.rope_op, (q, k, pos, 500000.0))
    torch.library.opcheck(rope_mod.rope_backward_op, (q.detach(), k.detach(), pos, 500000.0))
