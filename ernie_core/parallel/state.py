"""Layout-independent checkpoints: gather full tensors by parameter name on rank 0, and the inverse.

Model weights are written as the usual HF folder (the model's own names, fused weights split), so
a checkpoint saved under TP=2 x PP=2 loads into any layout: the trainer builds the full model from
the folder and then applies the plans. Optimizer state is saved the same way, keyed by parameter
name with full (unsharded) tensors:

    {"format": FORMAT, "state": {name: {"step": t, "exp_avg": full, "exp_avg_sq": full}},
     "param_groups": [{hyperparameters..., "names": [name, ...]}]}

and loading slices each tensor back to whatever this rank holds (TP/FSDP DTensor shard, a pipeline
stage's subset, a ZeRO-1 slice). Every rank reads the whole file, so the checkpoint folder must be
visible to all ranks (a shared filesystem on multi-node runs).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .dtensor import local_tensor

FORMAT = "ernie_core.full_optimizer.v1"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
_GROUP_KEYS_SKIP = ("params", "names")


def _full(t: torch.Tensor, like=None) -> torch.Tensor:
    """Full tensor of a DTensor (collective over its mesh); `like` gives the layout of a plain local tensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor) and isinstance(like, DTensor):
        t = DTensor.from_local(t, like.device_mesh, like.placements, run_check=False,
                               shape=like.shape, stride=like.stride())
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu()


def _gather_to_rank0(part: dict, pp_group) -> dict | None:
    """Merge the per-pipeline-stage dicts on global rank 0 (only the pipeline group of rank 0 talks)."""
    if pp_group is None or dist.get_world_size(pp_group) == 1:
        return part if (not dist.is_initialized() or dist.get_rank() == 0) else None
    if dist.get_rank() not in dist.get_process_group_ranks(pp_group) or \
            0 not in dist.get_process_group_ranks(pp_group):
        return None
    parts = [None] * dist.get_world_size(pp_group) if dist.get_rank() == 0 else None
    dist.gather_object(part, parts, dst=0, group=pp_group)
    if dist.get_rank() != 0:
        return None
    merged: dict = {}
    for p in parts:
        for k, v in p.items():
            if isinstance(v, dict) and isinstance(merged.get(k), dict):
                merged[k].update(v)
            elif isinstance(v, list) and isinstance(merged.get(k), list):
                merged[k].extend(v)
            else:
                merged.setdefault(k, v)
    return merged


def _in_rank0_slot(mesh) -> bool:
    """Ranks whose dp, sharding and tp coordinates are all 0 (one per pipeline stage) hold what rank 0 needs."""
    if mesh is None:
        return True
    coord = mesh.get_coordinate()
    return coord[0] == 0 and coord[1] == 0 and coord[3] == 0


def full_model_state(model, mesh, pp_group, *, tied: bool) -> dict | None:
    """{HF name: full CPU tensor} on global rank 0 (None elsewhere). Collective over every rank."""
    from ..models.config import FUSED_PROJECTIONS, natural_key

    part = {}
    for name, p in model.named_parameters():
        value = _full(p)  # every rank of the stage joins the all-gathers
        if tied and name == HEAD:
            continue
        part[name] = value
    merged = _gather_to_rank0(part if _in_rank0_slot(mesh) else {}, pp_group)
    if merged is None:
        return None
    cfg = model.config
    out = {}
    for name, t in merged.items():
        module, _, fused = name.rpartition(".")[0].rpartition(".")
        if fused in FUSED_PROJECTIONS:  # fused q|k|v or gate|up: split into the HF names
            parts = cfg.fused_parts(fused)
            for (part_name, _), chunk in zip(parts, t.split([n for _, n in parts], dim=0)):
                out[f"{module}.{part_name}.{name.rpartition('.')[2]}"] = chunk
        else:
            out[name] = t
    return dict(sorted(out.items(), key=lambda kv: natural_key(kv[0])))


def _named_optimizer_params(optimizer, zero):
    """(group, name, optimizer param, model param, zero chunk) for every optimizer parameter."""
    by_slice = {id(piece): (p, chunk) for p, piece, _, chunk in zero.entries} if zero is not None else {}
    for group in optimizer.param_groups:
        names = group.get("names")
        if names is None or len(names) != len(group["params"]):
            raise RuntimeError("optimizer param groups must carry parameter 'names' (train/optim.py param_groups)")
        for name, param in zip(names, group["params"]):
            model_param, chunk = by_slice.get(id(param), (param, None))
            yield group, name, param, model_param, chunk


def full_optimizer_state(optimizer, mesh, pp_group, *, zero=None, tied: bool) -> dict | None:
    """The optimizer state by parameter name, full tensors, on global rank 0. Collective."""
    state, groups = {}, []
    group_names: dict[int, list[str]] = {}
    for group, name, param, model_param, chunk in _named_optimizer_params(optimizer, zero):
        st = optimizer.state.get(param, {})
        if zero is not None and chunk is not None and param.dtype != model_param.dtype:
            st = {**st, "master": param.detach()}  # stage1 O2: the fp32 slice is the master weight
        if zero is not None and chunk is not None:
            st = zero.full_local_state(st, model_param, chunk)
        full = {k: (_full(v, like=model_param) if torch.is_tensor(v) and v.dim() > 0 else
                    (v.detach().cpu() if torch.is_tensor(v) else v)) for k, v in st.items()}
        if tied and name == HEAD:
            continue
        if full:
            state[name] = full
        group_names.setdefault(id(group), []).append(name)
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k not in _GROUP_KEYS_SKIP}
        groups.append({**hyper, "names": group_names.get(id(group), [])})
    part = {"format": FORMAT, "state": state, "param_groups": groups} if _in_rank0_slot(mesh) else {}
    return _gather_to_rank0(part, pp_group)


def _local_like(full: torch.Tensor, model_param) -> torch.Tensor:
    """This rank's piece of a full tensor, laid out like `model_param` (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(model_param.device)
    if isinstance(model_param, DTensor):
        return distribute_tensor(full, model_param.device_mesh, model_param.placements, src_data_rank=None)
    return full.clone()


def load_full_optimizer_state(optimizer, full: dict, *, zero=None, tied: bool) -> None:
    """Inverse of full_optimizer_state on every rank; parameters missing from `full` start fresh."""
    saved = full["state"]
    hyper_of = {}
    for g in full.get("param_groups", []):
        for n in g.get("names", []):
            hyper_of[n] = {k: v for k, v in g.items() if k not in _GROUP_KEYS_SKIP}
    for group, name, param, model_param, chunk in _named_optimizer_params(optimizer, zero):
        key = EMBED if (tied and name == HEAD) else name
        if key in hyper_of:
            group.update({k: v for k, v in hyper_of[key].items() if k in group})
        st = saved.get(key)
        if not st:
            continue
        local = {}
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                v = _local_like(v, model_param)
                if zero is not None and chunk is not None:
                    v = zero.local_slice(local_tensor(v), chunk)
                local[k] = v
            else:
                local[k] = v.clone() if torch.is_tensor(v) else v
        optimizer.state[param] = local


class StateDictView:
    """What the trainer's checkpoint code calls `.state_dict()` / `.load_state_dict()` on."""

    def __init__(self, save: dict | None = None, load=None):
        self._save, self._load = save, load

    def state_dict(self) -> dict:
        return self._save

    def load_state_dict(self, d: dict) -> None:
        self._load(d)
