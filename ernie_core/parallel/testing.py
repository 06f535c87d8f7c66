"""Run code in N local gloo processes, the way torchrun would (tests and bench/parallel_cpu.py).

`spawn(fn, world_size, *args)` starts N fresh interpreters with torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on a free port), joins them into one gloo process group,
calls `fn(*args)` on each and returns the per-rank results; a rank that raises makes `spawn`
raise with that rank's traceback. Joining once and running several layouts inside one spawn
pays the interpreter start-up (seconds each on a 2-core machine) once.
"""
from __future__ import annotations

import os
import socket
import traceback
from typing import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # several ranks share the cores; oversubscription only slows everyone down
    try:
        from .launch import init_distributed

        init_distributed(timeout_s)
        queue.put((rank, "ok", fn(*args)))
    except BaseException:  # report everything, including SystemExit from a CLI entry point
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args, timeout_s: float = 600.0) -> list:
    """fn(*args) on every rank of a fresh `world_size`-process gloo job; returns results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, timeout_s), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout_s)
            (results if status == "ok" else errors)[rank] = value
            if errors:
                break
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 5)
            if p.is_alive():
                p.terminate()
                p.join()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]
