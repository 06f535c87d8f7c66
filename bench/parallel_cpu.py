"""Parallel layouts on CPU (gloo): step time and bytes communicated per step, versus the analytic minimum.

Each layout trains a small ERNIE-shaped model for a few steps on synthetic packed batches
(B=1 x S tokens per micro-batch, gradient accumulation A), in 1, 2 or 4 local processes. The bytes
are counted at the collectives (ernie_core/parallel/comm_stats.py: every c10d / functional
collective and send, whoever issued it) and reported per rank as "bytes sent" under the ring model
(all-reduce of S bytes over n ranks = 2(n-1)/n S). The analytic minimum for each layout uses the
same model (f(n) = (n-1)/n, P = parameter bytes, act = B*S*H*4 bytes, L layers):

    dp D        all-reduce grads once per step                      2 f(D) P
    stage1 N    reduce-scatter grads + all-gather params            2 f(N) P
    stage2 N    reduce-scatter grads per micro-batch + 1 gather     (A+1) f(N) P
    stage3 N    gather params in fwd and bwd + reduce-scatter, per micro-batch   3 A f(N) P
    tp t        per micro-batch (4L+2) all-reduces of act (Megatron: 2 per layer fwd + 2 bwd,
                embedding fwd, LM-head input grad) + 3 all-reduces of B*S floats (vocab-parallel CE);
                sequence parallel moves the same bytes as all-gather + reduce-scatter pairs (measured
                +3%: DTensor turns the vocab-parallel embedding's masked partial sum into the
                sequence shards with an all-reduce, not a reduce-scatter)
    pp p, v     activations forward + their grads back at p*v-1 stage borders, per micro-batch,
                averaged over the p ranks; with TP only 1/t of each activation has to cross a
                border (Megatron's scatter/gather); + the tied embedding's grad all-reduce

On CPU this is about the communication volume being right, not about speed.

    python bench/parallel_cpu.py            # all layouts, JSON to bench/results/
    python bench/parallel_cpu.py --quick    # fewer steps
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

MODEL = dict(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64)
B, S, ACCUM = 1, 256, 2

# name: (processes, degrees/options)
LAYOUTS = {
    "single": (1, {}),
    "dp2": (2, {}),
    "tp2": (2, {"tp": 2}),
    "tp2_sp": (2, {"tp": 2, "sp": True}),
    "pp2": (2, {"pp": 2}),
    "pp2_vpp2": (2, {"pp": 2, "vpp": 2}),
    "stage1": (2, {"stage": "stage1"}),
    "stage2": (2, {"stage": "stage2"}),
    "stage3": (2, {"stage": "stage3"}),
    "tp2_dp2": (4, {"tp": 2}),
    "pp2_tp2": (4, {"pp": 2, "tp": 2}),
}


def _batches(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, MODEL["vocab_size"], (B, S), generator=g)
        idx = torch.full((B, 1, S, 1), S, dtype=torch.int32)
        out.append(dict(input_ids=ids, labels=ids.roll(-1, dims=1), position_ids=torch.arange(S).expand(B, S),
                        attn_mask_startend_row_indices=idx, num_tokens=B * S))
    return out


def _setup(spec: dict):
    import torch.distributed as dist

    from ernie_core.models import Ernie4_5Config, Ernie4_5ForCausalLM
    from ernie_core.parallel import ParallelContext, ParallelOptions, resolve_dims
    from ernie_core.train.optim import build_optimizer, param_groups

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    dims = resolve_dims(world, tensor_parallel_degree=spec.get("tp", 1), pipeline_parallel_degree=spec.get("pp", 1),
                        sharding=spec.get("stage", ""))
    opts = ParallelOptions(sequence_parallel=spec.get("sp", False), virtual_pp_degree=spec.get("vpp", 1),
                           gradient_accumulation_steps=ACCUM)
    ctx = ParallelContext(dims, opts, rank=rank)
    torch.manual_seed(0)
    cfg = Ernie4_5Config(**MODEL)
    full = Ernie4_5ForCausalLM(cfg)
    n_params = sum(p.numel() for p in full.parameters())
    model = ctx.parallelize(full)
    groups = ctx.optimizer_param_groups(param_groups(model, weight_decay=0.01, num_layers=cfg.num_hidden_layers))
    opt = build_optimizer(groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    return ctx, model, opt, dims, n_params


def _step(ctx, model, opt, batches) -> float:
    from ernie_core.train.sft import SFTObjective

    if ctx.pipelined:
        loss = ctx.pipeline_loss_step(SFTObjective(), batches)[0]
    else:
        loss = 0.0
        for i, b in enumerate(batches):
            ctx.set_grad_sync(i == len(batches) - 1)
            with ctx.loss_context():
                out = model(b["input_ids"], b["position_ids"], b["attn_mask_startend_row_indices"], labels=b["labels"])
                (out.loss / len(batches)).backward()
            loss += float(out.loss) / len(batches)
    ctx.optimizer_step(model, opt, 1.0)
    opt.zero_grad(set_to_none=True)
    return loss


def run_layouts(names: list[str], steps: int) -> dict:
    """On every rank: per layout, the median step time and one step's counted traffic."""
    from ernie_core.parallel.comm_stats import CommCounter

    torch.set_num_threads(1)  # every rank one thread (the spawned ranks have one each): comparable times
    out = {}
    for name in names:
        ctx, model, opt, dims, n_params = _setup(LAYOUTS[name][1])
        slot = ctx.dp_rank
        data = [_batches(ACCUM, seed=1000 * s + slot) for s in range(steps + 2)]
        _step(ctx, model, opt, data[0])  # warm-up (pipeline shape inference, lazy FSDP init)
        with CommCounter() as counter:
            _step(ctx, model, opt, data[1])
        times = []
        for s in range(steps):
            t0 = time.perf_counter()
            _step(ctx, model, opt, data[2 + s])
            times.append(time.perf_counter() - t0)
        out[name] = dict(step_s=statistics.median(times), bytes=counter.bytes_sent, by_kind=dict(counter.by_kind),
                         dims=dims, n_params=n_params)
    return out


def analytic_min_bytes(name: str, n_params: int) -> float:
    """Per-rank average bytes sent per step for the layout's textbook algorithm (module docstring)."""
    spec = LAYOUTS[name][1]
    world = LAYOUTS[name][0]
    tp, pp, vpp = spec.get("tp", 1), spec.get("pp", 1), spec.get("vpp", 1)
    L, H, V = MODEL["num_hidden_layers"], MODEL["hidden_size"], MODEL["vocab_size"]
    P = 4.0 * n_params
    act = 4.0 * B * S * H
    data = world // (tp * pp)

    def f(n):
        return (n - 1) / n

    total = 0.0
    if tp > 1:
        tp_bytes = ACCUM * ((4 * L + 2) * 2 * f(tp) * act + 3 * 2 * f(tp) * 4 * B * S)
        total += tp_bytes / pp  # each pipeline stage does its share of the layers
    if pp > 1:
        borders = pp * vpp - 1
        total += 2 * ACCUM * borders / pp * act / tp
        total += (2 / pp) * 2 * f(2) * 4 * V * H / tp  # tied embedding grad: first + last stage
    stage = spec.get("stage", "")
    shard = P / (tp * pp)
    if data > 1:
        if stage == "stage1" or not stage:
            total += 2 * f(data) * shard
        elif stage == "stage2":
            total += (ACCUM + 1) * f(data) * shard
        elif stage == "stage3":
            total += 3 * ACCUM * f(data) * shard
    return total


def main() -> None:
    from ernie_core.parallel.testing import spawn

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 timed steps per layout instead of 5")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="comma list of layouts")
    args = ap.parse_args()
    steps = 2 if args.quick else 5
    names = [n for n in args.layouts.split(",") if n]
    results = {}
    for world in (1, 2, 4):
        group = [n for n in names if LAYOUTS[n][0] == world]
        if not group:
            continue
        per_rank = [run_layouts(group, steps)] if world == 1 else spawn(run_layouts, world, group, steps)
        for n in group:
            results[n] = [r[n] for r in per_rank]
    rows = []
    for n in names:
        ranks = results[n]
        sent = [r["bytes"] for r in ranks]
        d = ranks[0]["dims"]
        minimum = analytic_min_bytes(n, ranks[0]["n_params"])
        mean = statistics.mean(sent)
        kinds = {}
        for r in ranks:
            for k, v in r["by_kind"].items():
                kinds[k] = kinds.get(k, 0.0) + v / len(ranks)
        rows.append({"layout": n, "procs": LAYOUTS[n][0], "dp": d.dp, "sharding": d.sharding, "pp": d.pp, "tp": d.tp,
                     "step_ms": 1e3 * ranks[0]["step_s"], "MB_sent_per_rank": mean / 1e6,
                     "MB_sent_max_rank": max(sent) / 1e6, "MB_analytic_min": minimum / 1e6,
                     "ratio_to_min": mean / minimum if minimum else float("nan"),
                     "by_kind_MB": {k: round(v / 1e6, 4) for k, v in sorted(kinds.items())}})
    name = "parallel_cpu-quick" if args.quick else "parallel_cpu"
    _harness.write_results(name, rows, columns=["layout", "procs", "dp", "sharding", "pp", "tp", "step_ms",
                                                "MB_sent_per_rank", "MB_sent_max_rank", "MB_analytic_min",
                                                "ratio_to_min"],
                           extra={"model": MODEL, "batch": {"B": B, "S": S, "accum": ACCUM},
                                  "bytes_model": "bytes sent per rank per optimizer step, ring model"})


if __name__ == "__main__":
    main()
