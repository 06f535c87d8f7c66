"""The endless, deterministic, resumable SFT train stream; dataset validation; max_steps estimate.

Pipeline: files -> tokenized sources (once, in memory) -> virtual epochs (§5.1) -> packs (§5.2)
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

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ernie_core.data.mixing import SourceCycler, epoch_counts, epoch_order, estimate_packs, parse_sources
from ernie_core.data.packing import build_rows, iter_packs
from ernie_core.data.readers import read_examples
from ernie_core.data.sequence import tokenize_file
from ernie_core.errors import DataError

DEFAULT_NUM_SAMPLES_EACH_EPOCH = 6_000_000


def _opt(section, name, default):
    """Optional config field; lets stand-in config objects omit fields that have table defaults."""
    value = getattr(section, name, default) if section is not None else default
    return default if value is None else value


def train_specs(cfg):
    t = cfg.train
    return parse_sources(t.train_dataset_path, _opt(t, "train_dataset_prob", "1.0"),
                         _opt(t, "train_dataset_type", "erniekit"), "train")


def eval_specs(cfg):
    e = getattr(cfg, "eval", None)
    if not _opt(e, "eval_dataset_path", ""):
        return []
    return parse_sources(e.eval_dataset_path, _opt(e, "eval_dataset_prob", "1.0"),
                         _opt(e, "eval_dataset_type", "erniekit"), "eval")


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


def validate_datasets(cfg, tok=None) -> dict[str, int]:
    """Read every train and eval file once (no tokenization) and raise DataError at the first bad
    line; returns {path: rows}. Sources with prob 0 are dropped from training, so not read."""
    rows = {}
    for spec in train_specs(cfg) + eval_specs(cfg):
        if spec.path not in rows:
            rows[spec.path] = sum(1 for _ in read_examples(spec.path, spec.kind))
    return rows


class _BatchPlanner:
    """Which (source, row) samples form each packed row and each of this rank's micro-batches."""

    def __init__(self, lengths, counts, seed, shuffle, greedy, seq_len, batch_size, dp_rank, dp_world):
        self.lengths, self.counts = lengths, counts
        self.seed, self.shuffle, self.greedy, self.seq_len = seed, shuffle, greedy, seq_len
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
            for pack in iter_packs(lens.tolist(), self.seq_len, self.greedy):
                yield [(src[p], row[p]) for p in pack]

    def batches(self):
        """This rank's micro-batches: cut global batches of bs*dp rows, keep slice dp_rank (§5.1)."""
        packs, bs = self.packs(), self.batch_size
        while True:
            rows = [next(packs) for _ in range(bs * self.dp_world)]
            yield rows[self.dp_rank * bs:(self.dp_rank + 1) * bs]


class _BatchDataset(IterableDataset):
    """Micro-batches from number `start` on; under a DataLoader, worker w builds every W-th one."""

    def __init__(self, planner, sources, seq_len, pad_id, start):
        self.planner, self.sources, self.seq_len, self.pad_id, self.start = (
            planner, sources, seq_len, pad_id, start)

    def __iter__(self):
        info = get_worker_info()
        w, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plans = itertools.islice(self.planner.batches(), self.start, None)
        for m, plan in enumerate(plans):
            if m % n_workers == w:
                rows = [[self.sources[s].get(r) for s, r in pack] for pack in plan]
                yield build_rows(rows, self.seq_len, self.pad_id)


class TrainStream:
    """Endless iterator of micro-batch dicts (CONTRACTS.md); `state_dict()` counts micro-batches."""

    def __init__(self, planner, sources, seq_len, pad_id, num_workers=0):
        self._planner, self.sources, self.seq_len, self.pad_id = planner, sources, seq_len, pad_id
        self.num_workers = num_workers
        self._consumed, self._real_tokens, self._rows = 0, 0, 0
        self._it = None

    def __iter__(self):
        return self

    def _open(self):
        dataset = _BatchDataset(self._planner, self.sources, self.seq_len, self.pad_id, self._consumed)
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


def build_train_stream(cfg, tok, dp_rank: int = 0, dp_world: int = 1) -> TrainStream:
    """The SFT train stream of this data-parallel rank (dp_world = dp * sharding degree)."""
    if not 0 <= dp_rank < dp_world:
        raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_world})")
    seq_len = cfg.train.max_seq_len
    specs = train_specs(cfg)
    sources = load_sources(specs, tok, seq_len)
    counts = epoch_counts(specs, _opt(getattr(cfg, "sft", None), "num_samples_each_epoch",
                                      DEFAULT_NUM_SAMPLES_EACH_EPOCH))
    planner = _BatchPlanner(
        lengths=[s.lengths for s in sources], counts=counts,
        seed=_opt(cfg.train, "seed", 42), shuffle=bool(_opt(cfg.train, "random_shuffle", True)),
        greedy=bool(_opt(getattr(cfg, "accel", None), "greedy_intokens", True)), seq_len=seq_len,
        batch_size=cfg.train.per_device_train_batch_size, dp_rank=dp_rank, dp_world=dp_world)
    workers = int(_opt(getattr(cfg, "accel", None), "dataloader_num_workers", 0))
    return TrainStream(planner, sources, seq_len, tok.pad_id, workers)


def estimate_max_steps(cfg, tok, dp: int = 1, sharding: int = 1) -> int:
    """Optimizer steps for `num_train_epochs` passes over the data (§5.1, used when max_steps = -1):
    ceil(packs * epochs / (batch_size * grad_accum * dp * sharding))."""
    t = cfg.train
    specs = train_specs(cfg)
    sources = load_sources(specs, tok, t.max_seq_len)
    packs = estimate_packs(sources, specs, t.max_seq_len,
                           bool(_opt(getattr(cfg, "accel", None), "greedy_intokens", True)),
                           _opt(t, "seed", 42), bool(_opt(t, "random_shuffle", True)))
    per_step = t.per_device_train_batch_size * _opt(t, "gradient_accumulation_steps", 1) * dp * sharding
    return max(1, math.ceil(packs * float(_opt(t, "num_train_epochs", 1)) / per_step))
