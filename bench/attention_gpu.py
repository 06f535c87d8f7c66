"""FlashMask attention forward+backward on a GPU: our Triton and CUDA kernels versus
`scaled_dot_product_attention` and FlexAttention with a block mask built from the same indices.

FLOPs count only the work the mask allows (FlashMask's convention): forward 4 * D * pairs per
head (QK^T and PV, 2 FLOPs per multiply-add), backward 2.5x that (five GEMMs to the forward's
two), where pairs = allowed (query, key) pairs, counted exactly from the indices. TFLOP/s over
the median time (CUDA events, triton.testing.do_bench); % of the dense bf16 peak (--peak-tflops,
default the H100/H200 SXM datasheet's 989).

    python bench/attention_gpu.py --json out.json          # on a GPU
    python bench/attention_gpu.py --dry-run                # CPU: configuration and FLOP counts only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ernie_core.ops.triton._mask import allowed_pairs, column_spans, example_indices  # noqa: E402

MASKS = {"causal": True, "causal_doc": True, "share_prompt": True}  # mode -> causal flag


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--masks", nargs="+", default=list(MASKS), choices=list(MASKS))
    ap.add_argument("--heads", type=int, default=16, help="query heads (ERNIE 4.5 0.3B: 16)")
    ap.add_argument("--kv-heads", type=int, default=2, help="key/value heads (ERNIE 4.5 0.3B: 2)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--docs", type=int, default=8, help="documents per row for causal_doc")
    ap.add_argument("--impls", nargs="+", default=["cuda", "triton", "sdpa", "flex", "cuda_dropout", "triton_dropout"])
    ap.add_argument("--sdpa-mask-max-s", type=int, default=8192,
                    help="longest S at which SDPA runs with a dense mask (it materialises [S, S])")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition budget per measurement")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: print cases and FLOP counts")
    ap.add_argument("--json", help="write the result rows here")
    return ap.parse_args(argv)


def make_indices(mode, S, device, docs):
    if mode == "causal":
        return None
    gen = torch.Generator().manual_seed(S)
    return example_indices(mode, 1, S, 1, gen, n_docs=docs).to(device)


def flops(idx, causal, S, Hq, D):
    """(forward, backward) FLOPs over the allowed pairs."""
    pairs = int(allowed_pairs(idx.cpu() if idx is not None else None, causal, S).sum())
    fwd = 4.0 * D * pairs * Hq
    return fwd, 2.5 * fwd


def _sdpa(q, k, v, idx, causal):
    import torch.nn.functional as F

    group = q.shape[2] // k.shape[2]
    # K/V repeated to the query heads: every SDPA backend takes that, not all take enable_gqa.
    qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(group, 2).transpose(1, 2), v.repeat_interleave(group, 2).transpose(1, 2)
    if idx is None:
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
    from ernie_core.ops.reference import startend_row_indices_to_mask

    mask = startend_row_indices_to_mask(idx, causal)  # dense [1, 1, S, S] bool: SDPA needs it materialised
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)


_FLEX = None


def _flex_fn(idx, causal, S, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    spans = column_spans(idx, causal, S, S, 1, device)[0, 0]  # [4, S]: the same per-column spans
    ls, le, us, ue = spans.unbind(0)

    def mask_mod(b, h, q_idx, kv_idx):
        lower = (q_idx >= ls[kv_idx]) & (q_idx < le[kv_idx])
        upper = (q_idx >= us[kv_idx]) & (q_idx < ue[kv_idx])
        return ~(lower | upper)

    global _FLEX
    block_mask = create_block_mask(mask_mod, None, None, S, S, device=device)
    if _FLEX is None:  # one compiled function for every case: compiles once per shape, not per mask
        _FLEX = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX

    def run(q, k, v):
        return flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                    enable_gqa=True).transpose(1, 2)

    return run


DROPOUT_P = 0.1  # the ERNIEKit 0.3B DPO config's attention_probs_dropout_prob


def make_impl(name, idx, causal, S, device, sdpa_mask_max_s=8192):
    """fn(q, k, v) -> out with autograd, or None when the implementation is missing here.
    "<backend>_dropout": the same kernels with attention dropout p = 0.1 (in-kernel keep mask)."""
    base = name[:-len("_dropout")] if name.endswith("_dropout") else name
    if base in ("cuda", "triton"):
        from ernie_core.ops import _backend

        dropout = base != name
        fwd_name, bwd_name = ("fwd_dropout", "bwd_dropout") if dropout else ("fwd", "bwd")
        if not _backend.has_kernel("flashmask_attention", base, fwd_name):
            return None
        fwd, bwd = (_backend.kernel("flashmask_attention", base, n) for n in (fwd_name, bwd_name))
        extra = dict(dropout_p=DROPOUT_P, rng_state=torch.tensor([1234, 5678])) if dropout else {}

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                out, lse = fwd(q, k, v, idx, causal, q.shape[-1] ** -0.5, *extra.values())
                ctx.save_for_backward(q, k, v, out, lse)
                return out

            @staticmethod
            def backward(ctx, dout):
                q, k, v, out, lse = ctx.saved_tensors
                return bwd(dout, q, k, v, out, lse, idx, causal, q.shape[-1] ** -0.5, **extra)

        return Fn.apply
    if name == "sdpa":
        if idx is not None and S > sdpa_mask_max_s:
            return "skipped: a dense [S, S] mask at this length is too large for the time budget"
        return lambda q, k, v: _sdpa(q, k, v, idx, causal)
    if name == "flex":
        return _flex_fn(idx, causal, S, device)
    raise ValueError(name)


def bench_case(args, S, mode, impl_names):
    import triton.testing

    device = "cuda"
    causal = MASKS[mode]
    idx = make_indices(mode, S, device, args.docs)
    Hq, Hkv, D = args.heads, args.kv_heads, args.head_dim
    f_fwd, f_bwd = flops(idx, causal, S, Hq, D)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, S, Hq, D, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    k = torch.randn(1, S, Hkv, D, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    v = torch.randn(1, S, Hkv, D, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    dout = torch.randn(1, S, Hq, D, device=device, dtype=torch.bfloat16, generator=gen)
    rows = []
    for name in impl_names:
        row = {"impl": name, "S": S, "mask": mode, "Hq": Hq, "Hkv": Hkv, "D": D, "fwd_flops": f_fwd, "bwd_flops": f_bwd}
        try:
            fn = make_impl(name, idx, causal, S, device, args.sdpa_mask_max_s)
            if fn is None or isinstance(fn, str):
                rows.append({**row, "status": fn or "not built"})
                continue
            t_fwd = triton.testing.do_bench(lambda: fn(q, k, v), rep=args.rep_ms, return_mode="median") * 1e-3
            t_all = triton.testing.do_bench(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout), rep=args.rep_ms,
                                            return_mode="median") * 1e-3
            tflops = (f_fwd + f_bwd) / t_all / 1e12
            rows.append({**row, "status": "ok", "fwd_ms": t_fwd * 1e3, "fwd_bwd_ms": t_all * 1e3,
                         "fwd_tflops": f_fwd / t_fwd / 1e12, "fwd_bwd_tflops": tflops,
                         "pct_of_peak": 100.0 * tflops / args.peak_tflops})
        except Exception as e:  # one failing competitor must not lose the others' numbers
            rows.append({**row, "status": f"error: {type(e).__name__}: {str(e)[:300]}"})
        torch.cuda.empty_cache()
    by = {r["impl"]: r for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r.get("status") == "ok" and "flex" in by:
            r["speedup_vs_flex"] = by["flex"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return rows


def dry_run(args):
    rows = []
    for S in args.seqlens:
        for mode in args.masks:
            causal = MASKS[mode]
            idx = make_indices(mode, S, "cpu", args.docs)
            f_fwd, f_bwd = flops(idx, causal, S, args.heads, args.head_dim)
            dense = 4.0 * args.head_dim * S * S * args.heads
            rows.append({"S": S, "mask": mode, "fwd_flops": f_fwd, "bwd_flops": f_bwd,
                         "density": f_fwd / dense, "impls": args.impls})
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        rows = dry_run(args)
    else:
        if not torch.cuda.is_available():
            sys.exit("attention_gpu.py needs a CUDA device (use --dry-run to check the set-up)")
        rows = [r for S in args.seqlens for mode in args.masks for r in bench_case(args, S, mode, args.impls)]
    for r in rows:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "attention_gpu", "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                       else "none", "peak_tflops": args.peak_tflops, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
