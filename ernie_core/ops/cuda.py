"""CUDA kernels (csrc/cuda/, bound in python/*_cuda.cpp), registered as backend "cuda".

Importing this module registers a kernel for each op whose `ernie_core_C::` schema has a CUDA
impl in the built extension; it raises ImportError when the extension was built without CUDA, so
the dispatcher treats the backend as absent. The wrappers take the backend kernel signatures of
docs/dev/CONTRACTS.md. FlashMask attention's CUDA kernels are bf16 with D in {64, 128}; other
inputs go to the Triton kernels, so choosing "cuda" never fails on a shape the op supports.
"""
from __future__ import annotations

import math

import torch

from . import _backend

try:
    import ernie_core._C  # noqa: F401  (loads the schemas and their impls)
except ImportError as e:  # not built: the backend is absent
    raise ImportError(f"ernie_core._C is not built: {e}") from e

_NS = "ernie_core_C"


def has_cuda_impl(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{_NS}::{name}", "CUDA")


if not has_cuda_impl("flashmask_fwd"):
    raise ImportError("ernie_core._C was built without CUDA kernels (torch without CUDA or CUDA_HOME unset)")

_EMPTY_IDX: dict[torch.device, torch.Tensor] = {}


def _idx_arg(idx, device):
    if idx is not None:
        return idx if idx.dtype == torch.int32 else idx.to(torch.int32)
    if device not in _EMPTY_IDX:  # an empty tensor tells the kernel "no mask tensor"
        _EMPTY_IDX[device] = torch.empty(0, dtype=torch.int32, device=device)
    return _EMPTY_IDX[device]


def flashmask_cuda_supported(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype == torch.bfloat16 and q.shape[-1] in (64, 128)


def _aligned(t):
    # The kernels copy 16-byte rows: every outer stride must be a multiple of 8 elements.
    return t if t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:3]) else t.contiguous()


def _triton(name):
    from . import triton as triton_backend  # noqa: F401  (registers the Triton kernels)

    return _backend.kernel("flashmask_attention", "triton", name)


def flashmask_fwd(q, k, v, idx, causal, scale):
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not flashmask_cuda_supported(q):
        return _triton("fwd")(q, k, v, idx, causal, scale)
    return torch.ops.ernie_core_C.flashmask_fwd(_aligned(q), _aligned(k), _aligned(v), _idx_arg(idx, q.device),
                                                causal, scale)


def flashmask_bwd(dout, q, k, v, out, lse, idx, causal, scale):
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not flashmask_cuda_supported(q):
        return _triton("bwd")(dout, q, k, v, out, lse, idx, causal, scale)
    return torch.ops.ernie_core_C.flashmask_bwd(_aligned(dout), _aligned(q), _aligned(k), _aligned(v), _aligned(out),
                                                lse, _idx_arg(idx, q.device), causal, scale, None)


def rope_fwd(x, position_ids, theta=500000.0, inverse=False):
    # Same expression as reference.rope_angles, so the frequencies match bit for bit.
    inv_freq = 1.0 / (theta ** (torch.arange(0, x.shape[-1], 2, device=x.device, dtype=torch.float32) / x.shape[-1]))
    return torch.ops.ernie_core_C.rope(x, position_ids, inv_freq, inverse)


def fused_head_ce_fwd_bwd(hidden, weight, labels, ignore_index=-100, chunk_tokens=0):
    return tuple(torch.ops.ernie_core_C.fused_head_ce(hidden, weight, labels, ignore_index, chunk_tokens or 0,
                                                      True, True))


_backend.register("flashmask_attention", "cuda", "fwd", flashmask_fwd)
_backend.register("flashmask_attention", "cuda", "bwd", flashmask_bwd)
if has_cuda_impl("rope"):
    _backend.register("rope", "cuda", "fwd", rope_fwd)
if has_cuda_impl("fused_head_ce"):
    _backend.register("fused_head_ce", "cuda", "fwd_bwd", fused_head_ce_fwd_bwd)
