"""flashmask_attention: every backend against the reference, values and gradients, over shapes,
dtypes, GQA ratios and the four FlashMask modes (grid + hypothesis-generated masks)."""
import importlib
import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _tolerances import BACKENDS, assert_close, assert_close_to_oracle, use_backend
from ernie_core import ops
from ernie_core.ops import reference as ref

fm = importlib.import_module("ernie_core.ops.flashmask_attention")
OP = "flashmask_attention"


# ---- mask builders (one column list per FlashMask index, ernie_reference §5.3, §4.2) -------------


def document_lts(lengths, S):
    """Causal LTS for packed documents; columns after the last document are padding (LTS = j)."""
    lts, off = [], 0
    for n in lengths:
        lts += [off + n] * n
        off += n
    return lts + list(range(off, S))


def share_prompt_lts(pairs, S):
    """DPO rows: prompt P, chosen C, rejected R per pair; rejected rows cannot see chosen columns."""
    lts, off = [], 0
    for P, C, R in pairs:
        T = P + C + R
        lts += [off + T] * P + [off + P + C] * C + [off + T] * R
        off += T
    return lts + list(range(off, S))


def sliding_window(lengths, S, window):
    """Causal (LTS, LTE): column j visible to rows [j, j + window) of its document."""
    ends = document_lts(lengths, S)
    return [min(j + window, e) for j, e in enumerate(ends)], [S] * S


def prefix_lm(S, prefix):
    """Bidirectional (LTS, UTE): the first `prefix` tokens see each other, the rest is causal."""
    return [S] * S, [0 if j < prefix else j for j in range(S)]


def global_token_docs(lengths, S):
    """Bidirectional (LTS, LTE, UTS, UTE), example (d): token 0 global, documents bidirectional."""
    lts, lte, uts, ute = [S], [S], [0], [0]
    off = 1
    for n in lengths:
        lts += [off + n] * n
        lte += [S] * n
        uts += [1] * n
        ute += [off] * n
        off += n
    pad = S - off
    return lts + list(range(off, S)), lte + [S] * pad, uts + [0] * pad, ute + [S] * pad


def to_idx(*columns, B=1):
    return torch.tensor(list(zip(*columns)), dtype=torch.int32).view(1, 1, len(columns[0]), len(columns)).repeat(
        B, 1, 1, 1
    )


def grid_mask(kind, S, B):
    """(indices or None, causal) for the named mask kind."""
    rng = random.Random(S)

    def lengths(lo, hi, fill=0.9):
        out, total = [], 0
        while total < int(S * fill) - lo:
            n = min(rng.randint(lo, hi), int(S * fill) - total)
            out.append(n)
            total += n
        return out

    if kind == "causal":
        return None, True
    if kind == "full":
        return None, False
    if kind == "documents":
        return to_idx(document_lts(lengths(5, 40), S), B=B), True
    if kind == "share_prompt":
        pairs = [(7, 9, 5), (11, 3, 13), (4, 20, 6), (9, 9, 9), (30, 12, 7)]
        while sum(map(sum, pairs)) > S - 3:  # keep a few padding columns
            pairs.pop()
        return to_idx(share_prompt_lts(pairs, S), B=B), True
    if kind == "sliding":
        return to_idx(*sliding_window(lengths(10, 70), S, 16), B=B), True
    if kind == "prefix_lm":
        return to_idx(*prefix_lm(S, S // 3), B=B), False
    if kind == "global_docs":
        return to_idx(*global_token_docs(lengths(5, 40), S), B=B), False
    raise ValueError(kind)


# ---- the check ------------------------------------------------------------------------------------


def check_attention(q32, k32, v32, idx, causal, dtype, scale=None, seed=0):
    """Op (current backend) vs autograd through the fp32 reference; bf16 judged by the reference's own error."""
    torch.manual_seed(seed)
    leaves32 = [t.detach().clone().requires_grad_() for t in (q32, k32, v32)]
    out32, lse32 = ref.flashmask_attention_reference(*leaves32, idx, causal, scale, return_lse=True)
    dout = torch.randn_like(out32)
    grads32 = torch.autograd.grad(out32, leaves32, dout)

    leaves = [t.detach().to(dtype).requires_grad_() for t in (q32, k32, v32)]
    out = ops.flashmask_attention(*leaves, idx, causal=causal, softmax_scale=scale)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    _, lse = fm.flashmask_attention_op(*[t.detach() for t in leaves], idx if idx is not None else
                                       fm.default_indices(q32, causal), causal,
                                       scale if scale is not None else 1 / math.sqrt(q32.shape[-1]))
    names = ["out", "dq", "dk", "dv"]
    for name, t in zip(names, [out, *grads]):
        assert torch.isfinite(t).all(), f"{name} has NaN/inf"
    empty_rows = torch.isinf(lse32)  # [B, Hq, S]: rows that may attend nothing
    assert torch.equal(torch.isinf(lse), empty_rows), "rows with lse = -inf differ from the reference"
    assert_close(lse[~empty_rows], lse32[~empty_rows], "attention", dtype, "lse")
    if empty_rows.any():
        rows = empty_rows.transpose(1, 2)  # [B, S, Hq]
        assert (out[rows] == 0).all() and (grads[0][rows] == 0).all(), "fully masked rows must give exact zeros"
    if dtype == torch.float32:
        for name, got, want in zip(names, [out, *grads], [out32, *grads32]):
            assert_close(got, want, "attention", dtype, name)
        return
    low = [t.detach().to(dtype).requires_grad_() for t in (q32, k32, v32)]
    out_low = ref.flashmask_attention_reference(*low, idx, causal, scale)
    grads_low = torch.autograd.grad(out_low, low, dout.to(dtype))
    for name, got, lowp, want in zip(names, [out, *grads], [out_low, *grads_low], [out32, *grads32]):
        assert_close_to_oracle(got, lowp, want, name, floor=2e-3 * max(1.0, want.abs().max().item()))


def inputs(B, S, Hq, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, Hq, D, generator=g), torch.randn(B, S, Hkv, D, generator=g),
            torch.randn(B, S, Hkv, D, generator=g))


SHAPES = [  # B, S, Hq, Hkv, D: GQA ratios 1, 2, 8; head dims 64 and 128; S below / above / off the 64 block
    (2, 97, 2, 2, 64),
    (1, 130, 4, 2, 128),
    (1, 200, 8, 1, 64),
    (2, 64, 2, 1, 128),
]
MASKS = ["causal", "full", "documents", "share_prompt", "sliding", "prefix_lm", "global_docs"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}S{}Hq{}Hkv{}D{}".format(*s))
@pytest.mark.parametrize("mask", MASKS)
def test_cpu_kernel_matches_reference(monkeypatch, dtype, shape, mask):
    use_backend(monkeypatch, OP, "cpu")
    B, S, Hq, Hkv, D = shape
    idx, causal = grid_mask(mask, S, B)
    check_attention(*inputs(*shape), idx, causal, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask", MASKS)
def test_reference_backend_backward(monkeypatch, dtype, mask):
    """The reference backend's explicit backward formulas against autograd through the reference."""
    use_backend(monkeypatch, OP, "reference")
    idx, causal = grid_mask(mask, 97, 2)
    check_attention(*inputs(2, 97, 4, 2, 64), idx, causal, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_head_masks_and_scale(monkeypatch, backend):
    """Indices with one mask per kv head ([B, Hkv, S, n]) and a custom softmax_scale."""
    use_backend(monkeypatch, OP, backend)
    S = 150
    heads = [document_lts([50, 60, 30], S), share_prompt_lts([(20, 30, 40)], S)]
    idx = torch.stack([to_idx(h) for h in heads], dim=1).view(1, 2, S, 1)
    check_attention(*inputs(1, S, 4, 2, 64), idx, True, torch.float32, scale=0.3)


def test_plain_causal_matches_sdpa(monkeypatch):
    """An independent oracle: with no indices the op is torch's causal / full attention."""
    if not ops._backend.has_kernel(OP, "cpu"):
        pytest.skip("no cpu kernel built here")
    monkeypatch.setenv("ERNIE_CORE_BACKEND", "cpu")
    q, k, v = inputs(2, 77, 4, 4, 64, seed=3)
    for causal in (True, False):
        got = ops.flashmask_attention(q, k, v, None, causal=causal)
        want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal).transpose(1, 2)
        assert_close(got, want, "attention", torch.float32, f"causal={causal}")


def test_strided_inputs(monkeypatch):
    """q/k/v as views of one fused qkv projection (non-contiguous heads) give the same result."""
    if not ops._backend.has_kernel(OP, "cpu"):
        pytest.skip("no cpu kernel built here")
    monkeypatch.setenv("ERNIE_CORE_BACKEND", "cpu")
    qkv = torch.randn(2, 90, 4 + 2 + 2, 64)
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    idx, causal = grid_mask("documents", 90, 2)
    check_attention(q, k, v, idx, causal, torch.float32)
    got = ops.flashmask_attention(q, k, v, idx)
    assert torch.equal(got, ops.flashmask_attention(q.contiguous(), k.contiguous(), v.contiguous(), idx))


# ---- hypothesis: random masks of every mode, including fully masked rows and columns -------------


@st.composite
def flashmask_cases(draw, mode):
    S = draw(st.integers(1, 150))
    Hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 8]))
    B = draw(st.integers(1, 2))
    per_head = draw(st.booleans())
    causal, n = {"causal1": (True, 1), "causal2": (True, 2), "bidir2": (False, 2), "bidir4": (False, 4)}[mode]

    def column_bounds():
        kind = draw(st.sampled_from(["structured", "random"]))
        if kind == "random":  # arbitrary spans: fully masked rows / columns happen often
            cols = []
            for _ in range(n // 2 if n > 1 else 1):
                a = draw(st.lists(st.integers(0, S), min_size=S, max_size=S))
                b = draw(st.lists(st.integers(0, S), min_size=S, max_size=S))
                lo, hi = [min(x, y) for x, y in zip(a, b)], [max(x, y) for x, y in zip(a, b)]
                cols += [lo, hi] if n > 1 else [lo]
            return cols
        docs, total = [], 0
        pad = draw(st.integers(0, S // 3))
        while total < S - pad:
            docs.append(min(draw(st.integers(1, 64)), S - pad - total))
            total += docs[-1]
        if mode == "causal1":
            if draw(st.booleans()):
                return [document_lts(docs, S)]
            pairs = [(max(1, d // 3), max(1, d // 3), max(1, d - 2 * max(1, d // 3))) for d in docs if d >= 3]
            return [share_prompt_lts(pairs, S)]
        if mode == "causal2":
            return list(sliding_window(docs, S, draw(st.integers(1, 40))))
        if mode == "bidir2":
            return list(prefix_lm(S, draw(st.integers(0, S))))
        if S < 2:
            return [[S], [S], [0], [0]]
        inner = docs[:]
        inner[0] = max(1, inner[0] - 1) if sum(inner) >= S else inner[0]
        while 1 + sum(inner) > S:
            inner.pop()
        return list(global_token_docs(inner, S))

    heads = Hkv if per_head else 1
    idx = torch.stack(
        [torch.stack([to_idx(*column_bounds()).view(S, n) for _ in range(heads)]) for _ in range(B)]
    )
    seed = draw(st.integers(0, 2**16))
    return B, S, Hkv * group, Hkv, idx, causal, seed


@pytest.mark.parametrize("mode", ["causal1", "causal2", "bidir2", "bidir4"])
def test_hypothesis_masks(monkeypatch, mode):
    use_backend(monkeypatch, OP, "cpu")

    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(flashmask_cases(mode))
    def run(case):
        B, S, Hq, Hkv, idx, causal, seed = case
        check_attention(*inputs(B, S, Hq, Hkv, 64, seed), idx, causal, torch.float32, seed=seed)

    run()


# ---- registration, dropout, autocast --------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(monkeypatch, backend):
    use_backend(monkeypatch, OP, backend)
    q, k, v = (t.requires_grad_() for t in inputs(1, 70, 4, 2, 64))
    idx, _ = grid_mask("documents", 70, 1)
    torch.library.opcheck(fm.flashmask_attention_op, (q, k, v, idx, True, 0.125))
    out, lse = fm.flashmask_attention_op(q.detach(), k.detach(), v.detach(), idx, True, 0.125)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, idx, True, 0.125, None)
    torch.library.opcheck(fm.flashmask_attention_backward_op, args)


def test_raw_kernel_ops_opcheck():
    if not ops._backend.has_kernel(OP, "cpu"):
        pytest.skip("no cpu kernel built here")
    q, k, v = inputs(1, 70, 4, 2, 64)
    idx, _ = grid_mask("documents", 70, 1)
    C = torch.ops.ernie_core_C
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(C.flashmask_fwd.default, (q, k, v, idx, True, 0.125), test_utils=tests)
    out, lse = C.flashmask_fwd(q, k, v, idx, True, 0.125)
    torch.library.opcheck(C.flashmask_bwd.default, (out, q, k, v, out, lse, idx, True, 0.125, None), test_utils=tests)


def test_lse_gradient(monkeypatch):
    """The backward also takes the lse's upstream gradient (d lse / d s = P)."""
    use_backend(monkeypatch, OP, "cpu")
    q, k, v = inputs(1, 80, 2, 2, 64, seed=5)
    idx, _ = grid_mask("documents", 80, 1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = fm.flashmask_attention_op(*leaves, idx, True, 0.125)
    w = torch.randn_like(lse).masked_fill(torch.isinf(lse), 0)
    got = torch.autograd.grad(out.sum() + (lse.masked_fill(torch.isinf(lse), 0) * w).sum(), leaves)
    leaves32 = [t.clone().requires_grad_() for t in (q, k, v)]
    o32, l32 = ref.flashmask_attention_reference(*leaves32, idx, True, 0.125, return_lse=True)
    want = torch.autograd.grad(o32.sum() + (l32.masked_fill(torch.isinf(l32), 0) * w).sum(), leaves32)
    for name, a, b in zip(["dq", "dk", "dv"], got, want):
        assert_close(a, b, "attention", torch.float32, name)


def test_dropout_falls_back_to_reference():
    q, k, v = (t.requires_grad_() for t in inputs(1, 40, 2, 2, 64))
    torch.manual_seed(0)
    out = ops.flashmask_attention(q, k, v, None, dropout_p=0.5)
    assert not torch.allclose(out, ops.flashmask_attention(q, k, v, None))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_autocast_casts_inputs_to_bf16(monkeypatch):
    use_backend(monkeypatch, OP, "cpu")
    q, k, v = inputs(1, 70, 4, 2, 64)
    idx, _ = grid_mask("documents", 70, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.flashmask_attention(q, k, v.bfloat16(), idx)
    assert out.dtype == torch.bfloat16
    want = ops.flashmask_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), idx)
    assert torch.equal(out, want)
    mixed = ops.flashmask_attention(q, k.bfloat16(), v, idx)  # no autocast: common dtype (fp32)
    assert mixed.dtype == torch.float32
