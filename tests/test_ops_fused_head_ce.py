"""fused_head_ce: every backend against logits + cross_entropy (values and gradients), chunk sizes
that do and do not divide the token count, ignored labels, sparse gathering, frozen weight, no-grad,
fp32 and bf16; opcheck."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from _tolerances import BACKENDS, assert_close, assert_close_to_oracle, use_backend
from ernie_core import ops
from ernie_core.ops import reference as ref

ce_mod = importlib.import_module("ernie_core.ops.fused_head_ce")
OP = "fused_head_ce"


def make(N=77, H=48, V=1000, seed=0, ignore_every=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.2
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::ignore_every] = -100
    return hidden, weight, labels


def naive(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"), (labels != -100).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [7, 32, None], ids=["chunk7", "chunk32", "auto"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_matches_reference_fp32(monkeypatch, backend, chunk, sparse):
    use_backend(monkeypatch, OP, backend, "fwd_bwd")
    hidden, weight, labels = make()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, n = ops.fused_head_ce(h, w, labels, chunk_tokens=chunk, sparse=sparse)
    h0, w0 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want_loss, want_n = naive(h0, w0, labels)
    assert n.dtype == torch.int64 and int(n) == int(want_n)
    assert_close(loss, want_loss, "reduction", torch.float32, "loss_sum")
    up = torch.tensor(0.37)  # a non-unit upstream gradient (e.g. 1 / n_tokens)
    got = torch.autograd.grad(loss, (h, w), up)
    want = torch.autograd.grad(want_loss, (h0, w0), up)
    assert_close(got[0], want[0], "reduction", torch.float32, "dhidden")
    assert_close(got[1], want[1], "reduction", torch.float32, "dweight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16(monkeypatch, backend):
    use_backend(monkeypatch, OP, backend, "fwd_bwd")
    hidden, weight, labels = make(N=50, H=64, V=700, seed=1)
    leaves = [t.bfloat16().requires_grad_() for t in (hidden, weight)]
    loss, _ = ops.fused_head_ce(*leaves, labels, chunk_tokens=16)
    grads = torch.autograd.grad(loss, leaves)
    low = [t.bfloat16().requires_grad_() for t in (hidden, weight)]
    loss_low, _ = naive(*low, labels)
    grads_low = torch.autograd.grad(loss_low, low)
    hi = [t.clone().requires_grad_() for t in (hidden, weight)]
    loss32, _ = naive(*hi, labels)
    grads32 = torch.autograd.grad(loss32, hi)
    assert loss.dtype == torch.float32
    for name, a, lo, o in zip(["loss", "dhidden", "dweight"], [loss, *grads], [loss_low, *grads_low],
                              [loss32, *grads32]):
        assert_close_to_oracle(a, lo, o, name, floor=1e-2 * max(1.0, o.abs().max().item()))


def test_frozen_weight_and_no_grad(monkeypatch):
    use_backend(monkeypatch, OP, "cpu", "fwd_bwd")
    hidden, weight, labels = make()
    h = hidden.clone().requires_grad_()
    loss, _ = ops.fused_head_ce(h, weight, labels, chunk_tokens=20)  # weight frozen (LoRA)
    (dh,) = torch.autograd.grad(loss, h)
    h0 = hidden.clone().requires_grad_()
    (want,) = torch.autograd.grad(naive(h0, weight, labels)[0], h0)
    assert_close(dh, want, "reduction", torch.float32, "dhidden")
    with torch.no_grad():
        loss_ng, n = ops.fused_head_ce(hidden, weight, labels)
    assert_close(loss_ng, naive(hidden, weight, labels)[0], "reduction", torch.float32, "loss")


def test_batched_shapes_and_all_ignored(monkeypatch):
    use_backend(monkeypatch, OP, "cpu", "fwd_bwd")
    hidden, weight, labels = make(N=40)
    loss, n = ops.fused_head_ce(hidden.view(2, 20, -1), weight, labels.view(2, 20))
    assert_close(loss, naive(hidden, weight, labels)[0], "reduction", torch.float32)
    h = hidden.clone().requires_grad_()
    loss, n = ops.fused_head_ce(h, weight, torch.full_like(labels, -100), sparse=True)
    assert float(loss.detach()) == 0.0 and int(n) == 0
    loss.backward()
    assert (h.grad == 0).all()


def test_second_backward_is_refused(monkeypatch):
    use_backend(monkeypatch, OP, "cpu", "fwd_bwd")
    hidden, weight, labels = make(N=12, V=60)
    h = hidden.requires_grad_()
    loss, _ = ops.fused_head_ce(h, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # gradients were scaled in place
        loss.backward()


def test_bad_label_is_reported(monkeypatch):
    use_backend(monkeypatch, OP, "cpu", "fwd_bwd")
    hidden, weight, labels = make(N=10, V=50)
    labels[4] = 50
    with pytest.raises(RuntimeError, match="label 50 at token 4"):
        ops.fused_head_ce(hidden, weight, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(monkeypatch, backend):
    use_backend(monkeypatch, OP, backend, "fwd_bwd")
    hidden, weight, labels = make(N=21, H=16, V=90)
    args = (hidden.requires_grad_(), weight.requires_grad_(), labels, -100, 8, True, True)
    torch.library.opcheck(ce_mod.fused_head_ce_op, args)
    torch.library.opcheck(ce_mod.fused_head_ce_backward_op, (torch.tensor(0.5), hidden.detach(), weight.detach()))


def test_reference_backend_matches_autograd():
    """The reference backend's explicit gradient formulas against autograd through logits + CE."""
    hidden, weight, labels = make(N=30, V=200)
    loss, n, dh, dw = ref.fused_head_ce_fwd_bwd_reference(hidden, weight, labels)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = naive(h, w, labels)[0]
    gh, gw = torch.autograd.grad(want, (h, w))
    assert_close(loss, want, "reduction", torch.float32)
    assert_close(dh, gh, "reduction", torch.float32)
    assert_close(dw, gw, "reduction", torch.float32)
