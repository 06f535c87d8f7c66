"""A 20-step SFT run of an ERNIE-4.5-0.3B-shaped model (random weights) on the GPU, as a user runs it:
the trainer CLI (`ernie_core.train.cli.main`) with the default backend dispatch (CUDA kernels where
built, else Triton), bf16, fused RoPE and fused LM head + CE. Reports tokens/s (median over the steps
after warm-up, from the trainer's own log), peak GPU memory (torch.cuda.max_memory_allocated /
reserved over the run), the losses, and which backend ran each op (kernel calls counted at the
dispatcher).

Shape (ERNIE-4.5-0.3B's config.json): hidden 1024, 18 layers, 16 query / 2 kv heads of 128,
intermediate 3072, vocab 103424, tied embeddings. Data: the repo's SFT examples packed into rows of
--seq-len tokens (token ids < 320 from the example tokenizer; the vocab-sized head and embedding
cost the same whatever the ids).

    python bench/gpu_train.py --json out.json                      # on a GPU (about a minute)
    python bench/gpu_train.py --variants plain dropout --steps 20  # + attention dropout 0.1 (the DPO config's)
    python bench/gpu_train.py --dry-run                            # CPU: the arguments a run would use
"""
from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE_0P3B = dict(hidden_size=1024, num_hidden_layers=18, num_attention_heads=16, num_key_value_heads=2, head_dim=128,
                  intermediate_size=3072, vocab_size=103424, tie_word_embeddings=True, max_position_embeddings=131072)
VARIANTS = {"plain": [], "dropout": ["attention_probs_dropout_prob=0.1", "dropout_warmup_steps=0"]}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=SHAPE_0P3B["num_hidden_layers"])
    ap.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the tokens/s median")
    ap.add_argument("--variants", nargs="+", default=["plain"], choices=list(VARIANTS))
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for the trainer")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--json")
    return ap.parse_args(argv)


def model_dir(tmp: Path, layers: int) -> Path:
    """config.json of the 0.3B shape plus the example tokenizer files; no weights (random init)."""
    out = tmp / "ernie_0p3b_random"
    out.mkdir(parents=True, exist_ok=True)
    src = ROOT / "examples/tiny_model"
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(SHAPE_0P3B, num_hidden_layers=layers)
    cfg["rope_parameters"] = {"rope_theta": cfg.get("rope_theta", 500000.0), "rope_type": "default"}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


def trainer_args(args, model: Path, out: Path, variant: str) -> list[str]:
    ex = ROOT / "examples"
    return [str(ex / "configs/sft_tiny.yaml"), f"model_name_or_path={model}", "continue_training=false",
            f"output_dir={out}", f"max_steps={args.steps}", f"max_seq_len={args.seq_len}",
            f"per_device_train_batch_size={args.batch}", "compute_type=bf16", "logging_steps=1", "do_eval=false",
            "save_strategy=no", "disable_tqdm=true", "eval_generate_samples=0", "fuse_rope=true",
            "use_fused_head_and_loss_fn=true", "learning_rate=1e-4", "warmup_steps=2", "num_samples_each_epoch=1000000",
            f"train_dataset_path={ex / 'data/sft-train.jsonl'},{ex / 'data/alpaca-train.json'}",
            f"eval_dataset_path={ex / 'data/sft-eval.jsonl'}", *VARIANTS[variant], *args.extra]


def run_variant(args, tmp: Path, model: Path, variant: str) -> dict:
    import torch

    from ernie_core import ops  # noqa: F401
    from ernie_core.ops import _backend
    from ernie_core.train.cli import main
    from ernie_core.train.loggers import read_log

    counts = collections.Counter()
    originals = {k: f for k, f in _backend.registered().items() if k[2] != "supports"}
    for key, fn in originals.items():
        def counted(*a, _fn=fn, _key=key, **kw):
            counts[_key] += 1
            return _fn(*a, **kw)
        _backend._REGISTRY[key] = counted
    out = tmp / f"run_{variant}"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    try:
        rc = main(trainer_args(args, model, out, variant))
    finally:
        _backend._REGISTRY.update(originals)
    wall = time.time() - t0
    rows = [r for r in read_log(out) if "loss" in r and "step" in r] if out.exists() else []
    tps = [r["tokens_per_sec"] for r in rows if r["step"] > args.warmup_steps and "tokens_per_sec" in r]
    backends = collections.defaultdict(dict)
    for (op, backend, fn_name), n in sorted(counts.items()):
        backends[op][f"{backend}.{fn_name}"] = n
    return {
        "variant": variant, "rc": rc, "steps": len(rows), "seq_len": args.seq_len, "batch": args.batch,
        "layers": args.layers, "tokens_per_sec_median": statistics.median(tps) if tps else None,
        "tokens_per_sec_all": [round(r.get("tokens_per_sec", 0.0), 1) for r in rows],
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "loss_first_last": [rows[0]["loss"], rows[-1]["loss"]] if rows else None,
        "grad_norm_last": rows[-1].get("grad_norm") if rows else None,
        "wall_s": wall, "kernel_calls": backends,
    }


def main(argv=None):
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_train_"))
    model = model_dir(tmp, args.layers)
    result = {"bench": "gpu_train", "shape": {**SHAPE_0P3B, "num_hidden_layers": args.layers}, "rows": []}
    if args.dry_run:
        result["rows"] = [{"variant": v, "trainer_args": trainer_args(args, model, tmp / "out", v)} for v in args.variants]
    else:
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_train.py needs a CUDA device (use --dry-run to check the set-up)")
        result["device"] = torch.cuda.get_device_name()
        for variant in args.variants:
            try:
                row = run_variant(args, tmp, model, variant)
            except Exception as e:  # one failing variant must not lose the others
                row = {"variant": variant, "status": f"error: {type(e).__name__}: {str(e)[:400]}",
                       "traceback": traceback.format_exc()[-3000:]}
            result["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("kernel_calls", "traceback")}), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
