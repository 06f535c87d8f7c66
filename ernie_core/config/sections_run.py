"""Run-level config sections: basic, eval, train, checkpoint, sft.

Defaults are ERNIEKit's code defaults (ERNIEKit + PaddleFormers dataclasses), not the parameter
table's "Required"; where the two differ the help text says so. `implemented=False` marks a
capability ernie_core does not have yet: flip it in that one line when it lands.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ernie_core.errors import ConfigError

from ._field import option, show


def _comma_list(key: str, value: str) -> str:
    """'a.jsonl, b.jsonl' -> 'a.jsonl,b.jsonl'; empty items are an error."""
    items = [s.strip() for s in value.split(",")]
    if any(not s for s in items):
        raise ConfigError(f"config key '{key}': {show(value)} has an empty item (expected a comma-separated list)")
    return ",".join(items)


def _prob_list(key: str, value: str) -> str:
    value = _comma_list(key, value)
    probs = []
    for item in value.split(","):
        try:
            probs.append(float(item))
        except ValueError:
            raise ConfigError(f"config key '{key}': {show(item)} is not a number "
                              f"(expected comma-separated probabilities such as '0.8,0.2')") from None
    if any(p < 0 for p in probs) or sum(probs) <= 0:
        raise ConfigError(f"config key '{key}': {show(value)} is out of range "
                          "(expected probabilities >= 0 with a positive sum)")
    return value


def _report_to(key: str, value: list) -> list:
    # "none" anywhere means no integrations, the way HF/PaddleFormers read it
    return [] if "none" in value else list(dict.fromkeys(value))


def _fp8_name(key: str, value: str) -> str:
    return "fp8linear" if value == "fp8_linear" else value  # the table spells it fp8_linear


@dataclass
class BasicSection:
    """Model, output and run switches (reference table 1.1 plus ERNIEKit run keys)."""

    model_name_or_path: Optional[str] = option(
        None, "Directory (Hugging Face or Paddle format) or hub id of the base model and its tokenizer. "
        "Needed by every entry point that loads a model.")
    output_dir: str = option(
        "./output", "Where checkpoints, the final model, logs and eval results go. ERNIEKit has no default; "
        "this project uses the shipped configs' ./output.")
    overwrite_output_dir: bool = option(
        False, "Start from scratch even if output_dir already holds checkpoints (otherwise the newest one is resumed).")
    logging_steps: int = option(500, "Log loss, learning rate and speed every this many optimizer steps.", ge=1)
    logging_dir: str = option(
        "./output", "Directory for the training log. When not set it follows output_dir "
        "(ERNIEKit's own default is a runs/ subfolder).")
    do_train: bool = option(False, "Run training.")
    do_eval: bool = option(
        False, "Run evaluation. Turned on when evaluation_strategy is not 'no'; with do_eval and strategy "
        "'no' the strategy becomes 'steps'.")
    do_predict: bool = option(False, "Run prediction on a test set (not available yet).", implemented=False)
    disable_tqdm: bool = option(False, "Hide the progress bar.")
    continue_training: bool = option(
        True, "Start from the weights in model_name_or_path. False initialises a fresh model from its config.json.")
    hidden_dropout_prob: float = option(
        0.0, "Residual (hidden) dropout probability, ramped in over dropout_warmup_steps and scaled per layer.",
        ge=0, lt=1)
    attention_probs_dropout_prob: float = option(
        0.0, "Dropout probability on attention weights, ramped in like hidden_dropout_prob.", ge=0, lt=1)
    dropout_warmup_steps: int = option(
        0, "Steps over which the dropout rates grow linearly from 0 to their configured value, then stay "
        "there; 0 applies the full rate from the first step.", ge=0)
    weight_quantize_algo: Optional[str] = option(
        None, "Quantisation of the frozen base weights. Normally set through compute_type (wint8 -> "
        "weight_only_int8, wint4/8 -> weight_only_mix, fp8 -> fp8linear); fp8_linear is read as fp8linear.",
        implemented=False, choices=("weight_only_int8", "weight_only_mix", "fp8linear", "fp8_linear"),
        normalize=_fp8_name)
    stage: str = option("SFT", "Training objective: SFT or DPO.", choices=("SFT", "DPO"))
    fine_tuning: str = option(
        "LoRA", "Full or LoRA. Sets `lora`. The default is ERNIEKit's (LoRA, reference 12.6), so a config "
        "without this key trains LoRA adapters; write `fine_tuning: Full` for full fine-tuning. When only "
        "`lora` is given, fine_tuning follows it.", choices=("LoRA", "Full"))
    compute_type: str = option(
        "bf16", "Numeric recipe: bf16 (bf16 AMP), fp16 (fp16 AMP with loss scaling), fp8 (FP8 linears, see "
        "the fp8 section), wint8 / wint4/8 (weight-only int8 / int4 experts + int8 rest under LoRA), or "
        "fp32 (no mixed precision; an ernie_core addition). It sets bf16, fp16 and weight_quantize_algo; "
        "setting one of those alone picks the matching compute_type.", implemented=False,
        choices=("bf16", "fp16", "fp32", "fp8", "wint8", "wint4/8"), supported=("bf16", "fp32"))
    report_to: list[str] = option(
        [], "Extra logging integrations (tensorboard, wandb, visualdl, all); empty or none = only the "
        "JSON-lines log in output_dir.", implemented=False,
        item_choices=("none", "all", "tensorboard", "wandb", "visualdl"), normalize=_report_to)


@dataclass
class EvalSection:
    """Evaluation data and schedule (reference table 1.2)."""

    per_device_eval_batch_size: int = option(
        1, "Evaluation micro-batch size (packed rows). Follows per_device_train_batch_size unless set.", ge=1)
    eval_dataset_path: Optional[str] = option(
        None, "Evaluation file(s), comma-separated for several sources.", normalize=_comma_list)
    eval_dataset_prob: str = option(
        "1.0", "Comma-separated sampling weight per eval source (one per path).", normalize=_prob_list)
    eval_dataset_type: str = option(
        "erniekit", "Comma-separated format per eval source (erniekit, alpaca, ...).", normalize=_comma_list)
    eval_steps: Optional[int] = option(
        None, "Evaluate every this many steps when evaluation_strategy is 'steps'; unset = logging_steps.")
    evaluation_strategy: str = option(
        "no", "When to evaluate during training: no, steps (every eval_steps) or epoch. The parameter "
        "table lists 'steps'; the code default is 'no' (do_eval: true switches it to 'steps').",
        choices=("no", "steps", "epoch"))
    max_evaluate_steps: int = option(
        -1, "At most this many eval batches per evaluation; <= 0 evaluates the whole eval set "
        "(the table says 1; the code default is -1).")
    eval_generate_samples: int = option(
        0, "ernie_core only: after training, greedily generate answers for this many eval prompts and "
        "report their exact-match accuracy next to eval loss before/after (0 = off; meant for small "
        "models: generation re-runs the whole prefix per token).", ge=0, implemented=True)
    eval_accumulation_steps: Optional[int] = option(
        None, "Accepted for ERNIEKit compatibility; evaluation here only accumulates the loss, so it has no effect.",
        ge=1)


@dataclass
class TrainSection:
    """Data, schedule and optimizer (reference table 1.3 plus ERNIEKit data/optimizer keys)."""

    train_dataset_path: Optional[str] = option(
        None, "Training file(s), comma-separated for several sources mixed by train_dataset_prob.",
        normalize=_comma_list)
    train_dataset_prob: str = option(
        "1.0", "Comma-separated sampling weight per training source; 0 drops a source, the rest are normalised.",
        normalize=_prob_list)
    train_dataset_type: str = option(
        "erniekit", "Comma-separated format per training source (erniekit, alpaca, ...).", normalize=_comma_list)
    max_steps: int = option(
        -1, "Optimizer steps to run; -1 derives them from num_train_epochs and the data size.",
        ge=1, special=(-1,))
    num_train_epochs: float = option(1.0, "Passes over the training data when max_steps is -1.", gt=0)
    per_device_train_batch_size: int = option(
        1, "Micro-batch size in packed rows (alias: batch_size). Global batch = this x "
        "gradient_accumulation_steps x data-parallel x sharding degree.", ge=1)
    gradient_accumulation_steps: int = option(1, "Micro-batches accumulated per optimizer step.", ge=1)
    learning_rate: float = option(
        5e-5, "Peak learning rate (typical: SFT 3e-5, DPO 1e-6, SFT-LoRA 3e-4, DPO-LoRA 1e-5).", ge=0)
    weight_decay: float = option(0.0, "AdamW weight decay; never applied to bias or norm weights.", ge=0)
    seed: int = option(42, "Random seed for initialisation, shuffling and dropout.")
    max_seq_len: int = option(4096, "Length of a packed row in tokens; longer samples lose whole early turns.", ge=1)
    warmup_steps: int = option(0, "Steps of linear warmup from 0 to learning_rate.", ge=0)
    lr_scheduler_type: str = option(
        "linear", "Learning-rate schedule after warmup.",
        choices=("linear", "cosine", "polynomial", "constant", "constant_with_warmup"))
    min_lr: float = option(0.0, "Floor of the cosine schedule.", ge=0)
    decay_steps: Optional[int] = option(
        None, "Length N of the decay (the schedule is computed against N); unset = max_steps.", ge=1)
    layerwise_lr_decay_bound: float = option(
        1.0, "Smallest per-layer LR factor: layer depth d gets b + d/(L+2)*(1-b); 1 disables it.", gt=0, le=1)
    random_shuffle: bool = option(True, "Shuffle the training data.")
    num_cycles: float = option(0.5, "Cosine schedule: number of waves (0.5 = one half-wave down to min_lr).", gt=0)
    lr_end: float = option(1e-7, "Polynomial schedule: final learning rate.", ge=0)
    power: float = option(1.0, "Polynomial schedule: exponent.", gt=0)
    adam_beta1: float = option(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = option(0.999, "AdamW beta2 (the shipped configs use 0.95).", ge=0, lt=1)
    adam_epsilon: float = option(1e-8, "AdamW epsilon.", ge=0)
    optim: str = option(
        "adamw", "Optimizer: adamw, or adamw_custom (AdamW with the memory options of the fp8 section).",
        choices=("adamw", "adamw_custom"))
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this value; 0 disables clipping.", ge=0)
    packing: bool = option(True, "Pack several samples into each row; false gives one sample per row.",
                           implemented=False)
    mix_strategy: str = option(
        "random", "How sources are mixed: random (by probability), concat (every row, probabilities ignored), "
        "interleave_under / interleave_over (stop when the first / every source runs out).", implemented=False,
        choices=("random", "concat", "interleave_under", "interleave_over"))
    dataset_type: str = option(
        "iterable", "iterable = read and pack on the fly; map = pre-built offline data under offline_dataset_path.",
        implemented=False, choices=("iterable", "map"))
    offline_dataset_path: Optional[str] = option(
        None, "Folder with offline indexed data (train/ and eval/), used when dataset_type is map.",
        implemented=False)
    split: str = option("950,50", "Train/eval split ratio of offline indexed data (dataset_type map only).",
                        implemented=False)


def _unified_ckpt(key: str, value: str) -> str:
    items = value.split()
    if "enable_all_options" in items:  # PaddleFormers expands it to these three
        items += ["skip_save_model_weight", "master_weight_compatible", "async_save"]
    return " ".join(dict.fromkeys(items))


@dataclass
class CheckpointSection:
    """Checkpoint saving, resuming and export (reference table 1.6 plus ERNIEKit keys)."""

    save_steps: int = option(500, "Save a checkpoint every this many steps when save_strategy is 'steps'.")
    save_strategy: str = option(
        "steps", "When to save checkpoints: no, steps or epoch. The parameter table lists 'no'; the code default "
        "is 'steps'.", choices=("no", "steps", "epoch"))
    save_total_limit: Optional[int] = option(
        None, "Keep at most this many checkpoints, deleting the oldest; unset keeps all.", ge=1)
    unified_checkpoint: bool = option(
        True, "Save checkpoints independent of the parallel layout. ernie_core always writes Hugging Face "
        "format, which already is.")
    unified_checkpoint_config: str = option(
        "", "Space-separated unified-checkpoint options. ernie_core checkpoints are always unified (merged by "
        "parameter name, any layout), and O2 master weights are saved with the optimizer state and restored on "
        "resume. remove_master_weight: do not save them; they are rebuilt from the saved bf16 weights on load. "
        "master_weight_compatible: always on here (a checkpoint without master weights resumes under O2 from "
        "its weights; one with them resumes under O1 with the fp32 masters as weights). ignore_merge_optimizer: "
        "inert, the optimizer state is one merged file. skip_save_model_weight: inert, every checkpoint keeps "
        "its model weights (a loadable HF model). async_save: inert, checkpoints are written synchronously "
        "(atomic rename, so a crash mid-save never corrupts one). enable_all_options = skip_save_model_weight "
        "master_weight_compatible async_save.",
        sep=" ", normalize=_unified_ckpt,
        item_choices=("async_save", "skip_save_model_weight", "master_weight_compatible",
                      "remove_master_weight", "ignore_merge_optimizer", "enable_all_options"))
    disable_ckpt_quant: bool = option(False, "Never compress optimizer state in checkpoints.")
    ckpt_quant_stage: str = option(
        "O0", "Optimizer-state compression in checkpoints: O0 off, O1 int8, O2 int4. Here the default is O0 "
        "even for full SFT (ERNIEKit switches to O1 unless disable_ckpt_quant); LoRA never compresses.",
        implemented=False, choices=("O0", "O1", "O2"))
    ignore_save_lr_and_optim: bool = option(False, "Do not save optimizer and scheduler state in checkpoints.")
    ignore_load_lr_and_optim: bool = option(False, "Do not restore optimizer and scheduler state when resuming.")
    max_shard_size: int = option(5, "Largest safetensors shard of a saved model, in GB.", ge=1)
    save_on_each_node: bool = option(
        False, "On multi-node runs without shared storage, save on every node instead of only the first.")
    ignore_data_skip: bool = option(
        False, "On resume, do not replay the data already consumed (faster, but the data order changes).")
    hf_hub_id: Optional[str] = option(None, "Hub repository to upload the exported model to (not available).",
                                      implemented=False)


@dataclass
class SftSection:
    """SFT data sampling (reference table 2.1)."""

    num_samples_each_epoch: int = option(
        6000000, "Rows drawn per virtual epoch across all sources, split by probability (keep the default).", ge=1)
    max_estimate_samples: int = option(
        100000, "At most this many rows are packed to estimate max_steps when it is -1.", ge=1)
