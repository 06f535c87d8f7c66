"""FlashMask attention in Triton: forward, and backward as a dK/dV kernel plus a dQ kernel.

Layouts as the op front door: q/out [B, S, Hq, D], k/v [B, S, Hkv, D] (any outer strides, last
dim contiguous), lse [B, Hq, S] fp32 (natural log, -inf for rows that may attend nothing). The
mask comes in as a TilePlan (see _mask.py): each program loops only over the tiles that are not
skipped, and applies the element mask only on partial tiles. Softmax runs in base 2 on fp32
scores (exp2 is one instruction); q/k/v/p/dS enter the dots in the input dtype, as the tensor
cores want, and everything else stays fp32. The backward is split in two kernels (dK/dV per
column block, dQ per row block) so that no atomics are needed and results are deterministic.

Attention dropout (DROPOUT=True) regenerates the C++ CPU kernel's counter-based keep mask inside
every kernel, bit for bit (the scheme is written out in reference.dropout_keep_mask): the wrapper
hashes (seed, offset, b, h) into one uint64 key per (batch, query head) with the reference's own
code (`reference.dropout_head_keys`); a kernel hashes its rows, row = mix64(head ^ i), and its
columns, x = mix64(row + (j // 2 + 1) * 0x9E3779B97F4A7C15), and keeps (i, j) when the low (j even)
or high (j odd) 32 bits of x are >= floor(p * 2^32). Nothing of size S x S is ever stored.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import reference as ref
from ._mask import TILE_PARTIAL, build_plan

LOG2E = 1.4426950408889634
# Globals read inside @triton.jit functions must be constexpr.
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(1.4426950408889634)
_PARTIAL = tl.constexpr(TILE_PARTIAL)
_GOLDEN = tl.constexpr(0x9E3779B97F4A7C15)
_MIX1 = tl.constexpr(0xBF58476D1CE4E5B9)
_MIX2 = tl.constexpr(0x94D049BB133111EB)


@triton.jit
def _mix64(z):
    """SplitMix64's output function on uint64 (wrapping multiplies, logical shifts)."""
    z = (z ^ (z >> 30)) * _MIX1
    z = (z ^ (z >> 27)) * _MIX2
    return z ^ (z >> 31)


@triton.jit
def _row_keys(drop_ptr, bh, rows):
    """uint64 keys of `rows` of (batch, query head) bh: mix64(head_key ^ i)."""
    head = tl.load(drop_ptr + 1 + bh).to(tl.uint64, bitcast=True)
    return _mix64(head ^ rows.to(tl.uint64))


@triton.jit
def _keep(row_keys, cols, threshold):
    """Keep flags of (row, column) pairs; row_keys uint64 and cols int32 broadcast against each other
    ([M, 1] x [1, N], or [1, M] x [N, 1] for a transposed tile)."""
    x = _mix64(row_keys + (cols // 2 + 1).to(tl.uint64) * _GOLDEN)
    u = tl.where((cols % 2) == 1, x >> 32, x & 0xFFFFFFFF)
    return u.to(tl.int64) >= threshold


@triton.jit
def _element_mask(spans_ptr, s_pad, rows, cols):
    """True where row i may NOT attend column j; spans [4, s_pad] for this (batch, mask head)."""
    ls = tl.load(spans_ptr + cols)
    le = tl.load(spans_ptr + s_pad + cols)
    us = tl.load(spans_ptr + 2 * s_pad + cols)
    ue = tl.load(spans_ptr + 3 * s_pad + cols)
    r = rows[:, None]
    return ((r >= ls[None, :]) & (r < le[None, :])) | ((r >= us[None, :]) & (r < ue[None, :]))


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, spans_ptr, kinds_ptr, cols_ptr, ncols_ptr, drop_ptr,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
    S, Hq, Hm, GROUP, s_pad, nrb, ncb, qk_scale, rescale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    # Heaviest row blocks first: with causal-like masks the last row blocks have the most tiles.
    rb = nrb - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    hkv = h // GROUP
    hm = hkv if Hm > 1 else 0
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok, d_ok = rows < S, offs_d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b * skb + hkv * skh
    v_base = v_ptr + b * svb + hkv * svh
    plan_row = (b * Hm + hm) * nrb + rb
    spans = spans_ptr + (b * Hm + hm) * 4 * s_pad
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if DROPOUT:
        threshold = tl.load(drop_ptr)
        row_keys = _row_keys(drop_ptr, bh, rows)
    n_live = tl.load(ncols_ptr + plan_row)
    for t in range(0, n_live):
        cb = tl.load(cols_ptr + plan_row * ncb + t)
        kind = tl.load(kinds_ptr + plan_row * ncb + cb)
        cols = cb * BLOCK_N + offs_n
        col_ok = cols < S
        kt = tl.load(k_base + cols[None, :] * sks + offs_d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if kind == _PARTIAL:
            s = tl.where(_element_mask(spans, s_pad, rows, cols), float("-inf"), s)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing allowed so far keeps m = -inf; subtracting 0 then keeps p = 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser sums the undropped probabilities
        if DROPOUT:
            p = tl.where(_keep(row_keys[:, None], cols[None, :], threshold), p, 0.0)
        v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if DROPOUT:
        out = out * rescale
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    tl.store(o_ptr + b * sob + h * soh + rows[:, None] * sos + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh * S + rows, lse, mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, spans_ptr, kinds_ptr, rows_ptr, nrows_ptr,
    drop_ptr,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
    S, Hq, Hkv, Hm, GROUP, s_pad, nrb, ncb, qk_scale, sm_scale, rescale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    cb = tl.program_id(0)
    bh = tl.program_id(1)
    b, hkv = bh // Hkv, bh % Hkv
    hm = hkv if Hm > 1 else 0
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok, d_ok = cols < S, offs_d < D
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + b * skb + hkv * skh + cols[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * svb + hkv * svh + cols[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    plan_col = (b * Hm + hm) * ncb + cb
    spans = spans_ptr + (b * Hm + hm) * 4 * s_pad
    n_live = tl.load(nrows_ptr + plan_col)
    if DROPOUT:
        threshold = tl.load(drop_ptr)
    for g in range(0, GROUP):  # the query heads that share this key/value head
        h = hkv * GROUP + g
        q_base = q_ptr + b * sqb + h * sqh
        do_base = do_ptr + b * sdob + h * sdoh
        for t in range(0, n_live):
            rb = tl.load(rows_ptr + plan_col * nrb + t)
            kind = tl.load(kinds_ptr + plan_col * nrb + rb)
            rows = rb * BLOCK_M + offs_m
            row_ok = rows < S
            qd_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows[:, None] * sqs + offs_d[None, :], mask=qd_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * sdos + offs_d[None, :], mask=qd_mask, other=0.0)
            lse = tl.load(lse_ptr + (b * Hq + h) * S + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptr + (b * Hq + h) * S + rows, mask=row_ok, other=0.0)
            # Rows that attend nothing have lse = -inf; +inf makes their p exactly 0.
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
            st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [BLOCK_N, BLOCK_M] = S^T
            pt = tl.exp2(st - lse2[None, :])
            if kind == _PARTIAL:
                pt = tl.where(tl.trans(_element_mask(spans, s_pad, rows, cols)), 0.0, pt)
            if DROPOUT:
                # O = (r Z P) V: dV = (Z P)^T dO (r applied once, below), dP = r Z (dO V^T); delta
                # = rowsum(dO O) already includes the dropout.
                keep_t = _keep(_row_keys(drop_ptr, b * Hq + h, rows)[None, :], cols[:, None], threshold)
                dv += tl.dot(tl.where(keep_t, pt, 0.0).to(do.dtype), do, input_precision=PREC)
                dpt = tl.where(keep_t, tl.dot(v, tl.trans(do), input_precision=PREC) * rescale, 0.0)
            else:
                dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
                dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    dk = dk * sm_scale
    if DROPOUT:
        dv = dv * rescale
    tl.store(dk_ptr + b * sdkb + hkv * sdkh + cols[:, None] * sdks + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=kv_mask)
    tl.store(dv_ptr + b * sdvb + hkv * sdvh + cols[:, None] * sdvs + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, spans_ptr, kinds_ptr, cols_ptr, ncols_ptr, drop_ptr,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sdqb, sdqs, sdqh,
    S, Hq, Hm, GROUP, s_pad, nrb, ncb, qk_scale, sm_scale, rescale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    rb = nrb - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    hkv = h // GROUP
    hm = hkv if Hm > 1 else 0
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok, d_ok = rows < S, offs_d < D
    qd_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(do_ptr + b * sdob + h * sdoh + rows[:, None] * sdos + offs_d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(lse_ptr + bh * S + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + bh * S + rows, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    k_base = k_ptr + b * skb + hkv * skh
    v_base = v_ptr + b * svb + hkv * svh
    plan_row = (b * Hm + hm) * nrb + rb
    spans = spans_ptr + (b * Hm + hm) * 4 * s_pad
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if DROPOUT:
        threshold = tl.load(drop_ptr)
        row_keys = _row_keys(drop_ptr, bh, rows)
    n_live = tl.load(ncols_ptr + plan_row)
    for t in range(0, n_live):
        cb = tl.load(cols_ptr + plan_row * ncb + t)
        kind = tl.load(kinds_ptr + plan_row * ncb + cb)
        cols = cb * BLOCK_N + offs_n
        col_ok = cols < S
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if kind == _PARTIAL:
            p = tl.where(_element_mask(spans, s_pad, rows, cols), 0.0, p)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if DROPOUT:
            dp = tl.where(_keep(row_keys[:, None], cols[None, :], threshold), dp * rescale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dq = dq * sm_scale
    tl.store(dq_ptr + b * sdqb + h * sdqh + rows[:, None] * sdqs + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=qd_mask)


# ---- wrappers (the backend kernel signatures of docs/dev/CONTRACTS.md) -------------------------

# Tile sizes per head dim on Hopper; tests pass smaller ones to exercise many tiles at small S.
FWD_CONFIG = dict(block_m=128, block_n=64, num_warps=8, num_stages=3)
BWD_CONFIG = dict(block_m=64, block_n=64, num_warps=4, num_stages=2)
# With dropout the keep-mask hash (uint64 math on every tile element) needs more registers: at 4
# warps ptxas spills ~680 bytes per thread in the bf16 D=128 dK/dV kernel, at 8 warps ~80.
BWD_DROPOUT_OVERRIDE = dict(num_warps=8)


# fp32 tiles take twice the shared memory and ieee dots run on CUDA cores: smaller and shallower.
FWD_CONFIG_FP32 = dict(block_m=64, block_n=64, num_warps=4, num_stages=2)
BWD_CONFIG_FP32 = dict(block_m=32, block_n=64, num_warps=4, num_stages=1)


def _config(q, base, base_fp32, override):
    return {**(base_fp32 if q.dtype == torch.float32 else base), **(override or {})}


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 dots (the oracle path); tf32 would add ~3e-4 relative error.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(q, k, v):
    if q.dim() != 4 or k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[2] % k.shape[2]:
        raise ValueError(f"flashmask_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                         "[B, S, Hq, D] / [B, S, Hkv, D] with Hq a multiple of Hkv")


def _last_contig(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def dropout_table(rng_state, B: int, Hq: int, dropout_p: float, device) -> torch.Tensor:
    """int64 [1 + B * Hq] the kernels read: [0] the threshold floor(p * 2^32), then the uint64 key of
    every (batch, query head), b * Hq + h, computed by the reference's code (bit-identical masks)."""
    if rng_state is None or rng_state.dtype != torch.int64 or rng_state.numel() != 2:
        raise ValueError("flashmask_attention: dropout_p > 0 needs rng_state, an int64 tensor (seed, offset)")
    heads = ref.dropout_head_keys(rng_state.cpu(), B, Hq).reshape(-1)
    table = torch.cat([torch.tensor([ref.dropout_threshold(dropout_p)], dtype=torch.int64), heads])
    return table.to(device)


def _dropout_args(rng_state, B, Hq, dropout_p, device):
    """(table, rescale, DROPOUT) kernel arguments; without dropout a placeholder the kernel never reads."""
    if not dropout_p:
        return torch.zeros(1, dtype=torch.int64, device=device), 1.0, False
    if not 0.0 < dropout_p <= 1.0:
        raise ValueError(f"flashmask_attention: dropout_p must be in [0, 1], got {dropout_p}")
    rescale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
    return dropout_table(rng_state, B, Hq, dropout_p, device), rescale, True


def flashmask_fwd(q, k, v, idx, causal, scale, dropout_p=0.0, rng_state=None, *, config=None):
    """(out [B, S, Hq, D], lse [B, Hq, S] fp32). dropout_p > 0: out = dropout(softmax(s)) v with the
    keep mask of rng_state int64 [2] = (seed, offset) (lse of the undropped softmax)."""
    _check(q, k, v)
    cfg = _config(q, FWD_CONFIG, FWD_CONFIG_FP32, config)
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, S), device=q.device, dtype=torch.float32)
    if q.numel() == 0:
        return out, lse
    bm, bn = cfg["block_m"], cfg["block_n"]
    plan = build_plan(idx, causal, S, B, q.device, bm, bn)
    drop, rescale, dropout = _dropout_args(rng_state, B, Hq, float(dropout_p), q.device)
    Hm, nrb, ncb = plan.kinds.shape[1], plan.kinds.shape[2], plan.kinds.shape[3]
    grid = (nrb, B * Hq)
    _fwd_kernel[grid](
        q, k, v, out, lse, plan.spans, plan.kinds, plan.cols, plan.n_cols, drop,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        S, Hq, Hm, Hq // Hkv, plan.spans.shape[-1], nrb, ncb, scale * LOG2E, rescale,
        D=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(D)), PREC=_prec(q.dtype),
        DROPOUT=dropout, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


def flashmask_bwd(dout, q, k, v, out, lse, idx, causal, scale, dlse=None, dropout_p=0.0, rng_state=None, *,
                  config=None):
    """(dq, dk, dv) in the dtypes and shapes of q, k, v. dlse [B, Hq, S]: the gradient reaching the
    forward's lse output (None = 0); dropout_p / rng_state: the forward's."""
    _check(q, k, v)
    base = {**BWD_CONFIG, **BWD_DROPOUT_OVERRIDE} if dropout_p else BWD_CONFIG
    cfg = _config(q, base, BWD_CONFIG_FP32, config)
    q, k, v, dout = _last_contig(q), _last_contig(k), _last_contig(v), _last_contig(dout)
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    # delta_i = sum_d dO_id O_id - dlse_i = sum_j P_ij (dP_ij - dlse_i), the softmax backward's row
    # term (fp32); d lse_i / d s_ij = P_ij gives the dlse part.
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    lse = lse.float().contiguous()
    bm, bn = cfg["block_m"], cfg["block_n"]
    plan = build_plan(idx, causal, S, B, q.device, bm, bn, transposed=True)
    drop, rescale, dropout = _dropout_args(rng_state, B, Hq, float(dropout_p), q.device)
    Hm, nrb, ncb = plan.kinds.shape[1], plan.kinds.shape[2], plan.kinds.shape[3]
    common = dict(D=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(D)), PREC=_prec(q.dtype),
                  DROPOUT=dropout, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    s_pad = plan.spans.shape[-1]
    _bwd_dkdv_kernel[(ncb, B * Hkv)](
        q, k, v, dout, lse, delta, dk, dv, plan.spans, plan.kinds_t, plan.rows, plan.n_rows, drop,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        S, Hq, Hkv, Hm, Hq // Hkv, s_pad, nrb, ncb, scale * LOG2E, scale, rescale, **common,
    )
    _bwd_dq_kernel[(nrb, B * Hq)](
        q, k, v, dout, lse, delta, dq, plan.spans, plan.kinds, plan.cols, plan.n_cols, drop,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        S, Hq, Hm, Hq // Hkv, s_pad, nrb, ncb, scale * LOG2E, scale, rescale, **common,
    )
    return dq, dk, dv
