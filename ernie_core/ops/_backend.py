"""Backend choice for every op, resolved per call (never at import time).

Order: `cuda` (CUDA kernels, CUDA tensors, where built) > `triton` (CUDA tensors) for GPU
tensors; `cpu` (C++ kernels in ernie_core._C) for CPU tensors; `reference` (pure PyTorch)
otherwise. `ERNIE_CORE_BACKEND=reference|cpu|triton|cuda` forces one; tests use it.

Kernels register themselves per (op, backend, function name); the op module asks for them with
`kernel()`. Backend modules are imported lazily the first time a backend is asked for.
"""
from __future__ import annotations

import importlib
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


def register(op: str, backend: str, fn_name: str, fn: Callable) -> None:
    """Register `fn` as `op`'s `fn_name` (e.g. "fwd", "bwd") for `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY[(op, backend, fn_name)] = fn


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
