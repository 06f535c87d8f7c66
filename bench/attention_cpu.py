"""FlashMask attention (C++ CPU kernel) versus torch SDPA with the equivalent dense boolean mask.

Forward + backward, B=1, Hq=8, Hkv=2, D=64, S in 2048/4096/8192, causal document masks (documents
of 128..1024 tokens) and share-prompt (DPO) masks; time, peak extra memory, ratios. Achieved
GFLOP/s count only the visible (row, column) pairs: fwd+bwd = 2 (fwd) + 5 (bwd) GEMMs of
2 * visible * D flops per head.

    python bench/attention_cpu.py            # full run, JSON to bench/results/
    python bench/attention_cpu.py --quick    # small sizes, a few seconds

Peak memory is measured by the harness in a forked child that runs single-threaded (libgomp's
thread pool does not survive fork), so it counts buffers, not per-thread scratch differences.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

from ernie_core.ops import _backend, flashmask_attention  # noqa: E402
from ernie_core.ops.reference import startend_row_indices_to_mask  # noqa: E402

B, HQ, HKV, D = 1, 8, 2, 64


def document_indices(S: int, rng: random.Random) -> torch.Tensor:
    """Causal LTS for packed documents of 128..1024 tokens (the last one cut at S)."""
    lts, off = [], 0
    while off < S:
        n = min(rng.randint(128, 1024), S - off)
        lts += [off + n] * n
        off += n
    return torch.tensor(lts, dtype=torch.int32).view(1, 1, S, 1)


def share_prompt_indices(S: int, rng: random.Random) -> torch.Tensor:
    """Causal LTS for DPO pairs (ernie_reference §4.2): prompt P, chosen C, rejected R; the
    rejected rows skip the chosen columns. Trailing columns that fit no pair are padding."""
    lts, off = [], 0
    while True:
        P, C, R = rng.randint(128, 1024), rng.randint(64, 512), rng.randint(64, 512)
        T = P + C + R
        if off + T > S:
            break
        lts += [off + T] * P + [off + P + C] * C + [off + T] * R
        off += T
    lts += list(range(off, S))
    return torch.tensor(lts, dtype=torch.int32).view(1, 1, S, 1)


def visible_pairs(idx: torch.Tensor) -> int:
    return int(startend_row_indices_to_mask(idx, True).sum())


def make_runs(S: int, idx: torch.Tensor):
    g = torch.Generator().manual_seed(S)
    q = torch.randn(B, S, HQ, D, generator=g).requires_grad_()
    k = torch.randn(B, S, HKV, D, generator=g).requires_grad_()
    v = torch.randn(B, S, HKV, D, generator=g).requires_grad_()
    dout = torch.randn(B, S, HQ, D, generator=g)
    # SDPA takes [B, H, S, D]; transposing outside the timed region keeps the comparison to the kernels.
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    dout_t = dout.transpose(1, 2).contiguous()
    dense = startend_row_indices_to_mask(idx, True)  # [1, 1, S, S] bool, True = may attend

    def flashmask():
        out = flashmask_attention(q, k, v, idx, causal=True)
        out.backward(dout)
        q.grad = k.grad = v.grad = None

    def sdpa():
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=dense, enable_gqa=True)
        out.backward(dout_t)
        qt.grad = kt.grad = vt.grad = None

    return flashmask, sdpa


def single_thread(fn):
    def run():
        torch.set_num_threads(1)
        fn()

    return run


def bench_case(S: int, kind: str, idx: torch.Tensor, repeats: int, memory: bool) -> list[dict]:
    flashmask, sdpa = make_runs(S, idx)
    flops = 7 * 2 * visible_pairs(idx) * D * HQ
    rows = []
    for name, fn in (("flashmask", flashmask), ("sdpa_dense_mask", sdpa)):
        row = {"S": S, "mask": kind, "impl": name, **_harness.measure(fn, warmup=1, repeats=repeats)}
        row["gflops"] = flops / row["median_s"] / 1e9
        if memory:
            row["peak_mem_mib"] = _harness.measure_peak_cpu_memory(single_thread(fn))
        rows.append(row)
    fm, sd = rows
    fm["speedup_vs_sdpa"] = sd["median_s"] / fm["median_s"]
    if memory:
        fm["mem_ratio_vs_sdpa"] = fm["peak_mem_mib"] / max(sd["peak_mem_mib"], 1e-9)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="S = 1024, 2048 and 2 repeats")
    parser.add_argument("--seqs", type=int, nargs="*", help="sequence lengths (default 2048 4096 8192)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child runs")
    args = parser.parse_args(argv)
    if not _backend.has_kernel("flashmask_attention", "cpu"):
        sys.exit("the C++ kernels are not built: pip install --no-build-isolation -e .")
    os.environ["ERNIE_CORE_BACKEND"] = "cpu"
    seqs = args.seqs or ([1024, 2048] if args.quick else [2048, 4096, 8192])
    repeats = args.repeats or (2 if args.quick else 3)
    rows = []
    for S in seqs:
        for kind, build in (("documents", document_indices), ("share_prompt", share_prompt_indices)):
            idx = build(S, random.Random(S))
            rows += bench_case(S, kind, idx, repeats, memory=not args.no_memory)
    columns = ["S", "mask", "impl", "median_s", "p20_s", "p80_s", "gflops", "peak_mem_mib", "speedup_vs_sdpa",
               "mem_ratio_vs_sdpa"]
    _harness.write_results("attention_cpu" + ("-quick" if args.quick else ""), rows, columns,
                           extra={"shape": {"B": B, "Hq": HQ, "Hkv": HKV, "D": D}, "dtype": "float32"})


if __name__ == "__main__":
    main()
