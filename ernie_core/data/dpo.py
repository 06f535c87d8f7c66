"""DPO preference data (docs/behaviour.md#dpo-data-format, #mixing-and-virtual-epochs): readers, pair -> row segment, share-prompt packing,
the endless resumable train stream, eval batches and the max_steps estimate.

One pair is laid out as prompt + chosen + rejected (T = P + C + R tokens); the FlashMask start rows
keep the rejected rows from seeing the chosen columns, and position ids restart at P for the
rejected branch, so each branch sees exactly what it would see alone after the prompt, while the
prompt is computed once. Pairs are packed greedily into rows of max_seq_len.

A micro-batch is a dict of CPU tensors:
    input_ids, position_ids [B, S] int64; attn_mask_startend_row_indices [B, 1, S, 1] int32
    chosen_index / rejected_index [Nc] / [Nr] int64   flat positions b*S + s whose prediction is scored
    chosen_target / rejected_target                   the token predicted there
    chosen_pair / rejected_pair                       pair number in [0, num_pairs) of each entry
    score_delta [num_pairs] fp32                      the data's score gap (docs/behaviour.md#dpo-score-offset)
    labels [B, S] int64   -100 except one 0 at each pair's first column: one unit of weight per pair,
                          so the trainer's eval average is a mean over pairs
    num_pairs, num_tokens (real tokens) ints
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ernie_core.data.packing import iter_next_fit, iter_packs
from ernie_core.data.readers import iter_rows, read_is_system, split_system, turn_list
from ernie_core.data.stream import TrainStream, build_stream, eval_specs, train_specs, validate_datasets
from ernie_core.errors import DataError

DPO_TYPES = ("erniekit", "alpaca")
_ALPACA_PROMPT_KEYS = ("question", "prompt", "query")
logger = logging.getLogger("ernie_core.data")

if TYPE_CHECKING:
    from ernie_core.config import TrainConfig


# ---- reading --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreferenceExample:
    """A prompt (system?, user turns src, earlier assistant turns tgt; len(src) = len(tgt) + 1) and
    two responses, each an odd-length list of turns (assistant, user, assistant, ...)."""

    src: tuple[str, ...]
    tgt: tuple[str, ...]
    chosen: tuple[str, ...]
    rejected: tuple[str, ...]
    score_delta: float = 1.0
    system: str | None = None

    def prompt_messages(self) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for user, reply in zip(self.src, self.tgt):
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return msgs + [{"role": "user", "content": self.src[-1]}]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _response(path, line, value, k) -> tuple[str, ...]:
    turns = [value] if isinstance(value, str) else value
    if not isinstance(turns, list) or not turns or len(turns) % 2 == 0:
        raise DataError(path, line, f"'response'[{k}] must be a string or an odd-length list "
                        "(assistant, user, assistant, ...)")
    for j, t in enumerate(turns):
        if not isinstance(t, str) or not t.strip():
            raise DataError(path, line, f"'response'[{k}][{j}] must be a non-blank string")
    return tuple(t.strip() for t in turns)


def _score_delta(path, line, row, chosen: int) -> float:
    """docs/behaviour.md#dpo-score-offset (this project): `score` (a number = the delta, or a 2-list aligned with response), else
    the sort gap. A delta <= 0 would make log(delta) undefined: the row is invalid."""
    score = row.get("score")
    if score is None:
        return float(row["sort"][chosen] - row["sort"][1 - chosen])
    if _number(score):
        delta = float(score)
    elif isinstance(score, list) and len(score) == 2 and all(_number(s) for s in score):
        delta = float(score[chosen] - score[1 - chosen])
    else:
        raise DataError(path, line, "'score' must be a number (the score gap) or a list of 2 numbers")
    if delta <= 0:
        raise DataError(path, line, f"the chosen response's score gap is {delta:g}; it must be > 0")
    return delta


def parse_dpo_row(path, line: int, row) -> PreferenceExample:
    """Validate one erniekit DPO row (docs/behaviour.md#dpo-data-format)."""
    if not isinstance(row, dict):
        raise DataError(path, line, f"row must be a JSON object, got {type(row).__name__}")
    is_system = read_is_system(path, line, row)
    src = turn_list(path, line, row, "src")
    tgt_raw = row.get("tgt", [])
    if tgt_raw in ([], None):
        tgt = []
    else:
        tgt = turn_list(path, line, row, "tgt", skip_first=is_system)
    if len(src) != len(tgt) + 1:
        raise DataError(path, line, f"'src' has {len(src)} turns and 'tgt' {len(tgt)}; DPO needs one more src "
                        "than tgt (the last user turn is answered by the responses)")
    response = row.get("response")
    if not isinstance(response, list) or len(response) != 2:
        n = len(response) if isinstance(response, list) else "no list"
        raise DataError(path, line, f"'response' must hold exactly 2 candidates, got {n}")
    sort = row.get("sort")
    if not (isinstance(sort, list) and len(sort) == 2 and all(isinstance(s, int) and not isinstance(s, bool)
                                                              for s in sort)):
        raise DataError(path, line, "'sort' must be a list of 2 integers")
    if sort[0] == sort[1]:
        raise DataError(path, line, f"'sort' values are equal ({sort[0]}); the higher one marks the chosen response")
    chosen = 0 if sort[0] > sort[1] else 1
    responses = [_response(path, line, r, k) for k, r in enumerate(response)]
    system, src, tgt = split_system(path, line, row, is_system, src, tgt)
    return PreferenceExample(tuple(src), tuple(tgt), responses[chosen], responses[1 - chosen],
                             _score_delta(path, line, row, chosen), system)


def parse_alpaca_pref_row(path, line: int, row) -> PreferenceExample:
    """{system?, question|prompt|query, chosen, rejected, score?} -> src=[q], response=[chosen, rejected]."""
    if not isinstance(row, dict):
        raise DataError(path, line, f"row must be a JSON object, got {type(row).__name__}")
    key = next((k for k in _ALPACA_PROMPT_KEYS if k in row), None)
    if key is None:
        raise DataError(path, line, "missing the prompt ('question', 'prompt' or 'query')")
    for k in ("chosen", "rejected"):
        if k not in row:
            raise DataError(path, line, f"missing {k!r}")
    converted = {"src": row[key], "tgt": [], "response": [row["chosen"], row["rejected"]], "sort": [1, 0]}
    for k in ("system", "score"):
        if row.get(k) is not None:
            converted[k] = row[k]
    return parse_dpo_row(path, line, converted)


def read_preferences(path, kind: str = "erniekit"):
    """Yield (line_no, PreferenceExample) for every row; DataError(path, line, reason) at the first bad one."""
    path = Path(path)
    if kind not in DPO_TYPES:
        raise DataError(path, None, f"DPO dataset type {kind!r} is not supported; use one of {', '.join(DPO_TYPES)}")
    parse = parse_dpo_row if kind == "erniekit" else parse_alpaca_pref_row
    for line_no, row in iter_rows(path, allow_array=True):
        yield line_no, parse(path, line_no, row)


# ---- pair -> tokens -------------------------------------------------------------------------------
@dataclass
class PairSeq:
    """One tokenized pair: ids = prompt + chosen + rejected; targets as (position, token) lists in the
    pair's own coordinates (0 = first prompt token)."""

    ids: np.ndarray
    P: int
    C: int
    R: int
    chosen_pos: np.ndarray
    chosen_tgt: np.ndarray
    rejected_pos: np.ndarray
    rejected_tgt: np.ndarray
    score_delta: float

    def __len__(self) -> int:
        return self.P + self.C + self.R


def _response_targets(chunks, start: int, sep_id: int, eos_id: int, mask_out_eos: bool):
    """(positions, targets) of one branch. chunks: [(tokens, is_assistant)] laid out from logical
    position `start`; an answer a is predicted from the position before it, a[j] at start+j-1; its
    final end-of-turn token is skipped with mask_out_eos (docs/behaviour.md#dpo-pair-layout), else trained as eos (as in SFT)."""
    pos, tgt, at = [], [], start
    for tokens, assistant in chunks:
        if assistant:
            last = len(tokens) - 1
            for j, t in enumerate(tokens):
                if j == last and t == sep_id:
                    if mask_out_eos:
                        continue
                    t = eos_id
                pos.append(at + j - 1)
                tgt.append(t)
        at += len(tokens)
    return pos, tgt


def tokenize_pair(tok, ex: PreferenceExample, max_seq_len: int, max_prompt_len: int, mask_out_eos: bool = True):
    """PairSeq, or the drop reason "too_long" / "no_loss".

    Truncation (docs/behaviour.md#dpo-pair-layout): both responses stay whole; prompt turns are added back to front while
    P + C + R <= max_seq_len and P <= max_prompt_len (the oldest turns go first; no cls re-add).
    The rejected branch's first token is predicted at P - 1, like the chosen one (this project).
    """
    prompt_msgs = ex.prompt_messages()
    n = len(ex.src)
    branches = []
    for resp in (ex.chosen, ex.rejected):
        msgs = prompt_msgs + [{"role": "assistant" if k % 2 == 0 else "user", "content": t} for k, t in enumerate(resp)]
        turns = tok.encode_chat_turns(msgs)
        chunks = [(turns[n - 1][1], True)]
        for q, a in turns[n:]:
            chunks += [(q, False), (a, True)]
        branches.append((turns, chunks))
    turns = branches[0][0]
    units = [list(q) + list(a) for q, a in turns[:n - 1]] + [list(turns[n - 1][0])]
    C = sum(len(t) for t, _ in branches[0][1])
    R = sum(len(t) for t, _ in branches[1][1])
    first, P = len(units), 0
    for k in range(len(units) - 1, -1, -1):
        if P + len(units[k]) + C + R > max_seq_len or P + len(units[k]) > max_prompt_len:
            break
        first, P = k, P + len(units[k])
    if first == len(units):
        return "too_long"
    prompt = [t for u in units[first:] for t in u]
    cpos, ctgt = _response_targets(branches[0][1], P, tok.sep_id, tok.eos_id, mask_out_eos)
    rpos, rtgt = _response_targets(branches[1][1], P, tok.sep_id, tok.eos_id, mask_out_eos)
    if not ctgt or not rtgt:
        return "no_loss"
    # Rejected logical position q (prompt + rejected) sits at q + C in the row once q >= P.
    rpos = [p if p < P else p + C for p in rpos]
    ids = prompt + [t for c, _ in branches[0][1] for t in c] + [t for c, _ in branches[1][1] for t in c]
    as32 = (lambda v: np.asarray(v, dtype=np.int32))
    return PairSeq(as32(ids), P, C, R, as32(cpos), as32(ctgt), as32(rpos), as32(rtgt), ex.score_delta)


def tokenize_preference_file(path, kind, tok, max_seq_len: int, max_prompt_len: int, mask_out_eos: bool = True):
    """Every kept pair of one file (list of PairSeq); logs how many rows were dropped and why."""
    pairs, dropped, rows = [], {"too_long": 0, "no_loss": 0}, 0
    for _, ex in read_preferences(path, kind):
        rows += 1
        seq = tokenize_pair(tok, ex, max_seq_len, max_prompt_len, mask_out_eos)
        if isinstance(seq, str):
            dropped[seq] += 1
        else:
            pairs.append(seq)
    for reason, count in dropped.items():
        if count:
            what = ("prompt + both responses do not fit max_seq_len / max_prompt_len" if reason == "too_long"
                    else "a response has no trained token")
            logger.warning("%s: dropped %d of %d rows (%s)", path, count, rows, what)
    if not pairs:
        raise DataError(path, None, f"no preference pair fits max_seq_len={max_seq_len} "
                        f"({rows} rows read, dropped {dropped})")
    return pairs


# ---- rows -----------------------------------------------------------------------------------------
def build_dpo_batch(rows, seq_len: int, pad_id: int) -> dict:
    """rows: list of packed rows, each a list of PairSeq whose lengths sum <= seq_len -> micro-batch
    (module docstring). Pair at offset off: position ids 0..P-1, P..P+C-1, P..P+R-1; start rows
    [off+T]*P + [off+P+C]*C + [off+T]*R (docs/behaviour.md#dpo-pair-layout); a pad column j gets j (no row sees it)."""
    B = len(rows)
    input_ids = np.full((B, seq_len), pad_id, np.int64)
    position_ids = np.zeros((B, seq_len), np.int64)
    start_rows = np.tile(np.arange(seq_len, dtype=np.int32), (B, 1))
    labels = np.full((B, seq_len), -100, np.int64)
    sides = {"chosen": ([], [], []), "rejected": ([], [], [])}
    deltas, k, num_tokens = [], 0, 0
    for b, pairs in enumerate(rows):
        off = 0
        for pair in pairs:
            P, C, R, T = pair.P, pair.C, pair.R, len(pair)
            if off + T > seq_len:
                raise ValueError(f"row {b} holds more than {seq_len} tokens")
            input_ids[b, off:off + T] = pair.ids
            position_ids[b, off:off + T] = np.concatenate([np.arange(P + C), np.arange(P, P + R)])
            start_rows[b, off:off + P] = off + T
            start_rows[b, off + P:off + P + C] = off + P + C
            start_rows[b, off + P + C:off + T] = off + T
            labels[b, off] = 0
            for side, pos, tgt in (("chosen", pair.chosen_pos, pair.chosen_tgt),
                                   ("rejected", pair.rejected_pos, pair.rejected_tgt)):
                idx, targets, owner = sides[side]
                idx.append(b * seq_len + off + pos.astype(np.int64))
                targets.append(tgt.astype(np.int64))
                owner.append(np.full(len(pos), k, np.int64))
            deltas.append(pair.score_delta)
            off, k = off + T, k + 1
        num_tokens += off
    batch = {
        "input_ids": torch.from_numpy(input_ids), "position_ids": torch.from_numpy(position_ids),
        "attn_mask_startend_row_indices": torch.from_numpy(start_rows).view(B, 1, seq_len, 1),
        "labels": torch.from_numpy(labels), "score_delta": torch.tensor(deltas, dtype=torch.float32),
        "num_pairs": k, "num_tokens": num_tokens,
    }
    for side, (idx, targets, owner) in sides.items():
        cat = (lambda parts: torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.int64))
        batch[f"{side}_index"], batch[f"{side}_target"], batch[f"{side}_pair"] = cat(idx), cat(targets), cat(owner)
    return batch


# ---- config glue ----------------------------------------------------------------------------------
def _load(specs, cfg, tok):
    d = cfg.dpo
    return [tokenize_preference_file(s.path, s.kind, tok, cfg.train.max_seq_len, d.max_prompt_len,
                                     d.mask_out_eos_token) for s in specs]


def validate_preference_datasets(cfg: "TrainConfig") -> dict[str, int]:
    """Read every train and eval file once; DataError at the first malformed line. {path: rows}."""
    return validate_datasets(cfg, read=read_preferences)


class PairBatchBuilder:
    """DPO: a plan (rows of (source, pair)) -> the micro-batch tensors of packed preference pairs."""

    def __init__(self, sources, seq_len: int, pad_id: int):
        self.sources, self.seq_len, self.pad_id = sources, seq_len, pad_id

    def __call__(self, plan) -> dict:
        return build_dpo_batch([[self.sources[s][r] for s, r in pack] for pack in plan], self.seq_len, self.pad_id)


def build_dpo_stream(cfg: "TrainConfig", tok, dp_rank: int = 0, dp_world: int = 1) -> TrainStream:
    """The DPO train stream: the SFT stream's planner and resumable iterator over pairs (a pair's length
    is prompt + chosen + rejected tokens), greedy-packed per `buffer_size` pairs."""
    sources = _load(train_specs(cfg), cfg, tok)
    lengths = [[len(p) for p in src] for src in sources]
    return build_stream(cfg, lengths, PairBatchBuilder(sources, cfg.train.max_seq_len, tok.pad_id),
                        buffer_size=cfg.dpo.buffer_size, dp_rank=dp_rank, dp_world=dp_world)


def build_dpo_eval_batches(cfg, tok, dp_rank: int = 0, dp_world: int = 1) -> list[dict]:
    """Every eval pair once, in file order, next-fit packed; `per_device_eval_batch_size` rows a batch."""
    specs = eval_specs(cfg)
    if not specs:
        return []
    pairs = [p for src in _load(specs, cfg, tok) for p in src]
    packs = list(iter_next_fit([len(p) for p in pairs], cfg.train.max_seq_len))
    bs = cfg.eval.per_device_eval_batch_size
    batches = [build_dpo_batch([[pairs[i] for i in pack] for pack in packs[lo:lo + bs]], cfg.train.max_seq_len,
                               tok.pad_id) for lo in range(0, len(packs), bs)]
    return batches[dp_rank::dp_world]


def estimate_dpo_max_steps(cfg, tok) -> int:
    """docs/behaviour.md#mixing-and-virtual-epochs for pairs: N = n (one source) or Σ ceil(n_i·prob_origin_i) pairs, packed as in training;
    ceil(packs · epochs / (batch_size · grad_accum)) (the trainer folds dp x sharding into batch_size)."""
    specs = train_specs(cfg)
    sources = _load(specs, cfg, tok)
    if len(sources) == 1:
        lengths = [len(p) for p in sources[0]]
    else:
        lengths = [len(src[i % len(src)]) for src, spec in zip(sources, specs)
                   for i in range(math.ceil(len(src) * spec.prob_origin))]
    if cfg.train.random_shuffle:
        lengths = [lengths[i] for i in np.random.RandomState(cfg.train.seed).permutation(len(lengths))]
    packs = sum(1 for _ in iter_packs(lengths, cfg.train.max_seq_len, cfg.accel.greedy_intokens,
                                      cfg.dpo.buffer_size))
    t = cfg.train
    return max(1, math.ceil(packs * float(t.num_train_epochs) / (t.per_device_train_batch_size
                                                                 * t.gradient_accumulation_steps)))
