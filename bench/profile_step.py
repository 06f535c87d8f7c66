"""Where a training step's time goes: per-op CPU time of ernie_core's step and transformers' on the
same weights and the same packed batch (torch.profiler), side by side.

One step = forward + backward + AdamW, under bf16 autocast (--dtype fp32: none). The models,
batch and implementations are those of bench/train_throughput.py (--impls, default
ernie_core with the document mask and transformers_causal, transformers' fastest path: plain
causal SDPA). Each implementation is warmed up, then `--steps` steps are profiled; the table gives
self milliseconds per step for the union of the top ops, plus the wall time per step and the sum
over all ops. "Self" is the profiler's time inside the op itself, not in its child ops, measured on
the calling thread (an op's intra-op worker threads run inside that interval), so the rows add up
to about the step's wall time.

    python bench/profile_step.py                          # 40.5M model, seq 4096, bf16
    python bench/profile_step.py --seq 2048 --dtype fp32 --top 30
    python bench/profile_step.py --seq 512 --layers 2     # quick
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _harness  # noqa: E402
from bench.train_throughput import DTYPES, build, loss_fn, model_kwargs, ours_runtime, packed_batch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--steps", type=int, default=2, help="profiled steps per implementation")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--min-doc", type=int, default=64)
    p.add_argument("--max-doc", type=int, default=1024)
    p.add_argument("--prompt-frac", type=float, default=0.3)
    p.add_argument("--ours", default="use_sparse_head_and_loss_fn=1,fuse_linear=1,fuse_rope=1")
    p.add_argument("--impls", default="ernie_core,transformers_causal")
    p.add_argument("--top", type=int, default=25, help="ops per implementation in the table")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def profile_impl(kind: str, args, state: dict, batch: dict) -> tuple[dict[str, float], float]:
    """Self CPU ms per step by op name, and wall seconds per step (of the profiled steps)."""
    torch.manual_seed(0)
    model = build(kind, args, state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    dtype = DTYPES[args.dtype]

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(kind, model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall = (time.perf_counter() - t0) / args.steps
    ops = {e.key: e.self_cpu_time_total / 1e3 / args.steps for e in prof.key_averages()}
    return ops, wall


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    reference = build("transformers", args, {})
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    del reference
    batch = packed_batch(args.batch, args.seq, args.vocab, args.min_doc, args.max_doc, args.prompt_frac,
                         args.seed + args.seq)
    kinds = args.impls.split(",")
    results = {kind: profile_impl(kind, args, state, batch) for kind in kinds}
    names: list[str] = []
    for kind in kinds:
        top = sorted(results[kind][0].items(), key=lambda kv: -kv[1])[: args.top]
        names += [n for n, _ in top if n not in names]
    names.sort(key=lambda n: -max(results[k][0].get(n, 0.0) for k in kinds))
    rows = [{"op": n, **{f"{k}_ms": results[k][0].get(n, 0.0) for k in kinds}} for n in names]
    rows.append({"op": "(all ops, self)", **{f"{k}_ms": sum(results[k][0].values()) for k in kinds}})
    rows.append({"op": "(wall per step)", **{f"{k}_ms": 1e3 * results[k][1] for k in kinds}})
    print(f"seq {args.seq}, {args.dtype}, {batch['docs']} documents, ernie_core runtime {ours_runtime(args.ours)}; "
          f"self ms per step, load average {os.getloadavg()[0]:.1f}")
    _harness.write_results(f"profile_step-{args.dtype}-{args.seq}", rows, ["op"] + [f"{k}_ms" for k in kinds],
                           extra=dict(config=model_kwargs(args), ours_runtime=ours_runtime(args.ours),
                                      steps=args.steps, load_avg_at_end=os.getloadavg()))


if __name__ == "__main__":
    main()
