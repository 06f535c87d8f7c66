"""Temporary front doors: the references, until each op gets its own module with kernels.

The [cpu-kernels] work replaces each of these with a `torch.library.custom_op` in
`ernie_core/ops/<op>.py` that dispatches through `_backend.choose_backend`; the signatures stay.
"""
from __future__ import annotations

import torch

from . import reference as ref


def flashmask_attention(q, k, v, startend_row_indices, causal=True, softmax_scale=None, dropout_p=0.0):
    return ref.flashmask_attention_reference(q, k, v, startend_row_indices, causal, softmax_scale, dropout_p)


def rope(q, k, position_ids, theta=500000.0):
    return ref.rope_reference(q, k, position_ids, theta)


def rms_norm(x, weight, eps=1e-5):
    return ref.rms_norm_reference(x, weight, eps)


def swiglu(gate, up):
    return ref.swiglu_reference(gate, up)


def fused_head_ce(hidden, weight, labels, ignore_index=-100):
    return ref.fused_head_ce_reference(hidden, weight, labels, ignore_index)
