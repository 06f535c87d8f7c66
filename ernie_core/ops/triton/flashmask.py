"""FlashMask attention in Triton: forward, and backward as a dK/dV kernel plus a dQ kernel.

Layouts as the op front door: q/out [B, S, Hq, D], k/v [B, S, Hkv, D] (any outer strides, last
dim contiguous), lse [B, Hq, S] fp32 (natural log, -inf for rows that may attend nothing). The
mask comes in as a TilePlan (see _mask.py): each program loops only over the tiles that are not
skipped, and applies the element mask only on partial tiles. Softmax runs in base 2 on fp32
scores (exp2 is one instruction); q/k/v/p/dS enter the dots in the input dtype, as the tensor
cores want, and everything else stays fp32. The backward is split in two kernels (dK/dV per
column block, dQ per row block) so that no atomics are needed and results are deterministic.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._mask import TILE_PARTIAL, build_plan

LOG2E = 1.4426950408889634
# Globals read inside @triton.jit functions must be constexpr.
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(1.4426950408889634)
_PARTIAL = tl.constexpr(TILE_PARTIAL)


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
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, spans_ptr, kinds_ptr, cols_ptr, ncols_ptr,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
    S, Hq, Hm, GROUP, s_pad, nrb, ncb, qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
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
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    tl.store(o_ptr + b * sob + h * soh + rows[:, None] * sos + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh * S + rows, lse, mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, spans_ptr, kinds_ptr, rows_ptr, nrows_ptr,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
    S, Hq, Hkv, Hm, GROUP, s_pad, nrb, ncb, qk_scale, sm_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
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
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    dk = dk * sm_scale
    tl.store(dk_ptr + b * sdkb + hkv * sdkh + cols[:, None] * sdks + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=kv_mask)
    tl.store(dv_ptr + b * sdvb + hkv * sdvh + cols[:, None] * sdvs + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, spans_ptr, kinds_ptr, cols_ptr, ncols_ptr,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sdqb, sdqs, sdqh,
    S, Hq, Hm, GROUP, s_pad, nrb, ncb, qk_scale, sm_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
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
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dq = dq * sm_scale
    tl.store(dq_ptr + b * sdqb + h * sdqh + rows[:, None] * sdqs + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=qd_mask)


# ---- wrappers (the backend kernel signatures of docs/dev/CONTRACTS.md) -------------------------

# Tile sizes per head dim on Hopper; tests pass smaller ones to exercise many tiles at small S.
FWD_CONFIG = dict(block_m=128, block_n=64, num_warps=8, num_stages=3)
BWD_CONFIG = dict(block_m=64, block_n=64, num_warps=4, num_stages=2)


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


def flashmask_fwd(q, k, v, idx, causal, scale, *, config=None):
    """(out [B, S, Hq, D], lse [B, Hq, S] fp32)."""
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
    Hm, nrb, ncb = plan.kinds.shape[1], plan.kinds.shape[2], plan.kinds.shape[3]
    grid = (nrb, B * Hq)
    _fwd_kernel[grid](
        q, k, v, out, lse, plan.spans, plan.kinds, plan.cols, plan.n_cols,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        S, Hq, Hm, Hq // Hkv, plan.spans.shape[-1], nrb, ncb, scale * LOG2E,
        D=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(D)), PREC=_prec(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


def flashmask_bwd(dout, q, k, v, out, lse, idx, causal, scale, *, config=None):
    """(dq, dk, dv) in the dtypes and shapes of q, k, v."""
    _check(q, k, v)
    cfg = _config(q, BWD_CONFIG, BWD_CONFIG_FP32, config)
    q, k, v, dout = _last_contig(q), _last_contig(k), _last_contig(v), _last_contig(dout)
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij, the softmax backward's row term (fp32).
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    lse = lse.float().contiguous()
    bm, bn = cfg["block_m"], cfg["block_n"]
    plan = build_plan(idx, causal, S, B, q.device, bm, bn, transposed=True)
    Hm, nrb, ncb = plan.kinds.shape[1], plan.kinds.shape[2], plan.kinds.shape[3]
    common = dict(D=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(D)), PREC=_prec(q.dtype),
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    s_pad = plan.spans.shape[-1]
    _bwd_dkdv_kernel[(ncb, B * Hkv)](
        q, k, v, dout, lse, delta, dk, dv, plan.spans, plan.kinds_t, plan.rows, plan.n_rows,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        S, Hq, Hkv, Hm, Hq // Hkv, s_pad, nrb, ncb, scale * LOG2E, scale, **common,
    )
    _bwd_dq_kernel[(nrb, B * Hq)](
        q, k, v, dout, lse, delta, dq, plan.spans, plan.kinds, plan.cols, plan.n_cols,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        S, Hq, Hm, Hq // Hkv, s_pad, nrb, ncb, scale * LOG2E, scale, **common,
    )
    return dq, dk, dv
