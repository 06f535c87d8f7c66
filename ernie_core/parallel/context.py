"""`ParallelContext`: the one object the trainer talks to about parallelism.

It is built once per run from the config's degrees (validated into a named mesh), applies the
plans to the plain model in a fixed order -- tensor/sequence parallel, pipeline split, data
parallel / ZeRO sharding -- and offers the handful of calls the trainer makes at the points where
parallelism plugs in (data slot, loss context, gradient sync, optimizer step, pipeline step,
checkpoint gather/scatter). With one process every call reduces to the single-process behaviour,
so the trainer has no branches on the layout.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .dims import ParallelDims, build_mesh, dims_from_config
from .dtensor import local_tensor


@dataclass
class ParallelOptions:
    """The flat options the plans take (read from the config once, in `from_config`)."""

    sequence_parallel: bool = False
    tensor_parallel_output: bool = True
    tp_options: set = field(default_factory=set)
    pp_options: set = field(default_factory=set)
    sharding_options: set = field(default_factory=set)
    pp_seg_method: object = "layer:Ernie4_5_DecoderLayer|EmptyLayer"
    virtual_pp_degree: int = 1
    add_tail_layers: int = 0
    gradient_accumulation_steps: int = 1
    distributed_dataloader: bool = False
    release_grads: bool = False
    pp_schedule: str | None = None  # None: 1F1B (interleaved with virtual stages); "gpipe" for benchmarks
    max_seq_len: int | None = None  # packed row length (sequence parallel splits it over tp)
    master_grad: bool = False  # AMP O2 amp_master_grad: gradients accumulate in fp32


def options_from_config(cfg) -> ParallelOptions:
    from .data_parallel import parse_sharding_options
    from .pipeline import parse_pp_options
    from .tensor_parallel import parse_tp_options

    d = cfg.dist
    return ParallelOptions(
        sequence_parallel=bool(d.sequence_parallel) and d.tensor_parallel_degree > 1,
        tensor_parallel_output=bool(d.tensor_parallel_output),
        tp_options=parse_tp_options(d.tensor_parallel_config),
        pp_options=parse_pp_options(d.pipeline_parallel_config),
        sharding_options=parse_sharding_options(d.sharding_parallel_config),
        pp_seg_method=d.pp_seg_method, virtual_pp_degree=d.virtual_pp_degree, add_tail_layers=d.add_tail_layers,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        distributed_dataloader=bool(cfg.accel.distributed_dataloader),
        release_grads=bool(cfg.memory.release_grads), max_seq_len=cfg.train.max_seq_len,
        master_grad=bool(cfg.precision.amp_master_grad) and cfg.precision.fp16_opt_level == "O2" and cfg.precision.bf16)


class ParallelContext:
    def __init__(self, dims: ParallelDims, options: ParallelOptions, *, rank: int = 0,
                 device: torch.device | None = None, mesh=None):
        self.dims, self.opts, self.rank = dims, options, rank
        self.world_size = dims.world_size
        self.device = device or torch.device("cpu")
        self.mesh = mesh if mesh is not None else build_mesh(dims, self.device.type)
        self.runner = None  # PipelineRunner when pp > 1
        self.zero = None  # ZeroOneOptimizer under sharding stage1
        self._replicated: list[str] = []  # TP-replicated parameter names
        self._tied = False
        self._tied_copy = None  # last pipeline stage's LM head when it copies a tied embedding
        self._roots: list[torch.nn.Module] = []  # modules wrapped for data parallelism
        self._loss_depth = 0
        if self.opts.virtual_pp_degree > 1 and dims.pp == 1:
            raise ConfigError("virtual_pp_degree > 1 needs pipeline_parallel_degree > 1")

    @classmethod
    def from_config(cls, cfg, *, rank: int = 0, world_size: int = 1, device=None) -> "ParallelContext":
        dims = dims_from_config(cfg, world_size)
        return cls(dims, options_from_config(cfg), rank=rank, device=device)

    # ------------------------------------------------------------------ coordinates
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def pipelined(self) -> bool:
        return self.dims.pp > 1

    def _coord(self, name: str) -> int:
        return self.mesh.get_local_rank(name) if self.mesh is not None else 0

    @property
    def dp_rank(self) -> int:
        """This rank's data slot in 0..dp*sharding-1 (tp and pp ranks of one replica share it)."""
        return self._coord("dp") * self.dims.sharding + self._coord("sharding")

    @property
    def dp_world(self) -> int:
        return self.dims.data_world

    def group(self, name: str):
        return self.mesh.get_group(name) if self.mesh is not None else None

    # ------------------------------------------------------------------ model
    def parallelize(self, model, masters: dict | None = None):
        """Apply TP/SP, the pipeline split and dp/sharding to the plain model (in this order).
        Returns what the trainer trains: the model itself, or this rank's PipelinedModel.

        masters (AMP O2): {name: fp32 value} of the trainable parameters stored in bf16. Each master
        weight is then kept once, sharded like its parameter: FSDP layouts (dp, stage2/3) shard the fp32
        values themselves and compute with bf16 copies (FSDP's mixed-precision policy); stage1 keeps
        fp32 slices in its optimizer; TP and pipeline layouts leave them to MixedPrecisionAdamW, whose
        master of a DTensor parameter is a DTensor with the same placements."""
        from .data_parallel import ZeroOneOptimizer, apply_data_parallel
        from .tensor_parallel import apply_tp, check_tp_shapes

        d, o = self.dims, self.opts
        rt = model.runtime
        check_tp_shapes(model.config, d.tp, fuse_linear=rt.fuse_linear, fused_head=rt.use_fused_head_and_loss_fn)
        if o.sequence_parallel and o.max_seq_len and o.max_seq_len % d.tp:
            raise ConfigError(f"sequence_parallel splits each row of max_seq_len={o.max_seq_len} tokens over "
                              f"tensor_parallel_degree={d.tp} ranks: choose a max_seq_len divisible by {d.tp}")
        self._tied = model.lm_head.weight is model.model.embed_tokens.weight
        if d.tp > 1:
            self._replicated = apply_tp(model, self.mesh["tp"], sequence_parallel=o.sequence_parallel,
                                        tensor_parallel_output=o.tensor_parallel_output)
        if d.pp > 1:
            model = self._split_pipeline(model)
            roots = model.chunks
        else:
            roots = [model]
        if d.data_world > 1:
            for root in roots:
                apply_data_parallel(root, list(root.model.layers.children()), self.mesh, d, masters=masters,
                                    master_grad=o.master_grad)
        self._roots = roots
        if d.sharding_stage == 1:
            self.zero = ZeroOneOptimizer(self.group("sharding"), dp_group=self.group("dp") if d.dp > 1 else None,
                                         masters=masters, master_grad=o.master_grad)
        if d.pp > 1:
            self._build_runner(model)
        return model

    def _split_pipeline(self, model):
        from .pipeline import split_model, stage_bounds

        o = self.opts
        bounds = stage_bounds(model.config.num_hidden_layers, self.dims.pp * o.virtual_pp_degree, o.pp_seg_method,
                              o.add_tail_layers)
        return split_model(model, self._coord("pp"), self.dims.pp, bounds)

    def _build_runner(self, pmodel) -> None:
        from .pipeline import PipelineRunner, tied_embedding_group

        tied_group = tied_embedding_group(self.mesh, self.dims.pp) if self._tied else None
        if self._tied and hasattr(pmodel, "lm_head"):
            self._tied_copy = pmodel.lm_head.weight
        self.runner = PipelineRunner(pmodel, self.group("pp"), n_microbatches=self.opts.gradient_accumulation_steps,
                                     device=self.device, options=self.opts.pp_options,
                                     loss_context=self.loss_context, tied_group=tied_group,
                                     schedule=self.opts.pp_schedule)

    def optimizer_param_groups(self, groups: list[dict]) -> list[dict]:
        """Stage1: the optimizer gets this rank's parameter slices instead of the parameters."""
        return self.zero.param_groups(groups) if self.zero is not None else groups

    # ------------------------------------------------------------------ data
    def build_stream(self, objective, cfg, tok):
        if self.opts.distributed_dataloader and self.dims.distributed:
            from .data import build_scattered_stream

            slots = self._data_slot_of_every_rank()
            return build_scattered_stream(objective, cfg, tok, slots, self.dp_world)
        return objective.build_stream(cfg, tok, dp_rank=self.dp_rank, dp_world=self.dp_world)

    def _data_slot_of_every_rank(self) -> list[int]:
        ranks = self.mesh.mesh  # [dp, sharding, pp, tp] -> global rank
        slots = [0] * self.world_size
        for idx in torch.nonzero(torch.ones_like(ranks)).tolist():
            dp_i, sh_i = idx[0], idx[1]
            slots[int(ranks[tuple(idx)])] = dp_i * self.dims.sharding + sh_i
        return slots

    def global_batch_config(self, cfg):
        """A copy of cfg whose micro batch is the whole data-parallel batch: what the max_steps
        estimate (docs/behaviour.md#mixing-and-virtual-epochs: divides by bs*accum*dp*sharding) must see."""
        if self.dp_world == 1:
            return cfg
        out = copy.deepcopy(cfg)
        out.train.per_device_train_batch_size *= self.dp_world
        return out

    def data_state(self, stream, batch_size: int) -> dict:
        """The stream position plus the data world it was counted in (micro-batches = global batches)."""
        return {**stream.state_dict(), "data_world": self.dp_world, "batch_size": batch_size}

    def restore_data_state(self, stream, state: dict, batch_size: int) -> None:
        """Resume the stream, converting the position when the data world changed (same rows consumed)."""
        state = dict(state)
        old_world, old_bs = state.pop("data_world", self.dp_world), state.pop("batch_size", None) or batch_size
        rows = int(state["micro_batches"]) * old_world * old_bs
        per_batch = self.dp_world * batch_size
        if rows % per_batch:
            raise ConfigError(f"cannot resume: the checkpoint consumed {rows} packed rows, not a whole number of this "
                              f"run's global batches ({per_batch} rows = per_device_train_batch_size x dp x sharding)")
        state["micro_batches"] = rows // per_batch
        stream.load_state_dict(state)

    # ------------------------------------------------------------------ steps
    @contextlib.contextmanager
    def loss_context(self):
        """Vocab-parallel CE (tensor_parallel_output) around forward and backward; re-entrant, since
        torch's loss_parallel switches itself off on the first exit."""
        from .tensor_parallel import loss_context

        if self._loss_depth:
            self._loss_depth += 1
            try:
                yield
            finally:
                self._loss_depth -= 1
            return
        self._loss_depth = 1
        try:
            with loss_context(self.dims.tp > 1 and self.opts.tensor_parallel_output):
                yield
        finally:
            self._loss_depth = 0

    def set_grad_sync(self, enabled: bool) -> None:
        """Call before each micro-batch with enabled = "this is the step's last micro-batch": gradients
        are reduced once per step (dp/stage1), stage2 gathers its parameters once per step."""
        from .data_parallel import set_micro_batch

        if self.dims.data_world > 1:
            for root in self._roots:
                set_micro_batch(root, self.dims.sharding_stage, enabled)

    def pipeline_loss_step(self, objective, micro_batches: list[dict]) -> tuple[float, int, dict]:
        loss, metrics = self.runner.train_step(objective, micro_batches)
        tokens = sum(int(mb["num_tokens"]) for mb in micro_batches)
        return self.reduce_step_stats(loss, tokens, metrics)

    def pipeline_eval_loss(self, objective, batch: dict) -> tuple[torch.Tensor, dict]:
        return self.runner.eval_step(objective, batch)

    def reduce_step_stats(self, loss: float, tokens: int, metrics: dict) -> tuple[float, int, dict]:
        """Mean loss/metrics and total tokens over the data-parallel replicas."""
        if self.dp_world == 1:
            return loss, tokens, metrics
        keys = sorted(metrics)
        t = torch.tensor([loss, float(tokens)] + [metrics[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.group("data"))
        vals = t.tolist()
        return vals[0] / self.dp_world, int(round(vals[1])), {k: v / self.dp_world for k, v in zip(keys, vals[2:])}

    def optimizer_step(self, model, optimizer, max_norm: float) -> float:
        """TP gradient syncs, global-norm clipping, the update (ZeRO-1: on slices, then all-gather),
        TP parameter/moment syncs. Returns the global gradient norm before clipping."""
        from .tensor_parallel import broadcast_replicated, sync_replicated_grads

        grad_of = _grad_reader(optimizer)
        rep = [p for n, p in model.named_parameters() if n in set(self._replicated)] if self._replicated else []
        tp_group = self.group("tp")
        if rep and self.opts.sequence_parallel:
            sync_replicated_grads([grad_of(p) for p in rep], tp_group, op="sum")  # each rank saw a sequence shard
        if rep and "sync_grad" in self.opts.tp_options:
            sync_replicated_grads([grad_of(p) for p in rep], tp_group, op="avg")
        if self.pipelined and self._tied and self.runner is not None:
            self._sync_tied_master_grads(model, optimizer)
        if self.zero is not None:
            self.zero.reduce_grads()  # stage1: averaged gradients land in this rank's slices
        norm = self.clip_grad_norm(model, max_norm, grad_of=grad_of)
        optimizer.step()
        if self.zero is not None:
            self.zero.gather_params()
        if rep and "sync_param" in self.opts.tp_options:
            broadcast_replicated(rep, tp_group)
        if rep and "sync_moment" in self.opts.tp_options:
            self._sync_moments(optimizer, rep, tp_group)
        return norm

    def _sync_moments(self, optimizer, rep, tp_group) -> None:
        from .tensor_parallel import broadcast_replicated

        slice_of = {id(p): piece for p, piece, _, _ in self.zero.entries} if self.zero is not None else {}
        tensors = []
        for p in rep:
            st = optimizer.state.get(slice_of.get(id(p), p), {})
            tensors += [v for k, v in sorted(st.items()) if torch.is_tensor(v) and v.dim() > 0]
        broadcast_replicated(tensors, tp_group)

    def _sync_tied_master_grads(self, model, optimizer) -> None:
        """Under master_grad the tied embedding's fp32 gradient lives in the optimizer's buffer, which the
        pipeline's tied-weight all-reduce (on `p.grad`) does not see: add the first and last stage's here."""
        buffers = getattr(optimizer, "_grads", None)
        group = getattr(self.runner, "tied_group", None)
        if not buffers or group is None:
            return
        for name, p in model.named_parameters():
            if name.endswith(("embed_tokens.weight", "lm_head.weight")) and id(p) in buffers:
                dist.all_reduce(local_tensor(buffers[id(p)]), group=group)
                break

    @torch.no_grad()
    def clip_grad_norm(self, model, max_norm: float, grad_of=None) -> float:
        """Global L2 norm of all gradients (every shard counted once) and in-place clipping. grad_of(p):
        where p's gradient is (the optimizer's fp32 buffer under master_grad), default p.grad."""
        grad_of = grad_of or (lambda p: p.grad)
        if not self.dims.distributed:
            params = [p for p in model.parameters() if p.grad is not None]
            if max_norm and max_norm > 0:
                return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False))
            if not params:
                return 0.0
            return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params])))
        if self.zero is not None:  # stage1: the gradients live in this rank's slices
            sharding = (self.group("sharding"),)
            pairs = [(p, g, sharding + _shard_groups(p)) for p, g in self.zero.slice_grads()]
        else:
            grads = [(p, grad_of(p)) for p in model.parameters()]
            pairs = [(p, local_tensor(g), _shard_groups(g)) for p, g in grads if g is not None]
        # The last stage's copy of a tied embedding has the embedding's gradient: count it once.
        total = _sq_sum([(g, groups) for p, g, groups in pairs if p is not self._tied_copy], self.device)
        if self.pipelined:
            dist.all_reduce(total, group=self.group("pp"))
        norm = float(total.sqrt())
        coef = min(1.0, max_norm / (norm + 1e-6)) if max_norm and max_norm > 0 else 1.0  # torch's formula
        if coef < 1.0:
            for _, g, _ in pairs:
                g.mul_(coef)
        return norm

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, model, optimizer, *, with_optimizer: bool):
        """(HF model state, full optimizer state) on rank 0, (None, None) elsewhere. Every rank calls it."""
        from .state import full_model_state, full_optimizer_state

        pp_group = self.group("pp") if self.pipelined else None
        model_state = full_model_state(model, self.mesh, pp_group, tied=self._tied)
        opt_state = full_optimizer_state(optimizer, self.mesh, pp_group, zero=self.zero, tied=self._tied) \
            if with_optimizer else None
        return model_state, opt_state

    def optimizer_saver(self, opt_state):
        from .state import StateDictView

        return StateDictView(save=opt_state)

    def optimizer_loader(self, optimizer):
        """An object whose load_state_dict takes a saved optimizer.pt: the full-by-name format of any
        layout, or an older single-process (index-keyed) one."""
        from .state import FORMAT, StateDictView, load_full_optimizer_state

        def load(d: dict) -> None:
            if d.get("format") == FORMAT:
                load_full_optimizer_state(optimizer, d, zero=self.zero, tied=self._tied)
            elif self.dims.distributed:
                raise ConfigError("this checkpoint's optimizer.pt is in the single-process format; resume it with one "
                                  "process or set ignore_load_lr_and_optim: true")
            else:
                optimizer.load_state_dict(d)

        return StateDictView(load=load)

    def after_step(self) -> None:
        """Nothing to do between steps today; kept as the hook for release_grads-style cleanup."""


def _grad_reader(optimizer):
    """p -> its gradient: MixedPrecisionAdamW's fp32 accumulation buffer (master_grad) or p.grad."""
    read = getattr(optimizer, "_grad", None)
    return read if callable(read) else (lambda p: p.grad)


def _shard_groups(t) -> tuple:
    """Process groups of the mesh dims a DTensor is split on (its local pieces add up over them)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return ()
    # Anything but Replicate (Shard, FSDP's _StridedShard under TP, Partial) splits the tensor over that dim.
    return tuple(t.device_mesh.get_group(i) for i, pl in enumerate(t.placements) if not pl.is_replicate())


def _sq_sum(items, device) -> torch.Tensor:
    """Sum of squares over all ranks of (local tensor, groups it is split over), every entry once:
    local sums are all-reduced over exactly those groups (replicated dims would double count).
    Items with the same groups share one all-reduce; every rank of a group sees the same order."""
    sums: dict[tuple, list] = {}
    for local, groups in items:
        sums.setdefault(groups, []).append(local.detach().float().pow(2).sum())
    total = torch.zeros((), dtype=torch.float32, device=device)
    for groups, vals in sums.items():
        s = torch.stack(vals).sum().to(device)
        for group in groups:
            dist.all_reduce(s, group=group)
        total += s
    return total


__all__ = ["ParallelContext", "ParallelOptions", "options_from_config"]
