"""The `cpu` backend: C++ kernels from ernie_core._C (csrc/cpu/, bound in python/).

Imported lazily by `_backend` the first time the cpu backend is asked for. Importing the extension
registers the raw ops `torch.ops.ernie_core_C.*`; when it is not built the import fails and the
dispatcher falls back to the reference. The kernels take float32 and bfloat16 CPU tensors.
"""
import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.ernie_core_C)
from . import _backend
from . import reference as ref

_C_OPS = torch.ops.ernie_core_C
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _supports(*tensors):
    return all(
        t.device.type == "cpu" and t.dtype in _KERNEL_DTYPES
        for t in tensors
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    )


def _flashmask_supports(q, *tensors):
    return q.shape[-1] <= 256 and _supports(q, *tensors)  # the kernel's tiles hold head dims up to 256


def _seed_offset(rng_state):
    seed, offset = rng_state.tolist()  # int64 [2] on CPU (ops/reference.py, draw_dropout_rng_state)
    return int(seed), int(offset)


def _flashmask_bwd(dout, q, k, v, out, lse, idx, causal, scale, dlse=None):
    return _C_OPS.flashmask_bwd(dout, q, k, v, out, lse, idx, causal, scale, dlse)


def _flashmask_fwd_dropout(q, k, v, idx, causal, scale, dropout_p, rng_state):
    return _C_OPS.flashmask_fwd(q, k, v, idx, causal, scale, dropout_p, *_seed_offset(rng_state))


def _flashmask_bwd_dropout(dout, q, k, v, out, lse, idx, causal, scale, dropout_p, rng_state, dlse=None):
    return _C_OPS.flashmask_bwd(dout, q, k, v, out, lse, idx, causal, scale, dlse, dropout_p,
                                *_seed_offset(rng_state))


def _rope_fwd(x, position_ids, theta, inverse=False):
    return _C_OPS.rope(x, position_ids, ref.rope_inv_freq(x.shape[-1], theta), inverse)


def _rope_fwd_qk(q, k, position_ids, theta, inverse=False):
    return _C_OPS.rope_qk(q, k, position_ids, ref.rope_inv_freq(q.shape[-1], theta), inverse)


def _head_ce(hidden, weight, labels, ignore_index, chunk_tokens, grad_hidden=True, grad_weight=True):
    return _C_OPS.fused_head_ce(hidden, weight, labels, ignore_index, chunk_tokens, grad_hidden, grad_weight)


_KERNELS = {
    ("flashmask_attention", "fwd"): _C_OPS.flashmask_fwd,
    ("flashmask_attention", "bwd"): _flashmask_bwd,
    ("flashmask_attention", "fwd_dropout"): _flashmask_fwd_dropout,
    ("flashmask_attention", "bwd_dropout"): _flashmask_bwd_dropout,
    ("rope", "fwd"): _rope_fwd,
    ("rope", "fwd_qk"): _rope_fwd_qk,
    ("rms_norm", "fwd"): _C_OPS.rms_norm_fwd,
    ("rms_norm", "bwd"): _C_OPS.rms_norm_bwd,
    ("swiglu", "fwd"): _C_OPS.swiglu_fwd,
    ("swiglu", "bwd"): _C_OPS.swiglu_bwd,
    ("fused_head_ce", "fwd_bwd"): _head_ce,
}

for (_op, _fn_name), _fn in _KERNELS.items():
    _backend.register(_op, "cpu", _fn_name, _fn)
for _op in {op for op, _ in _KERNELS}:
    _backend.register(_op, "cpu", "supports", _flashmask_supports if _op == "flashmask_attention" else _supports)
