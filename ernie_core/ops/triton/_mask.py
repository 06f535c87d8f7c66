"""FlashMask tile plans, built with torch ops before the attention kernels run.

Every mask mode of docs/behaviour.md#flashmask-row-indices is rewritten per key column j as two masked row spans:
lower [ls, le) (already clamped to rows >= j) and upper [us, ue) (clamped to rows < j). Row i may
attend column j unless it lies in one of them. An empty span is stored as (BIG, -BIG) so that it
never moves a block's min(start) down or max(end) up; padding columns (j >= S) are masked for every
row. Per column block the min/max of the four arrays classify a tile of rows [r0, r1) as

    skipped   every column's lower span, or every column's upper span, covers [r0, r1)
    unmasked  every column's spans miss [r0, r1)
    partial   otherwise: the kernel applies the element mask

(the FlashMask paper's block min/max test). The plan lists, per row block, the column blocks that
are not skipped (and per column block the row blocks, for the dK/dV kernel), so skipped tiles cost
the kernels nothing, as FlexAttention's block-sparse indices do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BIG = 1 << 30
TILE_UNMASKED = 1
TILE_PARTIAL = 2


def column_spans(idx: torch.Tensor | None, causal: bool, S: int, s_pad: int, batch: int, device) -> torch.Tensor:
    """int32 [B, Hm, 4, s_pad]: ls, le, us, ue per key column (see module docstring).

    idx: int [B, Hm, S, n] or None (plain causal / full attention, Hm = 1).
    """
    if idx is None:
        idx = torch.full((batch, 1, S, 1), BIG if causal else 0, dtype=torch.int64, device=device)
        if not causal:  # n=2 bidirectional with empty spans: LTS = BIG (no lower), UTE = 0 (no upper)
            idx = torch.cat([idx + BIG, idx], dim=-1)
    idx = idx.to(torch.int64)
    B, Hm, _, n = idx.shape
    j = torch.arange(S, device=device, dtype=torch.int64)
    full_big = torch.full_like(idx[..., 0], BIG)
    zeros = torch.zeros_like(full_big)
    if causal:
        if n not in (1, 2):
            raise ValueError(f"causal FlashMask takes 1 or 2 indices per column, got {n}")
        ls, le = idx[..., 0], (idx[..., 1] if n == 2 else full_big)
        us, ue = zeros, full_big  # the whole upper triangle is masked
    elif n == 2:
        ls, le, us, ue = idx[..., 0], full_big, zeros, idx[..., 1]
    elif n == 4:
        ls, le, us, ue = idx.unbind(-1)
    else:
        raise ValueError(f"bidirectional FlashMask takes 2 or 4 indices per column, got {n}")
    ls, ue = torch.maximum(ls, j), torch.minimum(ue, j)
    lower_empty, upper_empty = ls >= le, us >= ue
    ls, le = ls.masked_fill(lower_empty, BIG), le.masked_fill(lower_empty, -BIG)
    us, ue = us.masked_fill(upper_empty, BIG), ue.masked_fill(upper_empty, -BIG)
    spans = torch.stack([ls, le, us, ue], dim=2)  # [B, Hm, 4, S]
    pad = torch.tensor([-BIG, BIG, BIG, -BIG], device=device, dtype=torch.int64)
    out = pad.view(1, 1, 4, 1).expand(B, Hm, 4, s_pad).clone()
    out[..., :S] = spans
    return out.to(torch.int32)


def tile_kinds(spans: torch.Tensor, S: int, block_m: int, block_n: int) -> torch.Tensor:
    """int8 [B, Hm, n_row_blocks, n_col_blocks]: 0 skipped, 1 unmasked, 2 partial."""
    B, Hm, _, s_pad = spans.shape
    ncb = s_pad // block_n
    nrb = (S + block_m - 1) // block_m
    blk = spans.view(B, Hm, 4, ncb, block_n).to(torch.int64)
    lo, hi = blk.amin(-1), blk.amax(-1)  # [B, Hm, 4, ncb]
    r0 = torch.arange(nrb, device=spans.device, dtype=torch.int64) * block_m
    r1 = torch.clamp(r0 + block_m, max=S)
    r0, r1 = r0.view(1, 1, nrb, 1), r1.view(1, 1, nrb, 1)

    def stat(t, k):
        return t[:, :, k].unsqueeze(2)  # [B, Hm, 1, ncb]

    skipped = ((stat(hi, 0) <= r0) & (stat(lo, 1) >= r1)) | ((stat(hi, 2) <= r0) & (stat(lo, 3) >= r1))
    unmasked = ((stat(hi, 1) <= r0) | (stat(lo, 0) >= r1)) & ((stat(hi, 3) <= r0) | (stat(lo, 2) >= r1))
    kinds = torch.full(skipped.shape, TILE_PARTIAL, dtype=torch.int8, device=spans.device)
    kinds.masked_fill_(unmasked, TILE_UNMASKED)
    kinds.masked_fill_(skipped, 0)
    return kinds


def _compact(kinds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `kinds` (last dim), the indices of non-skipped entries first, ascending, and their count."""
    live = kinds != 0
    order = torch.sort((~live).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return order.contiguous(), live.sum(-1, dtype=torch.int32).contiguous()


@dataclass
class TilePlan:
    """What the kernels read: spans [B, Hm, 4, s_pad]; kinds [B, Hm, nrb, ncb] int8; for the row-block
    loops (forward, dQ) the live column blocks `cols` [B, Hm, nrb, ncb] and `n_cols` [B, Hm, nrb]; for
    the column-block loop (dK/dV) `rows` [B, Hm, ncb, nrb] and `n_rows` [B, Hm, ncb]."""

    spans: torch.Tensor
    kinds: torch.Tensor
    cols: torch.Tensor
    n_cols: torch.Tensor
    rows: torch.Tensor | None = None
    n_rows: torch.Tensor | None = None
    kinds_t: torch.Tensor | None = None


def build_plan(idx, causal: bool, S: int, batch: int, device, block_m: int, block_n: int, transposed=False) -> TilePlan:
    s_pad = (S + block_n - 1) // block_n * block_n
    spans = column_spans(idx, causal, S, s_pad, batch, device)
    kinds = tile_kinds(spans, S, block_m, block_n)
    cols, n_cols = _compact(kinds)
    plan = TilePlan(spans, kinds.contiguous(), cols, n_cols)
    if transposed:
        kt = kinds.transpose(-1, -2).contiguous()
        plan.kinds_t = kt
        plan.rows, plan.n_rows = _compact(kt)
    return plan


# ---- masks for tests and benchmarks -------------------------------------------------------------

def allowed_pairs(idx: torch.Tensor | None, causal: bool, S: int, batch: int = 1) -> torch.Tensor:
    """Number of (row, column) pairs that may attend, per [B, Hm]: the work FLOP counts use.
    Exact, from the column spans (lower and upper spans are disjoint), without an [S, S] mask."""
    spans = column_spans(idx, causal, S, S, batch, idx.device if idx is not None else "cpu").to(torch.int64)
    ls, le, us, ue = spans.unbind(2)

    def length(a, b):
        return (b.clamp(0, S) - a.clamp(0, S)).clamp_min(0)

    return (S - length(ls, le) - length(us, ue)).sum(-1)


def example_indices(mode: str, B: int, S: int, Hm: int = 1, generator: torch.Generator | None = None,
                    n_docs: int = 4) -> torch.Tensor:
    """int32 [B, Hm, S, n] FlashMask indices of one docs/behaviour.md#flashmask-row-indices mode with random boundaries.

    causal_doc (n=1): documents then 0-3 pad columns; share_prompt (n=2): prompt, two answers that
    do not see each other, the rest; prefix_lm (bidirectional n=2); global_docs (bidirectional n=4:
    token 0 global, two documents); random4 (bidirectional n=4, arbitrary, incl. fully masked rows).
    """
    gen = generator or torch.Generator().manual_seed(0)

    def cuts(k):
        return sorted(torch.randperm(S - 2, generator=gen)[:k].add(1).tolist())

    out = []
    for _ in range(B * Hm):
        if mode == "causal_doc":
            pad = int(torch.randint(0, 4, (1,), generator=gen))
            bounds = sorted(set([0] + [c for c in cuts(n_docs - 1) if c < S - pad] + [S - pad]))
            lts = list(range(S))
            for a, b in zip(bounds, bounds[1:]):
                lts[a:b] = [b] * (b - a)
            out.append(torch.tensor(lts).view(S, 1))
        elif mode == "share_prompt":
            p, a1 = cuts(2)
            lts = [S] * p + [a1] * (a1 - p) + [S] * (S - a1)
            lte = [S] * p + [S - 1] * (a1 - p) + [S] * (S - a1)
            out.append(torch.tensor([lts, lte]).t())
        elif mode == "prefix_lm":
            pre = cuts(1)[0]
            out.append(torch.tensor([[S] * S, [0] * pre + list(range(pre, S))]).t())
        elif mode == "global_docs":
            m = cuts(1)[0]
            lts = [S] + [m] * (m - 1) + [S] * (S - m)
            uts = [0] + [1] * (S - 1)
            ute = [0] + [1] * (m - 1) + [m] * (S - m)
            out.append(torch.tensor([lts, [S] * S, uts, ute]).t())
        elif mode == "random4":
            out.append(torch.randint(0, S + 1, (S, 4), generator=gen))
        else:
            raise ValueError(f"unknown mask mode {mode!r}")
    return torch.stack(out).view(B, Hm, S, -1).to(torch.int32).contiguous()
