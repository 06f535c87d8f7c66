"""Derived values and cross-key checks, applied once by `load_config`.

`explicit` is the set of keys the user wrote (file or override). It matters where ERNIEKit
derives one key from another: a derived key the user did not write just follows; one the user
wrote must agree, or the run stops with a ConfigError naming both keys.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from ernie_core.errors import ConfigError

from ._field import show

if TYPE_CHECKING:
    from .train_config import TrainConfig

# keys that describe one choice; an override of one replaces the file's value of the others
_GROUPS = (
    {"fine_tuning", "lora"},
    {"compute_type", "bf16", "fp16", "weight_quantize_algo"},
    {"do_eval", "evaluation_strategy"},
)
LINKED_KEYS: dict[str, tuple[str, ...]] = {k: tuple(sorted(g - {k})) for g in _GROUPS for k in g}

# compute_type -> (bf16, fp16, weight_quantize_algo); ERNIEKit turns bf16 on before anything else
COMPUTE_TYPES: dict[str, dict] = {
    "bf16": dict(bf16=True, fp16=False, weight_quantize_algo=None),
    "fp16": dict(bf16=False, fp16=True, weight_quantize_algo=None),
    "fp32": dict(bf16=False, fp16=False, weight_quantize_algo=None),
    "fp8": dict(bf16=True, fp16=False, weight_quantize_algo="fp8linear"),
    "wint8": dict(bf16=True, fp16=False, weight_quantize_algo="weight_only_int8"),
    "wint4/8": dict(bf16=True, fp16=False, weight_quantize_algo="weight_only_mix"),
}
_ALGO_COMPUTE = {"fp8linear": "fp8", "weight_only_int8": "wint8", "weight_only_mix": "wint4/8"}
# losses that can run without a reference model (reference 7.4)
_REFERENCE_FREE_OK = ("sigmoid", "hinge", "ipo", "simpo", "or", "orpo")


def resolve(cfg: "TrainConfig", explicit: Iterable[str] = ()) -> None:
    """Fill derived values in place and check combinations of keys."""
    explicit = set(explicit)
    _resolve_precision(cfg, explicit)
    _resolve_fine_tuning(cfg, explicit)
    _resolve_lora(cfg)
    _resolve_parallel(cfg)
    _resolve_data(cfg, explicit)
    _resolve_eval(cfg, explicit)
    _resolve_dpo(cfg, explicit)
    _check_schedule_and_saving(cfg)


def _resolve_precision(cfg: "TrainConfig", explicit: set) -> None:
    p, b = cfg.precision, cfg.basic
    if {"bf16", "fp16"} <= explicit and p.bf16 and p.fp16:
        raise ConfigError("config keys 'bf16' and 'fp16' are both true; set only one (or set compute_type)")
    if "compute_type" not in explicit:  # a lone bf16/fp16/weight_quantize_algo picks the recipe
        if "weight_quantize_algo" in explicit and b.weight_quantize_algo is not None:
            b.compute_type = _ALGO_COMPUTE[b.weight_quantize_algo]
        elif "fp16" in explicit and p.fp16:
            b.compute_type = "fp16"
        elif "bf16" in explicit and not p.bf16:
            b.compute_type = "fp32"
    implied = COMPUTE_TYPES[b.compute_type]
    for key, section in (("bf16", p), ("fp16", p), ("weight_quantize_algo", b)):
        value = getattr(section, key)
        if key in explicit and value != implied[key]:
            raise ConfigError(f"config key '{key}': {show(value)} conflicts with compute_type "
                              f"{show(b.compute_type)}, which sets {key}: {show(implied[key])}")
        setattr(section, key, implied[key])
    from .amp_ops import check_amp_lists

    check_amp_lists(p.amp_custom_white_list, p.amp_custom_black_list)  # ConfigError or a warning
    if b.compute_type == "fp8":  # ERNIEKit's FP8 recipe (reference 8) overrides these keys
        cfg.fp8.apply_hadamard = True
        cfg.train.optim = "adamw_custom"
        cfg.fp8.use_lowprecision_moment = True
        cfg.fp8.tensorwise_offload_optimizer = True
        cfg.fp8.optim_shard_num = 8
        cfg.checkpoint.unified_checkpoint_config = "ignore_merge_optimizer"


def _resolve_fine_tuning(cfg: "TrainConfig", explicit: set) -> None:
    b, lora = cfg.basic, cfg.lora
    if "fine_tuning" in explicit:
        wanted = b.fine_tuning == "LoRA"
        if "lora" in explicit and lora.lora != wanted:
            raise ConfigError(f"config keys 'fine_tuning' ({show(b.fine_tuning)}) and 'lora' ({show(lora.lora)}) "
                              "disagree; set only one of them")
        lora.lora = wanted
    elif "lora" in explicit:
        b.fine_tuning = "LoRA" if lora.lora else "Full"
    else:
        lora.lora = b.fine_tuning == "LoRA"


def _resolve_lora(cfg: "TrainConfig") -> None:
    lora = cfg.lora
    if lora.rslora_plus:
        lora.rslora, lora.lora_plus_scale, lora.lora_alpha = True, 4.0, 4.0
    if lora.lora:
        cfg.accel.fuse_linear = False  # adapters wrap the plain (unfused) linears
    elif lora.lora_path is not None:
        raise ConfigError("config key 'lora_path' is set but LoRA is off (fine_tuning: Full); "
                          "set fine_tuning: LoRA or remove lora_path")


def _resolve_parallel(cfg: "TrainConfig") -> None:
    d = cfg.dist
    if d.tensor_parallel_degree <= 1:
        d.sequence_parallel = False  # Megatron-style SP only exists inside a tensor-parallel group
    if "stage2" in d.sharding.split():
        d.use_sp_callback = False  # as in ERNIEKit: stage2 already reduces those gradients
    seg = d.pp_seg_method
    if isinstance(seg, list) and d.pipeline_parallel_degree > 1 and d.virtual_pp_degree == 1 \
            and len(seg) != d.pipeline_parallel_degree + 1:
        raise ConfigError(f"config keys 'pp_seg_method' ({show(seg)}) and 'pipeline_parallel_degree' "
                          f"({d.pipeline_parallel_degree}) disagree: expected {d.pipeline_parallel_degree + 1} "
                          "layer bounds")


def _resolve_data(cfg: "TrainConfig", explicit: set) -> None:
    if "logging_dir" not in explicit:
        cfg.basic.logging_dir = cfg.basic.output_dir
    _check_sources("train", cfg.train, explicit)
    _check_sources("eval", cfg.eval, explicit)
    t = cfg.train
    if t.dataset_type == "map" and not t.offline_dataset_path:
        raise ConfigError("config key 'dataset_type' is 'map' but 'offline_dataset_path' is not set")


def _check_sources(prefix: str, section, explicit: set) -> None:
    """path/prob/type are parallel comma lists; an unset prob/type is repeated for every path."""
    path = getattr(section, f"{prefix}_dataset_path")
    if path is None:
        return
    n = len(path.split(","))
    for kind in ("prob", "type"):
        key = f"{prefix}_dataset_{kind}"
        items = getattr(section, key).split(",")
        if len(items) == n:
            continue
        if key not in explicit and len(items) == 1:
            setattr(section, key, ",".join(items * n))
            continue
        raise ConfigError(f"config keys '{prefix}_dataset_path' ({n} item{'s' * (n != 1)}) and '{key}' "
                          f"({len(items)} item{'s' * (len(items) != 1)}) must list the same number of sources")


def _resolve_eval(cfg: "TrainConfig", explicit: set) -> None:
    e, b = cfg.eval, cfg.basic
    if "per_device_eval_batch_size" not in explicit:
        e.per_device_eval_batch_size = cfg.train.per_device_train_batch_size
    # PaddleFormers: a strategy other than 'no' turns do_eval on; do_eval alone means 'steps'
    if not b.do_eval and e.evaluation_strategy != "no":
        b.do_eval = True
    if b.do_eval and e.evaluation_strategy == "no":
        e.evaluation_strategy = "steps"
    if e.evaluation_strategy == "steps":
        if e.eval_steps is None:
            e.eval_steps = b.logging_steps
        elif e.eval_steps <= 0:
            raise ConfigError(f"config key 'eval_steps': {e.eval_steps} must be > 0 when do_eval is true and "
                              "evaluation_strategy is 'steps'")


def _resolve_dpo(cfg: "TrainConfig", explicit: set) -> None:
    d, t = cfg.dpo, cfg.train
    if d.loss_type == "orpo":
        d.reference_free, d.sft_loss_ratio = True, 1.0
    if t.max_seq_len > 10:
        d.max_prompt_len = min(d.max_prompt_len, t.max_seq_len - 10)
    if cfg.basic.stage != "DPO":
        return
    if "loss_subbatch_seqlen" not in explicit:
        cfg.memory.loss_subbatch_seqlen = 1024
    if cfg.lora.lora:
        d.ref_model_update_steps = -1  # the reference is the base with adapters off
    if t.max_seq_len <= 10:
        raise ConfigError(f"config key 'max_seq_len': {t.max_seq_len} is too short for DPO (expected > 10)")
    if d.reference_free and d.loss_type not in _REFERENCE_FREE_OK:
        raise ConfigError(f"config keys 'reference_free' and 'loss_type': loss {show(d.loss_type)} needs a "
                          f"reference model (reference_free works with {', '.join(_REFERENCE_FREE_OK)})")
    if d.label_smoothing > 0 and d.loss_type not in ("sigmoid", "simpo"):
        raise ConfigError(f"config keys 'label_smoothing' and 'loss_type': label smoothing only applies to "
                          f"sigmoid and simpo, not {show(d.loss_type)}")
    if d.offset_alpha > 0 and d.loss_type != "sigmoid":
        raise ConfigError(f"config keys 'offset_alpha' and 'loss_type': the score offset only applies to "
                          f"sigmoid, not {show(d.loss_type)}")


def _check_schedule_and_saving(cfg: "TrainConfig") -> None:
    t, c = cfg.train, cfg.checkpoint
    if t.lr_scheduler_type == "polynomial" and t.learning_rate <= t.lr_end:
        raise ConfigError(f"config keys 'learning_rate' ({t.learning_rate}) and 'lr_end' ({t.lr_end}): the "
                          "polynomial schedule needs learning_rate > lr_end")
    if c.save_strategy == "steps" and c.save_steps <= 0:
        raise ConfigError(f"config key 'save_steps': {c.save_steps} must be > 0 when save_strategy is 'steps'")
