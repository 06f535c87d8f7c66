"""`python -m ernie_core.eval CONFIG.yaml [key=value ...]`: eval_loss and eval_ppl of
`model_name_or_path` on the config's eval datasets (every row once, in order), plus held-out
exact-match accuracy when `eval_generate_samples` > 0. Prints one JSON line.

`model_name_or_path` may be a LoRA run's output_dir or checkpoint (or any PEFT / ERNIEKit adapter
dir): the adapter is applied to its base and merged (`Ernie4_5ForCausalLM.from_pretrained`), so the
loss is the adapted model's and generation runs at base speed. The tokenizer comes from that dir,
else from the adapter's base.

With `stage: DPO` the eval data are preference pairs and the line holds eval_loss (the configured
preference loss), rewards/{chosen,rejected,accuracy,margin} and logps/{chosen,rejected}. The
reference is the adapter's base for a LoRA output (adapters switched off, no second model), the
model given by `ref_model=DIR` when passed, and none otherwise (reference_free, said in the line)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from .errors import UserError


def tokenizer_dir(path) -> Path:
    """`path`, or for an adapter dir without tokenizer files its base model's dir."""
    from .peft.loading import find_lora_base
    from .peft import is_adapter_dir

    path = Path(path)
    if is_adapter_dir(path) and not any((path / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
        return find_lora_base(path)
    return path


def evaluate(cfg, ref_model=None) -> dict:
    from .data import build_eval_batches, build_eval_prompts, load_tokenizer
    from .models import Ernie4_5ForCausalLM
    from .train.report import generation_report
    from .train.trainer import model_runtime_kwargs

    if not cfg.eval.eval_dataset_path:
        raise UserError("eval_dataset_path is empty: nothing to evaluate")
    if str(cfg.basic.stage).upper() == "DPO":
        return evaluate_dpo(cfg, ref_model)
    tok = load_tokenizer(tokenizer_dir(cfg.basic.model_name_or_path))
    model = Ernie4_5ForCausalLM.from_pretrained(cfg.basic.model_name_or_path, **model_runtime_kwargs(cfg)).eval()
    batches = build_eval_batches(cfg, tok)
    limit = cfg.eval.max_evaluate_steps
    if limit and limit > 0:
        batches = batches[:limit]
    loss_sum, count = 0.0, 0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision.bf16)
    with torch.no_grad(), autocast:
        for batch in batches:
            n = int((batch["labels"] != -100).sum())
            if n:
                out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                            attn_mask_startend_row_indices=batch["attn_mask_startend_row_indices"],
                            labels=batch["labels"])
                loss_sum += float(out.loss) * n
                count += n
    result = {"eval_loss": loss_sum / max(1, count), "eval_ppl": math.exp(min(loss_sum / max(1, count), 50.0)),
              "eval_tokens": count, "eval_batches": len(batches)}
    if cfg.eval.eval_generate_samples > 0:
        gen = generation_report(model, tok, build_eval_prompts(cfg, tok, limit=cfg.eval.eval_generate_samples))
        result.update(held_out_accuracy=gen["accuracy"], held_out_n=gen["n"])
    return result


def evaluate_dpo(cfg, ref_model=None) -> dict:
    from .data import load_tokenizer
    from .models import Ernie4_5ForCausalLM
    from .peft import lora_modules
    from .train.dpo import DPOObjective
    from .train.trainer import model_runtime_kwargs

    path = cfg.basic.model_name_or_path
    tok = load_tokenizer(tokenizer_dir(path))
    runtime = model_runtime_kwargs(cfg)
    # Unmerged: a LoRA output's reference is its base with the adapters off (DPOObjective does that).
    model = Ernie4_5ForCausalLM.from_pretrained(path, merge_lora=False, **runtime).eval()
    objective = DPOObjective.from_config(cfg)
    reference = "adapters off" if lora_modules(model) else None
    if ref_model is not None:
        if reference:
            raise UserError(f"ref_model={ref_model}: {path} is a LoRA output, whose reference is its own base")
        objective.ref_model = Ernie4_5ForCausalLM.from_pretrained(ref_model, **runtime).eval()
        reference = str(ref_model)
    elif reference is None and not objective.reference_free:
        objective.reference_free = True  # a full DPO output does not say what its reference was
    batches = objective.build_eval_batches(cfg, tok)
    limit = cfg.eval.max_evaluate_steps
    if limit and limit > 0:
        batches = batches[:limit]
    totals, pairs = {}, 0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision.bf16)
    with torch.no_grad(), autocast:
        for batch in batches:
            k = int(batch["num_pairs"])
            if not k:
                continue
            loss, metrics = objective.loss(model, batch)
            for name, value in {"eval_loss": float(loss), **metrics}.items():
                totals[name] = totals.get(name, 0.0) + float(value) * k
            pairs += k
    result = {name: value / max(1, pairs) for name, value in totals.items()}
    result.update(eval_pairs=pairs, eval_batches=len(batches), reference=reference or "none (reference_free)")
    return result


def main(argv: list[str] | None = None) -> int:
    from .config import load_config

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        ref = [a for a in argv[1:] if a.startswith("ref_model=")]
        cfg = load_config(argv[0], [a for a in argv[1:] if not a.startswith("ref_model=")])
        print(json.dumps(evaluate(cfg, ref[-1].split("=", 1)[1] if ref else None)))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
