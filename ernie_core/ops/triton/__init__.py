"""Triton kernels for the core ops, registered as backend "triton" (see ops/_backend.py).

Importing this package registers every kernel; it raises ImportError where Triton is missing, so
the dispatcher treats the backend as absent. The kernels need CUDA tensors, except under
TRITON_INTERPRET=1 (set before Triton is imported), where they run on CPU tensors for tests.
"""
from __future__ import annotations

import triton  # noqa: F401  (ImportError here = backend absent)

from .. import _backend
from .flashmask import flashmask_bwd, flashmask_fwd
from .head_ce import fused_head_ce_fwd_bwd
from .pointwise import rms_norm_bwd, rms_norm_fwd, rope_fwd, swiglu_bwd, swiglu_fwd

_backend.register("flashmask_attention", "triton", "fwd", flashmask_fwd)
_backend.register("flashmask_attention", "triton", "bwd", flashmask_bwd)
# Attention dropout: the same kernels with the keep mask hashed inside (bit-identical to the CPU kernel's).
_backend.register("flashmask_attention", "triton", "fwd_dropout", flashmask_fwd)
_backend.register("flashmask_attention", "triton", "bwd_dropout", flashmask_bwd)
_backend.register("rope", "triton", "fwd", rope_fwd)
_backend.register("rms_norm", "triton", "fwd", rms_norm_fwd)
_backend.register("rms_norm", "triton", "bwd", rms_norm_bwd)
_backend.register("swiglu", "triton", "fwd", swiglu_fwd)
_backend.register("swiglu", "triton", "bwd", swiglu_bwd)
_backend.register("fused_head_ce", "triton", "fwd_bwd", fused_head_ce_fwd_bwd)

__all__ = ["flashmask_fwd", "flashmask_bwd", "rope_fwd", "rms_norm_fwd", "rms_norm_bwd", "swiglu_fwd",
           "swiglu_bwd", "fused_head_ce_fwd_bwd"]
