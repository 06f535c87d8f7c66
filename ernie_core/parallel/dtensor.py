"""The one helper every layout uses to reach a DTensor's local piece."""
from __future__ import annotations

import torch


def local_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's piece of a DTensor (TP shard, FSDP shard) as a plain tensor sharing its memory, with
    no autograd link and no communication; a plain tensor (or None) is returned as it is. Writing into
    the result writes into the DTensor (used for in-place gradient and parameter updates)."""
    from torch.distributed.tensor import DTensor

    return t.to_local().detach() if isinstance(t, DTensor) else t
