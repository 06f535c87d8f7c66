"""Count what the collectives move, at the collectives themselves.

Every torch.distributed collective -- the c10d ops FSDP2, replicate and our own code call, the
functional collectives DTensor uses, and pipelining's send/recv -- goes through the dispatcher as
a `c10d.*` or `_c10d_functional.*` op, so one TorchDispatchMode sees them all, whatever library
issued them.

Bytes are "sent per rank" under the usual ring/bus model, so they compare directly with textbook
minima: all-reduce of S bytes over n ranks sends 2(n-1)/n*S, all-gather of an S-byte output and
reduce-scatter of an S-byte input send (n-1)/n*S, broadcast sends (n-1)/n*S on average, a send
sends S (a recv sends nothing).
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_NAMESPACES = ("c10d", "_c10d_functional")
# op name -> (kind, argument index of the payload, payload multiplied by the group size?)
_OPS = {
    "allreduce_": ("all_reduce", 0, False), "allreduce_coalesced_": ("all_reduce", 0, False),
    "all_reduce": ("all_reduce", 0, False), "all_reduce_coalesced": ("all_reduce", 0, False),
    "_allgather_base_": ("all_gather", 0, False), "allgather_": ("all_gather", 1, True),
    "allgather_into_tensor_coalesced_": ("all_gather", 0, False), "allgather_coalesced_": ("all_gather", 1, True),
    "all_gather_into_tensor": ("all_gather", 0, True), "all_gather_into_tensor_coalesced": ("all_gather", 0, True),
    "_reduce_scatter_base_": ("reduce_scatter", 1, False), "reduce_scatter_": ("reduce_scatter", 1, False),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1, False),
    "reduce_scatter_tensor": ("reduce_scatter", 0, False), "reduce_scatter_tensor_coalesced": ("reduce_scatter", 0, False),
    "broadcast_": ("broadcast", 0, False), "broadcast": ("broadcast", 0, False),
    "alltoall_": ("all_to_all", 1, False), "alltoall_base_": ("all_to_all", 1, False),
    "all_to_all_single": ("all_to_all", 0, False),
    "send": ("send", 0, False), "recv_": ("recv", 0, False), "recv_any_source_": ("recv", 0, False),
    "gather_": ("gather", 1, False), "scatter_": ("scatter", 1, False), "reduce_": ("reduce", 0, False),
}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)


def _group_size(args) -> int:
    """Size of the op's process group: a boxed ProcessGroup (c10d ops) or a group name (functional)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    for a in args:
        if isinstance(a, str):
            try:
                return _resolve_process_group(a).size()
            except Exception:
                continue
        if type(a).__name__ == "ScriptObject":  # the group, or a ReduceOp (which does not unbox)
            try:
                return dist.ProcessGroup.unbox(a).size()
            except Exception:
                continue
    return 1


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def wire_bytes(kind: str, payload: int, n: int) -> float:
    """Bytes one rank sends for a collective of `payload` bytes over n ranks (ring model)."""
    if n <= 1 and kind not in ("send",):
        return 0.0
    frac = (n - 1) / n if n > 1 else 0.0
    return {"all_reduce": 2 * frac * payload, "all_gather": frac * payload, "reduce_scatter": frac * payload,
            "broadcast": frac * payload, "all_to_all": frac * payload, "send": float(payload), "recv": 0.0,
            "gather": frac * payload, "scatter": frac * payload, "reduce": frac * payload}[kind]


class CommCounter(TorchDispatchMode):
    """`with CommCounter() as c: ...` then c.bytes_sent, c.by_kind, c.calls, c.largest_payload."""

    def __init__(self):
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.bytes_sent = 0.0
        self.by_kind: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.largest_payload = 0  # bytes of the biggest single message (e.g. proves logits were never gathered)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace in _NAMESPACES:
            spec = _OPS.get(func._schema.name.split("::")[-1])
            if spec is not None:
                kind, index, times_n = spec
                n = _group_size(list(args) + list(kwargs.values()))
                payload = _nbytes(_tensors(args[index])) * (n if times_n else 1)
                sent = wire_bytes(kind, payload, n)
                self.bytes_sent += sent
                self.by_kind[kind] += sent
                self.calls[kind] += 1
                self.largest_payload = max(self.largest_payload, payload)
        return out
