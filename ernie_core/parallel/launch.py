"""Process-group set-up from the torchrun environment, and clean failure across ranks.

torchrun (single or multi node, `--nnodes` + rendezvous) exports RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/PORT; `init_process_group` reads them. The backend follows the device: nccl on GPUs,
gloo on CPU; nothing else in ernie_core branches on it.

A rank that fails must not leave the others waiting forever in a collective. Two things ensure it:
every collective has a timeout (`timeout_s`), and a failing rank tears its process group down
before re-raising, which makes the peers' pending collectives fail at once (gloo: connection
closed; nccl: communicator aborted) rather than after the timeout. torchrun then stops the
remaining workers as well.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist

from ..errors import UserError

DEFAULT_TIMEOUT_S = 900.0
TIMEOUT_ENV = "ERNIE_CORE_DIST_TIMEOUT_S"


def launched_by_torchrun() -> bool:
    """True when this process is one of several started by torchrun (or any launcher that sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def collective_timeout_s() -> float:
    """Timeout of every collective: ERNIE_CORE_DIST_TIMEOUT_S if set, else 15 minutes (a first step that
    compiles kernels or loads a large checkpoint can legitimately keep a rank busy for minutes)."""
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        return float(value)
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None


def init_distributed(timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Join the process group of this torchrun job; returns (rank, world_size, device)."""
    timeout = datetime.timedelta(seconds=timeout_s or collective_timeout_s())
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    return dist.get_rank(), dist.get_world_size(), device


def abort_process_group() -> None:
    """Tear the process group down without waiting for peers (they may be the ones that failed)."""
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    try:
        if abort is not None and dist.get_backend() == "nccl":
            abort()
        else:
            dist.destroy_process_group()
    except Exception:  # already broken: nothing left to release
        pass


@contextlib.contextmanager
def rank_failure_guard(rank: int, world_size: int, *, owns_group: bool = True):
    """Run the body; on an error, say which rank failed, abort the group so peers stop, re-raise.
    A clean exit leaves the group (after a barrier) when this run created it (`owns_group`).

    UserErrors (bad config or data) are printed by the entry point as usual; they are normally raised
    by every rank alike, so only their message matters."""
    try:
        yield
    except BaseException as e:
        if not isinstance(e, (UserError, KeyboardInterrupt)):
            print(f"error: rank {rank} of {world_size} failed: {type(e).__name__}: {e}\n"
                  "  (every rank stops; on the other ranks a failed collective is a consequence of this one)",
                  file=sys.stderr, flush=True)
        abort_process_group()
        raise
    else:
        if dist.is_initialized():
            dist.barrier()
            if owns_group:
                dist.destroy_process_group()


@contextlib.contextmanager
def parallel_session(cfg):
    """The run's ParallelContext: joins the torchrun job when launched by torchrun (and leaves it at
    the end), else a single-process context. Degrees are validated here, before any work."""
    from .context import ParallelContext

    if not launched_by_torchrun():
        yield ParallelContext.from_config(cfg)
        return
    owns_group = not dist.is_initialized()  # a test harness may have joined the job already
    rank, world, device = init_distributed()
    with rank_failure_guard(rank, world, owns_group=owns_group):
        ctx = ParallelContext.from_config(cfg, rank=rank, world_size=world, device=device)
        if rank == 0:
            print(f"parallel layout: {ctx.dims.describe()}, backend {dist.get_backend()}", flush=True)
        yield ctx
