"""Training throughput: ernie_core's Ernie4_5ForCausalLM against transformers' (attn "sdpa").

Both models get the same weights and the same packed batch: documents of random lengths packed into
rows (the last one cut to fill the row), position ids restarting per document, SFT-style labels
(the first `--prompt-frac` of each document is prompt, label -100). Four implementations (--impls):
  ernie_core            FlashMask start-row indices of the document mask (what a user runs);
  transformers          the equivalent 4D block-causal bool mask: SDPA's slow masked (math) path;
  transformers_causal   no mask: plain causal attention over the whole row, SDPA's flash kernel,
                        transformers' fastest path (more attention work and attention across
                        document boundaries: a different loss, so it is not loss-checked);
  ernie_core_causal     ours with no indices (plain causal): the same work as transformers_causal.
Labels for transformers are shifted by one (it shifts internally; ours are aligned to positions).
The fp32 losses of ernie_core and transformers (same mask) are checked to agree before anything is
timed. `speed_vs_transformers` compares rows with the same attention work (document mask with
document mask, causal with causal); `speed_vs_transformers_causal` compares ours with the
document mask against transformers at its fastest.

MFU: model FLOPs per step / step time / the torch.matmul rate (2048^3, bf16 and fp32) measured in
this run. Model FLOPs are those of the dense model on the mask's visible pairs, whatever an
implementation skips: 6 x tokens x (decoder matmul weights + LM head) + 12 x layers x heads x
head_dim x visible (query, key) pairs. `mfu_bf16` / `mfu_fp32` use wall time and both cores; the
per-CPU-second variants (`cpu_mfu_*`) divide by process CPU time and the matmul rate per CPU second,
steadier on a shared machine.

One step = forward + backward + AdamW step. Each (model, dtype, seq) runs in a spawned child, so its
peak RSS is its own (RSS peaks never go down within a process): `peak_rss_mib` is the child's peak,
`extra_rss_mib` what building the model, its optimizer state and the steps added.

    python bench/train_throughput.py                       # default: 40.5M params, seq 2048 and 4096
    python bench/train_throughput.py --seq-lens 512 --steps 2 --layers 2   # quick
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _harness  # noqa: E402
from ernie_core.models import Ernie4_5Config, Ernie4_5ForCausalLM  # noqa: E402
from ernie_core.models.io import load_hf_tensors  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def model_kwargs(args) -> dict:
    return dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                num_key_value_heads=args.kv_heads, head_dim=args.head_dim, intermediate_size=args.intermediate,
                vocab_size=args.vocab, tie_word_embeddings=True)


def ours_runtime(spec: str) -> dict:
    """"fuse_linear=1,use_sparse_flash_attn=0" -> {"fuse_linear": True, "use_sparse_flash_attn": False}."""
    out = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip().lower() in ("1", "true", "yes", "on")
    return out


def packed_batch(B: int, S: int, vocab: int, min_doc: int, max_doc: int, prompt_frac: float, seed: int) -> dict:
    """Rows filled with documents of random lengths; every format both models need."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    labels = torch.randint(0, vocab, (B, S), generator=g)
    pos = torch.zeros(B, S, dtype=torch.long)
    start_row = torch.zeros(B, S, dtype=torch.int32)
    allowed = torch.zeros(B, 1, S, S, dtype=torch.bool)
    docs, doc_pairs = 0, 0
    for b in range(B):
        off = 0
        while off < S:
            n = min(rng.randint(min_doc, max_doc), S - off)
            pos[b, off:off + n] = torch.arange(n)
            start_row[b, off:off + n] = off + n
            allowed[b, 0, off:off + n, off:off + n] = torch.ones(n, n, dtype=torch.bool).tril()
            labels[b, off:off + int(n * prompt_frac)] = -100
            off += n
            docs += 1
            doc_pairs += n * (n + 1) // 2
    labels[:, -1] = -100  # transformers' shift cannot express a target for the last position
    hf_labels = torch.full_like(labels, -100)
    hf_labels[:, 1:] = labels[:, :-1]
    return dict(input_ids=ids, position_ids=pos, indices=start_row.view(B, 1, S, 1), labels=labels,
                hf_mask=allowed, hf_labels=hf_labels, docs=docs, doc_pairs=doc_pairs)


def build(kind: str, args, state: dict):
    if kind.startswith("transformers"):
        import transformers

        cfg = transformers.Ernie4_5Config(**model_kwargs(args))
        model = transformers.Ernie4_5ForCausalLM._from_config(cfg, attn_implementation="sdpa")
        model.load_state_dict(state, strict=False)
    else:
        model = Ernie4_5ForCausalLM(Ernie4_5Config(**model_kwargs(args)), **ours_runtime(args.ours))
        load_hf_tensors(model, state.items(), "bench")
    return model.train()


def loss_fn(kind: str, model, batch: dict) -> torch.Tensor:
    if kind.startswith("transformers"):
        mask = batch["hf_mask"] if kind == "transformers" else None  # None: SDPA is_causal
        return model(input_ids=batch["input_ids"], attention_mask=mask,
                     position_ids=batch["position_ids"], labels=batch["hf_labels"]).loss
    indices = batch["indices"] if kind == "ernie_core" else None  # None: plain causal
    return model(batch["input_ids"], batch["position_ids"], indices, labels=batch["labels"]).loss


def model_flops(args, batch: dict, causal: bool) -> float:
    """Training FLOPs of one step of the dense model (see the module docstring)."""
    h, L, hd = args.hidden, args.layers, args.head_dim
    attn_w = h * (args.heads + 2 * args.kv_heads) * hd + args.heads * hd * h
    mlp_w = 3 * h * args.intermediate
    tokens = batch["input_ids"].numel()
    B, S = batch["input_ids"].shape
    visible = B * S * (S + 1) // 2 if causal else int(batch["doc_pairs"])
    return 6.0 * tokens * (L * (attn_w + mlp_w) + h * args.vocab) + 12.0 * L * args.heads * hd * visible


def check_losses_agree(args, state: dict, batch: dict) -> tuple[float, float]:
    with torch.no_grad():
        a = loss_fn("transformers", build("transformers", args, state), batch).item()
        b = loss_fn("ernie_core", build("ernie_core", args, state), batch).item()
    if abs(a - b) > 1e-4 * max(1.0, abs(a)):
        raise SystemExit(f"losses differ: transformers {a:.6f} vs ernie_core {b:.6f}; not timing different work")
    return a, b


def run_one(kind: str, dtype_name: str, args, state: dict, batch: dict) -> dict:
    """Runs in a forked child: build, warm up, time `args.steps` training steps."""
    base = _harness.current_rss_mib()
    torch.manual_seed(0)
    model = build(kind, args, state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    dtype = DTYPES[dtype_name]

    cpu_times = []

    def step():
        t0 = time.process_time()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(kind, model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        cpu_times.append(time.process_time() - t0)

    timing = _harness.measure(step, warmup=args.warmup, repeats=args.steps)
    tokens = batch["input_ids"].numel()
    # CPU seconds of this process per step: less disturbed than wall time when other jobs share the cores.
    cpu_s = statistics.median(cpu_times[args.warmup:])
    return dict(impl=kind, dtype=dtype_name, seq=batch["input_ids"].shape[1], tokens_per_s=tokens / timing["median_s"],
                median_s=timing["median_s"], p20_s=timing["p20_s"], p80_s=timing["p80_s"], cpu_s=cpu_s,
                peak_rss_mib=_harness.peak_rss_mib(), extra_rss_mib=_harness.peak_rss_mib() - base)


def _child_main(queue, fn, threads, args) -> None:
    try:
        if threads:
            torch.set_num_threads(threads)
        queue.put(fn(*args))
    except BaseException:  # report, don't leave the parent waiting
        queue.put({"error": traceback.format_exc()})


def in_child(fn, threads: int, *args) -> dict:
    """fn(*args) in a fresh spawned process. Not fork: a child forked after the parent ran OpenMP
    regions (the loss check) hangs in libgomp."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_main, args=(queue, fn, threads, args))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=1, help="packed rows per step")
    p.add_argument("--seq-lens", default="2048,4096")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32 (no autocast), bf16 (CPU autocast)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--min-doc", type=int, default=64)
    p.add_argument("--max-doc", type=int, default=1024)
    p.add_argument("--prompt-frac", type=float, default=0.3, help="share of each document with label -100")
    p.add_argument("--ours", default="use_sparse_head_and_loss_fn=1,fuse_linear=1,fuse_rope=1",
                   help="ernie_core runtime flags, e.g. 'use_sparse_flash_attn=0,fuse_linear=1'")
    p.add_argument("--impls", default="transformers_causal,ernie_core,transformers,ernie_core_causal")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate the implementations this many times (a fresh child each), median of rounds")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    reference = build("transformers", args, {})  # random weights, shared by both models
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    n_params = sum(p.numel() for p in reference.parameters())
    del reference
    print(f"model: {n_params / 1e6:.1f}M params; ernie_core runtime: {ours_runtime(args.ours)}", flush=True)
    mm = {name: _harness.matmul_gflops(dt) for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    print("matmul 2048^3 now:", {k: f"{v['gflops']:.0f} GFLOP/s" for k, v in mm.items()}, flush=True)
    rows, checks = [], {}
    for S in (int(s) for s in args.seq_lens.split(",")):
        batch = packed_batch(args.batch, S, args.vocab, args.min_doc, args.max_doc, args.prompt_frac, args.seed + S)
        checks[S] = check_losses_agree(args, state, batch)
        print(f"seq {S}: {batch['docs']} docs in {args.batch} row(s); fp32 loss transformers {checks[S][0]:.6f} "
              f"ernie_core {checks[S][1]:.6f}", flush=True)
        for dtype_name in args.dtypes.split(","):
            kinds = args.impls.split(",")
            runs = {kind: [] for kind in kinds}
            for _ in range(args.rounds):  # ours and theirs alternate, so load drifts hit both
                for kind in kinds:
                    runs[kind].append(in_child(run_one, args.threads, kind, dtype_name, args, state, batch))
            pair = {}
            for kind in kinds:
                row = min(runs[kind], key=lambda r: r["median_s"]) if args.rounds > 1 else runs[kind][0]
                if args.rounds > 1:
                    row["median_s"] = statistics.median(r["median_s"] for r in runs[kind])
                    row["cpu_s"] = statistics.median(r["cpu_s"] for r in runs[kind])
                    row["tokens_per_s"] = batch["input_ids"].numel() / row["median_s"]
                flops = model_flops(args, batch, causal=kind.endswith("_causal"))
                row["model_tflop_per_step"] = flops / 1e12
                for mm_dtype, rate in mm.items():
                    row[f"mfu_{mm_dtype}"] = flops / row["median_s"] / 1e9 / rate["gflops"]
                    row[f"cpu_mfu_{mm_dtype}"] = flops / row["cpu_s"] / 1e9 / rate["gflops_per_cpu_s"]
                pair[kind] = row
                rows.append(row)
                print(f"  {kind:20s} {dtype_name} seq {S}: {row['tokens_per_s']:.0f} tok/s, "
                      f"MFU {100 * row['mfu_bf16']:.0f}% of bf16 / {100 * row['mfu_fp32']:.0f}% of fp32 matmul, "
                      f"peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
            for ours, theirs in (("ernie_core", "transformers"), ("ernie_core_causal", "transformers_causal")):
                if ours in pair and theirs in pair:
                    a, b = pair[ours], pair[theirs]
                    a["speed_vs_transformers"] = a["tokens_per_s"] / b["tokens_per_s"]
                    a["cpu_time_ratio"] = b["cpu_s"] / a["cpu_s"]
                    a["extra_rss_vs_transformers"] = a["extra_rss_mib"] / max(b["extra_rss_mib"], 1e-9)
            if "ernie_core" in pair and "transformers_causal" in pair:
                a, b = pair["ernie_core"], pair["transformers_causal"]
                a["speed_vs_transformers_causal"] = a["tokens_per_s"] / b["tokens_per_s"]
                a["cpu_time_ratio_vs_transformers_causal"] = b["cpu_s"] / a["cpu_s"]
    columns = ["impl", "dtype", "seq", "tokens_per_s", "median_s", "cpu_s", "mfu_bf16", "mfu_fp32", "cpu_mfu_bf16",
               "cpu_mfu_fp32", "peak_rss_mib", "speed_vs_transformers", "cpu_time_ratio",
               "speed_vs_transformers_causal", "cpu_time_ratio_vs_transformers_causal"]
    extra = dict(params=n_params, config=model_kwargs(args), ours_runtime=ours_runtime(args.ours),
                 batch=args.batch, prompt_frac=args.prompt_frac, doc_lengths=[args.min_doc, args.max_doc],
                 fp32_loss_check={str(k): v for k, v in checks.items()}, matmul=mm,
                 load_avg_at_end=os.getloadavg())
    _harness.write_results("train_throughput", rows, columns, extra)


if __name__ == "__main__":
    main()
