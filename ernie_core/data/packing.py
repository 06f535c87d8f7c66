"""Packing sequences into rows of max_seq_len (docs/behaviour.md#packing) and building the row tensors
(position ids docs/behaviour.md#position-ids, FlashMask LTS indices docs/behaviour.md#flashmask-row-indices)."""
from __future__ import annotations

import heapq
from typing import Iterable, Iterator

import numpy as np
import torch

from ernie_core.data.sequence import IGNORE_INDEX

GREEDY_BUFFER = 500  # ERNIEKit's SFT hard-codes a 500-sequence buffer for greedy_intokens


def pack_greedy(lengths: Iterable[int], capacity: int) -> list[list[int]]:
    """Greedy packing of one buffer: each sequence goes, in buffer order, into the open pack with
    the most free space if it fits there, else into a new pack. Returns packs (lists of positions
    into `lengths`) in creation order, positions in insertion order.

    If the roomiest pack cannot take a sequence, no pack can, so a max-heap on free space suffices;
    ties go to the oldest pack (heap key (-free, pack index)).
    """
    packs: list[list[int]] = []
    heap: list[tuple[int, int]] = []
    for pos, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"sequence of {n} tokens does not fit a row of {capacity}")
        if heap and -heap[0][0] >= n:
            free, k = heapq.heappop(heap)
            packs[k].append(pos)
            heapq.heappush(heap, (free + n, k))
        else:
            packs.append([pos])
            heapq.heappush(heap, (-(capacity - n), len(packs) - 1))
    return packs


def iter_next_fit(lengths: Iterable[int], capacity: int) -> Iterator[list[int]]:
    """Next-fit: append while the pack stays <= capacity, else emit it and start a new one."""
    pack, used = [], 0
    for pos, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"sequence of {n} tokens does not fit a row of {capacity}")
        if pack and used + n > capacity:
            yield pack
            pack, used = [], 0
        pack.append(pos)
        used += n
    if pack:
        yield pack


def iter_packs(lengths, capacity: int, greedy: bool, buffer_size: int = GREEDY_BUFFER) -> Iterator[list[int]]:
    """Packs of positions into `lengths` (a sequence): greedy within each buffer of `buffer_size`
    items (SFT: 500, DPO: the `buffer_size` option), or next-fit."""
    if not greedy:
        yield from iter_next_fit(lengths, capacity)
        return
    for lo in range(0, len(lengths), buffer_size):
        for pack in pack_greedy(lengths[lo:lo + buffer_size], capacity):
            yield [lo + p for p in pack]


def build_rows(rows, seq_len: int, pad_id: int) -> dict:
    """Stack packed rows into one micro-batch of CPU tensors (keys as in CONTRACTS.md).

    rows: list of rows, each a list of (input_ids, labels) int arrays whose lengths sum <= seq_len.
    Returns input_ids/labels/position_ids [B,S] int64, attn_mask_startend_row_indices [B,1,S,1]
    int32 and num_tokens (real tokens). A sample in columns [off, off+n) gets LTS off+n (rows from
    there on cannot see it); a pad column j gets LTS j, so no row sees it (docs/behaviour.md#flashmask-row-indices).
    """
    b = len(rows)
    input_ids = np.full((b, seq_len), pad_id, np.int64)
    labels = np.full((b, seq_len), IGNORE_INDEX, np.int64)
    position_ids = np.zeros((b, seq_len), np.int64)
    start_rows = np.tile(np.arange(seq_len, dtype=np.int32), (b, 1))
    num_tokens = 0
    for r, samples in enumerate(rows):
        off = 0
        for ids, lab in samples:
            n = len(ids)
            if off + n > seq_len:
                raise ValueError(f"row {r} holds more than {seq_len} tokens")
            input_ids[r, off:off + n] = ids
            labels[r, off:off + n] = lab
            position_ids[r, off:off + n] = np.arange(n)  # restart per sample (docs/behaviour.md#position-ids this project)
            start_rows[r, off:off + n] = off + n
            off += n
        num_tokens += off
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "attn_mask_startend_row_indices": torch.from_numpy(start_rows).view(b, 1, seq_len, 1),
        "num_tokens": num_tokens,
    }
