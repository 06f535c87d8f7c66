"""FlashMask attention (C++ CPU kernel) versus torch SDPA: its flash kernel at its best, and with the
equivalent dense boolean mask.

Forward + backward, B=1, Hq=8, Hkv=2, D=64 (--dims 64 128), bf16 and fp32, S in 2048/4096/8192.
Masks and the SDPA formulations they are compared with (`sdpa_flash`, SDPA's flash kernel):
  causal          plain causal: SDPA `is_causal=True`;
  documents       packed documents of 128..1024 tokens: one `is_causal` SDPA call per document;
  long_documents  documents of 1024..4096 tokens: one `is_causal` call per document;
  share_prompt    DPO pairs (prompt P, chosen C, rejected R; rejected rows skip the chosen columns):
                  two `is_causal` calls per pair, on [P, C] and on [P, R] (the prompt gathered twice,
                  its K/V gradients summed by autograd): the standard unshared DPO formulation;
and `sdpa_dense_mask`: SDPA with the [S, S] boolean mask (its math path), --no-dense skips it.
The implementations run interleaved in one process (a, b, c, a, b, c, ...); the table gives wall
and process CPU time, GFLOP/s over the visible (row, column) pairs (fwd+bwd = 2 (fwd) + 5 (bwd)
GEMMs of 2 * visible * D flops per head) and that rate as a fraction of torch.matmul's rate in the
same dtype measured in the same run. Ratios use the wall medians; the CPU-time ratio is given too,
because on a shared machine it moves less.

Dropout rows (p = 0.1, share-prompt masks, S = 2048/4096, fp32): the kernel with attention dropout versus
the path dropout took before the kernel had it (autograd through the reference with F.dropout on
the [S, S] probabilities) and versus today's reference fallback (the same with the kernels' hashed
keep mask, what CUDA tensors get); plus the kernel at p = 0 for the cost of the mask itself.

    python bench/attention_cpu.py                  # full run, JSON to bench/results/
    python bench/attention_cpu.py --quick          # small sizes, a few seconds
    python bench/attention_cpu.py --dropout-only   # only the dropout rows

Peak memory (--memory) is measured in-process by the harness (VmHWM reset before the call),
single-threaded, so it counts buffers, not per-thread scratch differences.
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
# The checkout this script belongs to, ahead of any installed ernie_core (else `python bench/...`
# from a second worktree would time the installed package's kernels).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _harness  # noqa: E402

from ernie_core.ops import _backend, flashmask_attention  # noqa: E402
from ernie_core.ops import reference as ref  # noqa: E402
from ernie_core.ops.reference import startend_row_indices_to_mask  # noqa: E402

B, HQ, HKV, D = 1, 8, 2, 64
DROPOUT_P = 0.1  # attention_probs_dropout_prob of ERNIEKit's 0.3B DPO config


def document_lengths(S: int, rng: random.Random, lo: int = 128, hi: int = 1024) -> list[int]:
    """Packed documents of lo..hi tokens filling S (the last one cut at S)."""
    out, off = [], 0
    while off < S:
        out.append(min(rng.randint(lo, hi), S - off))
        off += out[-1]
    return out


def document_indices(S: int, rng: random.Random, lo: int = 128, hi: int = 1024) -> torch.Tensor:
    """Causal LTS for packed documents of lo..hi tokens."""
    lts, off = [], 0
    for n in document_lengths(S, rng, lo, hi):
        lts += [off + n] * n
        off += n
    return torch.tensor(lts, dtype=torch.int32).view(1, 1, S, 1)


def share_prompt_pairs(S: int, rng: random.Random) -> list[tuple[int, int, int]]:
    """DPO pairs (prompt P, chosen C, rejected R) packed into S; the rest is padding."""
    pairs, off = [], 0
    while True:
        P, C, R = rng.randint(128, 1024), rng.randint(64, 512), rng.randint(64, 512)
        if off + P + C + R > S:
            return pairs
        pairs.append((P, C, R))
        off += P + C + R


def share_prompt_indices(S: int, rng: random.Random) -> torch.Tensor:
    """Causal LTS for DPO pairs: prompt P, chosen C, rejected R; the rejected rows skip the chosen
    columns. Trailing columns that fit no pair are padding (they see only themselves)."""
    lts, off = [], 0
    for P, C, R in share_prompt_pairs(S, rng):
        T = P + C + R
        lts += [off + T] * P + [off + P + C] * C + [off + T] * R
        off += T
    lts += list(range(off, S))
    return torch.tensor(lts, dtype=torch.int32).view(1, 1, S, 1)


def visible_pairs(idx: torch.Tensor) -> int:
    return int(startend_row_indices_to_mask(idx, True).sum())


def sdpa_segments(kind: str, S: int, seed: int) -> list[list[tuple[int, int]]]:
    """The causal SDPA calls that compute `kind`'s mask: each call a list of (start, end) spans of
    the packed sequence, concatenated (None for the dense-mask-only case)."""
    rng = random.Random(seed)
    if kind == "causal":
        return [[(0, S)]]
    if kind in ("documents", "long_documents"):
        lo, hi = (128, 1024) if kind == "documents" else (1024, 4096)
        calls, off = [], 0
        for n in document_lengths(S, rng, lo, hi):
            calls.append([(off, off + n)])
            off += n
        return calls
    calls, off = [], 0
    for P, C, R in share_prompt_pairs(S, rng):
        calls += [[(off, off + P + C)], [(off, off + P), (off + P + C, off + P + C + R)]]
        off += P + C + R
    return calls  # padding rows see nothing (their LTS = j hides even the diagonal): no call


def mask_indices(kind: str, S: int, seed: int) -> torch.Tensor:
    if kind == "causal":
        return torch.full((1, 1, S, 1), S, dtype=torch.int32)
    if kind == "documents":
        return document_indices(S, random.Random(seed))
    if kind == "long_documents":
        return document_indices(S, random.Random(seed), 1024, 4096)
    return share_prompt_indices(S, random.Random(seed))


def make_runs(S: int, kind: str, D: int, dtype: torch.dtype, dense: bool, seed: int):
    idx = mask_indices(kind, S, seed)
    g = torch.Generator().manual_seed(S)
    q = torch.randn(B, S, HQ, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, S, HKV, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, S, HKV, D, generator=g).to(dtype).requires_grad_()
    dout = torch.randn(B, S, HQ, D, generator=g).to(dtype)
    # SDPA takes [B, H, S, D]; transposing outside the timed region keeps the comparison to the kernels.
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    dout_t = dout.transpose(1, 2).contiguous()
    calls = sdpa_segments(kind, S, seed)

    def flashmask():
        out = flashmask_attention(q, k, v, None if kind == "causal" else idx, causal=True)
        out.backward(dout)
        q.grad = k.grad = v.grad = None

    def sdpa_flash():
        outs, douts = [], []
        for spans in calls:
            if len(spans) == 1:  # a contiguous span: views, no copy
                (s0, s1), = spans
                sl = (slice(None), slice(None), slice(s0, s1))
                qs, ks, vs, ds = qt[sl], kt[sl], vt[sl], dout_t[sl]
            else:
                pos = torch.cat([torch.arange(s0, s1) for s0, s1 in spans])
                qs, ks, vs, ds = (t.index_select(2, pos) for t in (qt, kt, vt, dout_t))
                ds = ds.clone()
                ds[:, :, : spans[0][1] - spans[0][0]] = 0  # the prompt rows' output belongs to the other call
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True))
            douts.append(ds)
        torch.autograd.backward(outs, douts)
        qt.grad = kt.grad = vt.grad = None

    runs = {"flashmask": flashmask, "sdpa_flash": sdpa_flash}
    if dense:
        mask = startend_row_indices_to_mask(idx, True)  # [1, 1, S, S] bool, True = may attend

        def sdpa_dense():
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)
            out.backward(dout_t)
            qt.grad = kt.grad = vt.grad = None

        runs["sdpa_dense_mask"] = sdpa_dense
    return idx, runs


def single_thread(fn):
    def run():  # restores the thread count: later timings must not run single-threaded
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fn()
        finally:
            torch.set_num_threads(threads)

    return run


def bench_case(S: int, kind: str, D: int, dtype: torch.dtype, repeats: int, memory: bool, dense: bool,
               mm: dict) -> list[dict]:
    idx, runs = make_runs(S, kind, D, dtype, dense, seed=S)
    flops = 7 * 2 * visible_pairs(idx) * D * HQ
    timed = _harness.measure_interleaved(runs, warmup=1, repeats=repeats)
    rows = []
    for name, t in timed.items():
        row = {"S": S, "mask": kind, "dtype": str(dtype).replace("torch.", ""), "D": D, "impl": name, **t}
        row["gflops"] = flops / row["median_s"] / 1e9
        row["pct_of_matmul"] = 100.0 * flops / row["cpu_s"] / 1e9 / mm[row["dtype"]]["gflops_per_cpu_s"]
        if memory:
            row["peak_mem_mib"] = _harness.measure_peak_cpu_memory(single_thread(runs[name]))
        rows.append(row)
    fm = rows[0]
    for other in rows[1:]:
        fm[f"speedup_vs_{other['impl']}"] = other["median_s"] / fm["median_s"]
        fm[f"cpu_speedup_vs_{other['impl']}"] = other["cpu_s"] / fm["cpu_s"]
        if memory:
            fm[f"mem_ratio_vs_{other['impl']}"] = fm["peak_mem_mib"] / max(other["peak_mem_mib"], 1e-9)
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
    parser.add_argument("--dims", type=int, nargs="*", default=[64], help="head dims (default 64)")
    parser.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--masks", nargs="*", default=["causal", "documents", "long_documents", "share_prompt"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--memory", action="store_true", help="also measure peak extra memory per call")
    parser.add_argument("--no-dense", action="store_true", help="skip SDPA with the dense [S, S] mask")
    parser.add_argument("--dropout-seqs", type=int, nargs="*", help="dropout rows' lengths (default 2048 4096)")
    parser.add_argument("--dropout-only", action="store_true", help="only the dropout rows")
    parser.add_argument("--no-dropout", action="store_true", help="skip the dropout rows")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch (and kernel) threads, 0: torch's default; 1 gives the steadiest numbers on a busy machine")
    args = parser.parse_args(argv)
    if not _backend.has_kernel("flashmask_attention", "cpu"):
        sys.exit("the C++ kernels are not built: pip install --no-build-isolation -e .")
    os.environ["ERNIE_CORE_BACKEND"] = "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    seqs = args.seqs or ([1024, 2048] if args.quick else [2048, 4096, 8192])
    repeats = args.repeats or (2 if args.quick else 3)
    dtypes = [getattr(torch, d) for d in args.dtypes]
    mm = {str(d).replace("torch.", ""): _harness.matmul_gflops(d) for d in dtypes}
    print("matmul 2048^3 in this run:", {k: f"{v['gflops']:.0f} GFLOP/s wall, {v['gflops_per_cpu_s']:.0f} per CPU s"
                                         for k, v in mm.items()})
    rows = []
    if not args.dropout_only:
        for dtype in dtypes:
            for D in args.dims:
                for S in seqs:
                    for kind in args.masks:
                        if kind == "long_documents" and S < 4096:
                            continue
                        rows += bench_case(S, kind, D, dtype, repeats, args.memory, not args.no_dense, mm)
                        _harness.print_table(rows[-(2 if args.no_dense else 3):], ["S", "mask", "dtype", "D", "impl",
                                                                                   "median_s", "cpu_s", "gflops",
                                                                                   "pct_of_matmul"])
    dropout_rows = []
    if not args.no_dropout:
        dropout_seqs = args.dropout_seqs or ([512, 1024] if args.quick else [2048, 4096])
        for S in dropout_seqs:
            dropout_rows += bench_dropout_case(S, share_prompt_indices(S, random.Random(S)), repeats,
                                               memory=args.memory)
    columns = ["S", "mask", "dtype", "D", "impl", "median_s", "cpu_s", "gflops", "pct_of_matmul",
               "speedup_vs_sdpa_flash", "cpu_speedup_vs_sdpa_flash", "speedup_vs_sdpa_dense_mask", "peak_mem_mib"]
    dropout_columns = ["S", "impl", "dropout_p", "median_s", "p20_s", "p80_s", "peak_mem_mib",
                       "speedup_vs_reference_dropout_old", "mem_ratio_vs_reference_dropout_old",
                       "speedup_vs_reference_dropout_hash", "mem_ratio_vs_reference_dropout_hash",
                       "dropout_time_overhead"]
    if rows:
        print()
        _harness.print_table(rows, columns)
        print()
    name = "attention_cpu" + ("-dropout" if args.dropout_only else "") + ("-quick" if args.quick else "")
    _harness.write_results(name, rows + dropout_rows, columns if rows else dropout_columns,
                           extra={"shape": {"B": B, "Hq": HQ, "Hkv": HKV}, "matmul": mm, "threads": torch.get_num_threads(),
                                  "load_avg_at_end": os.getloadavg()})


if __name__ == "__main__":
    main()
