"""Multi-source mixing into virtual epochs and the max_steps estimate (docs/behaviour.md#mixing-and-virtual-epochs)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from ernie_core.data.packing import iter_packs
from ernie_core.errors import ConfigError

MAX_ESTIMATE_SAMPLES = 100_000  # ERNIEKit packs at most this many rows to estimate the pack count


@dataclass(frozen=True)
class SourceSpec:
    path: str
    prob: float         # normalised over the kept sources
    prob_origin: float  # as written in the config
    kind: str


def _split(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def parse_sources(paths, probs, kinds, prefix: str = "train") -> list[SourceSpec]:
    """Comma lists of paths / probs / types -> sources with prob > 0, probs normalised to sum 1.

    A single prob or type applies to every path (so the table defaults "1.0" and "erniekit" work
    with several paths); otherwise the lists must have the same length.
    """
    path_list = _split(paths)
    if not path_list:
        raise ConfigError(f"{prefix}_dataset_path is empty; give one or more comma-separated files")
    lists = {}
    for key, value, default in (("prob", probs, "1.0"), ("type", kinds, "erniekit")):
        items = _split(value) or [default]
        if len(items) == 1:
            items = items * len(path_list)
        if len(items) != len(path_list):
            raise ConfigError(f"{prefix}_dataset_{key} has {len(items)} entries but "
                              f"{prefix}_dataset_path has {len(path_list)}; give one per path")
        lists[key] = items
    try:
        weights = [float(p) for p in lists["prob"]]
    except ValueError:
        raise ConfigError(f"{prefix}_dataset_prob={probs!r}: expected comma-separated numbers") from None
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"{prefix}_dataset_prob={probs!r}: probabilities must be >= 0 and not all 0")
    total = sum(weights)
    return [SourceSpec(p, w / total, w, k) for p, w, k in zip(path_list, weights, lists["type"]) if w > 0]


def epoch_counts(specs: list[SourceSpec], num_samples_each_epoch: int) -> list[int]:
    """Rows each source contributes to one virtual epoch: int(p_norm * num_samples_each_epoch)."""
    counts = [int(s.prob * num_samples_each_epoch) for s in specs]
    if sum(counts) == 0:
        raise ConfigError(f"num_samples_each_epoch={num_samples_each_epoch} gives every source 0 rows "
                          "per virtual epoch; raise it")
    return counts


class SourceCycler:
    """Endless pass-by-pass iterator over row indices 0..n-1 of one source; each pass is a fresh
    shuffle from one `random.Random(seed)` (no shuffle when `shuffle` is False)."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.shuffle, self.rng = n, shuffle, random.Random(seed)
        self.perm, self.pos = np.arange(n), n  # pos == n: the next take starts a new pass

    def take(self, k: int) -> np.ndarray:
        parts = []
        while k > 0:
            if self.pos == self.n:
                order = list(range(self.n))
                if self.shuffle:
                    self.rng.shuffle(order)
                self.perm, self.pos = np.asarray(order, np.int64), 0
            m = min(k, self.n - self.pos)
            parts.append(self.perm[self.pos:self.pos + m])
            self.pos, k = self.pos + m, k - m
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def epoch_order(cyclers, counts, epoch: int, shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
    """(source index, row index) arrays of one virtual epoch, globally shuffled with
    np.random.RandomState(epoch) as ERNIEKit does. The passes are already shuffled per source, and a
    uniform global shuffle follows, so ERNIEKit's extra per-source shuffle would change nothing."""
    src = np.concatenate([np.full(c, i, np.int64) for i, c in enumerate(counts)])
    row = np.concatenate([cyc.take(c) for cyc, c in zip(cyclers, counts)])
    if shuffle:
        perm = np.random.RandomState(epoch).permutation(len(src))
        src, row = src[perm], row[perm]
    return src, row


def estimate_packs(sources, specs, capacity: int, greedy: bool, seed: int, shuffle: bool) -> float:
    """Packs in one pass over the original data: N = n (one source) or sum ceil(n_i * prob_origin_i);
    pack M = min(N, 1e5) of those rows into K packs; packs ~ K * N / M."""
    if len(sources) == 1:
        pools = [sources[0].lengths]
    else:
        pools = [np.resize(s.lengths, math.ceil(len(s.lengths) * spec.prob_origin))
                 for s, spec in zip(sources, specs)]
    pool = np.concatenate(pools)
    n_total = len(pool)
    if n_total == 0:
        return 0.0
    if shuffle:
        pool = pool[np.random.RandomState(seed).permutation(n_total)]
    sample = pool[:MAX_ESTIMATE_SAMPLES].tolist()
    packs = sum(1 for _ in iter_packs(sample, capacity, greedy))
    return packs * n_total / len(sample)
