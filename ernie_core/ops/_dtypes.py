"""Input dtype policy shared by the op front doors, autocast included.

torch.library custom ops are not on autocast's op lists, so each front door decides:
- `matmul_inputs` (flashmask_attention, fused_head_ce): under autocast on the tensors' device the
  floating inputs are cast to the autocast dtype (bf16 on CPU), like matmul / flash_attn on
  Paddle's AMP white list; otherwise to their common (promoted) dtype.
- `common_inputs` (swiglu): the promoted dtype of the inputs, autocast or not.
- rope and rms_norm keep their input dtypes (both compute in fp32 internally).
Op bodies run with autocast disabled so the reference backend computes what it says.
"""
from __future__ import annotations

import contextlib

import torch


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    device = t.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def common_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def matmul_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    dtype = autocast_dtype(tensors[0])
    if dtype is None:
        return common_inputs(*tensors)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def no_autocast(t: torch.Tensor):
    """Context for an op body: autocast off on t's device (a no-op context elsewhere)."""
    device = t.device.type
    if device in ("cpu", "cuda"):
        return torch.autocast(device_type=device, enabled=False)
    return contextlib.nullcontext()
