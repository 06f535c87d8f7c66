"""Tolerance table and comparison helpers for the op tests (tests/test_ops_*.py).

Tolerances are per (kind of op, dtype). Elementwise ops round once in their dtype; reductions and
attention accumulate, so in bf16 they are judged relative to the reference's own error: the
kernel's error against the fp32 oracle may be at most `factor` x the error of the reference run
in bf16, plus a small floor (the flash-attention test habit).
"""
from __future__ import annotations

import pytest
import torch

from ernie_core.ops import _backend

# (atol, rtol) by kind and dtype.
TOLERANCES = {
    ("pointwise", torch.float32): (1e-5, 1e-5),
    ("pointwise", torch.bfloat16): (1e-2, 1.6e-2),  # two bf16 ulps (2^-8 relative each)
    ("reduction", torch.float32): (2e-5, 1e-4),
    ("reduction", torch.bfloat16): (2e-2, 2e-2),
    ("attention", torch.float32): (5e-5, 2e-4),
    ("attention", torch.bfloat16): (2e-2, 2e-2),
}

BACKENDS = ["cpu", "reference"]


def tol(kind: str, dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[(kind, dtype)]


def _describe(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, name: str) -> str:
    diff = (actual.double() - expected.double()).abs()
    finite = diff[torch.isfinite(diff)]
    first = tuple(int(i) for i in bad.nonzero()[0]) if bad.any() else None
    return (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements off; max |diff| "
        f"{finite.max().item() if finite.numel() else float('nan'):.3g}, mean {finite.mean().item() if finite.numel() else float('nan'):.3g}; "
        f"first bad index {first}: got {actual[first].item() if first else None}, "
        f"expected {expected[first].item() if first else None}"
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, kind: str, dtype: torch.dtype, name: str = "tensor"):
    """|actual - expected| <= atol + rtol |expected|, NaNs and infinities must match exactly."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol, rtol = tol(kind, dtype)
    a, e = actual.detach().double(), expected.detach().double()
    same_special = (a == e) | (torch.isnan(a) & torch.isnan(e))
    bad = ~(same_special | ((a - e).abs() <= atol + rtol * e.abs()))
    assert not bad.any(), _describe(a, e, bad, name)


def assert_close_to_oracle(actual, lowp_ref, oracle, name: str, factor: float = 2.0, floor: float = 1e-3):
    """Low-precision check: max|actual - oracle| <= factor * max|lowp_ref - oracle| + floor."""
    a, r, o = (t.detach().double() for t in (actual, lowp_ref, oracle))
    assert torch.isfinite(a).all() == torch.isfinite(o).all(), f"{name}: non-finite values differ from the oracle"
    fin = torch.isfinite(o)
    err, ref_err = (a - o)[fin].abs(), (r - o)[fin].abs()
    bound = factor * (ref_err.max().item() if ref_err.numel() else 0.0) + floor
    bad = torch.zeros_like(a, dtype=torch.bool)
    bad[fin] = err > bound
    assert not bad.any(), _describe(a, o, bad, f"{name} (bound {bound:.3g} = {factor} x ref error + {floor})")


def use_backend(monkeypatch, op: str, backend: str, fn_name: str = "fwd") -> None:
    """Force `backend` for this test; skip (never pass) when its kernel is not built here."""
    if backend != "reference" and not _backend.has_kernel(op, backend, fn_name):
        pytest.skip(f"{op}: no {backend} kernel built here (ask: _backend.has_kernel)")
    monkeypatch.setenv("ERNIE_CORE_BACKEND", backend)
