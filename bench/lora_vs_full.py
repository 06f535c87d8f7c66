"""SFT with LoRA vs full fine-tuning in ernie_core: tokens/s and peak RSS on the small config.

    python bench/lora_vs_full.py [--steps 8] [--repeats 3] [--bf16] [--quick]

Same model, data, packing and step loop (forward, backward, AdamW step); LoRA rank 8 on every
attention/FFN linear with the base frozen, so backward skips the weight gradients of the base and
AdamW keeps state for the adapters only. Each configuration runs in its own subprocess so the peak
RSS is its own. With --bf16 the LoRA base is stored in bf16 (as the trainer does under bf16).

The machine may be shared, so full and LoRA runs alternate `--repeats` times and each mode reports
the median (and best) tokens/s, tokens per CPU-second of the process (less sensitive to other
load; exact with --threads 1, OpenMP spin-waits count at 2+ threads) and the median peak RSS.
`setup_rss_mib` is the RSS after the model and optimizer are built, before the first step (the
same imports and data in both modes), so peak - setup is what the training steps add. Peak RSS
includes glibc's heap high-water mark: freed activations stay resident until the heap can shrink.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import write_results  # noqa: E402
from dpo_throughput import SMALL, ernie_config, make_assets, timed_loop  # noqa: E402


def run(assets: dict, lora: bool, steps: int, warmup: int, seq_len: int, rows: int, bf16: bool) -> dict:
    from ernie_core.data import build_train_stream, load_tokenizer
    from ernie_core.models import Ernie4_5ForCausalLM
    from ernie_core.peft import apply_lora
    from ernie_core.train.trainer import model_runtime_kwargs

    cfg = ernie_config(assets, lora=lora, seq_len=seq_len, rows=rows, stage="SFT", data=assets["sft"])
    tok = load_tokenizer(cfg.basic.model_name_or_path)
    stream = build_train_stream(cfg, tok)
    model = Ernie4_5ForCausalLM.from_pretrained(cfg.basic.model_name_or_path, **model_runtime_kwargs(cfg))
    if lora:
        apply_lora(model, rank=8, base_dtype=torch.bfloat16 if bf16 else None)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def step() -> int:
        batch = next(stream)
        with autocast:
            loss = model(batch["input_ids"], batch["position_ids"], batch["attn_mask_startend_row_indices"],
                         labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(batch["num_tokens"])

    for _ in range(warmup):
        step()
    cpu0 = time.process_time()
    seconds, tokens = timed_loop(step, steps, 0)
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": time.process_time() - cpu0,
            "trainable_params": sum(p.numel() for p in params), "setup_rss_mib": setup_rss}


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    assets = json.loads(Path(args.assets).read_text())
    row = run(assets, args.lora, args.steps, args.warmup, args.seq_len, args.rows, args.bf16)
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print("RESULT " + json.dumps(row))


def spawn(args, lora: bool, assets_path: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--assets", str(assets_path), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--seq-len", str(args.seq_len), "--rows", str(args.rows),
           "--threads", str(args.threads)] + (["--lora"] if lora else []) + (["--bf16"] if args.bf16 else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not line:
        raise RuntimeError(f"lora={lora} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    row = json.loads(line[-1][len("RESULT "):])
    row["tokens_per_s"] = row["tokens"] / row["seconds"]
    row["tokens_per_cpu_s"] = row["tokens"] / row["cpu_seconds"]
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="SFT tokens/s and peak RSS: LoRA vs full fine-tuning")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="alternating full/LoRA runs per mode (medians reported)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (LoRA base stored in bf16)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--assets", help=argparse.SUPPRESS)
    p.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.steps, args.warmup, args.repeats = 3, 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        assets = make_assets(Path(tmp), 512)
        assets_path = Path(tmp) / "assets.json"
        assets_path.write_text(json.dumps(assets))
        runs = {"full": [], "lora": []}
        for _ in range(args.repeats):
            for mode in runs:
                runs[mode].append(spawn(args, mode == "lora", assets_path))
    med = statistics.median
    got = {m: {"mode": m, "tokens_per_s": med(r["tokens_per_s"] for r in rs),
               "tokens_per_s_best": max(r["tokens_per_s"] for r in rs),
               "tokens_per_cpu_s": med(r["tokens_per_cpu_s"] for r in rs),
               "peak_rss_mib": med(r["peak_rss_mib"] for r in rs),
               "setup_rss_mib": med(r["setup_rss_mib"] for r in rs),
               "trainable_params": rs[0]["trainable_params"], "tokens": rs[0]["tokens"],
               "seconds": med(r["seconds"] for r in rs)} for m, rs in runs.items()}
    for r in got.values():
        r["step_rss_mib"] = r["peak_rss_mib"] - r["setup_rss_mib"]
    rows = list(got.values())
    ratio = {"mode": "ratio lora/full"}
    for k in ("tokens_per_s", "tokens_per_s_best", "tokens_per_cpu_s", "peak_rss_mib"):
        ratio[k] = got["lora"][k] / got["full"][k]
    ratio["step_rss_mib"] = got["lora"]["step_rss_mib"] / got["full"]["step_rss_mib"]
    rows.append(ratio)
    write_results("lora_vs_full" + ("-bf16" if args.bf16 else "") + ("-quick" if args.quick else ""), rows,
                  ["mode", "tokens_per_s", "tokens_per_s_best", "tokens_per_cpu_s", "peak_rss_mib", "setup_rss_mib",
                   "step_rss_mib", "trainable_params", "tokens", "seconds"],
                  extra={"model": SMALL, "runs": runs,
                         "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "assets")}})


if __name__ == "__main__":
    main()
