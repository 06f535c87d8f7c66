"""flashmask_attention: every backend against the reference, values and gradients, over shapes,
dtypes, GQA ratios and the four FlashMask modes (grid + hypothesis-generated masks)."""
import importlib
import math
import random
import warnings

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


# ---- mask builders (one column list per FlashMask index, docs/behaviour.md#flashmask-row-indices, #dpo-pair-layout) -------------


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


def check_attention(q32, k32, v32, idx, causal, dtype, scale=None, seed=0, dropout_p=0.0):
    """Op (current backend) vs autograd through the fp32 reference; bf16 judged by the reference's own error.
    With dropout_p > 0 both use the keep mask of one fixed rng_state (seed, offset)."""
    torch.manual_seed(seed)
    rng = torch.tensor([seed * 7919 + 1, seed + 2**40], dtype=torch.int64) if dropout_p > 0 else None
    drop = dict(dropout_p=dropout_p, rng_state=rng)
    leaves32 = [t.detach().clone().requires_grad_() for t in (q32, k32, v32)]
    out32, lse32 = ref.flashmask_attention_reference(*leaves32, idx, causal, scale, return_lse=True, **drop)
    dout = torch.randn_like(out32)
    grads32 = torch.autograd.grad(out32, leaves32, dout)

    leaves = [t.detach().to(dtype).requires_grad_() for t in (q32, k32, v32)]
    idx_op = idx if idx is not None else fm.default_indices(q32, causal)
    scale_op = scale if scale is not None else 1 / math.sqrt(q32.shape[-1])
    if dropout_p > 0:  # the raw custom op, so the test chooses the rng_state
        out = fm.flashmask_attention_op(*leaves, idx_op, causal, scale_op, dropout_p, rng)[0]
    else:
        out = ops.flashmask_attention(*leaves, idx, causal=causal, softmax_scale=scale)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    _, lse = fm.flashmask_attention_op(*[t.detach() for t in leaves], idx_op, causal, scale_op, dropout_p, rng)
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
    out_low = ref.flashmask_attention_reference(*low, idx, causal, scale, **drop)
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


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(monkeypatch, backend, dropout_p):
    use_backend(monkeypatch, OP, backend)
    q, k, v = (t.requires_grad_() for t in inputs(1, 70, 4, 2, 64))
    idx, _ = grid_mask("documents", 70, 1)
    rng = torch.tensor([5, 6]) if dropout_p else None
    torch.library.opcheck(fm.flashmask_attention_op, (q, k, v, idx, True, 0.125, dropout_p, rng))
    out, lse = fm.flashmask_attention_op(q.detach(), k.detach(), v.detach(), idx, True, 0.125, dropout_p, rng)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, idx, True, 0.125, None, dropout_p, rng)
    torch.library.opcheck(fm.flashmask_attention_backward_op, args)


def test_raw_kernel_ops_opcheck():
    if not ops._backend.has_kernel(OP, "cpu"):
        pytest.skip("no cpu kernel built here")
    q, k, v = inputs(1, 70, 4, 2, 64)
    idx, _ = grid_mask("documents", 70, 1)
    C = torch.ops.ernie_core_C
    tests = ("test_schema", "test_faketensor")
    for drop in ((), (0.25, 11, 12)):
        torch.library.opcheck(C.flashmask_fwd.default, (q, k, v, idx, True, 0.125, *drop), test_utils=tests)
        out, lse = C.flashmask_fwd(q, k, v, idx, True, 0.125, *drop)
        torch.library.opcheck(C.flashmask_bwd.default, (out, q, k, v, out, lse, idx, True, 0.125, None, *drop),
                              test_utils=tests)


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


# ---- attention dropout: counter-based keep mask, kernel vs reference --------------------------------


def test_mix64_int64_tensors_match_uint64_arithmetic():
    """The reference's int64-tensor SplitMix64 equals the same function on Python integers mod 2^64,
    and gives SplitMix64's published first outputs from seed 0 (mix64(n * golden), n = 1, 2)."""
    M = (1 << 64) - 1
    first = ref.mix64(torch.tensor([ref._i64(ref._GOLDEN), ref._i64(2 * ref._GOLDEN)])).tolist()
    assert [x % (1 << 64) for x in first] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        return z ^ (z >> 31)

    rng = random.Random(0)
    values = [0, 1, M, 1 << 63, (1 << 63) - 1] + [rng.getrandbits(64) for _ in range(2000)]
    got = ref.mix64(torch.tensor([ref._i64(x) for x in values])).tolist()
    assert [g % (1 << 64) for g in got] == [mix(x) for x in values]


def kernel_keep_mask(B, S, Hq, Hkv, dropout_p, rng):
    """The CPU kernel's keep mask [B, Hq, S, S], read from its output: q = k = 0 gives equal
    probabilities 1/n_i over a causal window of 256 columns, and v_j = e_(j mod 256) sends entry
    (i, j) to out[i, j mod 256] = keep / (n_i (1 - p)). Also returns the visible entries."""
    W = D = 256
    q, k = torch.zeros(B, S, Hq, D), torch.zeros(B, S, Hkv, D)
    v = F.one_hot(torch.arange(S) % D, D).float().view(1, S, 1, D).expand(B, S, Hkv, D).contiguous()
    idx = to_idx(*sliding_window([S], S, W), B=B)  # column j visible to rows [j, j + W)
    out, _ = fm.flashmask_attention_op(q, k, v, idx, True, 1.0, dropout_p, rng)
    n = torch.arange(1, S + 1).clamp(max=W).view(1, S, 1, 1)
    kept = (out * n * (1 - dropout_p)).permute(0, 2, 1, 3)  # [B, Hq, S, D]: 1 kept, 0 dropped
    assert torch.allclose(kept, kept.round(), atol=1e-4), "read-out is not 0/1"
    per_col = kept.gather(-1, (torch.arange(S) % D).expand(B, Hq, S, S))  # [B, Hq, i, j]
    visible = ref.startend_row_indices_to_mask(idx, True).expand(B, Hq, S, S)
    return per_col > 0.5, visible


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_kernel_keep_mask_is_the_reference_hash(monkeypatch, dropout_p):
    """Bit-exact: every (b, h, i, j) the kernel keeps is the one reference.dropout_keep_mask keeps,
    over 2 batches, 4 query heads (GQA 2) and rows/columns up to 700."""
    use_backend(monkeypatch, OP, "cpu", "fwd_dropout")
    B, S, Hq = 2, 700, 4
    rng = torch.tensor([2**62 + 12345, 987654321])
    keep, visible = kernel_keep_mask(B, S, Hq, 2, dropout_p, rng)
    want = ref.dropout_keep_mask(rng, B, Hq, S, dropout_p)
    bad = (keep != want) & visible
    assert not bad.any(), (f"{int(bad.sum())} of {int(visible.sum())} keep flags differ, "
                           f"first at {bad.nonzero()[0].tolist()}")


DROPOUT_SHAPES = [(2, 97, 2, 2, 64), (1, 200, 8, 2, 128)]
DROPOUT_MASKS = ["causal", "documents", "share_prompt", "sliding", "global_docs"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", DROPOUT_SHAPES, ids=lambda s: "B{}S{}Hq{}Hkv{}D{}".format(*s))
@pytest.mark.parametrize("mask", DROPOUT_MASKS)
def test_cpu_kernel_dropout_matches_reference(monkeypatch, dtype, dropout_p, shape, mask):
    """Forward, lse and dq/dk/dv of the kernel with dropout vs autograd through the reference with the same mask."""
    use_backend(monkeypatch, OP, "cpu", "fwd_dropout")
    B, S, Hq, Hkv, D = shape
    idx, causal = grid_mask(mask, S, B)
    check_attention(*inputs(*shape), idx, causal, dtype, dropout_p=dropout_p)


@pytest.mark.parametrize("mask", ["documents", "share_prompt", "prefix_lm"])
def test_reference_backend_dropout_backward(monkeypatch, mask):
    """The reference backend's explicit dropout backward (the fallback where no kernel has dropout) vs autograd."""
    use_backend(monkeypatch, OP, "reference")
    idx, causal = grid_mask(mask, 97, 2)
    check_attention(*inputs(2, 97, 4, 2, 64), idx, causal, torch.float32, dropout_p=0.3)


@pytest.mark.parametrize("mode", ["causal1", "causal2", "bidir2", "bidir4"])
def test_hypothesis_masks_dropout(monkeypatch, mode):
    """Random masks (fully masked rows and columns included) with dropout."""
    use_backend(monkeypatch, OP, "cpu", "fwd_dropout")

    @settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(flashmask_cases(mode), st.sampled_from([0.2, 0.6]))
    def run(case, dropout_p):
        B, S, Hq, Hkv, idx, causal, seed = case
        check_attention(*inputs(B, S, Hq, Hkv, 64, seed), idx, causal, torch.float32, seed=seed, dropout_p=dropout_p)

    run()


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_keep_mask_statistics(dropout_p):
    """Keep fraction 1 - p overall, in even and odd columns (the two halves of one hash), and
    neighbouring rows/columns/heads kept together at the independent rate (1 - p)^2 (5 sigma)."""
    keep = ref.dropout_keep_mask(torch.tensor([3, 4]), 2, 4, 512, dropout_p)  # 2M draws
    q = 1 - dropout_p

    def check(frac, n, rate, what):
        sigma = math.sqrt(rate * (1 - rate) / n)
        assert abs(frac - rate) < 5 * sigma, f"{what}: {frac:.5f} vs {rate:.5f} (sigma {sigma:.2g})"

    for what, part in (("all", keep), ("even columns", keep[..., 0::2]), ("odd columns", keep[..., 1::2])):
        check(part.float().mean().item(), part.numel(), q, what)
    for what, a, b in (("rows", keep[:, :, 1:], keep[:, :, :-1]), ("columns", keep[..., 1:], keep[..., :-1]),
                       ("heads", keep[:, 1:], keep[:, :-1]), ("batches", keep[1:], keep[:-1])):
        both = a & b
        check(both.float().mean().item(), both.numel(), q * q, f"neighbouring {what}")


def test_dropout_is_unbiased(monkeypatch):
    """E[out] over seeds is the output without dropout: |mean - out| within a few standard errors."""
    use_backend(monkeypatch, OP, "cpu", "fwd_dropout")
    q, k, v = inputs(1, 64, 2, 1, 32, seed=4)
    idx, _ = grid_mask("documents", 64, 1)
    want, _ = fm.flashmask_attention_op(q, k, v, idx, True, 0.2)
    outs = torch.stack([fm.flashmask_attention_op(q, k, v, idx, True, 0.2, 0.3, torch.tensor([s, 9]))[0]
                        for s in range(400)])
    z = (outs.mean(0) - want) / (outs.std(0) / math.sqrt(len(outs))).clamp_min(1e-12)
    assert (z**2).mean() < 1.3 and z.abs().max() < 6, f"mean z^2 {(z**2).mean():.3f}, max |z| {z.abs().max():.2f}"


def test_dropout_zero_is_the_plain_kernel():
    """p = 0 runs the kernel exactly as without dropout (bitwise), and draws no random numbers."""
    if not ops._backend.has_kernel(OP, "cpu"):
        pytest.skip("no cpu kernel built here")
    q, k, v = inputs(2, 90, 4, 2, 64)
    idx, _ = grid_mask("share_prompt", 90, 2)
    C = torch.ops.ernie_core_C
    out, lse = C.flashmask_fwd(q, k, v, idx, True, 0.125)
    out0, lse0 = C.flashmask_fwd(q, k, v, idx, True, 0.125, 0.0, 123, 456)
    assert torch.equal(out, out0) and torch.equal(lse, lse0)
    dout = torch.randn_like(out)
    for a, b in zip(C.flashmask_bwd(dout, q, k, v, out, lse, idx, True, 0.125, None),
                    C.flashmask_bwd(dout, q, k, v, out, lse, idx, True, 0.125, None, 0.0, 123, 456)):
        assert torch.equal(a, b)
    state = torch.get_rng_state()
    assert torch.equal(ops.flashmask_attention(q, k, v, idx, dropout_p=0.0), ops.flashmask_attention(q, k, v, idx))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_one_gives_zero_output_and_finite_grads(monkeypatch, backend):
    use_backend(monkeypatch, OP, backend, "fwd_dropout")
    q, k, v = (t.requires_grad_() for t in inputs(1, 70, 4, 2, 64))
    idx, _ = grid_mask("documents", 70, 1)
    out = ops.flashmask_attention(q, k, v, idx, dropout_p=1.0)
    assert torch.equal(out, torch.zeros_like(out))
    (out * torch.randn_like(out)).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and not t.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_seeds_come_from_the_default_generator(monkeypatch, backend):
    """Same torch seed -> same mask (values and grads bitwise); another seed or the next call -> another
    mask; get/set_rng_state (checkpoint resume) replays it; the front door's draw is draw_dropout_rng_state."""
    use_backend(monkeypatch, OP, backend, "fwd_dropout")
    q, k, v = inputs(1, 80, 4, 2, 64, seed=2)
    idx, _ = grid_mask("documents", 80, 1)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ops.flashmask_attention(*leaves, idx, dropout_p=0.3)
        return [out, *torch.autograd.grad(out.sum(), leaves)]

    torch.manual_seed(1)
    a = run()
    next_call = run()
    torch.manual_seed(1)
    b = run()
    torch.manual_seed(2)
    c = run()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], next_call[0])
    state = torch.get_rng_state()
    d = run()
    torch.set_rng_state(state)
    assert all(torch.equal(x, y) for x, y in zip(d, run()))
    torch.manual_seed(1)
    rng = ref.draw_dropout_rng_state()
    assert torch.equal(fm.flashmask_attention_op(q, k, v, idx, True, 0.125, 0.3, rng)[0], a[0])


def test_dropout_on_cpu_runs_the_kernel(monkeypatch):
    if not ops._backend.has_kernel(OP, "cpu", "fwd_dropout"):
        pytest.skip("no cpu kernel built here")
    monkeypatch.delenv("ERNIE_CORE_BACKEND", raising=False)
    calls = []
    for fn in ("fwd_dropout", "bwd_dropout"):
        real = ops._backend.kernel(OP, "cpu", fn)
        monkeypatch.setitem(ops._backend._REGISTRY, (OP, "cpu", fn),
                            lambda *a, _real=real, _fn=fn, **kw: calls.append(_fn) or _real(*a, **kw))
    q, k, v = (t.requires_grad_() for t in inputs(1, 70, 4, 2, 64))
    for dtype in (torch.float32, torch.bfloat16):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            ops.flashmask_attention(q.to(dtype), k.to(dtype), v.to(dtype), None, dropout_p=0.1).sum().backward()
    assert calls == ["fwd_dropout", "bwd_dropout"] * 2


def test_dropout_without_a_kernel_uses_the_reference_and_warns_once(monkeypatch):
    """Where the tensors' backend has no dropout kernel (here: the cpu and triton ones removed),
    dropout runs the reference with the same mask, and says once why it is slow."""
    ops._backend.registered()  # load the backends before editing their registrations
    monkeypatch.delenv("ERNIE_CORE_BACKEND", raising=False)
    for backend in ("cpu", "triton"):
        for fn in ("fwd_dropout", "bwd_dropout"):
            monkeypatch.delitem(ops._backend._REGISTRY, (OP, backend, fn), raising=False)
    monkeypatch.setattr(fm, "_WARNED_DROPOUT_FALLBACK", set())
    q, k, v = inputs(1, 70, 4, 2, 64)
    idx, _ = grid_mask("documents", 70, 1)
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match=r"reference.*S\^2"):
        out = ops.flashmask_attention(q, k, v, idx, dropout_p=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.flashmask_attention(q, k, v, idx, dropout_p=0.2)
    torch.manual_seed(3)
    want = ref.flashmask_attention_reference(q, k, v, idx, True, None, 0.2)
    assert torch.equal(out, want)
    monkeypatch.setenv("ERNIE_CORE_BACKEND", "triton")  # a forced backend without dropout: reference too
    assert fm._choose(q, k, v, "fwd", True) == "reference"
