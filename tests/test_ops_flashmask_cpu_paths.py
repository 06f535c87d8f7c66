"""The FlashMask CPU kernel's two code paths: the AVX-512 path (bf16 tensors in bf16 arithmetic on
AVX512-BF16 `vdpbf16ps`, fp32 tensors with AVX-512F FMA) and the portable vector-extension path
(`ERNIE_CORE_FLASHMASK_PORTABLE=1`). Both run through the front door with autograd, against an
fp64 oracle written here (dense softmax attention on the mask from the FlashMask indices)."""
import math

import pytest
import torch

from _tolerances import assert_close
from ernie_core import ops
from ernie_core.ops import reference as ref
from test_ops_flashmask_attention import OP, grid_mask, inputs, share_prompt_lts, to_idx


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


HAS_BF16 = "avx512_bf16" in _cpu_flags()
HAS_AVX512F = "avx512f" in _cpu_flags()


@pytest.fixture
def cpu_kernel(monkeypatch):
    if not ops._backend.has_kernel(OP, "cpu"):
        pytest.skip("no cpu kernel built here")
    monkeypatch.setenv("ERNIE_CORE_BACKEND", "cpu")

    def use(path: str):
        monkeypatch.setenv("ERNIE_CORE_FLASHMASK_PORTABLE", "1" if path == "portable" else "0")

    return use


def oracle_fp64(q, k, v, idx, causal, dout, scale=None):
    """out, dq, dk, dv in float64: softmax(q k^T * scale + mask) v; rows that see nothing give 0."""
    B, S, Hq, D = q.shape
    group = Hq // k.shape[2]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    qd = leaves[0].transpose(1, 2)
    kd, vd = (t.transpose(1, 2).repeat_interleave(group, 1) for t in leaves[1:])
    s = qd @ kd.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(D))
    if idx is None:
        allow = torch.ones(S, S, dtype=torch.bool)
        allow = (allow.tril() if causal else allow).view(1, 1, S, S)
    else:
        allow = ref.startend_row_indices_to_mask(idx, causal)  # [B, 1|Hkv, S, S]
        allow = allow.repeat_interleave(group, 1) if allow.shape[1] > 1 else allow
    p = torch.softmax(s.masked_fill(~allow, -math.inf), -1).nan_to_num(0.0)
    out = (p @ vd).transpose(1, 2)
    return [out, *torch.autograd.grad(out, leaves, dout.double())]


def run_bf16(fn, q, k, v, dout):
    leaves = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, leaves, dout.bfloat16())]


ERROR_SHAPES = [(1, 512, 4, 2, 64), (1, 300, 2, 1, 128)]  # several tiles, GQA 2 and 2, D 64 and 128
ERROR_MASKS = ["causal", "documents", "share_prompt", "sliding", "prefix_lm", "global_docs"]


@pytest.mark.parametrize("path", ["avx512", "portable"])
@pytest.mark.parametrize("shape", ERROR_SHAPES, ids=lambda s: "S{}Hq{}Hkv{}D{}".format(*s[1:]))
@pytest.mark.parametrize("mask", ERROR_MASKS)
def test_bf16_error_within_twice_the_reference_error(cpu_kernel, path, shape, mask):
    """max |kernel - fp64| <= 2 max |reference in bf16 - fp64| for out, dq, dk, dv (no floor), the
    kernel at bf16 inputs with bf16 P / dS operands on the AVX-512 path."""
    if path == "avx512" and not HAS_BF16:
        pytest.skip("this CPU has no AVX512-BF16: the bf16 path is the portable one")
    cpu_kernel(path)
    idx, causal = grid_mask(mask, shape[1], shape[0])
    q, k, v = inputs(*shape, seed=11)
    dout = torch.randn_like(q)
    want = oracle_fp64(q, k, v, idx, causal, dout)
    got = run_bf16(lambda a, b, c: ops.flashmask_attention(a, b, c, idx, causal=causal), q, k, v, dout)
    lowp = run_bf16(lambda a, b, c: ref.flashmask_attention_reference(a, b, c, idx, causal), q, k, v, dout)
    for name, g, r, w in zip(["out", "dq", "dk", "dv"], got, lowp, want):
        err = (g.double() - w).abs().max().item()
        ref_err = (r.double() - w).abs().max().item()
        assert err <= 2.0 * ref_err, f"{name}: kernel error {err:.3g} > 2 x reference error {ref_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask", ["causal", "documents", "share_prompt", "sliding", "global_docs"])
def test_avx512_path_matches_portable_path(cpu_kernel, dtype, mask):
    """Same values and gradients from both paths (fp32: the fp32 tolerance; bf16: each within twice
    the other's error against the fp64 oracle), with per-kv-head masks, GQA 4 and a custom scale."""
    if not (HAS_BF16 if dtype == torch.bfloat16 else HAS_AVX512F):
        pytest.skip("the AVX-512 path is not available on this CPU")
    B, S, Hq, Hkv, D = 2, 261, 8, 2, 64
    idx, causal = grid_mask(mask, S, B)
    if idx is not None and causal and idx.shape[-1] == 1:  # one mask per kv head: shift the second
        idx = torch.cat([idx, to_idx(share_prompt_lts([(40, 30, 50), (60, 20, 30)], S), B=B)], dim=1)
    q, k, v = inputs(B, S, Hq, Hkv, D, seed=5)
    dout = torch.randn_like(q)
    res = {}
    for path in ("avx512", "portable"):
        cpu_kernel(path)
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = ops.flashmask_attention(*leaves, idx, causal=causal, softmax_scale=0.2)
        res[path] = [out, *torch.autograd.grad(out, leaves, dout.to(dtype))]
    if dtype == torch.float32:
        for name, a, b in zip(["out", "dq", "dk", "dv"], res["avx512"], res["portable"]):
            assert_close(a, b, "attention", dtype, name)
        return
    want = oracle_fp64(q, k, v, idx, causal, dout, scale=0.2)
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        err = {p: (r[i].double() - want[i]).abs().max().item() for p, r in res.items()}
        assert err["avx512"] <= 2 * err["portable"] and err["portable"] <= 2 * err["avx512"], f"{name}: {err}"


def test_bf16_avx512_path_is_taken(cpu_kernel):
    """On a CPU with AVX512-BF16, bf16 tensors run in bf16 arithmetic: results differ in the last
    bits from the portable path (fp32 arithmetic on the same bf16 inputs); the switch works."""
    if not HAS_BF16:
        pytest.skip("no AVX512-BF16 on this CPU")
    q, k, v = (t.bfloat16() for t in inputs(1, 256, 2, 1, 64, seed=2))
    cpu_kernel("avx512")
    a = ops.flashmask_attention(q, k, v, None)
    cpu_kernel("portable")
    b = ops.flashmask_attention(q, k, v, None)
    assert not torch.equal(a, b)
    cpu_kernel("avx512")
    assert torch.equal(a, ops.flashmask_attention(q, k, v, None))  # deterministic
