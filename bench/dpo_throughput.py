"""DPO training throughput: ernie_core vs TRL's DPOTrainer on the same model, pairs and settings.

    python bench/dpo_throughput.py [--steps 8] [--pairs 256] [--quick]

Both train the same small ERNIE-4.5-shaped model (transformers loads our checkpoint) on the same
synthetic pairs (prompt, chosen, rejected; the token counts are identical on both sides because the
prompt text is our chat template rendered and the tokenizer is word level), sigmoid loss, beta 0.1,
AdamW, fp32 on CPU, full fine-tuning and LoRA (rank 8 on every attention/FFN linear). Reported:
pairs/s over the timed steps (after warm-up) and the peak RSS of the process, each configuration
in its own subprocess. ernie_core packs pairs into rows with a shared prompt (one prompt forward
for both answers, no padding); TRL pads each pair to the batch's longest answer and runs prompt +
chosen and prompt + rejected as separate sequences.
Needs requirements-bench.txt (trl).
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import write_results  # noqa: E402

SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             intermediate_size=688)
WORDS = [f"w{i}" for i in range(600)]


def make_assets(out: Path, n_pairs: int, seed: int = 0) -> dict:
    """Word-level tokenizer + small model saved in HF format, and synthetic preference rows."""
    from ernie_core.data import load_tokenizer
    from ernie_core.data.testing import make_word_tokenizer, write_jsonl
    from ernie_core.models import Ernie4_5Config, Ernie4_5ForCausalLM

    model_dir = make_word_tokenizer(out / "model", WORDS)
    tok = load_tokenizer(model_dir)
    torch.manual_seed(seed)
    Ernie4_5ForCausalLM(Ernie4_5Config(**SMALL, vocab_size=tok.vocab_size)).save_pretrained(model_dir)
    rng = random.Random(seed)
    text = (lambda n: " ".join(rng.choice(WORDS) for _ in range(n)))
    rows = [{"src": text(rng.randint(20, 100)), "tgt": [], "response": [text(rng.randint(10, 80)),
                                                                         text(rng.randint(10, 80))], "sort": [1, 0]}
            for _ in range(n_pairs)]
    data = write_jsonl(out / "pairs.jsonl", rows)
    sft_rows = [{"src": r["src"], "tgt": r["response"][0]} for r in rows]
    sft = write_jsonl(out / "sft.jsonl", sft_rows)
    return {"model": str(model_dir), "pairs": str(data), "sft": str(sft), "rows": rows}


def ernie_config(assets: dict, *, lora: bool, seq_len: int, rows: int, stage: str = "DPO", data=None):
    from ernie_core.config import load_config

    return load_config(None, [
        f"stage={stage}", f"fine_tuning={'LoRA' if lora else 'Full'}", "lora_rank=8", "compute_type=fp32",
        f"model_name_or_path={assets['model']}", f"train_dataset_path={data or assets['pairs']}",
        f"max_seq_len={seq_len}", f"per_device_train_batch_size={rows}", "num_samples_each_epoch=100000",
        "learning_rate=1e-5", "beta=0.1", "output_dir=/tmp/unused"])


def ernie_model(cfg):
    """The policy as the trainer builds it (flat runtime options, LoRA applied when configured)."""
    from ernie_core.models import Ernie4_5ForCausalLM
    from ernie_core.peft import apply_lora
    from ernie_core.train.trainer import model_runtime_kwargs

    model = Ernie4_5ForCausalLM.from_pretrained(cfg.basic.model_name_or_path, **model_runtime_kwargs(cfg))
    if cfg.lora.lora:
        apply_lora(model, rank=cfg.lora.lora_rank, alpha=cfg.lora.lora_alpha, rslora=cfg.lora.rslora)
    return model.train()


def timed_loop(step, steps: int, warmup: int) -> tuple[float, int]:
    """(seconds, units) over `steps` calls of step() -> units, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    t0, units = time.perf_counter(), 0
    for _ in range(steps):
        units += step()
    return time.perf_counter() - t0, units


def run_ernie(assets: dict, lora: bool, steps: int, warmup: int, seq_len: int, rows: int) -> dict:
    from ernie_core.data import load_tokenizer
    from ernie_core.train.dpo import DPOObjective

    cfg = ernie_config(assets, lora=lora, seq_len=seq_len, rows=rows)
    tok = load_tokenizer(cfg.basic.model_name_or_path)
    objective = DPOObjective.from_config(cfg)
    stream = objective.build_stream(cfg, tok, dp_rank=0, dp_world=1)
    model = ernie_model(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> int:
        batch = next(stream)
        loss, _ = objective.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(batch["num_pairs"])

    seconds, pairs = timed_loop(step, steps, warmup)
    return {"pairs": pairs, "seconds": seconds, "packing_efficiency": stream.packing_efficiency}


def run_trl(assets: dict, lora: bool, steps: int, warmup: int, seq_len: int, batch_pairs: int) -> dict:
    import datasets
    import transformers
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from ernie_core.data import load_tokenizer

    ours = load_tokenizer(assets["model"])
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(assets["model"]) / "tokenizer.json"),
                                                  pad_token="<unk>", eos_token="</s>", bos_token="<s>")
    sep = ours.sep_token
    records = [{"prompt": ours.apply_chat_template([{"role": "user", "content": r["src"]}], add_generation_prompt=True),
                "chosen": r["response"][0] + sep, "rejected": r["response"][1] + sep} for r in assets["rows"]]
    model = transformers.AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    peft_config = None
    if lora:
        import peft

        peft_config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "gate_proj", "up_proj", "down_proj"])
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=batch_pairs, max_steps=steps + warmup,
                         learning_rate=1e-5, beta=0.1, loss_type=["sigmoid"], max_length=seq_len, use_cpu=True,
                         bf16=False, report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True,
                         dataloader_num_workers=0, lr_scheduler_type="constant")
        trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(records),
                             processing_class=hf_tok, peft_config=peft_config, callbacks=[Clock()])
        trainer.train()
    return {"pairs": batch_pairs * steps, "seconds": marks[-1] - marks[warmup - 1]}


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    assets = json.loads(Path(args.assets).read_text())
    if args.worker == "ernie":
        row = run_ernie(assets, args.lora, args.steps, args.warmup, args.seq_len, args.rows)
    else:
        row = run_trl(assets, args.lora, args.steps, args.warmup, args.seq_len, args.batch_pairs)
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print("RESULT " + json.dumps(row))


def spawn(args, which: str, lora: bool, assets_path: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", which, "--assets", str(assets_path), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--seq-len", str(args.seq_len), "--rows", str(args.rows),
           "--batch-pairs", str(args.batch_pairs), "--threads", str(args.threads)] + (["--lora"] if lora else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not line:
        raise RuntimeError(f"{which} lora={lora} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    row = json.loads(line[-1][len("RESULT "):])
    row["pairs_per_s"] = row["pairs"] / row["seconds"]
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="DPO pairs/s and peak RSS: ernie_core vs TRL DPOTrainer")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pairs", type=int, default=256, help="synthetic preference pairs")
    p.add_argument("--seq-len", type=int, default=512, help="ernie_core row length / TRL max_length")
    p.add_argument("--rows", type=int, default=2, help="ernie_core packed rows per step")
    p.add_argument("--batch-pairs", type=int, default=8, help="TRL pairs per step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="3 timed steps, for a smoke run")
    p.add_argument("--worker", choices=["ernie", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--assets", help=argparse.SUPPRESS)
    p.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.steps, args.warmup = 3, 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        assets = make_assets(Path(tmp), args.pairs)
        assets_path = Path(tmp) / "assets.json"
        assets_path.write_text(json.dumps(assets))
        for lora in (False, True):
            got = {which: spawn(args, which, lora, assets_path) for which in ("ernie", "trl")}
            for which, r in got.items():
                rows.append({"impl": "ernie_core" if which == "ernie" else "trl", "mode": "lora" if lora else "full",
                             "pairs_per_s": r["pairs_per_s"], "peak_rss_mib": r["peak_rss_mib"],
                             "pairs": r["pairs"], "seconds": r["seconds"]})
            rows.append({"impl": "ratio ernie/trl", "mode": "lora" if lora else "full",
                         "pairs_per_s": got["ernie"]["pairs_per_s"] / got["trl"]["pairs_per_s"],
                         "peak_rss_mib": got["ernie"]["peak_rss_mib"] / got["trl"]["peak_rss_mib"]})
    write_results("dpo_throughput" + ("-quick" if args.quick else ""), rows,
                  ["impl", "mode", "pairs_per_s", "peak_rss_mib", "pairs", "seconds"],
                  extra={"model": SMALL, "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "assets")}})


if __name__ == "__main__":
    main()
