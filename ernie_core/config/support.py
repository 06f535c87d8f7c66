"""`unsupported_options`: keys set to something ernie_core cannot do yet.

A key is reported when its field says `implemented=False`, its value is not one that works
without the capability (the default, or the field's `supported` values), and the key is active:
options that do nothing in this run (pipeline options at pipeline degree 1, LoRA options with
LoRA off, DPO options in SFT...) are never reported, since ignoring them is exactly right.
"""
from __future__ import annotations

from typing import Callable

from ._field import default_of
from .train_config import KEY_FIELD, TrainConfig, iter_options


def _pp(c: TrainConfig) -> bool:
    return c.dist.pipeline_parallel_degree > 1


def _tp(c: TrainConfig) -> bool:
    return c.dist.tensor_parallel_degree > 1


def _sharded(c: TrainConfig) -> bool:
    return c.dist.sharding_parallel_degree != 1


def _recompute(c: TrainConfig) -> bool:
    return c.memory.recompute


def _fused_head(c: TrainConfig) -> bool:
    return c.memory.use_fused_head_and_loss_fn


def _fp8(c: TrainConfig) -> bool:
    return c.basic.weight_quantize_algo == "fp8linear"


def _custom_adamw(c: TrainConfig) -> bool:
    return c.train.optim == "adamw_custom"


# key -> "does this option do anything in this run?"
ACTIVE_WHEN: dict[str, Callable[[TrainConfig], bool]] = {
    "pipeline_parallel_config": _pp, "pp_seg_method": _pp, "virtual_pp_degree": _pp, "add_tail_layers": _pp,
    "tensor_parallel_config": _tp, "tensor_parallel_output": _tp, "sequence_parallel": _tp,
    "use_sp_callback": _tp,
    "sharding": _sharded, "sharding_parallel_config": _sharded,
    "distributed_dataloader": lambda c: _tp(c) or _pp(c),  # one reader per model-parallel group
    "no_recompute_layers": _recompute, "offload_recompute_inputs": _recompute, "use_recompute_moe": _recompute,
    "refined_recompute": lambda c: _recompute(c) and _pp(c),
    "loss_subbatch_seqlen": _fused_head, "use_recompute_loss_fn": _fused_head,
    "apply_hadamard": _fp8, "hadamard_block_size": _fp8, "apply_online_actscale_step": _fp8,
    "actscale_moving_rate": _fp8, "fp8_format_type": _fp8, "quant_input_grad": _fp8, "quant_weight_grad": _fp8,
    "use_lowprecision_moment": _custom_adamw, "tensorwise_offload_optimizer": _custom_adamw,
    "optim_shard_num": lambda c: "ignore_merge_optimizer" in c.checkpoint.unified_checkpoint_config.split(),
    "ckpt_quant_stage": lambda c: not c.checkpoint.disable_ckpt_quant and not c.lora.lora,
    "offline_dataset_path": lambda c: c.train.dataset_type == "map",
    "split": lambda c: c.train.dataset_type == "map",
}
# whole sections that only act in some runs (the section's switch key itself is always active)
SECTION_ACTIVE_WHEN: dict[str, tuple[Callable[[TrainConfig], bool], str | None]] = {
    "lora": (lambda c: c.lora.lora, "lora"),
    "dpo": (lambda c: c.basic.stage == "DPO", None),
}


def _active(cfg: TrainConfig, section: str, key: str) -> bool:
    rule = SECTION_ACTIVE_WHEN.get(section)
    if rule is not None and key != rule[1] and not rule[0](cfg):
        return False
    check = ACTIVE_WHEN.get(key)
    return check is None or check(cfg)


def is_unsupported(key: str, value) -> bool:
    """Whether this value of this key needs a capability that is not implemented yet."""
    f = KEY_FIELD[key]
    if f.metadata["implemented"]:
        return False
    ok = f.metadata.get("supported")
    return value not in ok if ok is not None else value != default_of(f)


def unsupported_options(cfg: TrainConfig) -> list[str]:
    """Keys (in section order) whose value ernie_core cannot honour yet; empty when the run is supported."""
    out = []
    for section, f, _ in iter_options():
        value = getattr(getattr(cfg, section), f.name)
        if is_unsupported(f.name, value) and _active(cfg, section, f.name):
            out.append(f.name)
    return out
