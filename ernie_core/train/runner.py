"""Builds the run a config asks for (stage, single process or torchrun) and runs it."""
from __future__ import annotations

from ..errors import UserError


def run_training(cfg) -> dict:
    stage = str(cfg.basic.stage).upper()
    if stage == "SFT":
        from .sft import SFTObjective

        objective = SFTObjective()
    else:
        raise UserError(f"not supported yet: stage={cfg.basic.stage}")
    from .trainer import Trainer

    trainer = Trainer(cfg, objective)
    trainer.setup()
    state = trainer.train()
    if trainer.is_main:
        from .report import print_report

        print_report(trainer)
    return state
