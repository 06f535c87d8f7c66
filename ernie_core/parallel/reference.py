"""Running extra computations on a parallelized model: code run as a module's forward, and a frozen
copy of an FSDP-sharded model's weights that can be swapped in (DPO's reference model).

A wrapped model (FSDP2 `fully_shard` / `replicate`, possibly per pipeline stage) gathers its
parameters in forward pre-hooks and registers its gradient reduction after forward; code that
uses the parameters outside `forward` (a preference loss that scores only some rows with the LM
head) must therefore run *as* the forward: `run_as_forward`.

`ShardSnapshot` keeps this rank's local shards of every parameter (plain tensors, never in an
optimizer, sharded exactly like the policy, so ZeRO-3 holds 1/N of it per rank) and swaps them
into the live parameters for a no-grad pass, then puts the policy's weights back.
"""
from __future__ import annotations

import contextlib

import torch

from .dtensor import local_tensor as _local


def run_as_forward(module, fn, *args):
    """fn(*args) run as `module`'s forward, through module.__call__, so whatever a parallel layout hung
    on the module's forward runs around it (FSDP2/replicate gather the root's parameters before and
    register their gradient reduction after; tensor parallel output hooks). A plain module has no
    hooks and this is just fn(*args)."""
    with forward_replaced(module, fn):
        return module(*args)


@contextlib.contextmanager
def forward_replaced(module, fn):
    """Inside the block, calling `module` runs fn (an instance attribute shadows the class's forward)."""
    module.forward = fn
    try:
        yield module
    finally:
        del module.forward


def module_forward(module, *args, **kwargs):
    """The module's own (class) forward, for code that runs inside `forward_replaced(module, ...)`."""
    return type(module).forward(module, *args, **kwargs)


def fsdp_roots(model) -> list:
    """The modules a data-parallel layout wrapped at the top: the model, or each pipeline stage of a
    PipelinedModel (whose stages are not registered submodules)."""
    from .pipeline import PipelinedModel

    return list(model.chunks) if isinstance(model, PipelinedModel) else [model]


def fsdp_modules(model) -> list:
    """Every FSDP2-managed module (fully_shard or replicate) of the model or its pipeline stages."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    seen, out = set(), []
    for root in fsdp_roots(model):
        for m in root.modules():
            if isinstance(m, FSDPModule) and id(m) not in seen:
                seen.add(id(m))
                out.append(m)
    return out


def reshard(model) -> None:
    """Free every gathered parameter: afterwards the registered parameters are the sharded ones."""
    for m in fsdp_modules(model):
        m.reshard()


class ShardSnapshot:
    """This rank's local pieces of every parameter of `model` (in model.parameters() order)."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors

    @classmethod
    def of(cls, model, dtype: torch.dtype | None = None) -> "ShardSnapshot":
        reshard(model)
        return cls([_local(p).detach().to(dtype=dtype or p.dtype, copy=True) for p in model.parameters()])

    @classmethod
    def from_checkpoint(cls, model, path, dtype: torch.dtype | None = None) -> "ShardSnapshot":
        reshard(model)
        return cls([t.to(dtype=dtype or t.dtype, copy=True) for t in local_pieces_from_checkpoint(model, path)])

    @torch.no_grad()
    def refresh(self, model) -> None:
        """Copy the model's current weights into the snapshot."""
        reshard(model)
        for r, p in zip(self.tensors, model.parameters()):
            r.copy_(_local(p))

    @contextlib.contextmanager
    def swapped_in(self, model):
        """The model runs with the snapshot's weights inside the block (no grad), its own ones after.
        Every FSDP module is resharded before (so its next gather reads the swapped shards, not
        parameters left gathered by stage2) and after (so the next forward gathers the model's own
        weights again). Costs one copy of the local shards each way."""
        reshard(model)
        params = [_local(p) for p in model.parameters()]
        with torch.no_grad():
            backup = [t.clone() for t in params]
            for t, r in zip(params, self.tensors):
                t.copy_(r)
        try:
            yield model
        finally:
            reshard(model)
            with torch.no_grad():
                for t, b in zip(params, backup):
                    t.copy_(b)


def local_pieces_from_checkpoint(model, path) -> list[torch.Tensor]:
    """This rank's local pieces of the HF checkpoint at `path`, laid out like model.parameters() (plain,
    TP/FSDP DTensors, a pipeline stage's subset under the full model's names): a plain model is
    loaded and each rank cuts its own pieces, with no communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from ..models import Ernie4_5ForCausalLM

    plain = Ernie4_5ForCausalLM.from_pretrained(str(path), fuse_linear=model.runtime.fuse_linear)
    full = dict(plain.named_parameters(remove_duplicate=False))  # a pipeline stage's own copy of a tied head
    out = []
    for name, p in model.named_parameters():
        t = full[name].detach().to(device=_local(p).device, dtype=p.dtype)
        if isinstance(p, DTensor):
            t = distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None).to_local()
        out.append(t)
    return out


__all__ = ["ShardSnapshot", "forward_replaced", "fsdp_modules", "fsdp_roots", "local_pieces_from_checkpoint",
           "module_forward", "reshard", "run_as_forward"]
