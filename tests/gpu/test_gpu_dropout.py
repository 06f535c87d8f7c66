"""Attention dropout on a GPU: the Triton kernels (and the CUDA backend's wrappers, which hand the
raw ops dropout_p / seed / offset, or the Triton kernels for shapes the CUDA kernels do not take)
regenerate the CPU kernel's keep mask bit for bit, compiled for the real device (the uint64 hash
math is checked here on hardware, not only in the interpreter), and their values and gradients
(dlse included) match the fp64 reference with the same mask. Marked `gpu`; run by bench/gpu_check.sh."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _dropout_probe import extract_keep_masks, mismatches  # noqa: E402

from ernie_core.ops import _backend  # noqa: E402
from ernie_core.ops import reference as ref  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

OP = "flashmask_attention"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SEEDS = [torch.tensor([-(2**63) + 12345, 2**40 + 7]), torch.tensor([7, -3])]


def _kernels(backend):
    if not _backend.has_kernel(OP, backend, "fwd_dropout"):
        pytest.skip(f"{backend} is not built here")
    return _backend.kernel(OP, backend, "fwd_dropout"), _backend.kernel(OP, backend, "bwd_dropout")


def _close(what, x, r, tol):
    assert torch.isfinite(x).all(), f"{what}: non-finite values"
    err = float((x.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30))
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("S,D,Hq,Hkv", [(128, 128, 2, 2), (64, 64, 4, 2), (100, 128, 2, 2)])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_keep_mask_bits_on_device(backend, dt, S, D, Hq, Hkv):
    fwd, bwd = _kernels(backend)
    problems = []
    for rng in SEEDS:
        want = ref.dropout_keep_mask(rng, 2, Hq, S, 0.5)
        got = extract_keep_masks(fwd, bwd, B=2, S=S, D=D, Hq=Hq, Hkv=Hkv, p=0.5, rng=rng, device="cuda",
                                 dtype=DTYPES[dt])
        problems += mismatches(got, want, f"seed {rng.tolist()} ")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("mode,causal", [("causal_doc", True), ("share_prompt", True), ("random4", False)])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_dropout_matches_reference(backend, dt, mode, causal):
    from ernie_core.ops.triton._mask import example_indices

    fwd, bwd = _kernels(backend)
    dtype, B, S, Hq, Hkv, D, p = DTYPES[dt], 2, 700, 4, 2, 128, 0.1
    gen = torch.Generator().manual_seed(S)
    q, k, v, dout = (torch.randn(B, S, h, D, generator=gen).to("cuda", dtype) for h in (Hq, Hkv, Hkv, Hq))
    idx = example_indices(mode, B, S, 1, gen).cuda()
    rng = SEEDS[0]
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    r_out, r_lse = ref.flashmask_attention_reference(qr, kr, vr, idx, causal, None, p, return_lse=True, rng_state=rng)
    out, lse = fwd(q, k, v, idx, causal, D ** -0.5, p, rng)
    _close("out", out, r_out, 2e-5 if dtype == torch.float32 else 2e-2)
    fin = torch.isfinite(r_lse)
    dlse = torch.randn(lse.shape, generator=gen).cuda() * fin
    objective = (r_out * dout.double()).sum() + (torch.where(fin, r_lse, 0.0) * dlse.double()).sum()
    gq, gk, gv = torch.autograd.grad(objective, (qr, kr, vr))
    dq, dk, dv = bwd(dout, q, k, v, out, lse, idx, causal, D ** -0.5, dropout_p=p, rng_state=rng, dlse=dlse)
    for name, x, r in (("dq", dq, gq), ("dk", dk, gk), ("dv", dv, gv)):
        _close(name, x, r, 1e-4 if dtype == torch.float32 else 4e-2)


def test_front_door_dropout_on_cuda_takes_a_kernel_and_equals_the_cpu_kernel(monkeypatch, recwarn):
    """Dropout on CUDA tensors runs a GPU kernel (never the [S, S] reference: no warning) and gives
    the CPU kernel's result for the same rng_state."""
    import importlib

    fm = importlib.import_module("ernie_core.ops.flashmask_attention")
    monkeypatch.delenv("ERNIE_CORE_BACKEND", raising=False)
    monkeypatch.setattr(fm, "_WARNED_DROPOUT_FALLBACK", set())
    gen = torch.Generator().manual_seed(0)
    B, S, Hq, Hkv, D = 2, 300, 4, 2, 64
    q, k, v, dout = (torch.randn(B, S, h, D, generator=gen) for h in (Hq, Hkv, Hkv, Hq))
    idx, rng = fm.default_indices(q, True), torch.tensor([123, 456])
    assert fm._choose(q.cuda(), k.cuda(), v.cuda(), "fwd", True) != "reference"
    gpu = [t.cuda().requires_grad_() for t in (q, k, v)]
    out, _ = fm.flashmask_attention_op(*gpu, idx.cuda(), True, 0.125, 0.2, rng)
    grads = torch.autograd.grad(out, gpu, dout.cuda())
    assert not [w for w in recwarn if "reference" in str(w.message)], "dropout on CUDA fell back to the reference"
    cpu = [t.clone().requires_grad_() for t in (q, k, v)]
    want, _ = fm.flashmask_attention_op(*cpu, idx, True, 0.125, 0.2, rng)
    want_grads = torch.autograd.grad(want, cpu, dout)
    for what, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads)):
        _close(what, x.cpu(), r, 1e-4)
