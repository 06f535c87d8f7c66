"""Evaluation data: loss batches (every row once, in order) and generation prompts for exact match.

Eval batches use sequential (next-fit) packing: rows stay in file order and each appears exactly
once, never reordered by greedy packing (docs/behaviour.md#sft-row-to-sequence "Eval"). Because labels, position
ids and the FlashMask indices separate samples, packing does not change the eval loss; it only
avoids computing on padding.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

from ernie_core.data.packing import build_rows, iter_next_fit
from ernie_core.data.readers import read_examples
from ernie_core.data.sequence import first_kept_turn
from ernie_core.data.stream import eval_specs, load_sources

logger = logging.getLogger("ernie_core.data")


def build_eval_batches(cfg, tok, dp_rank: int = 0, dp_world: int = 1) -> list[dict]:
    """Micro-batches of `per_device_eval_batch_size` packed rows (the last may hold fewer) over every
    eval row once, sources in config order, rows in file order. With dp_world > 1 rank r keeps
    batches r, r + dp_world, ... . Empty list when no eval_dataset_path is set."""
    seq_len = cfg.train.max_seq_len
    specs = eval_specs(cfg)
    if not specs:
        return []
    samples = [src.get(i) for src in load_sources(specs, tok, seq_len) for i in range(len(src))]
    packs = list(iter_next_fit([len(ids) for ids, _ in samples], seq_len))
    bs = cfg.eval.per_device_eval_batch_size
    batches = []
    for lo in range(0, len(packs), bs):
        rows = [[samples[p] for p in pack] for pack in packs[lo:lo + bs]]
        batches.append(build_rows(rows, seq_len, tok.pad_id))
    return batches[dp_rank::dp_world]


class EvalPrompt(NamedTuple):
    prompt_ids: list[int]  # chat template up to and including the final "Assistant: "
    answer: str            # the final assistant turn of the row, stripped
    path: str
    line: int


def build_eval_prompts(cfg, tok, limit: int | None = None) -> list[EvalPrompt]:
    """One generation prompt per eval row (earlier turns with their reference answers as context),
    for exact-match accuracy. Turns are front-truncated as in training; rows whose last turn does
    not fit max_seq_len are skipped and counted in a log line."""
    seq_len = cfg.train.max_seq_len
    out, skipped = [], 0
    for spec in eval_specs(cfg):
        for line, example in read_examples(spec.path, spec.kind):
            if limit is not None and len(out) >= limit:
                return out
            turns = tok.encode_chat_turns(example.messages())
            first = first_kept_turn(turns, seq_len)
            if first == len(turns):
                skipped += 1
                continue
            ids = [tok.cls_id] if first > 0 else []  # cls re-added as in training
            for q, a in turns[first:-1]:
                ids += q + a
            ids += turns[-1][0]
            out.append(EvalPrompt(ids, example.tgt[-1], spec.path, line))
    if skipped:
        logger.warning("eval prompts: skipped %d rows whose last turn does not fit max_seq_len=%d",
                       skipped, seq_len)
    return out


def answer_text(tok, generated_ids) -> str:
    """Generated continuation -> answer text: cut at the first eos or sep, drop specials, strip."""
    ids = []
    for i in generated_ids:
        if int(i) in (tok.eos_id, tok.sep_id):
            break
        ids.append(int(i))
    return tok.decode(ids, skip_special_tokens=True).strip()


def answer_matches(tok, generated_ids, answer: str) -> bool:
    """Exact match of a generated continuation (ids after the prompt) against the reference."""
    return answer_text(tok, generated_ids) == answer.strip()
