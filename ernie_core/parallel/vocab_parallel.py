"""Token log-probabilities under a vocab-sharded LM head (tensor parallelism), without [N, V] logits.

Each tensor-parallel rank holds the head rows of its vocab slice. It scores the given hidden rows
against that slice; the softmax max, the sum of exponentials and the target logit are then reduced
over the TP group, so no rank ever holds the full logits or the whole head. The two autograd
functions are Megatron's `f` (identity forward, all-reduce backward) and `g` (all-reduce forward,
identity backward) for an input that is replicated over the group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) in forward, identity in backward: every rank then computes the same loss from
    the sum, so each rank's local addend gets that loss's gradient once (Megatron's `g`)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class CopyToGroup(torch.autograd.Function):
    """Identity in forward, all-reduce (sum) of the gradient in backward (Megatron's `f`): a
    replicated input feeding a vocab-sharded head gets the sum of every rank's partial gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def vocab_sharded(weight) -> bool:
    """A tensor-parallel LM head: a DTensor split on the vocab dim over a 1-D mesh."""
    from torch.distributed.tensor import DTensor, Shard

    return (isinstance(weight, DTensor) and weight.device_mesh.ndim == 1 and len(weight.placements) == 1
            and isinstance(weight.placements[0], Shard) and weight.placements[0].dim == 0)


def vocab_parallel_token_logps(hidden: torch.Tensor, weight, targets: torch.Tensor) -> torch.Tensor:
    """[N] fp32 log p(target) of hidden [N, H] (replicated over the TP group) under the vocab-sharded
    head `weight` (DTensor [V, H], Shard(0)); the same values as log_softmax of the full logits."""
    mesh = weight.device_mesh
    group, rank = mesh.get_group(), mesh.get_local_rank()
    local_w = weight.to_local()  # backward: the gradient of this rank's vocab rows
    logits = F.linear(CopyToGroup.apply(hidden, group), local_w).float()  # [N, V/tp]
    v_local = logits.shape[-1]
    lo = rank * v_local
    m = logits.detach().max(dim=-1).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)  # a constant shift: no gradient through it
    shifted = logits - m.unsqueeze(-1)
    sum_exp = SumOverGroup.apply(shifted.exp().sum(dim=-1), group)
    mine = (targets >= lo) & (targets < lo + v_local)
    picked = shifted.gather(-1, (targets - lo).clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = SumOverGroup.apply(torch.where(mine, picked, torch.zeros_like(picked)), group)
    return target_logit - sum_exp.log()


__all__ = ["CopyToGroup", "SumOverGroup", "vocab_parallel_token_logps", "vocab_sharded"]
