"""The training recipe: set up (seed, tokenizer, data, model, optimizer, resume), then one loop whose
body is a handful of named steps (loss_step, optimizer_step, log, maybe_evaluate, maybe_save)."""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from . import checkpoint as ckpt
from .loggers import RunLogger, progress_bar
from .optim import build_optimizer, build_scheduler, conform_loaded_state, lr_factor, param_groups, strip_master_weights
from .precision import AmpPlan


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_runtime_kwargs(cfg) -> dict:
    """The flat runtime options the model takes (the model never sees a config object)."""
    return dict(
        use_flash_attention=cfg.accel.use_flash_attention,
        use_sparse_flash_attn=cfg.accel.use_sparse_flash_attn,
        use_attn_mask_start_row_indices=cfg.accel.use_attn_mask_start_row_indices,
        fuse_rope=cfg.accel.fuse_rope,
        fuse_linear=cfg.accel.fuse_linear,
        use_fused_head_and_loss_fn=cfg.memory.use_fused_head_and_loss_fn,
        use_sparse_head_and_loss_fn=cfg.memory.use_sparse_head_and_loss_fn,
        recompute=cfg.memory.recompute,
        recompute_granularity=cfg.memory.recompute_granularity,
        recompute_use_reentrant=cfg.memory.recompute_use_reentrant,
    )


def dropout_rates(step: int, hidden_p: float, attn_p: float, warmup: int) -> tuple[float, float]:
    """Linear ramp from 0 to the configured rates over `warmup` steps, then hold (docs/behaviour.md#dropout-warmup)."""
    ramp = 1.0 if warmup <= 0 else min(1.0, step / warmup)
    return hidden_p * ramp, attn_p * ramp


class Trainer:
    """Runs one objective (SFT, DPO) on one process; parallel layouts wrap the same steps (ernie_core/parallel)."""

    def __init__(self, cfg, objective, *, rank: int = 0, world_size: int = 1, parallel=None):
        from ..parallel import ParallelContext

        self.cfg = cfg
        self.objective = objective  # what is trained: data + loss (sft.SFTObjective, dpo.DPOObjective)
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        # Where parallelism plugs in (mesh, plans, collectives); a no-op context for one process.
        self.parallel = parallel or ParallelContext.from_config(cfg)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.output_dir = Path(cfg.basic.output_dir)
        self.global_step = 0
        self.state: dict = {"eval_history": []}

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        self.resume_dir = self._find_resume_checkpoint()
        self.setup_tokenizer_and_data()
        self.setup_model()
        self.setup_optimizer()
        if self.resume_dir is not None:
            self._resume(self.resume_dir)
        self.logger = RunLogger(self.output_dir, cfg.basic.logging_dir, enabled=self.is_main,
                                resume_step=self.global_step if self.resume_dir is not None else None)

    def _find_resume_checkpoint(self) -> Path | None:
        if self.cfg.basic.overwrite_output_dir:
            return None
        ckpt.remove_stale_temporaries(self.output_dir)
        return ckpt.latest_checkpoint(self.output_dir)

    def setup_tokenizer_and_data(self) -> None:
        from ..data import load_tokenizer

        cfg, obj = self.cfg, self.objective
        self.tokenizer = load_tokenizer(cfg.basic.model_name_or_path)
        obj.validate(cfg, self.tokenizer)  # every bad line stops the run here, before training
        self.stream = self.parallel.build_stream(obj, cfg, self.tokenizer)  # this rank's slice of each global batch
        self.eval_batches = obj.build_eval_batches(cfg, self.tokenizer) if cfg.basic.do_eval else []
        steps_cfg = self.parallel.global_batch_config(cfg)  # steps count whole global batches (dp x sharding)
        if cfg.train.max_steps > 0:
            self.max_steps = cfg.train.max_steps
            self.steps_per_epoch = max(1, obj.estimate_max_steps(_with_epochs(steps_cfg, 1), self.tokenizer))
        else:
            self.max_steps = obj.estimate_max_steps(steps_cfg, self.tokenizer)
            self.steps_per_epoch = max(1, self.max_steps // max(1, int(math.ceil(cfg.train.num_train_epochs))))

    def setup_model(self) -> None:
        from ..models import Ernie4_5Config, Ernie4_5ForCausalLM

        cfg = self.cfg
        runtime = model_runtime_kwargs(cfg)
        source = self.resume_dir or cfg.basic.model_name_or_path
        load = self.resume_dir is not None or cfg.basic.continue_training
        if cfg.lora.lora:  # LoRA checkpoints hold adapters; the base stays model_name_or_path
            from ..peft.run import lora_base_source

            source, load = lora_base_source(self.resume_dir, cfg.basic.model_name_or_path, cfg.basic.continue_training)
        if load:
            self.model = Ernie4_5ForCausalLM.from_pretrained(str(source), **runtime)
        else:
            self.model = Ernie4_5ForCausalLM(Ernie4_5Config.from_pretrained(str(source)), **runtime)
        self.model.to(self.device)
        self.lora = None
        if cfg.lora.lora:  # frozen base + adapters, continued from the resumed checkpoint or lora_path
            from ..peft.run import LoraRun

            self.lora = LoraRun.setup(self.model, rank=cfg.lora.lora_rank, alpha=cfg.lora.lora_alpha,
                                      rslora=cfg.lora.rslora, bf16_base=cfg.precision.bf16,
                                      adapter_path=self.resume_dir or cfg.lora.lora_path,
                                      base_path=cfg.basic.model_name_or_path, save_base=not cfg.basic.continue_training)
        # AMP (docs/behaviour.md#precision-and-parallelism): O2 stores the weights in bf16; their fp32 values seed the optimizer's master weights.
        self.amp = AmpPlan.from_config(cfg)
        self._master_seeds = self.amp.cast_model(self.model)
        self.model.train()
        self.model_config = self.model.config
        self.model = self.parallel.parallelize(self.model, masters=self._master_seeds)  # TP/SP, PP, dp/ZeRO

    def setup_optimizer(self) -> None:
        cfg = self.cfg
        t = cfg.train
        groups = param_groups(self.model, weight_decay=t.weight_decay, layerwise_bound=t.layerwise_lr_decay_bound,
                              num_layers=self.model_config.num_hidden_layers,
                              tied_embedding=self.model_config.tie_word_embeddings,
                              lr_multiplier=self._lora_plus())
        groups = self.parallel.optimizer_param_groups(groups)  # sharding stage1: this rank's slices
        amp = self.amp
        self.optimizer = build_optimizer(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                         eps=t.adam_epsilon, master_grad=amp.master_grad, moment_dtype=amp.moment_dtype,
                                         offload=amp.offload, masters=self._master_seeds)
        self._master_seeds = None
        decay_steps = t.decay_steps if getattr(t, "decay_steps", None) and t.decay_steps > 0 else self.max_steps
        self.schedule = dict(kind=t.lr_scheduler_type, warmup=t.warmup_steps, total=decay_steps,
                             base_lr=t.learning_rate, min_lr=t.min_lr, num_cycles=t.num_cycles, lr_end=t.lr_end,
                             power=t.power)
        self.scheduler = build_scheduler(self.optimizer, **self.schedule)

    def _lora_plus(self):
        """LoRA+: lora_plus_scale multiplies the learning rate of the B matrices only (docs/behaviour.md#lora)."""
        if not self.cfg.lora.lora:
            return None
        from ..peft import lora_plus_multiplier

        return lora_plus_multiplier(self.cfg.lora.lora_plus_scale)

    def _write_model_files(self, model_state: dict, path: Path) -> None:
        """HF model files, or for LoRA the PEFT adapter (+ a freshly initialised base)."""
        from ..models.io import write_hf_checkpoint

        if getattr(self, "lora", None) is not None:
            self.lora.write(path, model_state)
        else:
            write_hf_checkpoint(model_state, self.model_config, path)

    def _resume(self, path: Path) -> None:
        load_opt = not self.cfg.checkpoint.ignore_load_lr_and_optim
        trainer_state, data_state = ckpt.load_training_state(  # optimizer state is saved by name, any layout
            path, optimizer=self.parallel.optimizer_loader(self.optimizer) if load_opt else None,
            scheduler=self.scheduler if load_opt else None)
        conform_loaded_state(self.optimizer)  # state to its place/dtype; saved master weights adopted or rebuilt
        if not load_opt:  # fresh optimizer, but the schedule continues at the resumed step
            for _ in range(trainer_state["global_step"]):
                self.scheduler.step()
        self.global_step = trainer_state["global_step"]
        self.state = trainer_state.get("state") or self.state
        if not self.state.get("window"):
            self.state.pop("window", None)
        if data_state:  # converted when the checkpoint's data-parallel world differs from this run's
            self.parallel.restore_data_state(self.stream, data_state, self.cfg.train.per_device_train_batch_size)
        if self.is_main:
            print(f"resuming from {path} at step {self.global_step}", flush=True)

    # ----------------------------------------------------------------- steps
    def autocast(self):
        return self.amp.autocast(self.device.type)  # bf16 autocast at O1 and O2, none at O0 / fp32

    def to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def forward_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        if self.parallel.pipelined:  # the stages run the model; the last one computes the objective's loss
            with self.autocast():
                return self.parallel.pipeline_eval_loss(self.objective, batch)
        with self.autocast(), self.parallel.loss_context():
            return self.objective.loss(self.model, batch)

    def loss_step(self) -> tuple[float, int, dict]:
        """Forward + backward over gradient_accumulation_steps micro-batches; mean of their losses
        (and of the objective's metrics)."""
        accum = self.cfg.train.gradient_accumulation_steps
        if self.parallel.pipelined:  # the pipeline schedule runs all micro-batches of the step
            with self.autocast():
                return self.parallel.pipeline_loss_step(self.objective,
                                                        [self.to_device(next(self.stream)) for _ in range(accum)])
        total, tokens, metrics = 0.0, 0, {}
        for i in range(accum):
            batch = self.to_device(next(self.stream))
            self.parallel.set_grad_sync(i == accum - 1)  # data-parallel gradient reduction once per step
            with self.parallel.loss_context():  # vocab-parallel CE needs forward and backward inside
                loss, extra = self.forward_loss(batch)
                (loss / accum).backward()
            total += loss.item() / accum
            tokens += int(batch["num_tokens"])
            for k, v in extra.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / accum
        return self.parallel.reduce_step_stats(total, tokens, metrics)  # mean loss, total tokens over replicas

    def optimizer_step(self) -> float:
        if getattr(self.optimizer, "clips_own_grads", False) and not self.parallel.dims.distributed:  # fp32 clip
            grad_norm = self.optimizer.clip_grad_norm_(self.cfg.train.max_grad_norm)
            self.optimizer.step()
        else:  # global-norm clip (every shard counted once) + the update, with the layout's syncs around it
            grad_norm = self.parallel.optimizer_step(self.model, self.optimizer, self.cfg.train.max_grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)  # release_grads: grads are freed after every step
        return float(grad_norm)

    def current_lr(self, step: int) -> float:
        return self.cfg.train.learning_rate * lr_factor(step, **self.schedule)

    @torch.no_grad()
    def evaluate(self) -> dict:
        if not self.eval_batches:
            return {}
        self.model.eval()
        limit = self.cfg.eval.max_evaluate_steps
        batches = self.eval_batches if limit is None or limit <= 0 else self.eval_batches[:limit]
        loss_sum, count = 0.0, 0
        for batch in batches:
            batch = self.to_device(batch)
            n = int((batch["labels"] != -100).sum())
            if n == 0:
                continue
            loss_sum += float(self.forward_loss(batch)[0]) * n
            count += n
        self.model.train()
        if count == 0:
            return {}
        eval_loss = loss_sum / count
        return {"eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0))}

    # ----------------------------------------------------------------- loop
    def train(self) -> dict:
        cfg = self.cfg
        if not cfg.basic.do_train:
            result = self.evaluate() if cfg.basic.do_eval else {}
            if self.is_main:
                print(json.dumps({"do_train": False, **result}), flush=True)
            return result
        if self.global_step == 0 and cfg.basic.do_eval:  # every rank: sharded models evaluate together
            self.state["eval_before"] = self.evaluate()
        bar = progress_bar(self.max_steps, self.global_step, disable=cfg.basic.disable_tqdm or not self.is_main)
        # The loss window survives a resume (it is in self.state), so the first log line after a
        # resume averages the same steps as in an uninterrupted run.
        window = self.state.setdefault("window", {"loss": 0.0, "steps": 0})
        window.update(tokens=0, t0=time.perf_counter())
        while self.global_step < self.max_steps:
            hidden_p, attn_p = dropout_rates(self.global_step, cfg.basic.hidden_dropout_prob,
                                             cfg.basic.attention_probs_dropout_prob, cfg.basic.dropout_warmup_steps)
            self.model.set_dropout(hidden_p, attn_p)
            lr = self.current_lr(self.global_step)
            loss, tokens, metrics = self.loss_step()
            grad_norm = self.optimizer_step()
            self.global_step += 1
            self.objective.on_step_end(self)
            window["loss"] += loss
            for k, v in metrics.items():
                window.setdefault("metrics", {})[k] = window.get("metrics", {}).get(k, 0.0) + v
            window["steps"] += 1
            window["tokens"] += tokens
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            if self.global_step % cfg.basic.logging_steps == 0 or self.global_step == self.max_steps:
                self.log(window, lr, grad_norm)
                window.update(loss=0.0, steps=0, tokens=0, t0=time.perf_counter(), metrics={})
            self.maybe_evaluate()
            self.maybe_save()
        bar.close()
        self.finish()
        return self.state

    def log(self, window: dict, lr: float, grad_norm: float) -> None:
        elapsed = max(time.perf_counter() - window["t0"], 1e-9)
        loss = window["loss"] / max(1, window["steps"])
        record = {
            "step": self.global_step,
            "loss": loss,
            "ppl": math.exp(min(loss, 50.0)),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_sec": window["tokens"] / elapsed,  # tokens of the whole global batch (all replicas)
            "epoch": self.global_step / self.steps_per_epoch,
            "packing_efficiency": self.stream.packing_efficiency,
        }
        for k, v in window.get("metrics", {}).items():
            record[k] = v / max(1, window["steps"])
        self.logger.log(record)

    def _due(self, strategy: str, every: int) -> bool:
        if strategy == "steps":
            return every > 0 and self.global_step % every == 0
        if strategy == "epoch":
            return self.global_step % self.steps_per_epoch == 0
        return False

    def maybe_evaluate(self) -> None:
        cfg = self.cfg
        if not cfg.basic.do_eval or not self._due(cfg.eval.evaluation_strategy, cfg.eval.eval_steps):
            return
        result = self.evaluate()
        if result and self.is_main:
            self.state["eval_history"].append({"step": self.global_step, **result})
            self.logger.log({"step": self.global_step, **result})

    def maybe_save(self) -> None:
        cfg = self.cfg.checkpoint
        if self._due(cfg.save_strategy, cfg.save_steps):
            self.save_checkpoint()

    def save_checkpoint(self) -> Path | None:
        cfg = self.cfg
        skip_opt = cfg.checkpoint.ignore_save_lr_and_optim
        # Every rank joins the gather of the full, layout-independent model/optimizer state; rank 0 writes.
        model_state, opt_state = self.parallel.checkpoint_state(self.model, self.optimizer, with_optimizer=not skip_opt)
        if not self.is_main:
            return None
        if "remove_master_weight" in cfg.checkpoint.unified_checkpoint_config.split():
            opt_state = strip_master_weights(opt_state)  # rebuilt from the saved bf16 weights on resume
        state = dict(self.state)
        state["window"] = ({k: self.state["window"].get(k) for k in ("loss", "steps", "metrics")}
                           if "window" in self.state else None)
        trainer_state = {"global_step": self.global_step, "max_steps": self.max_steps, "state": state}

        def write(tmp: Path) -> None:
            self._write_model_files(model_state, tmp)
            self.tokenizer.save_pretrained(tmp)
            ckpt.save_training_state(tmp, optimizer=None if skip_opt else self.parallel.optimizer_saver(opt_state),
                                     scheduler=None if skip_opt else self.scheduler,
                                     data_state=self.parallel.data_state(self.stream, cfg.train.per_device_train_batch_size),
                                     trainer_state=trainer_state)

        path = ckpt.write_atomically(self.output_dir / f"checkpoint-{self.global_step}", write)
        ckpt.rotate(self.output_dir, cfg.checkpoint.save_total_limit)
        return path

    def finish(self) -> None:
        """Final eval, final HF model in output_dir, and a summary line."""
        final_eval = self.evaluate() if self.cfg.basic.do_eval else {}  # every rank: sharded models eval together
        model_state, _ = self.parallel.checkpoint_state(self.model, self.optimizer, with_optimizer=False)
        if not self.is_main:
            return
        self.state["eval_after"] = final_eval
        tmp = self.output_dir / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self._write_model_files(model_state, tmp)
        self.tokenizer.save_pretrained(tmp)
        for stale in self.output_dir.glob("model*.safetensors*"):
            stale.unlink()
        for f in tmp.iterdir():  # each rename is atomic; the index is moved last
            if f.name != "model.safetensors.index.json":
                os.replace(f, self.output_dir / f.name)
        if (tmp / "model.safetensors.index.json").exists():
            os.replace(tmp / "model.safetensors.index.json", self.output_dir / "model.safetensors.index.json")
        shutil.rmtree(tmp, ignore_errors=True)
        summary = {"global_step": self.global_step, "eval_before": self.state.get("eval_before"),
                   "eval_after": final_eval, "output_dir": str(self.output_dir)}
        (self.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        self.logger.close()


def _with_epochs(cfg, epochs: int):
    import copy

    clone = copy.deepcopy(cfg)
    clone.train.num_train_epochs = epochs
    return clone
