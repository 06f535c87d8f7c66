"""Every CUDA and Triton kernel against its pure-PyTorch reference on a GPU, values and gradients,
bf16 and fp32. Marked `gpu`; skipped where torch sees no CUDA device, and per backend where that
backend is not built (asked of the dispatcher, never silently passed). Run by bench/gpu_check.sh."""
from __future__ import annotations

import pytest
import torch

from ernie_core.ops import _backend
from ernie_core.ops import reference as ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BACKENDS = ["cuda", "triton"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Relative-norm tolerances: fp32 math throughout (fp32 dots are ieee in our kernels); bf16 inputs,
# bf16 P / dS in the dots.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 4e-2}


def _kernel(op, backend, name):
    if not _backend.has_kernel(op, backend, name):
        pytest.skip(f"{backend} has no {op} {name} kernel built here")
    return _backend.kernel(op, backend, name)


def _close(what, x, r, tol):
    assert torch.isfinite(x).all(), f"{what}: non-finite values"
    err = float((x.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30))
    diff = (x.double() - r.double()).abs()
    assert err <= tol, (f"{what}: relative error {err:.3g} > {tol:g}; max abs diff {diff.max():.3g} (mean "
                        f"{diff.mean():.3g}) at {torch.nonzero(diff == diff.max())[0].tolist()}")


MASKS = [(None, True), (None, False), ("causal_doc", True), ("share_prompt", True), ("prefix_lm", False),
         ("global_docs", False), ("random4", False)]


@pytest.mark.parametrize("S,D,Hm", [(200, 128, 1), (1000, 64, 2), (2100, 128, 1)])
@pytest.mark.parametrize("mode,causal", MASKS)
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_flashmask_attention(backend, dt, mode, causal, S, D, Hm):
    from ernie_core.ops.triton._mask import example_indices

    fwd, bwd = _kernel("flashmask_attention", backend, "fwd"), _kernel("flashmask_attention", backend, "bwd")
    dtype, dev, B, Hq, Hkv = DTYPES[dt], "cuda", 2, 4, 2
    gen = torch.Generator().manual_seed(S + D)
    q, k, v, dout = (torch.randn(B, S, h, D, generator=gen).to(dev, dtype) for h in (Hq, Hkv, Hkv, Hq))
    idx = None if mode is None else example_indices(mode, B, S, Hm, gen).to(dev)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    r_out, r_lse = ref.flashmask_attention_reference(qr, kr, vr, idx, causal, None, return_lse=True)
    out, lse = fwd(q, k, v, idx, causal, None)
    torch.cuda.synchronize()
    _close("out", out, r_out, TOL[dtype])
    assert torch.equal(torch.isinf(lse), torch.isinf(r_lse)), "fully masked rows (lse = -inf) differ"
    fin = torch.isfinite(r_lse)
    _close("lse", lse[fin], r_lse[fin], 1e-5 if dtype == torch.float32 else 5e-3)
    gq, gk, gv = torch.autograd.grad(r_out, (qr, kr, vr), dout.double())
    dq, dk, dv = bwd(dout, q, k, v, out, lse, idx, causal, None)
    for name, x, r in (("dq", dq, gq), ("dk", dk, gk), ("dv", dv, gv)):
        _close(name, x, r, GRAD_TOL[dtype])


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_rope(backend, dt):
    fwd = _kernel("rope", backend, "fwd")
    dtype = DTYPES[dt]
    x = torch.randn(2, 333, 5, 128, device="cuda").to(dtype)
    pos = torch.randint(0, 32768, (2, 333), device="cuda")
    for inverse in (False, True):
        _close(f"rope inverse={inverse}", fwd(x, pos, 500000.0, inverse), ref.rope_reference_one(x, pos, 500000.0, inverse),
               1e-6 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm(backend, dt):
    fwd, bwd = _kernel("rms_norm", backend, "fwd"), _kernel("rms_norm", backend, "bwd")
    dtype = DTYPES[dt]
    x = torch.randn(3, 517, 1024, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(1024, device="cuda")).to(dtype)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    r = ref.rms_norm_reference(xr, wr, 1e-6)
    y, rstd = fwd(x, w, 1e-6)
    _close("y", y, r, 1e-6 if dtype == torch.float32 else 8e-3)
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(r, (xr, wr), dy.double())
    dx, dw = bwd(dy, x, w, rstd)
    _close("dx", dx, gx, 1e-5 if dtype == torch.float32 else 1e-2)
    _close("dw", dw, gw, 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu(backend, dt):
    fwd, bwd = _kernel("swiglu", backend, "fwd"), _kernel("swiglu", backend, "bwd")
    dtype = DTYPES[dt]
    g, u = (3 * torch.randn(1001, 2731, device="cuda")).to(dtype), torch.randn(1001, 2731, device="cuda").to(dtype)
    gr, ur = g.double().requires_grad_(), u.double().requires_grad_()
    r = ref.swiglu_reference(gr, ur)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    _close("y", fwd(g, u), r, tol)
    dy = torch.randn_like(g)
    rg, ru = torch.autograd.grad(r, (gr, ur), dy.double())
    dg, du = bwd(dy, g, u)
    _close("dg", dg, rg, 2 * tol)
    _close("du", du, ru, 2 * tol)


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_head_ce(backend, dt):
    fn = _kernel("fused_head_ce", backend, "fwd_bwd")
    dtype = DTYPES[dt]
    N, H, V = 1000, 256, 10007
    h = torch.randn(N, H, device="cuda").to(dtype)
    w = (0.05 * torch.randn(V, H, device="cuda")).to(dtype)
    labels = torch.randint(0, V, (N,), device="cuda")
    labels[::9] = -100
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    r_loss, r_n = ref.fused_head_ce_reference(hr, wr, labels)
    rh, rw = torch.autograd.grad(r_loss, (hr, wr))
    loss, n, dh, dw = fn(h, w, labels, -100, 256)  # 4 chunks, the last partial
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    _close("loss", loss.reshape(1), r_loss.reshape(1), tol)
    assert int(n) == int(r_n)
    _close("dhidden", dh, rh, tol)
    _close("dweight", dw, rw, tol)
    with pytest.raises((ValueError, RuntimeError), match="outside"):
        bad = labels.clone()
        bad[3] = V
        fn(h, w, bad, -100, 256)


def test_hopper_path_is_taken_when_built():
    """On an H100/H200 with the CUDA backend built, bf16 D=128 attention runs the wgmma kernel."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("not a Hopper GPU")
    if not _backend.has_kernel("flashmask_attention", "cuda"):
        pytest.skip("CUDA backend not built")
    from ernie_core.ops import cuda as cuda_backend

    q = torch.randn(1, 256, 2, 128, device="cuda", dtype=torch.bfloat16)
    assert cuda_backend.flashmask_cuda_supported(q)
