"""Packing (docs/behaviour.md#packing), packed-row tensors, position ids (docs/behaviour.md#position-ids) and FlashMask LTS (docs/behaviour.md#flashmask-row-indices)."""
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie_core.data.packing import GREEDY_BUFFER, build_rows, iter_next_fit, iter_packs, pack_greedy

PAD = 0


def test_greedy_worked_example():
    # capacity 10, lengths 6,5,3,4,2 -> A=[6,4], B=[5,3,2]
    assert pack_greedy([6, 5, 3, 4, 2], 10) == [[0, 3], [1, 2, 4]]


def test_greedy_prefers_the_roomiest_pack_and_ties_go_to_the_oldest():
    # 7 -> A(3 free); 6 -> B(4 free); 3 -> B (most free) ; 3 -> A (3 free vs B 1)
    assert pack_greedy([7, 6, 3, 3], 10) == [[0, 3], [1, 2]]
    assert pack_greedy([5, 5, 2], 10) == [[0, 1], [2]]
    assert pack_greedy([4, 4, 2], 6) == [[0, 2], [1]]  # A and B both have 2 free: A is older


def test_next_fit():
    assert list(iter_next_fit([6, 5, 3, 4, 2], 10)) == [[0], [1, 2], [3, 4]]


def test_greedy_packs_within_500_sequence_buffers():
    lengths = [1] * (GREEDY_BUFFER + 10)
    packs = list(iter_packs(lengths, 1000, greedy=True))
    assert packs == [list(range(GREEDY_BUFFER)), list(range(GREEDY_BUFFER, GREEDY_BUFFER + 10))]


def sample(n, start):
    ids = np.arange(start, start + n, dtype=np.int32)
    return ids, ids + 100


def test_flashmask_example_a():
    # causal,1; docs [0,3),[3,6), pads 6,7: LTS=[3,3,3,6,6,6,6,7]
    batch = build_rows([[sample(3, 10), sample(3, 20)]], seq_len=8, pad_id=PAD)
    lts = batch["attn_mask_startend_row_indices"]
    assert lts.shape == (1, 1, 8, 1) and lts.dtype == torch.int32
    assert lts.flatten().tolist() == [3, 3, 3, 6, 6, 6, 6, 7]
    # the dense mask it stands for: row i sees column j iff j <= i < LTS[j]
    i, j = torch.arange(8)[:, None], torch.arange(8)[None, :]
    dense = (j <= i) & (i < lts.flatten()[None, :])
    pattern = "x....... xx...... xxx..... ...x.... ...xx... ...xxx.. ........ ........".split()
    assert ["".join("x" if v else "." for v in row) for row in dense.tolist()] == pattern
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 0]]
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 22, PAD, PAD]]
    assert batch["labels"].tolist() == [[110, 111, 112, 120, 121, 122, -100, -100]]
    assert batch["num_tokens"] == 6
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.int64


lengths_st = st.lists(st.integers(1, 32), min_size=1, max_size=80)


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_st, capacity=st.integers(32, 64), greedy=st.booleans())
def test_packing_invariants(lengths, capacity, greedy):
    packs = list(iter_packs(lengths, capacity, greedy))
    flat = [p for pack in packs for p in pack]
    assert sorted(flat) == list(range(len(lengths)))  # nothing lost, nothing duplicated
    assert all(sum(lengths[p] for p in pack) <= capacity for pack in packs)
    assert all(pack == sorted(pack) for pack in packs)  # insertion order inside a pack
    if not greedy:
        assert flat == list(range(len(lengths)))  # next-fit keeps the stream order
        assert all(sum(lengths[p] for p in a + b[:1]) > capacity for a, b in zip(packs, packs[1:]))


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_st, capacity=st.integers(32, 64))
def test_row_tensors_follow_sample_boundaries(lengths, capacity):
    packs = list(iter_packs(lengths, capacity, greedy=True))
    rows = [[sample(lengths[p], 1000 * p) for p in pack] for pack in packs]
    batch = build_rows(rows, capacity, PAD)
    lts = batch["attn_mask_startend_row_indices"][:, 0, :, 0]
    assert batch["num_tokens"] == sum(lengths)
    for r, pack in enumerate(packs):
        off = 0
        for p in pack:
            n = lengths[p]
            cols = slice(off, off + n)
            assert batch["position_ids"][r, cols].tolist() == list(range(n))
            assert (lts[r, cols] == off + n).all()
            assert batch["input_ids"][r, cols].tolist() == list(range(1000 * p, 1000 * p + n))
            off += n
        assert (lts[r, off:] == torch.arange(off, capacity)).all()  # pad column j -> j
        assert (batch["labels"][r, off:] == -100).all() and (batch["position_ids"][r, off:] == 0).all()
        assert (batch["input_ids"][r, off:] == PAD).all()
