"""Fused LM head + cross-entropy (chunked, C++ CE kernel) versus logits + F.cross_entropy.

Forward + backward of the mean CE over labelled tokens, tokens 8192, hidden 1024, vocab 103424
(10% of the labels ignored, as prompts are in SFT); time, peak extra memory, ratios. GFLOP/s use
6 * N * H * V (the logits GEMM and the two gradient GEMMs), which both paths perform.

    python bench/head_ce_cpu.py             # full size (the naive path needs ~10 GiB)
    python bench/head_ce_cpu.py --quick     # tokens 1024, vocab 32000

Peak memory is measured by the harness in a forked child that runs single-threaded (libgomp's
thread pool does not survive fork).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

from ernie_core.ops import _backend, fused_head_ce  # noqa: E402


def make_runs(N: int, H: int, V: int, dtype: torch.dtype, chunk: int | None):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * H**-0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.1] = -100

    def clear():
        hidden.grad = weight.grad = None

    def fused(sparse=False):
        loss, n = fused_head_ce(hidden, weight, labels, chunk_tokens=chunk, sparse=sparse)
        (loss / n).backward()
        clear()

    def naive():
        logits = hidden @ weight.t()
        loss = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
        (loss / (labels != -100).sum()).backward()
        clear()

    return {"fused": fused, "fused_sparse": lambda: fused(sparse=True), "naive": naive}


def single_thread(fn):
    def run():
        torch.set_num_threads(1)
        fn()

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tokens 1024, vocab 32000")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=103424)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="default: ~256 MiB of fp32 logits")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child runs")
    parser.add_argument("--impls", nargs="*", default=["fused", "fused_sparse", "naive"],
                        help="which paths to run (naive last, as the ratios' baseline)")
    args = parser.parse_args(argv)
    if not _backend.has_kernel("fused_head_ce", "cpu", "fwd_bwd"):
        sys.exit("the C++ kernels are not built: pip install --no-build-isolation -e .")
    os.environ["ERNIE_CORE_BACKEND"] = "cpu"
    N, H, V = (1024, 1024, 32000) if args.quick else (args.tokens, args.hidden, args.vocab)
    dtype = getattr(torch, args.dtype)
    runs = make_runs(N, H, V, dtype, args.chunk_tokens)
    rows = []
    for name in args.impls:
        fn = runs[name]
        row = {"impl": name, "tokens": N, "hidden": H, "vocab": V, "dtype": args.dtype}
        row.update(_harness.measure(fn, warmup=1 if args.quick else 0, repeats=args.repeats))
        row["gflops"] = 6 * N * H * V / row["median_s"] / 1e9
        if not args.no_memory:
            row["peak_mem_mib"] = _harness.measure_peak_cpu_memory(single_thread(fn))
        rows.append(row)
    naive = next((r for r in rows if r["impl"] == "naive"), None)
    for row in rows if naive else []:
        if row is naive:
            continue
        row["time_ratio_vs_naive"] = row["median_s"] / naive["median_s"]
        if not args.no_memory:
            row["mem_ratio_vs_naive"] = row["peak_mem_mib"] / max(naive["peak_mem_mib"], 1e-9)
    columns = ["impl", "tokens", "hidden", "vocab", "dtype", "median_s", "p20_s", "p80_s", "gflops", "peak_mem_mib",
               "time_ratio_vs_naive", "mem_ratio_vs_naive"]
    _harness.write_results("head_ce_cpu" + ("-quick" if args.quick else ""), rows, columns)


if __name__ == "__main__":
    main()
