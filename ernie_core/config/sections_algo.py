"""Algorithm config sections: lora, dpo, fp8.

`implemented=False` marks a capability ernie_core does not have yet: flip it in that one line
when it lands (docs/config.md is regenerated with `python -m ernie_core.config.docs`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ernie_core.errors import ConfigError

from ._field import option, show


@dataclass
class LoraSection:
    """LoRA adapters (reference table 2.2)."""

    lora: bool = option(
        True, "Train LoRA adapters on every attention and FFN linear (experts included) with the base frozen. "
        "Follows fine_tuning, whose default LoRA makes this true (the table lists false).")
    lora_rank: int = option(8, "Adapter rank r (typical 8/16/32).", ge=1)
    lora_alpha: float = option(
        -1.0, "Adapter scale numerator: scaling = alpha/r, or alpha/sqrt(r) with rslora. -1 means 2r "
        "(4 with rslora).", gt=0, special=(-1,))
    rslora: bool = option(False, "Rank-stabilised scaling alpha/sqrt(r) (helps from rank 64 up).")
    lora_plus_scale: float = option(1.0, "LoRA+: learning-rate multiplier for the B matrices only (try 4-16).", gt=0)
    rslora_plus: bool = option(
        False, "Shortcut for rslora: true, lora_plus_scale: 4, lora_alpha: 4 (overrides those keys).")
    lora_path: Optional[str] = option(None, "Adapter to start from: a PEFT adapter folder (adapter_config.json + "
                                      "adapter_model.safetensors, as ernie_core and peft save them) or an ERNIEKit "
                                      "one (lora_config.json + peft_model*.safetensors [+ index] or "
                                      "lora_model_state.pdparams); its r, lora_alpha and rslora must match the run's.")

    def scaling(self) -> float:
        """The factor applied to x·A·B: alpha/r, or alpha/sqrt(r) with rslora; alpha -1 -> 2r (4 with rslora).

        >>> LoraSection(lora_rank=32).scaling()
        2.0
        """
        r = self.lora_rank
        alpha = self.lora_alpha
        if alpha == -1:
            alpha = 4.0 if self.rslora else 2.0 * r
        return alpha / math.sqrt(r) if self.rslora else alpha / r


DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "dpop", "kto_pair", "sppo_hard", "nca_pair", "or", "orpo")


@dataclass
class DpoSection:
    """DPO objective and preference data (reference table 2.3 plus ERNIEKit DPO keys)."""

    beta: float = option(0.1, "Temperature of the preference loss.", gt=0)
    simpo_gamma: float = option(0.5, "SimPO target margin gamma.", ge=0)
    offset_alpha: float = option(
        0.0, "Score-based margin for the sigmoid loss: the margin grows with log(score gap); 0 = plain DPO.", ge=0)
    max_prompt_len: int = option(
        2048, "Longest prompt kept: older prompt turns are dropped beyond it (responses stay whole); capped at "
        "max_seq_len - 10.", ge=1)
    loss_type: str = option(
        "sigmoid", "Preference loss: sigmoid, hinge, ipo, simpo, dpop, kto_pair, sppo_hard, nca_pair, or, "
        "orpo (= or + reference_free + sft_loss_ratio 1).", choices=DPO_LOSS_TYPES)
    pref_loss_ratio: float = option(1.0, "Weight of the preference loss.", ge=0)
    sft_loss_ratio: float = option(0.0, "Weight of an SFT loss on the chosen answers.", ge=0)
    label_smoothing: float = option(
        0.0, "Label smoothing of the sigmoid/simpo losses (assumed fraction of flipped preferences).", ge=0, le=0.5)
    reference_free: bool = option(
        False, "No reference model (reference log-probs are 0); for sigmoid, hinge, ipo, simpo, or/orpo.")
    ref_model_update_steps: int = option(
        -1, "Copy the policy into the reference model every this many steps; -1 never (always under LoRA).",
        ge=1, special=(-1,))
    normalize_logps: bool = option(
        True, "Rescale chosen/rejected log-prob sums to their mean length (losses without length means).")
    dpop_lambda: float = option(50.0, "DPOP penalty weight on a chosen log-prob drop below the reference.", ge=0)
    mask_out_eos_token: bool = option(True, "Do not train the end-of-turn token of the answers.")
    buffer_size: int = option(500, "Samples buffered for greedy packing of DPO pairs.", ge=1)


def _power_of_two(key: str, value: int) -> int:
    if value & (value - 1):
        raise ConfigError(f"config key '{key}': {show(value)} is not a power of two (expected e.g. 32)")
    return value


@dataclass
class Fp8Section:
    """FP8 training and the memory-lean AdamW (reference table 2.4 plus ERNIEKit FP8 keys)."""

    apply_hadamard: bool = option(True, "Rotate FP8 linear inputs/weights by a block Hadamard matrix first.",
                                  implemented=False)
    hadamard_block_size: int = option(32, "Block size of the Hadamard rotation (in-features must divide by it).",
                                      implemented=False, ge=1, normalize=_power_of_two)
    use_lowprecision_moment: bool = option(
        False, "Keep Adam moments in bf16 (optim adamw_custom); the update itself runs in fp32. Single process.")
    tensorwise_offload_optimizer: bool = option(
        False, "Keep master weights and moments in pinned host memory, moved to the GPU one tensor at a time "
        "during the step (optim adamw_custom; the same mechanism as offload_optim). Single process.")
    apply_online_actscale_step: int = option(
        200, "Steps that use each step's own activation scale before switching to the moving average "
        "(the table types it bool; it is a step count).", implemented=False, ge=0)
    actscale_moving_rate: float = option(0.01, "Weight of a new step in the activation-scale moving average.",
                                         implemented=False, gt=0, le=1)
    optim_shard_num: int = option(
        1, "Optimizer state files per rank when unified_checkpoint_config has ignore_merge_optimizer.",
        implemented=False, ge=1)
    fp8_format_type: str = option("hybrid", "hybrid (e4m3 forward, e5m2 gradients) or e4m3 everywhere.",
                                  implemented=False, choices=("hybrid", "e4m3"))
    quant_input_grad: bool = option(False, "Compute input gradients of FP8 linears in FP8 too.", implemented=False)
    quant_weight_grad: bool = option(False, "Compute weight gradients of FP8 linears in FP8 too.",
                                     implemented=False)
