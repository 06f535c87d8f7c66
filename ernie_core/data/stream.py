"""The endless, deterministic, resumable train stream (SFT and DPO); dataset validation; max_steps estimate.

Pipeline: files -> tokenized sources (once, in memory) -> virtual epochs -> packs (docs/behaviour.md,
"Data: mixing, epochs, packing")
-> global batches of bs*dp rows -> this rank's slice -> tensors. Everything up to the tensors is
index arithmetic on sequence lengths, so skipping k micro-batches on resume is cheap and never
re-tokenizes. With dataloader_num_workers = W > 0, worker w builds the tensors of micro-batches
m with m % W == w; torch's DataLoader reads workers round-robin, so the order equals W = 0.
"""
from __future__ import annotations

import itertools
import math
import os
import weakref
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ernie_core.data.mixing import SourceCycler, epoch_counts, epoch_order, estimate_packs, parse_sources
from ernie_core.data.packing import GREEDY_BUFFER, build_rows, iter_packs
from ernie_core.data.readers import read_examples
from ernie_core.data.sequence import tokenize_file
from ernie_core.errors import DataError

if TYPE_CHECKING:
    from ernie_core.config import TrainConfig


def train_specs(cfg: "TrainConfig"):
    t = cfg.train
    return parse_sources(t.train_dataset_path, t.train_dataset_prob, t.train_dataset_type, "train")


def eval_specs(cfg: "TrainConfig"):
    e = cfg.eval
    if not e.eval_dataset_path:
        return []
    return parse_sources(e.eval_dataset_path, e.eval_dataset_prob, e.eval_dataset_type, "eval")


# Tokenized files per tokenizer, so estimate_max_steps and build_train_stream in one run tokenize
# each file once. Weak keys: the memo dies with the tokenizer. A changed file (mtime, size) misses.
_TOKENIZED = weakref.WeakKeyDictionary()


def _tokenize_cached(spec, tok, max_seq_len: int):
    try:
        st = os.stat(spec.path)
    except OSError:
        return tokenize_file(spec.path, spec.kind, tok, max_seq_len)  # raises DataError naming it
    key = (os.path.abspath(spec.path), spec.kind, max_seq_len, st.st_mtime_ns, st.st_size)
    memo = _TOKENIZED.setdefault(tok, {})
    if key not in memo:
        memo[key] = tokenize_file(spec.path, spec.kind, tok, max_seq_len)
    return memo[key]


def load_sources(specs, tok, max_seq_len: int):
    """Tokenize every source; a source left with no usable row is an error, not an empty stream."""
    sources = [_tokenize_cached(s, tok, max_seq_len) for s in specs]
    for src in sources:
        if len(src) == 0:
            raise DataError(src.path, None, f"no row fits max_seq_len={max_seq_len} with a trained answer "
                            f"({src.rows_read} rows read, dropped {src.dropped})")
    return sources


def validate_datasets(cfg: "TrainConfig", tok=None, read=read_examples) -> dict[str, int]:
    """Read every train and eval file once with `read(path, kind)` (SFT rows by default; DPO passes its
    preference reader), no tokenization, and raise DataError at the first bad line; returns
    {path: rows}. Sources with prob 0 are dropped from training, so not read."""
    rows = {}
    for spec in train_specs(cfg) + eval_specs(cfg):
        if spec.path not in rows:
            rows[spec.path] = sum(1 for _ in read(spec.path, spec.kind))
    return rows


class BatchPlanner:
    """Which items (source, row) form each packed row and each of this rank's micro-batches: index
    arithmetic on item lengths only, shared by SFT (sequences) and DPO (preference pairs).

    lengths: per source, the token count of every item; counts: items per source in one virtual epoch;
    pack(lengths) -> packs of positions (e.g. `iter_packs` with the run's capacity and greedy buffer)."""

    def __init__(self, lengths, counts, *, seed: int, shuffle: bool, pack, batch_size: int, dp_rank: int = 0,
                 dp_world: int = 1):
        self.lengths, self.counts = [np.asarray(n) for n in lengths], counts
        self.seed, self.shuffle, self.pack = seed, shuffle, pack
        self.batch_size, self.dp_rank, self.dp_world = batch_size, dp_rank, dp_world

    def packs(self):
        """Endless packed rows, each a list of (source, row); packing restarts every virtual epoch."""
        cyclers = [SourceCycler(len(n), self.seed, self.shuffle) for n in self.lengths]
        for epoch in itertools.count():
            src, row = epoch_order(cyclers, self.counts, epoch, self.shuffle)
            lens = np.empty(len(src), np.int64)
            for i, n in enumerate(self.lengths):
                lens[src == i] = n[row[src == i]]
            src, row = src.tolist(), row.tolist()
            for pack in self.pack(lens.tolist()):
                yield [(src[p], row[p]) for p in pack]

    def batches(self):
        """This rank's micro-batches: cut global batches of bs*dp rows, keep slice dp_rank."""
        packs, bs = self.packs(), self.batch_size
        while True:
            rows = [next(packs) for _ in range(bs * self.dp_world)]
            yield rows[self.dp_rank * bs:(self.dp_rank + 1) * bs]


class SequenceBatchBuilder:
    """SFT: a plan (rows of (source, row)) -> the micro-batch tensors of packed sequences."""

    def __init__(self, sources, seq_len: int, pad_id: int):
        self.sources, self.seq_len, self.pad_id = sources, seq_len, pad_id

    def __call__(self, plan) -> dict:
        return build_rows([[self.sources[s].get(r) for s, r in pack] for pack in plan], self.seq_len, self.pad_id)


class _PlanDataset(IterableDataset):
    """Micro-batches from number `start` on; under a DataLoader, worker w builds every W-th one."""

    def __init__(self, planner, build, start):
        self.planner, self.build, self.start = planner, build, start

    def __iter__(self):
        info = get_worker_info()
        w, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plans = itertools.islice(self.planner.batches(), self.start, None)
        for m, plan in enumerate(plans):
            if m % n_workers == w:
                yield self.build(plan)


class TrainStream:
    """Endless iterator of micro-batch dicts (docs/dev/CONTRACTS.md); `state_dict()` counts micro-batches.
    `build(plan)` turns one micro-batch plan of the planner into tensors (SFT rows, DPO pairs); every
    batch dict carries `input_ids` and `num_tokens` (real tokens)."""

    def __init__(self, planner: BatchPlanner, build, seq_len: int, num_workers: int = 0):
        self.planner, self.build, self.seq_len, self.num_workers = planner, build, seq_len, num_workers
        self._consumed, self._real_tokens, self._rows = 0, 0, 0
        self._it = None

    @property
    def sources(self):
        return getattr(self.build, "sources", None)

    def __iter__(self):
        return self

    def _open(self):
        dataset = _PlanDataset(self.planner, self.build, self._consumed)
        if self.num_workers == 0:
            return iter(dataset)
        # batch_size=None: the dataset already yields whole micro-batches.
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers)
        return iter(loader)

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._open()
        batch = next(self._it)
        self._consumed += 1
        self._real_tokens += batch["num_tokens"]
        self._rows += batch["input_ids"].shape[0]
        return batch

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / row capacity over the micro-batches produced so far (1.0 before any)."""
        return self._real_tokens / (self._rows * self.seq_len) if self._rows else 1.0

    def state_dict(self) -> dict:
        return {"micro_batches": self._consumed, "real_tokens": self._real_tokens, "rows": self._rows}

    def load_state_dict(self, state: dict) -> None:
        """Continue after `micro_batches` batches: the next batch equals the uninterrupted run's."""
        self.close()
        self._consumed = int(state["micro_batches"])
        self._real_tokens = int(state.get("real_tokens", 0))
        self._rows = int(state.get("rows", 0))

    def close(self) -> None:
        """Stop DataLoader workers (dropping the iterator shuts them down)."""
        self._it = None


def build_stream(cfg: "TrainConfig", lengths, build, *, buffer_size: int = GREEDY_BUFFER, dp_rank: int = 0,
                 dp_world: int = 1) -> TrainStream:
    """The train stream of this data-parallel rank (dp_world = dp x sharding degree) over items of the
    given `lengths` (per source), built into tensors by `build`; the mixing, shuffling, packing and
    batch options come from cfg."""
    if not 0 <= dp_rank < dp_world:
        raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_world})")
    t, seq_len = cfg.train, cfg.train.max_seq_len
    counts = epoch_counts(train_specs(cfg), cfg.sft.num_samples_each_epoch)
    pack = partial(iter_packs, capacity=seq_len, greedy=cfg.accel.greedy_intokens, buffer_size=buffer_size)
    planner = BatchPlanner(lengths, counts, seed=t.seed, shuffle=t.random_shuffle, pack=pack,
                           batch_size=t.per_device_train_batch_size, dp_rank=dp_rank, dp_world=dp_world)
    return TrainStream(planner, build, seq_len, cfg.accel.dataloader_num_workers)


def build_train_stream(cfg: "TrainConfig", tok, dp_rank: int = 0, dp_world: int = 1) -> TrainStream:
    """The SFT train stream of this data-parallel rank (dp_world = dp * sharding degree)."""
    sources = load_sources(train_specs(cfg), tok, cfg.train.max_seq_len)
    return build_stream(cfg, [s.lengths for s in sources], SequenceBatchBuilder(sources, cfg.train.max_seq_len, tok.pad_id),
                        dp_rank=dp_rank, dp_world=dp_world)


def estimate_max_steps(cfg: "TrainConfig", tok, dp: int = 1, sharding: int = 1) -> int:
    """Optimizer steps for `num_train_epochs` passes over the data (used when max_steps = -1):
    ceil(packs * epochs / (batch_size * grad_accum * dp * sharding))."""
    t = cfg.train
    specs = train_specs(cfg)
    sources = load_sources(specs, tok, t.max_seq_len)
    packs = estimate_packs(sources, specs, t.max_seq_len, cfg.accel.greedy_intokens, t.seed, t.random_shuffle)
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * dp * sharding
    return max(1, math.ceil(packs * float(t.num_train_epochs) / per_step))
