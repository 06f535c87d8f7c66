"""Data parallelism and ZeRO sharding over the `dp x sharding` ranks.

| layout           | torch mechanism                                    | at rest per rank               |
|------------------|----------------------------------------------------|--------------------------------|
| dp only          | `replicate` (DDP on FSDP2's machinery)             | full params, grads, moments    |
| sharding stage1  | `ZeroOneOptimizer` (this file)                     | full params and grads; 1/N moments |
| sharding stage2  | `fully_shard(reshard_after_forward=False)`         | 1/N grads and moments (ZeRO-2) |
| sharding stage3  | `fully_shard(reshard_after_forward=True)`          | 1/N params, grads, moments     |

With dp > 1 as well, stage2/3 use a 2-D mesh (HSDP: replicate over dp, shard over sharding).
FSDP2 keeps parameters sharded between steps also in stage2 and gathers them once per forward;
that costs the same bytes as ZeRO-2's after-step all-gather and holds less memory.

Stage1 has no torch counterpart for DTensor parameters (ZeroRedundancyOptimizer broadcasts plain
tensors), so `ZeroOneOptimizer` does it on local tensors: each sharding rank owns a 1/N slice of
every parameter; once per step the accumulated gradients are reduce-scattered into those slices
(one flat collective), the AdamW state exists only for the slices, and after the update one
all-gather puts the new values back into the full parameters -- the minimum ZeRO-1 traffic.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .dims import parse_option_list
from .dtensor import local_tensor

SHARDING_OPTIONS = {
    "enable_stage1_overlap": "no-op: the stage1 all-gather is one bucketed collective after the update",
    "enable_stage2_overlap": "no-op: FSDP2 overlaps its collectives with compute itself",
    "enable_stage1_tensor_fusion": "honoured by construction: stage1 gathers all parameters in one flat buffer",
    "enable_stage1_broadcast_overlap": "no-op: stage1 uses one all-gather, not per-parameter broadcasts",
    "enable_release_grads": "honoured: gradients are freed after every optimizer step (as release_grads)",
    "disable_stage1_reduce_avg": "no-op: gradients are always averaged over data-parallel ranks",
    "split_param": "no-op: stage1 always splits each parameter evenly over the sharding ranks",
    "enable_fuse_optimizer_states": "no-op: optimizer states are per parameter slice",
}


def parse_sharding_options(value: str) -> set[str]:
    return parse_option_list("sharding_parallel_config", value, SHARDING_OPTIONS)


def apply_data_parallel(root: nn.Module, layers: list[nn.Module], mesh, dims, *, masters: dict | None = None,
                        master_grad: bool = False) -> None:
    """Wrap `root` (the model or one pipeline chunk) and its decoder `layers` for dp/sharding, in place.
    Layers are wrapped first so each is one communication group (bottom-up, as FSDP2 requires); the
    embedding, final norm and LM head (tied) stay in the root's group.

    AMP O2 (`masters`: {name: fp32 value} of the bf16-stored trainable parameters): the parameters
    get their fp32 values back before wrapping, so the FSDP shards *are* the master weights (one copy,
    sharded), and FSDP's mixed-precision policy gathers them as bf16 for compute (the same rounded
    weights the one-process O2 model computes with). Gradients reach the shards in fp32; with
    master_grad they are reduced in fp32 too, else in bf16 (the dtype they accumulate in on one process)."""
    if dims.data_world == 1:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw: dict = {}
    if masters and dims.sharding_stage != 1:
        low = _restore_masters(root, masters)
        if low is not None:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if master_grad else low)
    if dims.sharding_stage in (2, 3):
        shard_mesh = mesh["dp", "sharding"] if dims.dp > 1 else mesh["sharding"]
        kw.update(mesh=shard_mesh, reshard_after_forward=dims.sharding_stage == 3)
        if dims.sharding_offload and shard_mesh.device_type == "cuda":
            # 'offload': sharded params, grads and optimizer state in pinned host memory, the update on
            # the CPU (FSDP2's policy). On a CPU mesh everything is in host memory already.
            from torch.distributed.fsdp import CPUOffloadPolicy

            kw["offload_policy"] = CPUOffloadPolicy()
        for layer in layers:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, **kw)
        fully_shard(root, **kw)
    elif dims.sharding_stage == 0:  # plain dp: gradients all-reduced over every data-parallel rank
        from torch.distributed._composable.replicate_with_fsdp import replicate

        for layer in layers:
            if any(True for _ in layer.parameters()):
                replicate(layer, mesh=mesh["data"], **kw)
        replicate(root, mesh=mesh["data"], **kw)
    # stage1: parameters stay as they are; ZeroOneOptimizer reduces the gradients once per step.


@torch.no_grad()
def _restore_masters(root: nn.Module, masters: dict) -> torch.dtype | None:
    """Put the fp32 master values back into the bf16-stored parameters of `root`; returns the
    low-precision dtype they had (None when none of root's parameters has a master)."""
    low = None
    for name, p in root.named_parameters():
        seed = masters.get(_model_name(name))
        if seed is not None and p.dtype != torch.float32 and seed.shape == p.shape:
            low = p.dtype
            p.data = seed.to(p.device)
    return low


def _model_name(name: str) -> str:
    """A pipeline chunk's parameter name as the whole model names it (chunks keep the model's names)."""
    return name


def set_micro_batch(root: nn.Module, stage: int, last: bool) -> None:
    """Per micro-batch switches, set before its forward.

    dp/stage1: all-reduce gradients only after the last micro-batch (accumulate locally before).
    stage2: reduce-scatter every micro-batch (ZeRO-2 keeps no full gradients), but keep the gathered
    parameters until the last backward, so the next forward does not gather them again.
    stage3: reshard and re-gather every time; that is what saves its memory."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(root, FSDPModule):
        return
    if stage in (0, 1):
        root.set_requires_gradient_sync(last)
    elif stage == 2:
        root.set_reshard_after_backward(last)


class ZeroOneOptimizer:
    """ZeRO stage 1 over the sharding group: the optimizer only ever sees this rank's slices.

    `param_groups(groups)` swaps every parameter of the trainer's groups for its slice (a fresh
    leaf Parameter); the trainer builds its usual AdamW and LR schedule on those. Per step:
    `reduce_grads()` reduce-scatters the accumulated local gradients into the slices (averaged over
    every data-parallel rank), the optimizer steps, `gather_params()` all-gathers the updated slices
    into the full parameters. Slices of parameter i on rank r: flat elements [r*c_i, (r+1)*c_i),
    zero-padded at the end; rank r's slices of all parameters sit side by side in one flat buffer."""

    def __init__(self, group, dp_group=None, *, masters: dict | None = None, master_grad: bool = False):
        self.group, self.dp_group = group, dp_group  # dp_group: replicas of the same slices (or None)
        # AMP O2: a bf16-stored parameter's slice is an fp32 master (from `masters`, by name), so the
        # optimizer updates fp32 slices and gather_params rounds them into the bf16 parameters; the
        # master weights are kept once, 1/N per rank. master_grad: each micro-batch's gradient is
        # added into an fp32 buffer as backward produces it, and those buffers are reduced.
        self.masters, self.master_grad = masters or {}, master_grad
        self._acc: dict[int, torch.Tensor] = {}
        self._hooks = []
        self.n, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.replicas = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.entries: list[tuple[nn.Parameter, nn.Parameter, int, int]] = []  # (param, slice, offset, chunk)
        self.flat_size = 0

    def param_groups(self, groups: list[dict]) -> list[dict]:
        out = []
        for g in groups:
            names = g.get("names") or [None] * len(g["params"])
            out.append({**g, "params": [self._slice_of(p, n) for p, n in zip(g["params"], names)]})
        return out

    def _slice_of(self, p: nn.Parameter, name: str | None = None) -> nn.Parameter:
        local = local_tensor(p.data)
        chunk = -(-local.numel() // self.n)  # ceil: the last rank's slice is zero-padded
        seed = self.masters.get(name) if p.dtype != torch.float32 else None
        if seed is not None and seed.shape == p.shape:
            piece = nn.Parameter(self.local_slice(local_tensor(seed).to(local.device, torch.float32), chunk))
        elif p.dtype != torch.float32:  # no recorded fp32 value: the master starts from the parameter
            piece = nn.Parameter(self.local_slice(local.float(), chunk))
        else:
            piece = nn.Parameter(self.local_slice(local, chunk))
        if self.master_grad and p.dtype != torch.float32:
            self._hooks.append(p.register_post_accumulate_grad_hook(self._accumulate))
        self.entries.append((p, piece, self.flat_size, chunk))
        self.flat_size += chunk
        return piece

    def _padded(self, t: torch.Tensor, chunk: int) -> torch.Tensor:
        flat = torch.zeros(self.n * chunk, dtype=t.dtype, device=t.device)
        flat[:t.numel()] = t.reshape(-1)
        return flat.view(self.n, chunk)

    @torch.no_grad()
    def _accumulate(self, p: torch.Tensor) -> None:
        """master_grad: this micro-batch's low-precision gradient -> the fp32 buffer."""
        if p.grad is None:
            return
        acc = self._acc.get(id(p))
        if acc is None:
            self._acc[id(p)] = local_tensor(p.grad).to(torch.float32)
        else:
            acc.add_(local_tensor(p.grad))
        p.grad = None

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Average the step's gradients over all data-parallel ranks, straight into this rank's slices
        (in the slices' dtype: fp32 for O2 master slices)."""
        if not self.entries:
            return
        first = self.entries[0][1]
        send = torch.zeros(self.n, self.flat_size, dtype=first.dtype, device=first.device)
        for p, _, off, chunk in self.entries:
            g = self._acc.pop(id(p), None)
            g = g if g is not None else (local_tensor(p.grad) if p.grad is not None else None)
            if g is not None:
                send[:, off:off + chunk] = self._padded(g, chunk)
            p.grad = None  # the full gradient is not needed any more (stage1 keeps it only during backward)
        mine = torch.empty(self.flat_size, dtype=send.dtype, device=send.device)
        dist.reduce_scatter_tensor(mine, send.view(-1), group=self.group)
        if self.dp_group is not None:
            dist.all_reduce(mine, group=self.dp_group)
        mine /= self.n * self.replicas
        for _, piece, off, chunk in self.entries:
            piece.grad = mine[off:off + chunk]

    def slice_grads(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(model parameter, its gradient slice on this rank), for the global norm and clipping."""
        return [(p, piece.grad) for p, piece, _, _ in self.entries if piece.grad is not None]

    @torch.no_grad()
    def gather_params(self) -> None:
        if not self.entries:
            return
        mine = torch.cat([piece.detach().reshape(-1) for _, piece, _, _ in self.entries])
        full = torch.empty(self.n * self.flat_size, dtype=mine.dtype, device=mine.device)
        dist.all_gather_into_tensor(full, mine, group=self.group)
        full = full.view(self.n, self.flat_size)
        for p, _, off, chunk in self.entries:
            local = local_tensor(p.data)
            local.copy_(full[:, off:off + chunk].reshape(-1)[:local.numel()].view_as(local))

    @torch.no_grad()
    def full_local_state(self, piece_state: dict, p: nn.Parameter, chunk: int) -> dict:
        """One slice's AdamW state -> the state of the whole local parameter (all-gather over sharding)."""
        local = local_tensor(p.data)
        out = {}
        for k, v in piece_state.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.numel() == chunk:
                full = torch.empty(self.n * chunk, dtype=v.dtype, device=v.device)
                dist.all_gather_into_tensor(full, v.contiguous(), group=self.group)
                out[k] = full[:local.numel()].view_as(local)
            else:
                out[k] = v
        return out

    def local_slice(self, full_local: torch.Tensor, chunk: int) -> torch.Tensor:
        """This rank's (zero-padded) slice of a whole local-parameter tensor."""
        return self._padded(full_local.detach(), chunk)[self.rank].clone()
