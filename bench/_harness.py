"""Tiny benchmark harness shared by every script in bench/.

`measure(fn)` times a callable (median / p20 / p80 over repeats, after warm-up) and reports the
peak memory it allocated: CUDA peak for GPU work, else the growth of the process's peak RSS
measured in a fresh child process when `isolate=True` (RSS peaks never go down in-process).
`write_results(name, rows)` prints a table and writes JSON to bench/results/ with the hostname
and date in the file name.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import socket
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(fn: Callable[[], object], warmup: int = 1, repeats: int = 5, device: str = "cpu") -> dict:
    """Run fn warmup + repeats times; return times (s) and peak memory (MiB) of one call."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    row = {
        "median_s": statistics.median(times),
        "p20_s": times[int(0.2 * (len(times) - 1))],
        "p80_s": times[int(round(0.8 * (len(times) - 1)))],
        "repeats": repeats,
    }
    if device == "cuda":
        row["peak_mem_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise OSError("no VmHWM in /proc/self/status")


def measure_peak_cpu_memory(fn: Callable[[], object]) -> float:
    """Extra peak memory (MiB) that one call of fn needs on CPU, in this process: Linux resets the
    high-water mark (VmHWM) to the current RSS when "5" is written to /proc/self/clear_refs, so the
    peak after fn minus the RSS before it is what fn added. (A forked child, the earlier way, can
    hang in the OpenMP runtime once the parent has run parallel torch ops.)"""
    import ctypes
    import gc

    gc.collect()
    try:  # hand the heap's free pages back first: reused pages would hide fn's allocations
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: measure as is
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = current_rss_mib()
    fn()
    return max(0.0, _vm_hwm_mib() - base)


def environment() -> dict:
    env = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    if not rows:
        return
    columns = columns or list(rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def write_results(name: str, rows: list[dict], columns: list[str] | None = None, extra: dict | None = None) -> Path:
    """Print the table and write bench/results/<name>-<host>-<date>.json."""
    print_table(rows, columns)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    env = environment()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS_DIR / f"{name}-{env['host']}-{stamp}.json"
    path.write_text(json.dumps({"benchmark": name, "env": env, "rows": rows, **(extra or {})}, indent=2))
    print(f"wrote {path}")
    return path


def measure_interleaved(fns: dict[str, Callable[[], object]], warmup: int = 1, repeats: int = 5) -> dict[str, dict]:
    """Time several callables round-robin (a, b, c, a, b, c, ...) so that load on a shared machine
    hits them alike. Per callable: median/p20/p80 wall seconds and the median process CPU seconds
    (all threads; on a loaded box the CPU time is the steadier measure of the work done)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    out = {}
    for name in fns:
        times = sorted(wall[name])
        out[name] = {
            "median_s": statistics.median(times),
            "p20_s": times[int(0.2 * (len(times) - 1))],
            "p80_s": times[int(round(0.8 * (len(times) - 1)))],
            "cpu_s": statistics.median(cpu[name]),
            "repeats": repeats,
        }
    return out


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 3) -> dict:
    """torch.matmul rate at n^3 in this process now: wall GFLOP/s (all threads) and per CPU second."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    row = measure_interleaved({"mm": lambda: torch.matmul(a, b)}, warmup=1, repeats=repeats)["mm"]
    flops = 2.0 * n**3
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "gflops": flops / row["median_s"] / 1e9,
            "gflops_per_cpu_s": flops / row["cpu_s"] / 1e9}
