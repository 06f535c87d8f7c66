"""Pipeline parallelism: split the plain model into stages, run them with torch.distributed.pipelining.

Layers are split by `pp_seg_method` into `pp x virtual_pp_degree` stages; stage s lives on pipeline
rank s % pp (the interleaved layout torch's multi-stage schedules expect). `add_tail_layers` adds
empty layer indices that count in the split (they hold nothing), so uneven layer counts can still
give equal stages.

A stage is the model itself with the pieces it does not own removed (`stage_module`, the way
torchtitan does it): the model's layers live in an `nn.ModuleDict` keyed by index, a stage keeps
its range of them, the first stage the embedding, the last the final norm and LM head, and the
model's forward skips whatever is missing. So every stage runs the single-process code for the
forward, recompute and dropout, and the last stage's loss is the model's own head-and-loss path
(dense, fused or sparse head; vocab-parallel under tensor parallelism). What the last stage
computes comes from the objective (SFT: the model's loss; DPO: the scored rows' log-probs), see
`PipelineRunner`.

Each rank keeps only its stages' modules in a `PipelinedModel`, registered under the full model's
names (`model.layers.7.mlp.up_proj.weight`, ...), so optimizer groups, checkpoints and logs see the
same names in every layout. With tied embeddings the last stage owns a copy of the embedding as
its LM head; the two copies get the sum of both gradients every step, so they stay equal.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import re
import warnings

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from .dims import parse_option_list
from .reference import forward_replaced, run_as_forward

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


def _shell(module: nn.Module) -> nn.Module:
    """A second module object of the same class sharing `module`'s children, parameters, buffers and
    attributes; its own registries (children, hooks, ...), so removing a child from it or wrapping
    it (FSDP) leaves `module` as it is."""
    out = copy.copy(module)
    for key, value in list(vars(out).items()):
        if isinstance(value, (dict, set)):
            vars(out)[key] = copy.copy(value)
    return out


def stage_module(full, start: int, end: int, *, first: bool, last: bool):
    """Pipeline stage [start, end) of `full`: the model with the pieces the stage does not own removed
    (torchtitan's layout). The layers outside the range are dropped from `model.layers` (indices past
    the model's layers are `add_tail_layers`, which own nothing); the embedding is kept by the first
    stage only, the final norm and LM head by the last. The stage's forward is the model's: it takes
    the previous stage's hidden state without an embedding and returns its hidden state without a
    head, and the last stage computes the loss with the model's own head-and-loss path."""
    stage = _shell(full)
    stage.model = _shell(full.model)
    stage.model.layers = nn.ModuleDict({k: m for k, m in full.model.layers.items() if start <= int(k) < end})
    if not first:
        stage.model.embed_tokens = None
    if not last:
        stage.model.norm = None
        stage.lm_head = None
    return stage


class PipelinedModel(nn.Module):
    """This rank's stages, under the full model's parameter names; `chunks` are the stage modules
    (shells of the model, see stage_module) in stage order."""

    def __init__(self, full, chunks: list[nn.Module], stage_ids: list[int], num_stages: int):
        super().__init__()
        self.config, self.runtime = full.config, full.runtime
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict()
        for c in chunks:
            for name in ("embed_tokens", "norm"):
                if getattr(c.model, name) is not None:
                    setattr(self.model, name, getattr(c.model, name))
            self.model.layers.update(c.model.layers)
            if c.lm_head is not None:
                self.lm_head = c.lm_head
        # A plain list: the chunks share the modules registered above (no second set of names).
        self.__dict__["chunks"] = chunks
        self.stage_ids, self.num_stages = stage_ids, num_stages

    def train(self, mode: bool = True):
        """Also the stage modules themselves (not registered here): their forward reads `training`."""
        super().train(mode)
        for c in self.chunks:
            c.train(mode)
        return self

    def set_dropout(self, hidden_p: float, attn_p: float) -> None:
        for c in self.chunks:
            c.set_dropout(hidden_p, attn_p)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipelined model runs through its schedule (PipelineRunner), not model(...)")


def split_model(full, pp_rank: int, pp: int, bounds: list[tuple[int, int]]) -> PipelinedModel:
    """Keep the stages of `pp_rank` (stage s on rank s % pp); the other layers are dropped."""
    num_stages = len(bounds)
    tied = full.lm_head.weight is full.model.embed_tokens.weight
    # torch's schedules get a stage's input gradient from autograd.grad(inputs=...), which reentrant
    # checkpointing cannot serve; the non-reentrant recompute runs the same code and gives the same values.
    full.runtime.recompute_use_reentrant = False
    stage_ids = list(range(pp_rank, num_stages, pp))
    chunks = []
    for s in stage_ids:
        first, last = s == 0, s == num_stages - 1
        stage = stage_module(full, *bounds[s], first=first, last=last)
        if last and tied:  # its own copy: the embedding lives on another rank (see sync_tied_grads)
            embed = full.model.embed_tokens.weight
            stage.lm_head = _shell(full.lm_head)
            stage.lm_head.weight = nn.Parameter(embed.detach().clone(), requires_grad=embed.requires_grad)
        chunks.append(stage)
    return PipelinedModel(full, chunks, stage_ids, num_stages)


class PipelineRunner:
    """Runs training steps and forward-only passes of a PipelinedModel with a torch schedule.

    What a stage computes comes from the objective (train/sft.py, train/dpo.py):
    `stage_forward(stage, x, batch)` runs as each stage module's forward (x: token ids on the first
    stage, the received hidden state on the others; the last stage returns what the loss needs),
    `stage_loss(output, batch, index) -> (loss, metrics)` runs on the last stage per micro-batch, and
    `before_pipeline_step(runner, micro_batches)` runs first (DPO: a no-grad pass for the reference).
    The schedule splits only the micro-batch index; each stage reads its micro-batch from the
    step's list, so micro-batches may hold tensors of different lengths (packed DPO pairs)."""

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
        self.scale = 1.0 if self.delay_scale else 1.0 / n_microbatches
        self._step = None  # (objective, micro-batches, per-micro-batch metrics) while a step runs
        common = dict(n_microbatches=n_microbatches, loss_fn=self._loss, scale_grads=self.delay_scale)
        if n_microbatches < self.pp and dist.get_rank() == 0:
            warnings.warn(f"gradient_accumulation_steps={n_microbatches} < pipeline_parallel_degree={self.pp}: "
                          "every step is mostly pipeline bubble (GPipe schedule); raise gradient_accumulation_steps",
                          stacklevel=2)
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

    def _loss(self, output, index):
        objective, batches, metrics = self._step
        i = int(index)
        loss, metrics[i] = objective.stage_loss(output, batches[i], i)  # by index: torch's metadata pass reruns 0
        return loss * self.scale

    @contextlib.contextmanager
    def _stage_forwards(self, objective, batches: list[dict]):
        """Each stage module's forward becomes objective.stage_forward on the micro-batch it is given."""
        def forward_of(chunk):
            return lambda x, mb: _local_output(objective.stage_forward(chunk, x, batches[int(mb)]))

        with contextlib.ExitStack() as stack:
            for c in self.model.chunks:
                stack.enter_context(forward_replaced(c, forward_of(c)))
            yield

    def train_step(self, objective, micro_batches: list[dict]) -> tuple[float, dict]:
        """Forward + backward of all micro-batches (one optimizer step's worth); returns the mean of the
        micro-batch losses and of the objective's metrics, on every pipeline rank."""
        objective.before_pipeline_step(self, micro_batches)
        index = torch.arange(len(micro_batches), device=self.device)
        losses, metrics = [], {}
        args = (torch.cat([mb["input_ids"] for mb in micro_batches]),) if self.has_first else ()
        self._step = (objective, micro_batches, metrics)
        try:
            with self.loss_context(), self._stage_forwards(objective, micro_batches):
                self.schedule.step(*args, target=index if self.has_last else None,
                                   losses=losses if self.has_last else None, return_outputs=False, mb=index)
        finally:
            self._step = None
        self.match_grad_layouts()
        self.sync_tied_grads()
        value = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.has_last:
            value += torch.stack([torch.as_tensor(x).detach().float() for x in losses]).sum()
            if self.delay_scale:
                value /= len(losses)
        return self._from_last(value, _mean_metrics(list(metrics.values())))

    def _from_last(self, value: torch.Tensor, metrics: dict) -> tuple[float, dict]:
        """The last stage's loss and metrics on every pipeline rank."""
        dist.broadcast(value, src=self.last_rank, group=self.group)
        box = [metrics if self.has_last else None]
        dist.broadcast_object_list(box, src=self.last_rank, group=self.group, device=self.device)
        return float(value), box[0]

    @torch.no_grad()
    def forward_only(self, model: PipelinedModel, objective, batches: list[dict]) -> list:
        """No-grad forward of every micro-batch through the stages of `model` (this runner's model or a
        frozen copy laid out the same way), in stage order with plain send/recv. Returns the last
        stage's outputs (objective.stage_forward) on the rank that holds it, [] elsewhere."""
        outs = []
        last = model.num_stages - 1
        for batch in batches:
            x = batch["input_ids"]
            for s in range(model.num_stages):
                if s % self.pp != self.pp_rank:
                    continue
                chunk = model.chunks[model.stage_ids.index(s)]
                if s > 0:
                    x = _recv_tensor(dist.get_global_rank(self.group, (s - 1) % self.pp), self.group, self.device)
                x = _local_output(run_as_forward(chunk, functools.partial(objective.stage_forward, chunk, batch=batch), x))
                if s < last:
                    _send_tensor(x, dist.get_global_rank(self.group, (s + 1) % self.pp), self.group)
            if self.has_last:
                outs.append(x)
        return outs

    @torch.no_grad()
    def eval_step(self, objective, batch: dict) -> tuple[torch.Tensor, dict]:
        """The objective's loss and metrics of one batch (forward only), on every pipeline rank."""
        objective.before_pipeline_step(self, [batch])
        with self.loss_context():
            outs = self.forward_only(self.model, objective, [batch])
            loss = torch.zeros((), dtype=torch.float32, device=self.device)
            metrics = {}
            if self.has_last:
                value, metrics = objective.stage_loss(outs[0], batch, 0)
                loss += value.detach().float()
        value, metrics = self._from_last(loss, metrics)
        return torch.tensor(value), metrics

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
        from .dtensor import local_tensor as _local
        dist.all_reduce(_local(p.grad), group=self.tied_group)


def _local_output(t):
    """Stages exchange plain tensors: a replicated DTensor (the vocab-parallel loss) becomes its local value."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _mean_metrics(metrics: list[dict]) -> dict:
    keys = sorted({k for m in metrics for k in m})
    return {k: sum(float(m[k]) for m in metrics) / len(metrics) for k in keys}


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


__all__ = ["PP_OPTIONS", "PipelinedModel", "PipelineRunner", "parse_pp_options", "split_model", "stage_bounds",
           "stage_module", "tied_embedding_group"]
