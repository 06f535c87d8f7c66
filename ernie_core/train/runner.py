"""Builds the run a config asks for (stage, single process or torchrun) and runs it."""
from __future__ import annotations

from ..errors import UserError


def run_training(cfg) -> dict:
    stage = str(cfg.basic.stage).upper()
    if stage == "SFT":
        from .sft import SFTObjective

        objective = SFTObjective()
    elif stage == "DPO":
        from .dpo import DPOObjective

        objective = DPOObjective.from_config(cfg)
    else:
        raise UserError(f"not supported yet: stage={cfg.basic.stage}")
    from ..parallel import parallel_session
    from .trainer import Trainer

    # Under torchrun (WORLD_SIZE > 1): process group + mesh, and a failing rank stops every rank.
    with parallel_session(cfg) as par:
        if not par.is_main:  # every rank reads the same files: their notes (dropped rows, ...) once
            import logging

            logging.getLogger("ernie_core.data").setLevel(logging.ERROR)
        trainer = Trainer(cfg, objective, rank=par.rank, world_size=par.world_size, parallel=par)
        trainer.setup()
        state = trainer.train()
        if trainer.is_main:
            from .report import print_report

            if par.dims.distributed and cfg.basic.do_train:  # the sharded model needs every rank: report on the saved one
                from ..models import Ernie4_5ForCausalLM
                from .trainer import model_runtime_kwargs

                trainer.model = Ernie4_5ForCausalLM.from_pretrained(str(trainer.output_dir),
                                                                    **model_runtime_kwargs(cfg)).to(trainer.device)
            print_report(trainer)
    return state
