"""Backend choice for every op, resolved per call (never at import time).

Order: `cuda` (CUDA kernels, CUDA tensors, where built) > `triton` (CUDA tensors) for GPU
tensors; `cpu` (C++ kernels in ernie_core._C) for CPU tensors; `reference` (pure PyTorch)
otherwise. `ERNIE_CORE_BACKEND=reference|cpu|triton|cuda` forces one; tests use it.

Kernels register themselves per (op, backend, function name); the op module asks for them with
`kernel()`. Backend modules are imported lazily the first time a backend is asked for.

Every (op, function name) has ONE declared contract, `declare()`d next to its front door: a stub
function whose signature is the call the front door makes to every backend's kernel. Parameters
before a `*` are passed positionally, always; keyword-only parameters are passed by name, and
those with a default only sometimes. `conformance_problems()` says whether a kernel accepts every
such call; tests/test_backend_conformance.py checks each registered kernel of every backend
against its contract, so a new front-door argument fails there until every backend takes it.
`example()` registers, per op, a small front-door run (forward and backward on CPU tensors) that
the conformance test drives through each backend it can run.
"""
from __future__ import annotations

import importlib
import inspect
import itertools
import os
from typing import Callable

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
_REGISTRY: dict[tuple[str, str, str], Callable] = {}
# Module that registers each backend's kernels when imported.
_BACKEND_MODULES = {
    "cpu": "ernie_core.ops.cpu",
    "triton": "ernie_core.ops.triton",
    "cuda": "ernie_core.ops.cuda",
}
_loaded: dict[str, bool] = {}
_CONTRACTS: dict[tuple[str, str], inspect.Signature] = {}
_EXAMPLES: dict[str, Callable] = {}


def register(op: str, backend: str, fn_name: str, fn: Callable) -> None:
    """Register `fn` as `op`'s `fn_name` (e.g. "fwd", "bwd") for `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY[(op, backend, fn_name)] = fn


def declare(op: str, fn_name: str, stub: Callable) -> None:
    """Declare the call `op`'s front door makes to `fn_name` kernels: `stub`'s signature (its body is
    never run). Positional-or-keyword parameters are always passed by position; keyword-only ones by
    name (one with a default may be left out). "supports" contracts take the tensors given to
    choose_backend."""
    _CONTRACTS[(op, fn_name)] = inspect.signature(stub)


def contract(op: str, fn_name: str) -> inspect.Signature | None:
    return _CONTRACTS.get((op, fn_name))


def contracts() -> dict[tuple[str, str], inspect.Signature]:
    return dict(_CONTRACTS)


def example(op: str, run: Callable) -> None:
    """Register `run()`: a small front-door run of `op` (CPU tensors, forward and backward) returning
    a dict of named tensors (outputs and gradients) that every backend must reproduce."""
    _EXAMPLES[op] = run


def examples() -> dict[str, Callable]:
    return dict(_EXAMPLES)


def contract_calls(sig: inspect.Signature) -> list[tuple[int, tuple[str, ...]]]:
    """Every (number of positional arguments, keyword names) call a contract allows."""
    P = inspect.Parameter
    params = list(sig.parameters.values())
    n_pos = sum(p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD) for p in params)
    required = tuple(p.name for p in params if p.kind == P.KEYWORD_ONLY and p.default is P.empty)
    optional = [p.name for p in params if p.kind == P.KEYWORD_ONLY and p.default is not P.empty]
    calls = []
    for r in range(len(optional) + 1):
        for extra in itertools.combinations(optional, r):
            calls.append((n_pos, required + extra))
    return calls


def conformance_problems(fn: Callable, sig: inspect.Signature) -> list[str]:
    """What in the contract `sig` the kernel `fn` does not accept (empty: it takes every call)."""
    if isinstance(fn, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):  # a raw op: read its schema
        return _schema_problems(fn, sig)
    try:
        have = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        return [f"{fn!r} has no inspectable signature: {e}"]
    problems = []
    for n_pos, names in contract_calls(sig):
        args = [object()] * n_pos
        try:
            have.bind(*args, **{n: object() for n in names})
        except TypeError as e:
            call = ", ".join([f"<{n_pos} positional>"] + [f"{n}=" for n in names])
            problems.append(f"does not take the call ({call}): {e}")
    return problems


def _schema_problems(fn, sig: inspect.Signature) -> list[str]:
    """The same check for a raw torch op (torch.ops.ernie_core_C.*), from its schema."""
    schema = (fn.default if isinstance(fn, torch._ops.OpOverloadPacket) else fn)._schema
    names = [a.name for a in schema.arguments]
    required = [a.name for a in schema.arguments if not a.has_default_value()]
    n_positional = sum(not a.kwarg_only for a in schema.arguments)
    problems = []
    for n_pos, kw in contract_calls(sig):
        given = names[:n_pos] + list(kw)
        if n_pos > n_positional:
            problems.append(f"schema {schema} takes {n_positional} positional arguments, the contract passes {n_pos}")
        missing = [n for n in required if n not in given]
        unknown = [n for n in kw if n not in names or names.index(n) < n_pos]
        if missing or unknown:
            problems.append(f"schema {schema}: call ({n_pos} positional, {', '.join(kw) or 'no keywords'}) "
                            f"misses {missing} / passes unknown or duplicate {unknown}")
    return problems


def registered() -> dict[tuple[str, str, str], Callable]:
    """Every registered kernel, (op, backend, fn_name) -> fn (backends imported where they load)."""
    for backend in _BACKEND_MODULES:
        _load(backend)
    return dict(_REGISTRY)


def _load(backend: str) -> None:
    if backend in _loaded or backend == "reference":
        return
    try:
        importlib.import_module(_BACKEND_MODULES[backend])
        _loaded[backend] = True
    except ImportError:
        # A backend that is not built here is simply absent; the dispatcher falls through.
        _loaded[backend] = False


def has_kernel(op: str, backend: str, fn_name: str = "fwd") -> bool:
    _load(backend)
    return (op, backend, fn_name) in _REGISTRY


def kernel(op: str, backend: str, fn_name: str) -> Callable:
    _load(backend)
    try:
        return _REGISTRY[(op, backend, fn_name)]
    except KeyError:
        raise NotImplementedError(f"op {op!r} has no {fn_name!r} kernel for backend {backend!r}") from None


def forced_backend() -> str | None:
    value = os.environ.get("ERNIE_CORE_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"ERNIE_CORE_BACKEND={value!r}; expected one of {', '.join(BACKENDS)}")
    return value


def supports(op: str, backend: str, *tensors: torch.Tensor) -> bool:
    """Whether `backend`'s kernel for `op` takes these tensors (dtypes, devices). A backend states
    its limits by registering a `"supports"` function; without one it takes everything."""
    fn = _REGISTRY.get((op, backend, "supports"))
    return fn is None or bool(fn(*tensors))


def choose_backend(op: str, *tensors: torch.Tensor, fn_name: str = "fwd") -> str:
    """The backend that runs `op` on these tensors now (one that has an `fn_name` kernel)."""
    forced = forced_backend()
    if forced is not None:
        if forced != "reference" and not has_kernel(op, forced, fn_name):
            raise RuntimeError(f"ERNIE_CORE_BACKEND={forced} but op {op!r} has no {forced} kernel built here")
        if not supports(op, forced, *tensors):
            kinds = ", ".join(f"{t.dtype} on {t.device}" for t in tensors if isinstance(t, torch.Tensor))
            raise RuntimeError(f"ERNIE_CORE_BACKEND={forced} but its {op!r} kernel does not take {kinds}")
        return forced
    is_cuda = any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    candidates = ("cuda", "triton") if is_cuda else ("cpu",)
    for backend in candidates:
        if has_kernel(op, backend, fn_name) and supports(op, backend, *tensors):
            return backend
    return "reference"
