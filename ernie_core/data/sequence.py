"""Row -> training sequence (docs/behaviour.md#sft-row-to-sequence, with this project's mask), and the tokenized store.

A sequence is (input_ids, labels) of equal length <= max_seq_len; labels are -100 where no loss is
taken. Dropped rows (too long, or nothing to train) are counted and logged, never lost silently.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ernie_core.data.readers import Example, read_examples

IGNORE_INDEX = -100
# Room ERNIEKit keeps free when truncating (`max_seq_len + 1 - cur_len - 8`), docs/behaviour.md#sft-row-to-sequence.
_TRUNCATION_SLACK = 8
logger = logging.getLogger("ernie_core.data")


def first_kept_turn(turns, max_seq_len: int) -> int:
    """Index of the first turn kept by front truncation (whole turns only); len(turns) = drop the row.

    Walking back from the last turn, turn t stays while len(q_t)+len(a_t) <= max_seq_len+1-cur_len-8.
    """
    cur_len, first = 0, len(turns)
    for t in range(len(turns) - 1, -1, -1):
        n = len(turns[t][0]) + len(turns[t][1])
        if n > max_seq_len + 1 - cur_len - _TRUNCATION_SLACK:
            break
        cur_len, first = cur_len + n, t
    return first


def build_sequence(turns, labels, cls_id: int, sep_id: int, eos_id: int):
    """Steps 2-5 of docs/behaviour.md#sft-row-to-sequence on already-truncated turns [(q_ids, a_ids), ...] with per-turn labels.

    Returns (input_ids, labels) as int32 arrays, or None when no position carries loss.
    Mask (this project): non-final turn `[0]*(len(q)-1) + [label]*len(a) + [0]`, final turn
    `[0]*(len(q)-1) + [label]*(len(a)+1)`; mask[p] weights the prediction made at input p.
    """
    tokens, mask = [], []
    last = len(turns) - 1
    for t, ((q, a), weight) in enumerate(zip(turns, labels)):
        if not q:
            raise ValueError("every turn needs a non-empty prompt chunk")
        tokens += list(q) + list(a)
        tail = [weight] * (len(a) + 1) if t == last else [weight] * len(a) + [0]
        mask += [0] * (len(q) - 1) + tail
    if tokens[0] != cls_id:  # front truncation cut q_1, which held cls
        tokens, mask = [cls_id] + tokens, [0] + mask
    if tokens[-1] == sep_id:  # the final sep is only ever a target, never an input
        tokens, mask = tokens[:-1], mask[:-1]
    ids = np.asarray(tokens, dtype=np.int32)
    targets = np.append(ids[1:], eos_id).astype(np.int32)
    targets[targets == sep_id] = eos_id  # answers end with the generation eos (id 2)
    targets[np.asarray(mask) == 0] = IGNORE_INDEX
    if not (targets != IGNORE_INDEX).any():
        return None
    return ids, targets


def tokenize_example(tok, example: Example, max_seq_len: int):
    """Example -> (input_ids, labels), or the drop reason "too_long" / "no_loss"."""
    turns = tok.encode_chat_turns(example.messages())
    first = first_kept_turn(turns, max_seq_len)
    if first == len(turns):
        return "too_long"
    seq = build_sequence(turns[first:], example.label[first:], tok.cls_id, tok.sep_id, tok.eos_id)
    return "no_loss" if seq is None else seq


@dataclass
class TokenizedSource:
    """All kept sequences of one file, concatenated: sample i is ids[offsets[i]:offsets[i+1]].

    One flat array per field keeps DataLoader workers cheap (fork shares it, pickling is one copy).
    """

    path: str
    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    rows_read: int = 0
    dropped: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.ids[lo:hi], self.labels[lo:hi]


def tokenize_file(path: str | Path, kind: str, tok, max_seq_len: int) -> TokenizedSource:
    """Read, validate and tokenize one SFT file; logs how many rows were dropped and why."""
    ids, labels, offsets = [], [], [0]
    dropped = {"too_long": 0, "no_loss": 0}
    rows = 0
    for _, example in read_examples(path, kind):
        rows += 1
        seq = tokenize_example(tok, example, max_seq_len)
        if isinstance(seq, str):
            dropped[seq] += 1
            continue
        ids.append(seq[0])
        labels.append(seq[1])
        offsets.append(offsets[-1] + len(seq[0]))
    if dropped["too_long"]:
        logger.warning("%s: dropped %d of %d rows whose last turn does not fit max_seq_len=%d",
                       path, dropped["too_long"], rows, max_seq_len)
    if dropped["no_loss"]:
        logger.warning("%s: dropped %d of %d rows with no trained answer (every kept turn has label 0)",
                       path, dropped["no_loss"], rows)
    cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int32))
    return TokenizedSource(str(path), cat(ids), cat(labels), np.asarray(offsets, np.int64), rows, dropped)
