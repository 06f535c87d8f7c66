"""FlashMask attention (C++ CPU kernel) versus torch SDPA with the equivalent dense boolean mask.

Forward + backward, B=1, Hq=8, Hkv=2, D=64, S in 2048/4096/8192, causal document masks (documents
of 128..1024 tokens) and share-prompt (DPO) masks; time, peak extra memory, ratios. Achieved
GFLOP/s count only the visible (row, column) pairs: fwd+bwd = 2 (fwd) + 5 (bwd) GEMMs of
2 * visible * D flops per head.

Dropout rows (p = 0.1, share-prompt masks, S = 2048/4096): the kernel with attention dropout versus
the path dropout took before the kernel had it (autograd through the reference with F.dropout on
the [S, S] probabilities) and versus today's reference fallback (the same with the kernels' hashed
keep mask, what CUDA tensors get); plus the kernel at p = 0 for the cost of the mask itself.

    python bench/attention_cpu.py                  # full run, JSON to bench/results/
    python bench/attention_cpu.py --quick          # small sizes, a few seconds
    python bench/attention_cpu.py --dropout-only   # only the dropout rows

Peak memory is measured in-process by the harness (VmHWM reset before the call), single-threaded,
so it counts buffers, not per-thread scratch differences.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

from ernie_core.ops import _backend, flashmask_attention  # noqa: E402
from ernie_core.ops import reference as ref  # noqa: E402
from ernie_core.ops.reference import startend_row_indices_to_mask  # noqa: E402

B, HQ, HKV, D = 1, 8, 2, 64
DROPOUT_P = 0.1  # attention_probs_dropout_prob of ERNIEKit's 0.3B DPO config


def document_indices(S: int, rng: random.Random) -> torch.Tensor:
    """Causal LTS for packed documents of 128..1024 tokens (the last one cut at S)."""
    lts, off = [], 0
    while off < S:
        n = min(rng.randint(128, 1024), S - off)
        lts += [off + n] * n
        off += n
    return torch.tensor(lts, dtype=torch.int32).view(1, 1, S, 1)


def share_prompt_indices(S: int, rng: random.Random) -> torch.Tensor:
    """Causal LTS for DPO pairs (docs/behaviour.md#dpo-pair-layout): prompt P, chosen C, rejected R; the
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
    def run():  # restores the thread count: later timings must not run single-threaded
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fn()
        finally:
            torch.set_num_threads(threads)

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


def _f_dropout(probs, dropout_p, rng_state):
    return F.dropout(probs, p=dropout_p, training=True)


def make_dropout_runs(S: int, idx: torch.Tensor):
    """Forward + backward callables: kernel at p and 0, the pre-kernel path, today's reference fallback."""
    g = torch.Generator().manual_seed(S)
    q = torch.randn(B, S, HQ, D, generator=g).requires_grad_()
    k = torch.randn(B, S, HKV, D, generator=g).requires_grad_()
    v = torch.randn(B, S, HKV, D, generator=g).requires_grad_()
    dout = torch.randn(B, S, HQ, D, generator=g)

    def backward(out):
        out.backward(dout)
        q.grad = k.grad = v.grad = None

    def kernel(p):
        return lambda: backward(flashmask_attention(q, k, v, idx, causal=True, dropout_p=p))

    def reference_hash():
        backward(ref.flashmask_attention_reference(q, k, v, idx, True, None, DROPOUT_P))

    def reference_old():  # the front door's dropout path before the kernel had it: F.dropout on probs
        with mock.patch.object(ref, "_apply_dropout", _f_dropout):
            backward(ref.flashmask_attention_reference(q, k, v, idx, True, None, DROPOUT_P))

    return {"flashmask_p0": kernel(0.0), "flashmask_dropout": kernel(DROPOUT_P),
            "reference_dropout_old": reference_old, "reference_dropout_hash": reference_hash}


def bench_dropout_case(S: int, idx: torch.Tensor, repeats: int, memory: bool) -> list[dict]:
    rows = {}
    for name, fn in make_dropout_runs(S, idx).items():
        p = 0.0 if name == "flashmask_p0" else DROPOUT_P
        n = repeats if name.startswith("reference") else max(repeats, 7)  # kernels are cheap: more repeats
        row = {"S": S, "mask": "share_prompt", "impl": name, "dropout_p": p,
               **_harness.measure(fn, warmup=1, repeats=n)}
        if memory:
            row["peak_mem_mib"] = _harness.measure_peak_cpu_memory(single_thread(fn))
        rows[name] = row
    fm = rows["flashmask_dropout"]
    for other in ("reference_dropout_old", "reference_dropout_hash"):
        fm[f"speedup_vs_{other}"] = rows[other]["median_s"] / fm["median_s"]
        if memory:
            fm[f"mem_ratio_vs_{other}"] = fm["peak_mem_mib"] / max(rows[other]["peak_mem_mib"], 1e-9)
    fm["dropout_time_overhead"] = fm["median_s"] / rows["flashmask_p0"]["median_s"] - 1.0
    return list(rows.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="S = 1024, 2048 and 2 repeats")
    parser.add_argument("--seqs", type=int, nargs="*", help="sequence lengths (default 2048 4096 8192)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child runs")
    parser.add_argument("--dropout-seqs", type=int, nargs="*", help="dropout rows' lengths (default 2048 4096)")
    parser.add_argument("--dropout-only", action="store_true", help="only the dropout rows")
    args = parser.parse_args(argv)
    if not _backend.has_kernel("flashmask_attention", "cpu"):
        sys.exit("the C++ kernels are not built: pip install --no-build-isolation -e .")
    os.environ["ERNIE_CORE_BACKEND"] = "cpu"
    seqs = args.seqs or ([1024, 2048] if args.quick else [2048, 4096, 8192])
    repeats = args.repeats or (2 if args.quick else 3)
    rows = []
    if not args.dropout_only:
        for S in seqs:
            for kind, build in (("documents", document_indices), ("share_prompt", share_prompt_indices)):
                idx = build(S, random.Random(S))
                rows += bench_case(S, kind, idx, repeats, memory=not args.no_memory)
    dropout_seqs = args.dropout_seqs or ([512, 1024] if args.quick else [2048, 4096])
    dropout_rows = []
    for S in dropout_seqs:
        dropout_rows += bench_dropout_case(S, share_prompt_indices(S, random.Random(S)), repeats,
                                           memory=not args.no_memory)
    columns = ["S", "mask", "impl", "median_s", "p20_s", "p80_s", "gflops", "peak_mem_mib", "speedup_vs_sdpa",
               "mem_ratio_vs_sdpa"]
    dropout_columns = ["S", "impl", "dropout_p", "median_s", "p20_s", "p80_s", "peak_mem_mib",
                       "speedup_vs_reference_dropout_old", "mem_ratio_vs_reference_dropout_old",
                       "speedup_vs_reference_dropout_hash", "mem_ratio_vs_reference_dropout_hash",
                       "dropout_time_overhead"]
    if rows:
        _harness.print_table(rows, columns)
        print()
    name = "attention_cpu" + ("-dropout" if args.dropout_only else "") + ("-quick" if args.quick else "")
    _harness.write_results(name, rows + dropout_rows, dropout_columns,
                           extra={"shape": {"B": B, "Hq": HQ, "Hkv": HKV, "D": D}, "dtype": "float32"})


if __name__ == "__main__":
    main()
