"""End-of-run evidence that the model learned: eval loss before and after, and (when
`eval_generate_samples` > 0) greedy answers to held-out prompts with their exact-match accuracy."""
from __future__ import annotations

import json

import torch


def generation_report(model, tok, prompts, max_new_tokens: int = 32) -> dict:
    """Greedy-decode each EvalPrompt; return accuracy and the per-prompt rows."""
    from ..data import answer_matches, answer_text

    rows = []
    stop = [i for i in (tok.eos_id, tok.sep_id) if i is not None]
    device = next(model.parameters()).device
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p.prompt_ids], dtype=torch.long, device=device)
            new = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=stop)
            rows.append({"prompt": tok.decode(p.prompt_ids, skip_special_tokens=True).strip(),
                         "expected": p.answer.strip(), "got": answer_text(tok, new),
                         "correct": answer_matches(tok, new, p.answer)})
    accuracy = sum(r["correct"] for r in rows) / len(rows) if rows else float("nan")
    return {"accuracy": accuracy, "n": len(rows), "rows": rows}


def print_report(trainer, show: int = 8) -> dict:
    cfg = trainer.cfg
    before = trainer.state.get("eval_before") or {}
    after = trainer.state.get("eval_after") or {}
    report: dict = {"steps": trainer.global_step}
    lines = ["", "=== ernie_core run summary ==="]
    lines.append(f"steps trained: {trainer.global_step}   model saved to: {trainer.output_dir}")
    # Perplexity means something for a token NLL (SFT), not for a preference loss (DPO).
    sft = str(cfg.basic.stage).upper() == "SFT"

    def fmt(ev: dict) -> str:
        return f"{ev['eval_loss']:.4f}" + (f" (ppl {ev['eval_ppl']:.2f})" if sft and "eval_ppl" in ev else "")

    if before and after:
        lines.append(f"eval loss: {fmt(before)} before training -> {fmt(after)} after")
        report.update(eval_loss_before=before["eval_loss"], eval_loss_after=after["eval_loss"])
    elif after:
        lines.append(f"eval loss after training: {fmt(after)}")
        report.update(eval_loss_after=after["eval_loss"])
    rewards = _reward_accuracy(trainer.output_dir)
    if rewards:
        first, last = rewards
        report.update(reward_accuracy_first=first["rewards/accuracy"], reward_accuracy_last=last["rewards/accuracy"])
        lines.append(f"reward accuracy (chosen preferred over rejected): {first['rewards/accuracy']:.0%} at step "
                     f"{first['step']} -> {last['rewards/accuracy']:.0%} at step {last['step']}; reward margin "
                     f"{first['rewards/margin']:.4f} -> {last['rewards/margin']:.4f}")
    n = cfg.eval.eval_generate_samples
    if n > 0 and cfg.basic.do_eval:
        from ..data import build_eval_prompts

        gen = generation_report(trainer.model, trainer.tokenizer, build_eval_prompts(cfg, trainer.tokenizer, limit=n))
        report.update(held_out_accuracy=gen["accuracy"], held_out_n=gen["n"])
        lines.append(f"held-out exact-match accuracy: {gen['accuracy']:.1%} on {gen['n']} prompts; examples:")
        for r in gen["rows"][:show]:
            mark = "ok " if r["correct"] else "BAD"
            lines.append(f"  [{mark}] {r['prompt'][-60:]!r} -> {r['got']!r} (expected {r['expected']!r})")
    print("\n".join(lines), flush=True)
    (trainer.output_dir / "run_report.json").write_text(json.dumps(report, indent=2))
    return report


def _reward_accuracy(output_dir):
    """(first, last) logged training lines of a DPO run (those with rewards/accuracy), or None."""
    from .loggers import read_log

    lines = [r for r in read_log(output_dir) if "rewards/accuracy" in r and "rewards/margin" in r]
    return (lines[0], lines[-1]) if lines else None
