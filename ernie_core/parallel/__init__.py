"""Parallelism applied from outside to the plain model (docs/design.md), on torch.distributed.

    from ernie_core.parallel import parallel_session
    with parallel_session(cfg) as par:            # torchrun -> process group + named mesh; else one process
        model = par.parallelize(model)             # TP/SP -> pipeline split -> dp / ZeRO sharding

Degrees: `dims.py`; launch and failure handling: `launch.py`; plans: `tensor_parallel.py`,
`pipeline.py`, `data_parallel.py`; layout-independent checkpoints: `state.py`; the trainer-facing
calls: `context.py`; communication accounting: `comm_stats.py`; a vocab-sharded head's token
log-probs: `vocab_parallel.py`; code run as a wrapped module's forward and frozen FSDP weight
snapshots (DPO's reference): `reference.py`.
"""
from .context import ParallelContext, ParallelOptions, options_from_config
from .dims import MESH_DIMS, ParallelDims, build_mesh, dims_from_config, resolve_dims
from .launch import init_distributed, launched_by_torchrun, parallel_session, rank_failure_guard

__all__ = [
    "MESH_DIMS", "ParallelContext", "ParallelDims", "ParallelOptions", "build_mesh", "dims_from_config",
    "init_distributed", "launched_by_torchrun", "options_from_config", "parallel_session", "rank_failure_guard",
    "resolve_dims",
]
