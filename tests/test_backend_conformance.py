"""Every backend honours its front door's contract.

Each op declares, next to its front door, the call it makes to a backend kernel, one stub per
(op, function name) (`_backend.declare`). Here, generically over the registry (ops other issues add
are covered as soon as they register kernels):

1. every registered kernel of every backend -- cpu, reference, triton, and cuda, whose module cannot
   import without a CUDA build, so it is loaded in isolation with the CUDA-impl probe answered yes --
   has a declared contract and accepts every call it allows (signature / raw-op schema inspection);
2. the calls the front doors really make (recorded while each op's registered example runs forward
   and backward) are calls the contract allows, for every backend that runs here; and the results
   equal the reference backend's: cpu and reference in this process, the cuda wrappers with their raw
   ops served by the CPU impls of the same schema, and triton under TRITON_INTERPRET=1 in a child
   process (the interpreter must be switched on before Triton is imported).

The issue's snippet (triton, flashmask_attention(...).sum().backward(), which used to die on `dlse`)
runs in that child too.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from ernie_core import ops  # noqa: F401  (registers every op's contract, reference kernels and example)
from ernie_core.ops import _backend

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CUDA_MODULE = os.path.join(ROOT, "ernie_core", "ops", "cuda.py")
# fp32 examples; attention accumulates in another order per backend (tests/_tolerances.py, fp32 rows).
ATOL, RTOL = 5e-5, 2e-4


# ---- the cuda backend, loaded without CUDA --------------------------------------------------------

def load_cuda_module(run_on_cpu: bool = False):
    """ernie_core/ops/cuda.py executed as a private module whose registrations land in a dict
    {(op, fn_name): fn} instead of the dispatcher: `has_cuda_impl` answers yes, and without a built
    extension a stand-in `ernie_core._C` is used (enough for signatures). run_on_cpu: the wrappers
    send every input to the raw ops, whose CPU impls share the CUDA impls' schema, so the exact
    calls the wrappers make run here."""
    got = {}
    real_register = _backend.register
    real_probe = torch._C._dispatch_has_kernel_for_dispatch_key

    def register(op, backend, fn_name, fn):
        assert backend == "cuda", f"ops/cuda.py registered {op}.{fn_name} for backend {backend!r}"
        got[(op, fn_name)] = fn

    stand_in = None
    try:
        import ernie_core._C  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("ernie_core._C")
        sys.modules["ernie_core._C"] = stand_in
    spec = importlib.util.spec_from_file_location("ernie_core.ops._cuda_conformance_probe", CUDA_MODULE)
    module = importlib.util.module_from_spec(spec)
    try:
        _backend.register = register
        torch._C._dispatch_has_kernel_for_dispatch_key = lambda name, key: True
        spec.loader.exec_module(module)
    finally:
        _backend.register = real_register
        torch._C._dispatch_has_kernel_for_dispatch_key = real_probe
        if stand_in is not None:
            del sys.modules["ernie_core._C"]
    if run_on_cpu:
        module.flashmask_cuda_supported = lambda q: True
    return module, got


def all_kernels() -> dict[tuple[str, str, str], object]:
    kernels = {k: f for k, f in _backend.registered().items() if k[1] != "cuda"}
    _, cuda = load_cuda_module()
    kernels.update({(op, "cuda", fn_name): f for (op, fn_name), f in cuda.items()})
    return kernels


KERNELS = all_kernels()


def test_registry_is_populated():
    backends = {b for _, b, _ in KERNELS}
    assert {"reference", "triton", "cuda"} <= backends, f"backends seen: {backends}"


@pytest.mark.parametrize("key", sorted(KERNELS), ids=lambda k: ".".join(k))
def test_kernel_accepts_its_contract(key):
    op, backend, fn_name = key
    sig = _backend.contract(op, fn_name)
    assert sig is not None, (f"{op}: backend {backend!r} registers {fn_name!r} but the op declares no contract for "
                             f"it; add _backend.declare({op!r}, {fn_name!r}, stub) next to its front door")
    problems = _backend.conformance_problems(KERNELS[key], sig)
    assert not problems, f"{op}.{fn_name} ({backend}) vs its contract {sig}:\n  " + "\n  ".join(problems)


def test_every_op_has_an_example():
    """Every op with kernels registers a front-door example for the real-call checks below."""
    ops_with_kernels = {op for op, _, _ in KERNELS}
    missing = ops_with_kernels - set(_backend.examples())
    assert not missing, f"ops without a front-door example (_backend.example): {sorted(missing)}"


def test_cuda_backend_has_dropout():
    """Attention dropout on CUDA tensors must never need the [S, S] reference."""
    _, cuda = load_cuda_module()
    for fn_name in ("fwd", "bwd", "fwd_dropout", "bwd_dropout"):
        assert ("flashmask_attention", fn_name) in cuda, f"cuda registers no flashmask_attention.{fn_name}"


def test_conformance_check_catches_a_dropped_argument():
    """The check itself can fail: a bwd that lost `dlse` (the bug this file exists for), a kernel that
    needs an argument the front door does not pass, and a raw op called with too many positionals."""
    sig = _backend.contract("flashmask_attention", "bwd")

    def no_dlse(dout, q, k, v, out, lse, idx, causal, scale):
        pass

    def extra_required(dout, q, k, v, out, lse, idx, causal, scale, window, dlse=None):
        pass

    assert any("dlse" in p for p in _backend.conformance_problems(no_dlse, sig))
    assert _backend.conformance_problems(extra_required, sig)
    fwd_dropout = _backend.contract("flashmask_attention", "fwd_dropout")
    if ("rms_norm", "cpu", "fwd") in KERNELS:  # a raw op with a 3-argument schema
        assert _backend.conformance_problems(KERNELS[("rms_norm", "cpu", "fwd")], fwd_dropout)


# ---- real calls through the front doors -----------------------------------------------------------

@contextlib.contextmanager
def recording(backend: str, calls: list, extra: dict | None = None):
    """Force `backend`; record every kernel call the front doors make, as (op, fn_name, n_positional,
    keyword names), and every supports() probe. extra: {(op, fn_name): fn} kernels to serve for
    `backend` (the cuda wrappers here)."""
    real_kernel, real_supports, real_has = _backend.kernel, _backend.supports, _backend.has_kernel
    old_env = os.environ.get("ERNIE_CORE_BACKEND")

    def has_kernel(op, b, fn_name="fwd"):
        if extra is not None and b == backend:
            return (op, fn_name) in extra
        return real_has(op, b, fn_name)

    def kernel(op, b, fn_name):
        fn = extra[(op, fn_name)] if extra is not None and b == backend else real_kernel(op, b, fn_name)

        def wrapped(*args, **kwargs):
            call = (op, b, fn_name, len(args), tuple(sorted(kwargs)))
            calls.append(call)
            problems = check_calls([call], b)
            if problems:  # say so before the kernel fails on it with a bare TypeError
                raise AssertionError("; ".join(problems))
            return fn(*args, **kwargs)

        return wrapped

    def supports(op, b, *tensors):
        calls.append((op, b, "supports", len(tensors), ()))
        if extra is not None and b == backend:
            fn = extra.get((op, "supports"))
            return fn is None or bool(fn(*tensors))
        return real_supports(op, b, *tensors)

    _backend.kernel, _backend.supports, _backend.has_kernel = kernel, supports, has_kernel
    os.environ["ERNIE_CORE_BACKEND"] = backend
    try:
        yield
    finally:
        _backend.kernel, _backend.supports, _backend.has_kernel = real_kernel, real_supports, real_has
        if old_env is None:
            os.environ.pop("ERNIE_CORE_BACKEND", None)
        else:
            os.environ["ERNIE_CORE_BACKEND"] = old_env


def check_calls(calls, backend) -> list[str]:
    """Problems with the recorded calls: a call the contract does not allow, or a kernel of another
    backend than the forced one (a silent fallback)."""
    problems = []
    for op, b, fn_name, n_pos, names in sorted(set(calls)):
        if b != backend and fn_name != "supports":
            problems.append(f"{op}.{fn_name} ran on {b!r} with {backend!r} forced")
            continue
        sig = _backend.contract(op, fn_name)
        if sig is None:
            problems.append(f"{op}.{fn_name}: called by the front door but has no declared contract")
        elif (n_pos, names) not in {(n, tuple(sorted(kw))) for n, kw in _backend.contract_calls(sig)}:
            problems.append(f"{op}.{fn_name}: front door called it with {n_pos} positional + {list(names)}, "
                            f"outside its contract {sig}")
    return problems


def run_example(op: str, backend: str, extra=None):
    calls = []
    with recording(backend, calls, extra):
        result = _backend.examples()[op]()
    return {k: v.detach() for k, v in result.items()}, calls


def compare(got: dict, want: dict) -> list[str]:
    problems = []
    for name, w in want.items():
        g = got[name]
        if g.shape != w.shape or g.dtype != w.dtype:
            problems.append(f"{name}: {g.dtype} {tuple(g.shape)} vs reference {w.dtype} {tuple(w.shape)}")
            continue
        gd, wd = g.double(), w.double()
        bad = ~((gd == wd) | ((gd - wd).abs() <= ATOL + RTOL * wd.abs()))
        if bad.any():
            problems.append(f"{name}: {int(bad.sum())}/{bad.numel()} off, max |diff| {float((gd - wd).abs().max()):.3g}")
    return problems


EXAMPLE_OPS = sorted(_backend.examples())
_CUDA_OPS = {op for op, b, _ in KERNELS if b == "cuda"}
IN_PROCESS = ([(op, "reference") for op in EXAMPLE_OPS]
              + [(op, "cpu") for op in EXAMPLE_OPS if any(o == op and b == "cpu" for o, b, _ in KERNELS)]
              + [(op, "cuda") for op in EXAMPLE_OPS if op in _CUDA_OPS])


@pytest.mark.parametrize("op,backend", IN_PROCESS, ids=lambda x: x)
def test_front_door_calls_conform_and_match_reference(op, backend):
    """cuda: the wrappers of ops/cuda.py with their raw ops served by the CPU impls of the same schema."""
    want, _ = run_example(op, "reference")
    extra = None
    if backend == "cuda":
        if not _backend.has_kernel("rms_norm", "cpu"):
            pytest.fail("ernie_core._C is not built here (setup.py build_ext --inplace)")
        extra = load_cuda_module(run_on_cpu=True)[1]
    got, calls = run_example(op, backend, extra)
    assert any(c[1] == backend and c[2] != "supports" for c in calls), f"no {backend} kernel ran"
    problems = check_calls(calls, backend) + compare(got, want)
    assert not problems, "\n".join(problems)


# ---- triton under the interpreter (a child process) -----------------------------------------------

def issue_snippet():
    """The snippet of issue #10, verbatim apart from the imports."""
    from ernie_core.ops import flashmask_attention

    q = torch.randn(1, 64, 2, 32, requires_grad=True)
    k = torch.randn(1, 64, 1, 32, requires_grad=True)
    v = torch.randn(1, 64, 1, 32, requires_grad=True)
    flashmask_attention(q, k, v, None, causal=True).sum().backward()
    return {"dq": q.grad, "dk": k.grad, "dv": v.grad}


def _worker(out_path):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    for op in EXAMPLE_OPS:
        try:
            want, _ = run_example(op, "reference")
            got, calls = run_example(op, "triton")
            problems = check_calls(calls, "triton") + compare(got, want)
            if not any(c[1] == "triton" and c[2] != "supports" for c in calls):
                problems.append("no triton kernel ran")
        except Exception as e:  # reported by the parent
            problems = [f"{type(e).__name__}: {e}"]
        results[op] = problems
    calls = []
    try:
        torch.manual_seed(0)
        with recording("triton", calls):
            grads = issue_snippet()
        problems = check_calls(calls, "triton")
        torch.manual_seed(0)
        os.environ["ERNIE_CORE_BACKEND"] = "reference"
        problems += compare(grads, issue_snippet())
        if not {("flashmask_attention", "fwd"), ("flashmask_attention", "bwd")} <= {(c[0], c[2]) for c in calls}:
            problems.append(f"triton attention kernels did not both run: {sorted(set(calls))}")
    except Exception as e:
        problems = [f"{type(e).__name__}: {e}"]
    results["issue_snippet"] = problems
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("conformance") / "triton.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("ERNIE_CORE_BACKEND", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"interpreter worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", EXAMPLE_OPS + ["issue_snippet"])
def test_triton_interpreted_front_door(triton_results, case):
    problems = triton_results[case]
    assert not problems, "\n".join(problems)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
