"""Pipeline parallelism: split the plain model into stages, run them with torch.distributed.pipelining.

Layers are split by `pp_seg_method` into `pp x virtual_pp_degree` stages; stage s lives on pipeline
rank s % pp (the interleaved layout torch's multi-stage schedules expect). The embedding rides
with the first stage, the final norm + LM head with the last. `add_tail_layers` appends empty
(identity) layers that count in the split, so uneven layer counts can still give equal stages.

Each rank keeps only its stages' modules in a `PipelinedModel`, registered under the full model's
names (`model.layers.7.mlp.up_proj.weight`, ...), so optimizer groups, checkpoints and logs see the
same names in every layout. With tied embeddings the last stage owns a copy of the embedding as
its LM head; the two copies get the sum of both gradients every step, so they stay equal.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .dims import parse_option_list

IGNORE_INDEX = -100

# pipeline_parallel_config options (ERNIEKit names) and what they mean here.
PP_OPTIONS = {
    "enable_delay_scale_loss": "honoured: gradients are divided by the micro-batch count once, after the last "
                               "backward (torch scale_grads), instead of scaling every micro-batch loss",
    "disable_partial_send_recv": "no-op: stages always send whole local tensors",
    "enable_clear_every_step_cache": "no-op: torch's schedule clears its per-step buffers itself",
    "enable_overlap_p2p_comm": "no-op: torch's schedules already post send/recv asynchronously",
    "enable_dp_comm_overlap": "no-op: FSDP/replicate overlap gradient reduction with backward themselves",
    "enable_sharding_comm_overlap": "no-op: FSDP overlaps its collectives with compute itself",
    "best_unbalanced_scheduler": "no-op: torch's 1F1B/interleaved schedules are used as they are",
    "enable_release_grads": "honoured through release_grads (gradients are freed after every step)",
}


def parse_pp_options(value: str) -> set[str]:
    return parse_option_list("pipeline_parallel_config", value, PP_OPTIONS)


def _uniform(num_items: int, num_parts: int) -> list[int]:
    """Bounds of num_parts near-equal parts; the extra items go to the last parts (as ERNIEKit)."""
    base, extra = divmod(num_items, num_parts)
    bounds = [0]
    for i in range(num_parts):
        bounds.append(bounds[-1] + base + (1 if i >= num_parts - extra else 0))
    return bounds


def stage_bounds(num_layers: int, num_stages: int, seg_method, add_tail_layers: int = 0) -> list[tuple[int, int]]:
    """[start, end) decoder-layer indices of every stage (indices >= num_layers are empty tail layers).

    seg_method: "layer:<names>" (split by layer count; names must be the decoder/empty layer),
    "uniform" (also counts the embedding and the head as one layer each), or explicit bounds
    such as [0, 9, 18] over the decoder (+ tail) layers."""
    total = num_layers + add_tail_layers
    if isinstance(seg_method, (list, tuple)):
        bounds = [int(b) for b in seg_method]
        if len(bounds) != num_stages + 1 or bounds[0] != 0 or bounds[-1] != total or \
                any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ConfigError(f"pp_seg_method {bounds}: expected {num_stages + 1} increasing bounds from 0 to {total} "
                              f"({num_layers} layers + {add_tail_layers} tail layers, pipeline_parallel_degree x "
                              f"virtual_pp_degree = {num_stages} stages)")
    elif seg_method == "uniform":
        # items: embedding, layers..., head; a stage holding only the embedding or head would be empty
        bounds = [min(max(b - 1, 0), total) for b in _uniform(total + 2, num_stages)]
        bounds[-1] = total
    elif isinstance(seg_method, str) and seg_method.startswith("layer:"):
        names = seg_method[len("layer:"):].split("|")
        if not any(re.search(n, "Ernie4_5_DecoderLayer") for n in names if n):
            raise ConfigError(f"pp_seg_method {seg_method!r} names no decoder layer; use "
                              "'layer:Ernie4_5_DecoderLayer|EmptyLayer', 'uniform' or explicit bounds like [0, 9, 18]")
        bounds = _uniform(total, num_stages)
    else:
        raise ConfigError(f"pp_seg_method {seg_method!r}: expected 'layer:Ernie4_5_DecoderLayer|EmptyLayer', "
                          "'uniform' or explicit bounds like [0, 9, 18]")
    if total < num_stages:
        raise ConfigError(f"{total} layers cannot fill {num_stages} pipeline stages; lower pipeline_parallel_degree "
                          "or virtual_pp_degree, or add add_tail_layers")
    out = list(zip(bounds, bounds[1:]))
    if any(a >= b for a, b in out):
        raise ConfigError(f"pp_seg_method {seg_method!r} leaves a pipeline stage without layers: {out}")
    return out


class EmptyLayer(nn.Module):
    """An identity layer (`add_tail_layers`): it only shifts where the split falls."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, x, inputs):
        return x


class PipelineChunk(nn.Module):
    """One pipeline stage: [embedding] + layers[start:end] + [norm + LM head].

    forward(x, position_ids, attn_mask_startend_row_indices): x is input_ids [B,S] on the first
    stage, else the hidden state [B,S(/tp under SP),H]; returns hidden, or logits on the last stage."""

    def __init__(self, embed, layers: nn.ModuleDict, norm, lm_head, runtime):
        super().__init__()
        self.model = nn.Module()
        if embed is not None:
            self.model.embed_tokens = embed
        self.model.layers = layers
        if norm is not None:
            self.model.norm = norm
        if lm_head is not None:
            self.lm_head = lm_head
        self.runtime = runtime
        self.is_first, self.is_last = embed is not None, lm_head is not None

    def forward(self, x, position_ids, attn_mask_startend_row_indices=None):
        from ..models.ernie4_5 import _checkpoint, build_attention_inputs

        # build_attention_inputs only reads the [B, S] shape and device of its ids argument.
        inputs = build_attention_inputs(self.runtime.attention_mode, position_ids, position_ids,
                                        attn_mask_startend_row_indices)
        if self.is_first:
            x = self.model.embed_tokens(x)
        full = self.runtime.recomputes("full") and self.training
        for layer in self.model.layers.values():
            if full and not isinstance(layer, EmptyLayer):  # same recompute as Ernie4_5Model.forward
                x = _checkpoint(layer, x, inputs, reentrant=self.runtime.recompute_use_reentrant)
            else:
                x = layer(x, inputs)
        if self.is_last:
            x = self.lm_head(self.model.norm(x))
        return x


class PipelinedModel(nn.Module):
    """This rank's stages, under the full model's parameter names; `chunks` in stage order."""

    def __init__(self, full, chunks: list[PipelineChunk], stage_ids: list[int], num_stages: int):
        super().__init__()
        self.config, self.runtime = full.config, full.runtime
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict()
        for c in chunks:
            for name in ("embed_tokens", "norm"):
                if hasattr(c.model, name):
                    setattr(self.model, name, getattr(c.model, name))
            self.model.layers.update(c.model.layers)
            if c.is_last:
                self.lm_head = c.lm_head
        # A plain list: the chunks share the modules registered above (no second set of names).
        self.__dict__["chunks"] = chunks
        self.stage_ids, self.num_stages = stage_ids, num_stages
        self.num_layers = full.config.num_hidden_layers

    def set_dropout(self, hidden_p: float, attn_p: float) -> None:
        """Same rule as the full model (§12.4): layer l uses p * l / L."""
        for layer in self.model.layers.values():
            if isinstance(layer, EmptyLayer):
                continue
            scale = layer.layer_idx / self.num_layers
            layer.hidden_dropout_p = float(hidden_p) * scale
            layer.self_attn.dropout_p = float(attn_p) * scale

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipelined model runs through its schedule (PipelineRunner), not model(...)")


def split_model(full, pp_rank: int, pp: int, bounds: list[tuple[int, int]]) -> PipelinedModel:
    """Keep the stages of `pp_rank` (stage s on rank s % pp); the other layers are dropped."""
    num_stages = len(bounds)
    tied = full.lm_head.weight is full.model.embed_tokens.weight
    stage_ids = list(range(pp_rank, num_stages, pp))
    chunks = []
    for s in stage_ids:
        start, end = bounds[s]
        layers = nn.ModuleDict({str(i): full.model.layers[str(i)] if str(i) in full.model.layers else EmptyLayer(i)
                                for i in range(start, end)})
        first, last = s == 0, s == num_stages - 1
        lm_head = None
        if last:
            lm_head = full.lm_head
            if tied:  # its own copy: the embedding lives on another rank (see sync_tied_grads)
                embed = full.model.embed_tokens.weight
                lm_head.weight = nn.Parameter(embed.detach().clone(), requires_grad=embed.requires_grad)
        chunks.append(PipelineChunk(full.model.embed_tokens if first else None, layers,
                                    full.model.norm if last else None, lm_head, full.runtime))
    return PipelinedModel(full, chunks, stage_ids, num_stages)


def pipeline_loss(logits, labels, *, scale: float = 1.0):
    """Mean fp32 CE over labelled positions (the model's head_and_loss), times `scale`."""
    from torch.distributed.tensor import DTensor

    loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    n = (labels != IGNORE_INDEX).sum().clamp(min=1).to(torch.float32)
    loss = loss_sum / n
    if isinstance(loss, DTensor):
        loss = loss.to_local()
    return loss * scale


class PipelineRunner:
    """Runs training steps and eval forwards of a PipelinedModel with a torch schedule."""

    def __init__(self, model: PipelinedModel, pp_group, *, n_microbatches: int, device, options: set[str],
                 loss_context, tied_group=None, schedule: str | None = None):
        from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                                  ScheduleInterleaved1F1B)

        self.model, self.group, self.device = model, pp_group, device
        self.pp_rank, self.pp = dist.get_rank(pp_group), dist.get_world_size(pp_group)
        self.n_micro, self.loss_context, self.tied_group = n_microbatches, loss_context, tied_group
        self.delay_scale = "enable_delay_scale_loss" in options
        self.stages = [PipelineStage(c, s, model.num_stages, device, group=pp_group)
                       for c, s in zip(model.chunks, model.stage_ids)]
        scale = 1.0 if self.delay_scale else 1.0 / n_microbatches

        def loss_fn(logits, labels):
            return pipeline_loss(logits, labels, scale=scale)

        common = dict(n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=self.delay_scale)
        if n_microbatches < self.pp and dist.get_rank() == 0:
            print(f"warning: gradient_accumulation_steps={n_microbatches} < pipeline_parallel_degree={self.pp}: "
                  "every step is mostly pipeline bubble (GPipe schedule); raise gradient_accumulation_steps",
                  flush=True)
        if n_microbatches < self.pp:
            schedule = "gpipe"  # 1F1B needs at least one micro-batch per stage
        try:
            if len(self.stages) > 1:
                self.schedule = ScheduleInterleaved1F1B(self.stages, **common)
            else:
                cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
                self.schedule = cls(self.stages[0], **common)
        except ValueError as e:  # torch's micro-batch count rules for the interleaved schedule
            raise ConfigError(f"gradient_accumulation_steps={n_microbatches} (the pipeline's micro-batches) does not "
                              f"fit pipeline_parallel_degree={self.pp} x virtual_pp_degree="
                              f"{model.num_stages // self.pp}: {e}") from None
        self.has_first = any(s.is_first for s in self.stages)
        self.has_last = any(s.is_last for s in self.stages)
        self.last_rank = dist.get_global_rank(pp_group, (model.num_stages - 1) % self.pp)

    def train_step(self, micro_batches: list[dict]) -> float:
        """Forward + backward of all micro-batches (one optimizer step's worth); returns the mean of the
        micro-batch losses, on every pipeline rank."""
        batch = {k: torch.cat([mb[k] for mb in micro_batches]) for k in
                 ("input_ids", "labels", "position_ids", "attn_mask_startend_row_indices")}
        losses: list = []
        args = (batch["input_ids"],) if self.has_first else ()
        with self.loss_context():
            self.schedule.step(*args, target=batch["labels"] if self.has_last else None,
                               losses=losses if self.has_last else None, return_outputs=False,
                               position_ids=batch["position_ids"],
                               attn_mask_startend_row_indices=batch["attn_mask_startend_row_indices"])
        self.match_grad_layouts()
        self.sync_tied_grads()
        value = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.has_last:
            value += torch.stack([torch.as_tensor(x).detach().float() for x in losses]).sum()
            if self.delay_scale:
                value /= len(losses)
        dist.broadcast(value, src=self.last_rank, group=self.group)
        return float(value)

    @torch.no_grad()
    def match_grad_layouts(self) -> None:
        """Give every DTensor gradient its parameter's placements. The schedule's backward can leave
        e.g. the vocab-parallel embedding's gradient replicated; re-sharding it is a local slice."""
        from torch.distributed.tensor import DTensor

        for p in self.model.parameters():
            g = p.grad
            if isinstance(p, DTensor) and isinstance(g, DTensor) and g.placements != p.placements:
                p.grad = g.redistribute(p.device_mesh, p.placements)

    @torch.no_grad()
    def sync_tied_grads(self) -> None:
        """Tied embedding: both copies (first and last stage) get the sum of their gradients."""
        if self.tied_group is None:
            return
        p = self.model.model.embed_tokens.weight if self.has_first else self.model.lm_head.weight
        if not p.requires_grad:  # frozen (LoRA): nothing to keep in step
            return
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        from .tensor_parallel import _local
        dist.all_reduce(_local(p.grad), group=self.tied_group)

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        """Forward only over the stages, in order, with plain send/recv; the loss on every rank."""
        x = batch["input_ids"]
        pos, mask = batch["position_ids"], batch.get("attn_mask_startend_row_indices")
        out = None
        for s in range(self.model.num_stages):
            owner = s % self.pp
            if owner != self.pp_rank:
                continue
            chunk = self.model.chunks[self.model.stage_ids.index(s)]
            if s > 0:
                x = _recv_tensor(dist.get_global_rank(self.group, (s - 1) % self.pp), self.group, self.device)
            out = chunk(x, pos, mask)
            if s < self.model.num_stages - 1:
                _send_tensor(out, dist.get_global_rank(self.group, (s + 1) % self.pp), self.group)
        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.has_last:
            with self.loss_context():
                loss += pipeline_loss(out, batch["labels"])
        dist.broadcast(loss, src=self.last_rank, group=self.group)
        return loss


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _send_tensor(t: torch.Tensor, dst: int, group) -> None:
    t = t.contiguous()
    header = torch.tensor([_DTYPES.index(t.dtype), t.dim(), *t.shape] + [0] * (8 - t.dim()), dtype=torch.int64,
                          device=t.device)
    dist.send(header, dst, group=group)
    dist.send(t, dst, group=group)


def _recv_tensor(src: int, group, device) -> torch.Tensor:
    header = torch.empty(10, dtype=torch.int64, device=device)
    dist.recv(header, src, group=group)
    dtype, ndim = _DTYPES[int(header[0])], int(header[1])
    t = torch.empty([int(v) for v in header[2:2 + ndim]], dtype=dtype, device=device)
    dist.recv(t, src, group=group)
    return t


def tied_embedding_group(mesh, pp: int):
    """Process group joining the first and last pipeline rank of this rank's (dp, sharding, tp) slot.
    Every rank creates every pair group (new_group is collective), in the same order."""
    ranks = mesh.mesh  # [dp, sharding, pp, tp]
    mine = None
    me = dist.get_rank()
    for d in range(ranks.shape[0]):
        for s in range(ranks.shape[1]):
            for t in range(ranks.shape[3]):
                pair = [int(ranks[d, s, 0, t]), int(ranks[d, s, pp - 1, t])]
                g = dist.new_group(pair)
                if me in pair:
                    mine = g
    return mine


__all__ = ["PP_OPTIONS", "EmptyLayer", "PipelineChunk", "PipelinedModel", "PipelineRunner",
           "parse_pp_options", "pipeline_loss", "split_model", "stage_bounds", "tied_embedding_group"]
