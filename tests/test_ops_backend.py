"""Backend choice (ernie_core/ops/_backend.py): per call, forced by ERNIE_CORE_BACKEND, falling back
to the reference for inputs a kernel does not take."""
import pytest
import torch

from ernie_core import ops
from ernie_core.ops import _backend


def test_cpu_tensors_pick_the_cpu_kernel_when_built(monkeypatch):
    monkeypatch.delenv("ERNIE_CORE_BACKEND", raising=False)
    x = torch.randn(3, 4)
    want = "cpu" if _backend.has_kernel("rms_norm", "cpu") else "reference"
    assert _backend.choose_backend("rms_norm", x) == want
    assert _backend.choose_backend("rms_norm", x.double()) == "reference"  # kernels take fp32/bf16 only


def test_forced_backend(monkeypatch):
    monkeypatch.setenv("ERNIE_CORE_BACKEND", "reference")
    assert _backend.choose_backend("swiglu", torch.randn(2)) == "reference"
    monkeypatch.setenv("ERNIE_CORE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="ERNIE_CORE_BACKEND"):
        _backend.choose_backend("swiglu", torch.randn(2))
    if _backend.has_kernel("swiglu", "cpu"):
        monkeypatch.setenv("ERNIE_CORE_BACKEND", "cpu")
        with pytest.raises(RuntimeError, match="does not take"):
            _backend.choose_backend("swiglu", torch.randn(2, dtype=torch.float64))


def test_float64_runs_on_the_reference(monkeypatch):
    monkeypatch.delenv("ERNIE_CORE_BACKEND", raising=False)
    q = torch.randn(1, 10, 2, 8, dtype=torch.float64, requires_grad=True)
    out = ops.flashmask_attention(q, q, q, None)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert torch.autograd.gradcheck(lambda g, u: ops.swiglu(g, u), (torch.randn(5, dtype=torch.float64,
                                    requires_grad=True), torch.randn(5, dtype=torch.float64, requires_grad=True)))


def test_raw_kernel_ops_opcheck():
    """The private C++ ops (torch.ops.ernie_core_C) have consistent schemas and Meta kernels."""
    if not _backend.has_kernel("rms_norm", "cpu"):
        pytest.skip("no cpu kernels built here (ask: _backend.has_kernel)")
    C = torch.ops.ernie_core_C
    tests = ("test_schema", "test_faketensor")
    q, k, pos = torch.randn(2, 6, 4, 16), torch.randn(2, 6, 2, 16), torch.arange(6).expand(2, 6)
    inv_freq = torch.rand(8)
    x, w = torch.randn(3, 5, 32), torch.randn(32)
    _, rstd = C.rms_norm_fwd(x, w, 1e-6)
    hidden, weight, labels = torch.randn(9, 16), torch.randn(40, 16), torch.randint(0, 40, (9,))
    cases = [
        (C.rope.default, (q, pos, inv_freq, False)),
        (C.rope_qk.default, (q, k, pos, inv_freq, True)),
        (C.rms_norm_fwd.default, (x, w, 1e-6)),
        (C.rms_norm_bwd.default, (torch.randn_like(x), x, w, rstd)),
        (C.swiglu_fwd.default, (x, x.flip(0))),
        (C.swiglu_bwd.default, (x, x, x.flip(0))),
        (C.fused_head_ce.default, (hidden, weight, labels, -100, 4, True, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=tests)
