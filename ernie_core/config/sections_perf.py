"""Performance config sections: dist, memory, accel, precision, moe.

`implemented=False` marks a capability ernie_core does not have yet: flip it in that one line
when it lands (docs/config.md is regenerated with `python -m ernie_core.config.docs`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ernie_core.errors import ConfigError

from . import amp_ops
from ._field import option, show


def _sharding(key: str, value: str) -> str:
    tokens = list(dict.fromkeys(value.split()))
    stages = [t for t in tokens if t.startswith("stage")]
    if len(stages) > 1:
        raise ConfigError(f"config key '{key}': {show(value)} names more than one stage (expected one of "
                          "stage1, stage2, stage3, optionally with offload)")
    if "offload" in tokens and not (set(stages) & {"stage2", "stage3"}):
        raise ConfigError(f"config key '{key}': {show(value)}: offload needs stage2 or stage3")
    return " ".join(tokens)


def _seg_method(key: str, value):
    if isinstance(value, list):
        if len(value) < 2 or value[0] != 0 or any(b <= a for a, b in zip(value, value[1:])):
            raise ConfigError(f"config key '{key}': {show(value)} is not a valid layer split (expected "
                              "increasing layer bounds starting at 0, e.g. [0, 29, 57])")
    elif value != "uniform" and not value.startswith("layer:"):
        raise ConfigError(f"config key '{key}': {show(value)} is not a valid split method (expected 'uniform', "
                          "'layer:<layer class names>' or a list of layer bounds)")
    return value


def _degree(key: str, value: int) -> int:
    return 1 if value == -1 else value  # Paddle uses -1 for "not parallel"


@dataclass
class DistSection:
    """Parallel layout (reference table 1.4)."""

    tensor_parallel_degree: int = option(
        1, "Tensor-parallel ways (each layer split over this many devices); -1 reads as 1.",
        ge=1, special=(-1,), normalize=_degree)
    tensor_parallel_config: str = option(
        "", "Space-separated tensor-parallel options, e.g. 'sync_param sync_grad sync_moment'.",
        sep=" ")
    tensor_parallel_output: bool = option(
        True, "With tensor parallelism, keep logits vocab-sharded and use a vocab-parallel cross-entropy.")
    pipeline_parallel_degree: int = option(
        1, "Pipeline stages; -1 reads as 1.", ge=1, special=(-1,), normalize=_degree)
    pipeline_parallel_config: str = option(
        "", "Space-separated pipeline options, e.g. 'disable_partial_send_recv enable_delay_scale_loss'.",
        sep=" ")
    pp_seg_method: Union[str, list[int]] = option(
        "layer:Ernie4_5_DecoderLayer|EmptyLayer", "How layers are split over pipeline stages: "
        "'layer:Ernie4_5_DecoderLayer|EmptyLayer' (by layer count), 'uniform', or layer bounds such as "
        "[0, 29, 57] (one more entry than stages).", normalize=_seg_method)
    virtual_pp_degree: int = option(
        1, "Virtual pipeline chunks per stage (interleaved schedule); needs pipeline_parallel_degree > 1.",
        ge=1)
    add_tail_layers: int = option(0, "Empty layers appended after the decoder layers to balance pipeline stages.",
                                  ge=0)
    sharding_parallel_degree: int = option(
        -1, "Ranks that share optimizer state (ZeRO group); -1 = all data-parallel ranks, 1 = no sharding.",
        ge=1, special=(-1,), supported=(-1, 1))
    sharding_parallel_config: str = option(
        "", "Space-separated sharding options, e.g. 'enable_stage1_overlap enable_release_grads'.",
        sep=" ")
    sharding: str = option(
        "", "ZeRO stage: stage1 (optimizer state), stage2 (+ gradients) or stage3 (+ parameters); "
        "stage2/stage3 may add 'offload', e.g. 'stage2 offload'.", sep=" ",
        item_choices=("stage1", "stage2", "stage3", "offload"), normalize=_sharding)
    sequence_parallel: bool = option(
        False, "Megatron-style sequence parallelism; only active with tensor_parallel_degree > 1 and "
        "switched off otherwise (the table lists true; the code default is false).")
    use_sp_callback: bool = option(
        False, "All-reduce sequence-parallel parameter gradients in a callback instead of hooks; "
        "turned off with sharding stage2.")
    moe_group: str = option(
        "dummy", "Expert-parallel group: dummy (none), mp/tp (experts over the tensor-parallel group), "
        "dp/data (experts over data-parallel ranks).", implemented=False,
        choices=("dummy", "mp", "tp", "dp", "data"))


@dataclass
class MemorySection:
    """Memory savers (reference table 1.5 plus ERNIEKit recompute keys)."""

    release_grads: bool = option(False, "Free gradients after every optimizer step to lower peak memory.")
    use_sparse_head_and_loss_fn: bool = option(
        False, "Run the LM head only on positions that carry a label. DPO always does this.")
    use_fused_head_and_loss_fn: bool = option(
        False, "Compute LM head + cross-entropy in chunks so full logits never exist.")
    recompute_use_reentrant: bool = option(
        True, "Reentrant activation checkpointing (true) or the hook-based variant (false). Code default "
        "true, as in all shipped configs (the table lists false).")
    recompute: bool = option(False, "Recompute activations in backward instead of storing them.")
    recompute_granularity: str = option(
        "full", "What is recomputed: full (whole layer), full_attn (attention sublayer), core_attn (RoPE + "
        "attention kernel).", choices=("full", "full_attn", "core_attn"))
    offload_optim: bool = option(
        False, "Keep optimizer state and master weights in host memory (pinned with CUDA) between steps; the "
        "step moves one tensor's state at a time to the device (a no-op on CPU-only runs). Single process; "
        "with sharding use 'sharding: stage2 offload'.")
    no_recompute_layers: Optional[list[int]] = option(
        None, "Layer indices exempt from recompute.", implemented=False)
    offload_recompute_inputs: bool = option(
        False, "Keep recompute inputs in host memory (reentrant, full granularity, no pipeline).",
        implemented=False)
    refined_recompute: str = option(
        "", "Per-op recompute skip counts under pipeline parallelism, e.g. 'flash_attn:-1,mlp_row_ln:5'.",
        implemented=False)
    use_recompute_moe: bool = option(
        False, "Also recompute MoE experts (turns granularity 'full' into 'full_attn').", implemented=False)
    loss_subbatch_seqlen: int = option(
        32768, "Tokens per chunk of the fused head + loss; unset = 32768 for SFT and 1024 for DPO.",
        implemented=False, ge=1)
    use_recompute_loss_fn: bool = option(
        True, "Recompute the fused head + loss chunks in backward (SFT uses the fused head only with this).",
        implemented=False)


@dataclass
class AccelSection:
    """Kernels and data-loading speed-ups (reference table 1.7)."""

    use_flash_attention: bool = option(True, "Use the flash attention kernel where available.")
    use_sparse_flash_attn: bool = option(
        True, "FlashMask attention on start-row indices (needs use_attn_mask_start_row_indices); "
        "false uses a dense mask built from the same indices.")
    use_attn_mask_start_row_indices: bool = option(
        True, "Describe the packed-document mask by start-row indices (false = dense [S, S] mask). "
        "Alias: use_attn_mask_startend_row_indices.")
    fuse_rope: bool = option(False, "Fused rotary-embedding kernel.")
    fuse_linear: bool = option(False, "Fused linear kernels (turned off under LoRA).")
    greedy_intokens: bool = option(
        True, "Greedy packing: fill the open row with the most room from a buffer of samples; false packs "
        "samples in order (next-fit).")
    dataloader_num_workers: int = option(
        0, "Data-loading worker processes; 0 loads in the main process (the table says 1; code default 0).",
        ge=0)
    distributed_dataloader: bool = option(
        False, "Read data on one rank per model-parallel group and broadcast it.")
    moe_multimodal_dispatch_use_allgather: str = option(
        "v2-alltoall-unpad", "MoE token dispatch: empty = capacity-padded all-to-all; otherwise all-gather, "
        "with an all-to-all back if it contains 'alltoall', unpadded if it contains 'unpad'.",
        implemented=False)


@dataclass
class PrecisionSection:
    """Mixed precision (reference table 1.8). bf16/fp16 follow compute_type."""

    bf16: bool = option(
        True, "bf16 mixed precision. Set by compute_type (ERNIEKit forces it on; the table lists false); "
        "`bf16: false` alone selects compute_type fp32.")
    fp16: bool = option(False, "fp16 mixed precision with loss scaling; `fp16: true` alone selects "
                        "compute_type fp16.", implemented=False, supported=(False,))
    fp16_opt_level: str = option(
        "O1", "AMP level. O0: fp32, no autocast. O1: fp32 weights, bf16 autocast for matmuls and attention. "
        "O2 (all shipped configs): weights stored in bf16 (the MoE router gate stays fp32; LoRA adapters stay "
        "fp32 and are their own master weights), autocast still on, fp32 master weights in the optimizer take "
        "the update, which is then rounded into the bf16 weights. Full fine-tuning at O2 runs on one process "
        "for now (LoRA at O2 has no master weights and runs under any layout). compute_type fp32 means O0.", choices=("O0", "O1", "O2"))
    scale_loss: float = option(32768.0, "Initial fp16 loss scale (no effect under bf16).", gt=0)
    amp_custom_white_list: Optional[list[str]] = option(
        None, "Ops run in bf16 under AMP (Paddle op names, list or space-separated). ernie_core's precision is "
        "fixed per op and matches ERNIEKit's shipped lists; naming an op ernie_core keeps in fp32 is an error, an "
        "unknown name is ignored with a warning. " + amp_ops.mapping_text())
    amp_custom_black_list: Optional[list[str]] = option(
        None, "Ops kept in fp32 under AMP (Paddle op names, list or space-separated). Checked like "
        "amp_custom_white_list: the shipped list (reduce_sum, softmax_with_cross_entropy, "
        "c_softmax_with_cross_entropy, elementwise_div, sin, cos) is what the model does at every AMP level; "
        "naming a matmul/attention/embedding op is an error.")
    amp_master_grad: bool = option(
        False, "Under O2: accumulate the gradients of the bf16 weights in fp32 buffers (over all gradient "
        "accumulation steps), clip and update from them; false: gradients accumulate in bf16 and are upcast "
        "at the step. No effect at O0/O1 (the gradients of fp32 weights are fp32).")


@dataclass
class MoeSection:
    """MoE routing losses and multi-token prediction (ERNIEKit model keys, 21B/300B only)."""

    moe_aux_loss_lambda: float = option(1e-5, "Weight of the load-balancing auxiliary loss (gradient only).",
                                        implemented=False, ge=0)
    moe_z_loss_lambda: float = option(0.0, "Weight of the router z-loss.", implemented=False, ge=0)
    moe_orthogonal_loss_lambda: float = option(0.0, "Weight of the router orthogonality loss.",
                                               implemented=False, ge=0)
    moe_use_hard_gate: bool = option(False, "Route by a fixed rule instead of the learned gate.", implemented=False)
    moe_use_aux_free: Optional[bool] = option(
        None, "Bias-corrected (aux-loss-free) routing; unset = as in the model's config.json.", implemented=False)
    moe_group_experts: bool = option(False, "Group-wise top-k over expert gate logits.", implemented=False)
    moe_with_send_router_loss: bool = option(False, "Send router losses between pipeline stages.",
                                             implemented=False)
    moe_use_aux_free_update_coef: float = option(
        1e-3, "Update rate of the routing correction bias (frozen during SFT/DPO).", implemented=False, ge=0)
    num_nextn_predict_layers: int = option(
        0, "Multi-token-prediction blocks to train; fine-tuning keeps 0.", implemented=False, ge=0)
    multi_token_pred_lambda: float = option(0.3, "Loss weight of the multi-token-prediction blocks.",
                                            implemented=False, ge=0)
