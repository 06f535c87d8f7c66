"""Mixing, virtual epochs, the train stream (determinism, resume, workers, DP) and the max_steps
estimate (docs/behaviour.md#mixing-and-virtual-epochs)."""
import random
from collections import Counter
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie_core.data import build_train_stream, estimate_max_steps, load_tokenizer
from ernie_core.data import stream as stream_module
from ernie_core.data.mixing import SourceCycler, epoch_counts, epoch_order, estimate_packs, parse_sources
from ernie_core.data.packing import iter_packs
from ernie_core.data.stream import BatchPlanner
from ernie_core.data.testing import stand_in_config, write_jsonl
from ernie_core.errors import ConfigError, DataError

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny_model"
KEYS = {"input_ids", "labels", "position_ids", "attn_mask_startend_row_indices", "num_tokens"}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("data")
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 12))) for _ in range(60)]
    a = write_jsonl(d / "a.jsonl", [{"src": f"Repeat: {w}", "tgt": w} for w in words[:40]])
    b = write_jsonl(d / "b.jsonl", [{"src": f"Up: {w}", "tgt": w.upper()} for w in words[40:]])
    return a, b


def config(data, **kw):
    fields = dict(train_dataset_path=f"{data[0]},{data[1]}", train_dataset_prob="0.75,0.25",
                  max_seq_len=64, per_device_train_batch_size=2, num_samples_each_epoch=48)
    return stand_in_config(**{**fields, **kw})


def take(stream, n):
    return [next(stream) for _ in range(n)]


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys() == KEYS
        for k in KEYS:
            assert torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])), k


def test_parse_sources():
    specs = parse_sources("a,b,c", "0.6,0,0.2", "erniekit,alpaca,alpaca")
    assert [(s.path, s.kind, s.prob_origin) for s in specs] == [("a", "erniekit", 0.6), ("c", "alpaca", 0.2)]
    assert [s.prob for s in specs] == pytest.approx([0.75, 0.25])
    assert [s.prob for s in parse_sources("a,b", "1.0", None)] == [0.5, 0.5]  # one prob for all
    for probs, msg in (("1,1,1", "has 3 entries"), ("1,-1", ">= 0"), ("0,0", "not all 0"), ("x", "numbers")):
        with pytest.raises(ConfigError, match=msg):
            parse_sources("a,b", probs, "erniekit")
    assert epoch_counts(specs, 10) == [7, 2]  # int(p * n) per source


def test_source_cycler_passes():
    cyc = SourceCycler(5, seed=3, shuffle=True)
    passes = cyc.take(15).reshape(3, 5)
    assert all(sorted(p) == list(range(5)) for p in passes) and len({tuple(p) for p in passes}) > 1
    assert SourceCycler(5, 3, True).take(15).tolist() == passes.flatten().tolist()  # deterministic
    assert SourceCycler(5, 3, False).take(7).tolist() == [0, 1, 2, 3, 4, 0, 1]


def test_batches_follow_the_contract(tok, data):
    stream = build_train_stream(config(data), tok)
    for batch in take(stream, 4):
        assert batch.keys() == KEYS
        assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, 64)
        assert batch["attn_mask_startend_row_indices"].shape == (2, 1, 64, 1)
        assert batch["num_tokens"] == int((batch["attn_mask_startend_row_indices"][:, 0, :, 0]
                                           > torch.arange(64)).sum())
        assert (batch["labels"] != -100).any()
    assert 0.5 < stream.packing_efficiency <= 1.0


def test_deterministic_and_seeded(tok, data):
    first = take(build_train_stream(config(data), tok), 5)
    assert_same(first, take(build_train_stream(config(data), tok), 5))
    other = take(build_train_stream(config(data, seed=7), tok), 5)
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other))


@pytest.mark.parametrize("greedy", [True, False])
def test_resume_gives_the_same_next_batches(tok, data, greedy):
    cfg = config(data, greedy_intokens=greedy)
    stream = build_train_stream(cfg, tok)
    take(stream, 7)  # crosses the first virtual epoch (48 rows ~ 5 micro-batches)
    state = stream.state_dict()
    expected, efficiency = take(stream, 4), stream.packing_efficiency
    resumed = build_train_stream(cfg, tok)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 4), expected)
    assert resumed.packing_efficiency == efficiency


def test_workers_give_the_same_batches(tok, data):
    expected = take(build_train_stream(config(data), tok), 7)
    stream = build_train_stream(config(data, dataloader_num_workers=2), tok)
    try:
        assert_same(take(stream, 4), expected[:4])
        state = stream.state_dict()
        resumed = build_train_stream(config(data, dataloader_num_workers=2), tok)
        resumed.load_state_dict(state)  # starts at an odd batch: worker 0 must still go first
        take(resumed, 1)
        resumed.load_state_dict({"micro_batches": 3})
        assert_same(take(resumed, 4), expected[3:7])
    finally:
        stream.close()


def test_data_parallel_ranks_slice_each_global_batch(tok, data):
    single = take(build_train_stream(config(data, per_device_train_batch_size=4), tok), 4)
    ranks = [take(build_train_stream(config(data), tok, dp_rank=r, dp_world=2), 4) for r in range(2)]
    for m, batch in enumerate(single):
        for r in range(2):
            assert torch.equal(ranks[r][m]["input_ids"], batch["input_ids"][2 * r:2 * r + 2])
            assert torch.equal(ranks[r][m]["labels"], batch["labels"][2 * r:2 * r + 2])


def first_epoch(planner, size):
    samples, packs = [], planner.packs()
    while len(samples) < size:
        samples += next(packs)
    assert len(samples) == size  # packing restarts at each epoch boundary
    return samples


def test_mixing_proportions_and_order_without_shuffle(tok, data):
    stream = build_train_stream(config(data, random_shuffle=False, greedy_intokens=False), tok)
    samples = first_epoch(stream.planner, 48)
    assert Counter(s for s, _ in samples) == {0: 36, 1: 12}  # int(0.75*48), int(0.25*48)
    assert samples == [(0, i) for i in range(36)] + [(1, i) for i in range(12)]
    shuffled = first_epoch(build_train_stream(config(data), tok).planner, 48)
    assert Counter(s for s, _ in shuffled) == {0: 36, 1: 12} and shuffled != samples


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=30), min_size=1, max_size=3),
       st.integers(1, 120), st.booleans(), st.integers(0, 3))
def test_virtual_epoch_loses_and_duplicates_nothing(source_lengths, epoch_size, greedy, seed):
    lengths = [np.asarray(ls) for ls in source_lengths]
    counts = [max(1, epoch_size // len(lengths))] * len(lengths)
    planner = BatchPlanner(lengths, counts, seed=seed, shuffle=True, pack=partial(iter_packs, capacity=40, greedy=greedy),
                           batch_size=1)
    got = first_epoch(planner, sum(counts))
    cyclers = [SourceCycler(len(n), seed, True) for n in lengths]
    src, row = epoch_order(cyclers, counts, 0, True)
    assert sorted(got) == sorted(zip(src.tolist(), row.tolist()))
    for i, n in enumerate(lengths):  # whole passes, then part of one: row counts differ by <= 1
        seen = Counter(r for s, r in got if s == i)
        assert {seen[r] for r in range(len(n))} <= {counts[i] // len(n), -(-counts[i] // len(n))}


def test_estimate_packs_reference_example():
    source = SimpleNamespace(lengths=np.full(20_000, 8))
    spec = SimpleNamespace(prob_origin=1.0)
    assert estimate_packs([source], [spec], 64, False, 0, True) == 2500  # 8 rows of 8 per pack
    # greedy packs per 500-buffer: 62.5 packs of 8 -> 63 per buffer
    assert estimate_packs([source], [spec], 64, True, 0, True) == 40 * 63


def test_estimate_packs_several_sources_uses_raw_probs():
    # N = ceil(10 * 2.0) + ceil(20 * 0.5) = 30 rows of 8 tokens; next-fit 8 per pack of 64 -> 4 packs
    sources = [SimpleNamespace(lengths=np.full(n, 8)) for n in (10, 20)]
    specs = [SimpleNamespace(prob_origin=2.0), SimpleNamespace(prob_origin=0.5)]
    assert estimate_packs(sources, specs, 64, False, 0, True) == 4


def test_estimate_max_steps_reference_example(tok, data, monkeypatch):
    # 20,000 rows -> 2,500 packs; 3 epochs, bs 1, ga 8, dp 2 -> ceil(7500/16) = 469
    fake = [SimpleNamespace(lengths=np.full(20_000, 8))]
    monkeypatch.setattr(stream_module, "load_sources", lambda specs, tok, seq_len: fake)
    cfg = config(data, train_dataset_path="x.jsonl", train_dataset_prob="1", max_seq_len=64,
                 num_train_epochs=3, per_device_train_batch_size=1, gradient_accumulation_steps=8,
                 greedy_intokens=False)
    assert estimate_max_steps(cfg, tok, dp=2) == 469


def test_estimate_max_steps_on_files(tok, data):
    cfg = config(data, train_dataset_prob="1,1", num_train_epochs=2)
    steps = estimate_max_steps(cfg, tok)
    # N = 40 + 20 rows; next-fit bounds: at least N*len/S packs, at most N packs
    assert 60 * 20 / 64 / 2 <= steps <= 60 * 2 / 2


def test_source_without_usable_rows_is_an_error(tok, tmp_path):
    long = write_jsonl(tmp_path / "long.jsonl", [{"src": "x" * 200, "tgt": "y"}])
    with pytest.raises(DataError, match="long.jsonl: no row fits max_seq_len=64"):
        build_train_stream(stand_in_config(train_dataset_path=str(long), max_seq_len=64), tok)


def test_tiny_epochs_are_a_config_error(tok, data):
    with pytest.raises(ConfigError, match="num_samples_each_epoch=1"):
        build_train_stream(config(data, num_samples_each_epoch=1), tok)
