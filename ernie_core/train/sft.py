"""The SFT objective: erniekit/alpaca data packed into FlashMask rows, mean token cross-entropy."""
from __future__ import annotations

import torch


class SFTObjective:
    """Data and loss of supervised fine-tuning (docs/behaviour.md#sft-data-format, #loss-batch-optimizer)."""

    name = "SFT"

    def validate(self, cfg, tok) -> None:
        from ..data import validate_datasets

        validate_datasets(cfg, tok)

    def build_stream(self, cfg, tok, *, dp_rank: int, dp_world: int):
        from ..data import build_train_stream

        return build_train_stream(cfg, tok, dp_rank=dp_rank, dp_world=dp_world)

    def build_eval_batches(self, cfg, tok) -> list[dict]:
        from ..data import build_eval_batches

        return build_eval_batches(cfg, tok)

    def estimate_max_steps(self, cfg, tok) -> int:
        from ..data import estimate_max_steps

        return estimate_max_steps(cfg, tok)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """Mean fp32 CE over labelled tokens of one micro-batch; no extra metrics."""
        out = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"),
                    attn_mask_startend_row_indices=batch.get("attn_mask_startend_row_indices"),
                    labels=batch["labels"])
        return out.loss, {}

    # -- pipeline parallelism (parallel/pipeline.py): a stage is the model minus what it does not own
    def stage_forward(self, model, x, batch: dict):
        """One pipeline stage: the model's own forward; the last stage returns the loss of its configured
        head (dense, fused or sparse; vocab-parallel under tensor parallelism), the others their hidden state."""
        from ..parallel.reference import module_forward

        out = module_forward(model, x, batch["position_ids"], batch.get("attn_mask_startend_row_indices"),
                             labels=batch["labels"])
        return out if model.lm_head is None else out.loss

    def stage_loss(self, output, batch: dict, index: int) -> tuple[torch.Tensor, dict]:
        return output, {}

    def before_pipeline_step(self, runner, micro_batches: list[dict]) -> None:
        """Nothing to prepare: SFT needs no second model."""

    def on_step_end(self, trainer) -> None:
        """Hook after each optimizer step (DPO uses it to refresh its reference model)."""
