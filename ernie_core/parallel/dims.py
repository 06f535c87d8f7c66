"""Parallel degrees, validated once, and the named device mesh built from them.

The world is a 4-D grid `dp x sharding x pp x tp` (ERNIEKit's axes; tp varies fastest so a
tensor-parallel group sits on neighbouring ranks, i.e. inside one node). `dp` is derived: whatever
is left of the world after tp, pp and sharding. The data-parallel "replicas" that read different
data are the `dp x sharding` ranks (docs/behaviour.md#mixing-and-virtual-epochs: global batch = dp*sharding*bs*accum).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

MESH_DIMS = ("dp", "sharding", "pp", "tp")

def parse_option_list(key: str, value, known) -> set[str]:
    """A space-separated ERNIEKit option string (`pipeline_parallel_config: "a b"`) as a set; an
    option not in `known` stops the run naming the key and listing the known ones."""
    opts = set(str(value or "").split())
    unknown = opts - set(known)
    if unknown:
        raise ConfigError(f"{key}: unknown option(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
    return opts

_STAGES = {"stage1": 1, "stage2": 2, "stage3": 3}


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each axis (all >= 1, product = world_size) plus the ZeRO stage (0 = none)."""

    dp: int = 1
    sharding: int = 1
    pp: int = 1
    tp: int = 1
    sharding_stage: int = 0
    world_size: int = 1
    sharding_offload: bool = False  # `sharding: stage2 offload`: sharded state lives in host memory

    @property
    def data_world(self) -> int:
        """Ranks that train on different slices of each global batch."""
        return self.dp * self.sharding

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        stage = f" stage{self.sharding_stage}" if self.sharding_stage else ""
        return f"dp={self.dp} sharding={self.sharding}{stage} pp={self.pp} tp={self.tp} (world {self.world_size})"


def parse_sharding_stage(sharding: str) -> int:
    """'stage2 offload' -> 2; '' -> 0."""
    stages = [_STAGES[t] for t in str(sharding or "").split() if t in _STAGES]
    return stages[0] if stages else 0


def resolve_dims(world_size: int, *, tensor_parallel_degree: int = 1, pipeline_parallel_degree: int = 1,
                 sharding_parallel_degree: int = -1, sharding: str = "") -> ParallelDims:
    """Check the degrees against the world size and derive dp; every error names the keys to change.

    sharding_parallel_degree -1 means "all data-parallel ranks" when a sharding stage is set
    (ERNIEKit), else no sharding.
    """
    tp, pp = max(1, tensor_parallel_degree), max(1, pipeline_parallel_degree)
    stage = parse_sharding_stage(sharding)
    if world_size < tp * pp:
        raise ConfigError(f"tensor_parallel_degree={tp} x pipeline_parallel_degree={pp} needs {tp * pp} processes, this "
                          f"run has {world_size}; launch with `torchrun --nproc-per-node {tp * pp} -m ernie_core.train "
                          "CONFIG.yaml ...` (or a multiple of it for data parallelism)")
    launch = f"launch with `torchrun --nproc-per-node N -m ernie_core.train ...` where N is a multiple of {tp * pp}"
    if world_size % (tp * pp):
        raise ConfigError(f"tensor_parallel_degree={tp} x pipeline_parallel_degree={pp} = {tp * pp} does not divide "
                          f"the {world_size} process(es) of this run; {launch}, or lower the degrees")
    data_world = world_size // (tp * pp)
    if sharding_parallel_degree in (-1, 0):
        shard = data_world if stage else 1
    else:
        shard = sharding_parallel_degree
    if shard > 1 and not stage:
        raise ConfigError(f"sharding_parallel_degree={shard} needs a sharding stage: set sharding to stage1, stage2 "
                          "or stage3 (or sharding_parallel_degree to 1)")
    if data_world % shard:
        raise ConfigError(f"sharding_parallel_degree={shard} does not divide the {data_world} data-parallel rank(s) "
                          f"left after tensor_parallel_degree={tp} x pipeline_parallel_degree={pp} on "
                          f"{world_size} process(es)")
    if shard == 1:
        stage = 0  # a stage over one rank shards nothing: plain data parallelism
    offload = stage in (2, 3) and "offload" in str(sharding or "").split()
    return ParallelDims(dp=data_world // shard, sharding=shard, pp=pp, tp=tp, sharding_stage=stage,
                        world_size=world_size, sharding_offload=offload)


def dims_from_config(cfg, world_size: int) -> ParallelDims:
    d = cfg.dist
    return resolve_dims(world_size, tensor_parallel_degree=d.tensor_parallel_degree,
                        pipeline_parallel_degree=d.pipeline_parallel_degree,
                        sharding_parallel_degree=d.sharding_parallel_degree, sharding=d.sharding)


def build_mesh(dims: ParallelDims, device_type: str):
    """The 4-D named mesh plus the flattened `data` (dp x sharding) dim; None for one process."""
    if not dims.distributed:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (dims.dp, dims.sharding, dims.pp, dims.tp), mesh_dim_names=MESH_DIMS)
    mesh["dp", "sharding"]._flatten("data")  # one group for gradient/loss averaging over all replicas
    return mesh
