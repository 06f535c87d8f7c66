"""Megatron-style tensor and sequence parallelism for the plain ERNIE 4.5 model, with DTensor plans.

Per decoder layer: q/k/v and gate/up are column-parallel (each rank owns whole heads / a slice of
the FFN width), o and down are row-parallel; the embedding is vocab-parallel and so is the LM head
(tied to the embedding). Every block boundary converts back to plain local tensors
(`use_local_output=True`), so RMSNorm, RoPE, attention and SwiGLU (custom ops) never see a DTensor.

Sequence parallel (`sequence_parallel`) keeps the activations between blocks sharded on the sequence
dim: the row-parallel outputs reduce-scatter instead of all-reduce and each block's input is
all-gathered back. The RMSNorm weights then see only their sequence shard, so their gradients are
partial sums: `sync_sequence_parallel_grads` adds them up over the TP group (ERNIEKit's
`use_sp_callback`; here always done, the option only names where).

`tensor_parallel_output` keeps logits vocab-sharded (a DTensor) and runs the cross-entropy under
torch's `loss_parallel` (local max, sum-exp and target logit, each all-reduced), so the [tokens, V]
logits are never gathered.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from .dims import parse_option_list

TP_OPTIONS = ("sync_param", "sync_grad", "sync_moment")


def check_tp_shapes(config, tp: int, *, fuse_linear: bool, fused_head: bool) -> None:
    """Every sharded dim must split evenly; say which model dimension does not."""
    if tp == 1:
        return
    dims = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
            "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size}
    for name, value in dims.items():
        if value % tp:
            raise ConfigError(f"tensor_parallel_degree={tp} does not divide the model's {name} ({value}); "
                              "choose a degree that divides it")
    if fuse_linear:
        raise ConfigError("fuse_linear with tensor_parallel_degree > 1 is not supported yet (the fused q|k|v and "
                          "gate|up weights would need a per-rank row order); set fuse_linear: false")
    if fused_head:
        raise ConfigError("use_fused_head_and_loss_fn with tensor_parallel_degree > 1 is not supported yet; "
                          "tensor_parallel_output already avoids full logits, use it instead")


def parse_tp_options(value: str) -> set[str]:
    return parse_option_list("tensor_parallel_config", value, TP_OPTIONS)


def apply_tp(model: nn.Module, tp_mesh, *, sequence_parallel: bool, tensor_parallel_output: bool) -> list[str]:
    """Shard `model` (Ernie4_5ForCausalLM, in place) over the 1-D `tp_mesh`.

    Returns the names of the parameters left replicated (the RMSNorm weights): the ones
    tensor_parallel_config's sync options and sequence parallel act on."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                                   RowwiseParallel, parallelize_module)

    tp = tp_mesh.size()
    _check_plain_linears(model)
    between_blocks = Shard(1) if sequence_parallel else Replicate()
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    # Vocab-parallel embedding: each rank looks up its vocab rows, the partial sums are reduced
    # (reduce-scattered over the sequence under SP).
    parallelize_module(model.model.embed_tokens, tp_mesh,
                       RowwiseParallel(input_layouts=Replicate(), output_layouts=between_blocks))
    for layer in model.model.layers.values():
        plan = {
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=between_blocks),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=between_blocks),
        }
        # Each block gets its input as one replicated DTensor (all-gathered from the sequence shards under
        # SP): q/k/v (gate/up) then share it, so backward reduces its gradient once, not once per projection.
        plan["self_attn"] = PrepareModuleInput(input_layouts=(between_blocks, None),
                                               desired_input_layouts=(Replicate(), None))
        plan["mlp"] = PrepareModuleInput(input_layouts=(between_blocks,), desired_input_layouts=(Replicate(),))
        parallelize_module(layer, tp_mesh, plan)
        # The model views q/k/v with these counts; after column sharding each rank holds 1/tp of the heads.
        layer.self_attn.num_heads //= tp
        layer.self_attn.num_kv_heads //= tp
    if sequence_parallel:  # the LM head (and a sparse head's row selection) needs the whole sequence
        parallelize_module(model.model.norm, tp_mesh,
                           PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate()))
    parallelize_module(model.lm_head, tp_mesh, ColwiseParallel(
        output_layouts=Shard(-1) if tensor_parallel_output else Replicate(),
        use_local_output=not tensor_parallel_output))
    if tied:  # both plans distributed the same full tensor; make them one Parameter again
        model.lm_head.weight = model.model.embed_tokens.weight
    if tensor_parallel_output:
        model.register_forward_hook(_loss_to_local)
    from torch.distributed.tensor import DTensor

    return [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]


def _check_plain_linears(model) -> None:
    """The plans split nn.Linear / nn.Embedding weights; adapters or quantized layers need their own plans."""
    targets = [("model.embed_tokens", model.model.embed_tokens, nn.Embedding), ("lm_head", model.lm_head, nn.Linear)]
    for i, layer in model.model.layers.items():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            targets.append((f"model.layers.{i}.self_attn.{name}", getattr(layer.self_attn, name, None), nn.Linear))
        for name in ("gate_proj", "up_proj", "down_proj"):
            targets.append((f"model.layers.{i}.mlp.{name}", getattr(layer.mlp, name, None), nn.Linear))
    for name, module, kind in targets:
        if type(module) is not kind:
            raise ConfigError(f"tensor_parallel_degree > 1 needs {name} to be a plain {kind.__name__}, found "
                              f"{type(module).__name__}: LoRA adapters and quantized linears under tensor "
                              "parallelism are not supported yet")


def _loss_to_local(module, args, output):
    """The vocab-parallel CE returns a replicated DTensor loss; callers get a plain scalar tensor."""
    from torch.distributed.tensor import DTensor

    loss = getattr(output, "loss", None)
    if isinstance(loss, DTensor):
        output.loss = loss.to_local()
    n = getattr(output, "num_label_tokens", None)
    if isinstance(n, DTensor):
        output.num_label_tokens = n.to_local()
    return output


def loss_context(enabled: bool):
    """Context for forward *and* backward of a step whose logits are vocab-sharded: torch's
    vocab-parallel cross-entropy plus implicit replication of the plain tensors the loss mixes in."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.distributed.tensor.experimental import implicit_replication
    from torch.distributed.tensor.parallel import loss_parallel

    stack = contextlib.ExitStack()
    stack.enter_context(loss_parallel())
    stack.enter_context(implicit_replication())
    return stack


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


@torch.no_grad()
def sync_replicated_grads(params: list[torch.Tensor], group, *, op: str) -> None:
    """All-reduce the gradients of TP-replicated params over the TP group, one flat buffer.

    op "sum": sequence-parallel partial gradients (each rank saw a sequence shard);
    op "avg": `sync_grad`, keeping replicated params' gradients bit-identical across TP ranks."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    if op == "avg":
        flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def broadcast_replicated(tensors: list[torch.Tensor], group) -> None:
    """`sync_param` / `sync_moment`: copy TP rank 0's values of replicated tensors to the others."""
    local = [_local(t) for t in tensors]
    if not local:
        return
    src = dist.get_global_rank(group, 0)
    flat = torch.cat([t.reshape(-1) for t in local])
    dist.broadcast(flat, src=src, group=group)
    offset = 0
    for t in local:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
