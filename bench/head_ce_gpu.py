"""Fused LM head + cross-entropy on a GPU versus the naive computation, time and peak memory.

Naive: logits = h W^T ([N, V] bf16), fp32 cross-entropy, autograd backward (dh, dW). Fused: the
backend kernels (`fused_head_ce` fwd_bwd of "cuda" and "triton"), which never hold more than a
chunk of logits. Peak memory is what the call allocates above its inputs (torch.cuda peak stats).
Default shape: ERNIE 4.5 0.3B's head, 32K tokens x 103424 vocab x 1024 hidden.

    python bench/head_ce_gpu.py --json out.json     # on a GPU
    python bench/head_ce_gpu.py --dry-run           # CPU: shapes and the naive memory estimate
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--vocab", type=int, default=103424)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--chunk-tokens", type=int, default=0, help="0: the kernel's default")
    ap.add_argument("--impls", nargs="+", default=["naive", "cuda", "triton"])
    ap.add_argument("--rep-ms", type=int, default=300)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--json")
    return ap.parse_args(argv)


def naive_bytes(N, V, H, elem=2):
    """The naive path's big tensors: bf16 logits, their fp32 upcast, fp32 log-softmax (saved for
    backward), fp32 and bf16 logits gradients; what autograd actually keeps alive is measured."""
    return {"logits": N * V * elem, "logits_fp32": N * V * 4, "log_softmax_fp32": N * V * 4,
            "grad_logits_fp32": N * V * 4, "grad_logits": N * V * elem, "flops": 3 * 2.0 * N * V * H}


def make_impl(name, h, w, labels, chunk):
    if name == "naive":
        import torch.nn.functional as F

        def naive():
            hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
            loss = F.cross_entropy((hh @ ww.t()).float(), labels, reduction="sum")
            dh, dw = torch.autograd.grad(loss, (hh, ww))
            return loss, dh, dw

        return naive
    from ernie_core.ops import _backend

    if not _backend.has_kernel("fused_head_ce", name, "fwd_bwd"):
        return None
    fn = _backend.kernel("fused_head_ce", name, "fwd_bwd")
    return lambda: fn(h, w, labels, -100, chunk)


def run(args):
    import triton.testing

    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(args.tokens, args.hidden, device=dev, dtype=torch.bfloat16, generator=gen)
    w = (torch.randn(args.vocab, args.hidden, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02)
    labels = torch.randint(0, args.vocab, (args.tokens,), device=dev, generator=gen)
    labels[::7] = -100
    rows, ref = [], None
    for name in args.impls:
        row = {"impl": name, "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden}
        try:
            fn = make_impl(name, h, w, labels, args.chunk_tokens)
            if fn is None:
                rows.append({**row, "status": "not built"})
                continue
            out = fn()  # warm-up, and the values to compare
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            ms = triton.testing.do_bench(fn, rep=args.rep_ms, return_mode="median")
            loss, dh, dw = float(out[0]), out[-2], out[-1]
            row.update(status="ok", ms=ms, peak_mib=peak / 2**20, loss_sum=loss)
            if ref is None:
                ref = (loss, dh.float(), dw.float())
            else:
                row["loss_rel_diff"] = abs(loss - ref[0]) / abs(ref[0])
                row["dh_rel_err"] = float((dh.float() - ref[1]).norm() / ref[1].norm())
                row["dw_rel_err"] = float((dw.float() - ref[2]).norm() / ref[2].norm())
            del out, dh, dw
        except Exception as e:
            row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        torch.cuda.empty_cache()
    naive = next((r for r in rows if r["impl"] == "naive" and r["status"] == "ok"), None)
    for r in rows:
        if naive and r["status"] == "ok" and r is not naive:
            r["mem_pct_of_naive"] = 100.0 * r["peak_mib"] / naive["peak_mib"]
            r["time_ratio_vs_naive"] = r["ms"] / naive["ms"]
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        est = naive_bytes(args.tokens, args.vocab, args.hidden)
        rows = [{"impl": "naive-estimate", **{k: (v / 2**20 if k != "flops" else v) for k, v in est.items()}}]
    else:
        if not torch.cuda.is_available():
            sys.exit("head_ce_gpu.py needs a CUDA device (use --dry-run to check the set-up)")
        rows = run(args)
    for r in rows:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "head_ce_gpu", "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
