"""Builds the run a config asks for (stage, single process or torchrun) and runs it."""
from __future__ import annotations

from ..errors import UserError


def run_training(cfg) -> dict:
    stage = str(cfg.basic.stage).upper()
    if stage == "SFT":
        from .trainer import SFTTrainer

        trainer = SFTTrainer(cfg)
    else:
        raise UserError(f"not supported yet: stage={cfg.basic.stage}")
    trainer.setup()
    state = trainer.train()
    if trainer.is_main:
        from .report import print_report

        print_report(trainer)
    return state
