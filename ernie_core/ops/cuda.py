"""CUDA kernels (csrc/cuda/, bound in python/*_cuda.cpp), registered as backend "cuda".

Importing this module registers a kernel for each op whose `ernie_core_C::` schema has a CUDA
impl in the built extension; it raises ImportError when the extension was built without CUDA, so
the dispatcher treats the backend as absent. The wrappers take the backend kernel signatures of
docs/dev/CONTRACTS.md (the contracts declared next to each front door; tests/test_backend_conformance.py
checks these wrappers without a CUDA build). FlashMask attention's CUDA kernels are bf16 with D in
{64, 128}; other inputs go to the Triton kernels, so choosing "cuda" never fails on a shape the op
supports. Attention dropout and dlse go to the raw ops' dropout_p / seed / offset / dlse arguments
(the schema the CPU kernels share, python/ops.cpp).
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


def _seed_offset(dropout_p, rng_state):
    if not dropout_p:
        return 0, 0
    if rng_state is None or rng_state.dtype != torch.int64 or rng_state.numel() != 2:
        raise ValueError("flashmask_attention: dropout_p > 0 needs rng_state, an int64 tensor (seed, offset)")
    seed, offset = rng_state.tolist()  # int64 [2] on CPU (ops/reference.py, draw_dropout_rng_state)
    return int(seed), int(offset)


def flashmask_fwd(q, k, v, idx, causal, scale, dropout_p=0.0, rng_state=None):
    """The contract's fwd and fwd_dropout: (out, lse). Shapes the CUDA kernels do not take run the
    Triton kernels (which have dropout too, with the same keep mask)."""
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not flashmask_cuda_supported(q):
        return _triton("fwd_dropout" if dropout_p else "fwd")(q, k, v, idx, causal, scale, dropout_p, rng_state)
    seed, offset = _seed_offset(dropout_p, rng_state)
    return torch.ops.ernie_core_C.flashmask_fwd(_aligned(q), _aligned(k), _aligned(v), _idx_arg(idx, q.device),
                                                causal, scale, float(dropout_p), seed, offset)


def flashmask_bwd(dout, q, k, v, out, lse, idx, causal, scale, dlse=None, dropout_p=0.0, rng_state=None):
    """The contract's bwd and bwd_dropout: (dq, dk, dv); dlse = the gradient reaching lse (None = 0)."""
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not flashmask_cuda_supported(q):
        return _triton("bwd_dropout" if dropout_p else "bwd")(dout, q, k, v, out, lse, idx, causal, scale, dlse,
                                                              dropout_p, rng_state)
    seed, offset = _seed_offset(dropout_p, rng_state)
    return torch.ops.ernie_core_C.flashmask_bwd(_aligned(dout), _aligned(q), _aligned(k), _aligned(v), _aligned(out),
                                                lse, _idx_arg(idx, q.device), causal, scale,
                                                None if dlse is None else dlse.contiguous(), float(dropout_p), seed,
                                                offset)


def rope_fwd(x, position_ids, theta=500000.0, inverse=False):
    # Same expression as reference.rope_angles, so the frequencies match bit for bit.
    inv_freq = 1.0 / (theta ** (torch.arange(0, x.shape[-1], 2, device=x.device, dtype=torch.float32) / x.shape[-1]))
    return torch.ops.ernie_core_C.rope(x, position_ids, inv_freq, inverse)


def fused_head_ce_fwd_bwd(hidden, weight, labels, ignore_index=-100, chunk_tokens=0, grad_hidden=True,
                          grad_weight=True):
    return tuple(torch.ops.ernie_core_C.fused_head_ce(hidden, weight, labels, ignore_index, chunk_tokens or 0,
                                                      grad_hidden, grad_weight))


_backend.register("flashmask_attention", "cuda", "fwd", flashmask_fwd)
_backend.register("flashmask_attention", "cuda", "bwd", flashmask_bwd)
_backend.register("flashmask_attention", "cuda", "fwd_dropout", flashmask_fwd)
_backend.register("flashmask_attention", "cuda", "bwd_dropout", flashmask_bwd)
if has_cuda_impl("rope"):
    _backend.register("rope", "cuda", "fwd", rope_fwd)
if has_cuda_impl("fused_head_ce"):
    _backend.register("fused_head_ce", "cuda", "fwd_bwd", fused_head_ce_fwd_bwd)
