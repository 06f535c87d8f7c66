"""The FlashMask tile plan (ernie_core/ops/triton/_mask.py) against the dense mask: a tile called
skipped has no allowed entry, a tile called unmasked has no masked one, and the compacted lists
hold exactly the live tiles. Pure torch, so it needs neither a GPU nor the Triton interpreter."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie_core.ops.reference import startend_row_indices_to_mask

_mask = pytest.importorskip("ernie_core.ops.triton._mask")


def _check_plan(idx, causal, S, bm, bn):
    B = idx.shape[0] if idx is not None else 1
    plan = _mask.build_plan(idx, causal, S, B, "cpu", bm, bn, transposed=True)
    if idx is None:
        allowed = torch.ones(S, S, dtype=torch.bool)
        allowed = (torch.tril(allowed) if causal else allowed).view(1, 1, S, S)
    else:
        allowed = startend_row_indices_to_mask(idx, causal)
    Bm, Hm, nrb, ncb = plan.kinds.shape
    for b in range(Bm):
        for h in range(Hm):
            for rb in range(nrb):
                live = []
                for cb in range(ncb):
                    tile = allowed[b, h, rb * bm:(rb + 1) * bm, cb * bn:(cb + 1) * bn]
                    kind = int(plan.kinds[b, h, rb, cb])
                    full_width = tile.shape[1] == bn
                    assert kind != 0 or not tile.any(), f"tile ({rb},{cb}) skipped but has allowed entries"
                    assert kind != 1 or (tile.all() and full_width), f"tile ({rb},{cb}) unmasked but has masked ones"
                    if kind:
                        live.append(cb)
                n = int(plan.n_cols[b, h, rb])
                assert plan.cols[b, h, rb, :n].tolist() == live
            for cb in range(ncb):
                rows = [rb for rb in range(nrb) if plan.kinds[b, h, rb, cb]]
                assert plan.rows[b, h, cb, :int(plan.n_rows[b, h, cb])].tolist() == rows


@settings(max_examples=60, deadline=None)
@given(S=st.integers(1, 70), n=st.sampled_from([1, 2, 4]), causal=st.booleans(), data=st.data(),
       bm=st.sampled_from([8, 16]), bn=st.sampled_from([8, 16]))
def test_plan_is_sound_for_random_indices(S, n, causal, data, bm, bn):
    if causal and n == 4:
        n = 2
    if not causal and n == 1:
        n = 2
    vals = data.draw(st.lists(st.integers(0, S + 1), min_size=S * n, max_size=S * n))
    idx = torch.tensor(vals, dtype=torch.int32).view(1, 1, S, n)
    _check_plan(idx, causal, S, bm, bn)


@pytest.mark.parametrize("causal", [True, False])
def test_plan_without_indices(causal):
    _check_plan(None, causal, 45, 16, 8)


def test_causal_document_mask_skips_off_diagonal_documents():
    S, doc = 64, 16
    lts = torch.tensor([(j // doc + 1) * doc for j in range(S)], dtype=torch.int32).view(1, 1, S, 1)
    plan = _mask.build_plan(lts, True, S, 1, "cpu", 16, 16)
    # Four documents of one tile each: only the diagonal tiles are live, each partial (causal inside).
    assert plan.n_cols.flatten().tolist() == [1, 1, 1, 1]
    assert torch.equal(plan.kinds[0, 0], torch.diag(torch.full((4,), _mask.TILE_PARTIAL, dtype=torch.int8)))
