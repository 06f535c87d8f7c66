"""The CUDA FlashMask kernels through their raw ops (ernie_core_C::flashmask_fwd / flashmask_bwd, the
schema the CPU binding has): attention dropout with the CPU kernel's keep mask, and the gradient of
lse (dlse), on the Hopper (D = 128: TMA forward, wgmma backward) and sm_80 (D = 64) paths. Marked
`gpu`; skipped where torch sees no CUDA device or the extension has no CUDA kernels. Run by
bench/gpu_check.sh with the other GPU tests."""
from __future__ import annotations

import math

import pytest
import torch

from ernie_core.ops import reference as ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = "cuda"  # the same ops exist for CPU tensors (the CPU kernels): DEV = "cpu" runs these checks there


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _no_mask(q, causal):
    """The CUDA binding takes an empty index tensor as "plain causal / full"; the CPU one wants indices."""
    if DEV == "cuda":
        return torch.empty(0, dtype=torch.int32, device=DEV)
    from ernie_core.ops.flashmask_attention import default_indices

    return default_indices(q, causal)


@pytest.fixture(scope="module")
def raw():
    import ernie_core._C  # noqa: F401

    if not torch._C._dispatch_has_kernel_for_dispatch_key("ernie_core_C::flashmask_fwd", DEV.upper()):
        pytest.skip("ernie_core._C was built without the CUDA kernels")
    return torch.ops.ernie_core_C


def _close(what, x, r, tol):
    assert torch.isfinite(x).all(), f"{what}: non-finite values"
    err = float((x.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30))
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("D", [128, 64])
def test_dropout_keep_mask_is_the_cpu_kernels(raw, D):
    """q = k = 0 makes every visible probability 1 / S; v = the identity puts column j of P in output
    channel j, so out != 0 is exactly the keep mask: it must equal the reference's bit for bit."""
    B, Hq, Hkv, S, p = 2, 4, 2, D, 0.5
    seed, offset = -(2**62) - 12345, 977  # int64 words as torch draws them
    q = torch.zeros(B, S, Hq, D, device=DEV, dtype=torch.bfloat16)
    k = torch.zeros(B, S, Hkv, D, device=DEV, dtype=torch.bfloat16)
    v = torch.eye(S, D, device=DEV, dtype=torch.bfloat16).view(1, S, 1, D).repeat(B, 1, Hkv, 1).contiguous()
    idx = _no_mask(q, False)
    out, lse = raw.flashmask_fwd(q, k, v, idx, False, 1.0, p, seed, offset)
    _sync()
    keep = ref.dropout_keep_mask(torch.tensor([seed, offset]), B, Hq, S, p)  # [B, H, i, j]
    got = (out.float().cpu() != 0).permute(0, 2, 1, 3)  # [B, H, i, channel j]
    assert torch.equal(got, keep), f"keep mask differs at {(got != keep).nonzero()[:5].tolist()}"
    kept = out.float().cpu().permute(0, 2, 1, 3)[keep]
    torch.testing.assert_close(kept, torch.full_like(kept, 1.0 / (S * (1 - p))), rtol=1e-2, atol=0)
    torch.testing.assert_close(lse.cpu(), torch.full((B, Hq, S), math.log(S)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("D,S", [(128, 1000), (64, 333), (128, 4100)])
@pytest.mark.parametrize("mode,causal", [(None, True), ("causal_doc", True), ("share_prompt", True),
                                         ("global_docs", False)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.15])
def test_dropout_and_dlse_match_the_reference(raw, D, S, mode, causal, dropout_p):
    from ernie_core.ops.triton._mask import example_indices

    B, Hq, Hkv = 2, 4, 2
    gen = torch.Generator().manual_seed(S + D)
    q, k, v, dout = (torch.randn(B, S, h, D, generator=gen).to(DEV, torch.bfloat16) for h in (Hq, Hkv, Hkv, Hq))
    dlse = torch.randn(B, Hq, S, generator=gen).to(DEV)
    idx = None if mode is None else example_indices(mode, B, S, 1, gen).to(DEV)
    rng = torch.tensor([1234567, 89], dtype=torch.int64)
    scale = 1.0 / math.sqrt(D)
    qr, kr, vr = (t.double() for t in (q, k, v))
    r_out, r_lse = ref.flashmask_attention_reference(qr, kr, vr, idx, causal, scale, dropout_p=dropout_p,
                                                     return_lse=True, rng_state=rng)
    idx_arg = idx if idx is not None else _no_mask(q, causal)
    out, lse = raw.flashmask_fwd(q, k, v, idx_arg, causal, scale, dropout_p, 1234567, 89)
    _sync()
    _close("out", out, r_out, 2e-2)
    fin = torch.isfinite(r_lse)
    assert torch.equal(torch.isinf(lse), torch.isinf(r_lse))
    _close("lse", lse[fin], r_lse[fin], 5e-3)
    dlse = torch.where(fin, dlse, torch.zeros_like(dlse))
    want = ref.flashmask_attention_backward_reference(dout.double(), qr, kr, vr, r_out.double(), r_lse, idx, causal,
                                                      scale, dlse=dlse.double(), dropout_p=dropout_p, rng_state=rng)
    got = raw.flashmask_bwd(dout, q, k, v, out, lse, idx_arg, causal, scale, dlse, dropout_p, 1234567, 89)
    _sync()
    for name, x, r in zip(("dq", "dk", "dv"), got, want):
        _close(name, x, r, 4e-2)


def test_strided_views_take_the_kernels(raw):
    """q, k, v as views of one packed qkv tensor (row stride 3 * H * D) and a tensor starting at an odd
    element (copied by the binding to a 16-byte aligned one) give the contiguous inputs' results."""
    B, S, H, D = 1, 777, 2, 128
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, S, 3, H, D, generator=gen).to(DEV, torch.bfloat16)
    q, k, v = qkv.unbind(2)
    idx = _no_mask(q, True)
    out, lse = raw.flashmask_fwd(q, k, v, idx, True, 0.1, 0.0, 0, 0)
    out_c, lse_c = raw.flashmask_fwd(q.contiguous(), k.contiguous(), v.contiguous(), idx, True, 0.1, 0.0, 0, 0)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    flat = torch.empty(q.numel() + 1, device=DEV, dtype=torch.bfloat16)
    q_odd = flat[1:].view_as(q).copy_(q)
    out_o, _ = raw.flashmask_fwd(q_odd, k, v, idx, True, 0.1, 0.0, 0, 0)
    assert torch.equal(out_o, out_c)
