"""RoPE, RMSNorm and SwiGLU in Triton. Loads in the storage dtype, all math in fp32, one rounding
at the store. Wrappers follow the backend kernel signatures of docs/dev/CONTRACTS.md."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# ---- RoPE (interleaved pairs (2i, 2i+1), angle pos * theta^(-2i/D)) -----------------------------

@triton.jit
def _rope_kernel(x_ptr, y_ptr, pos_ptr, inv_freq_ptr, sxb, sxs, sxh, syb, sys, syh, spb, sps, S, H, n_tok, sign,
                 HALF_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # BLOCK_T (batch, position) tokens per program, BLOCK_H heads; the angles once per token.
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < n_tok
    b, s = tok // S, tok % S
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, BLOCK_HALF)
    pos = tl.load(pos_ptr + b * spb + s * sps, mask=tok_ok, other=0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + offs_i, mask=offs_i < HALF_D, other=0.0)
    # The same fp32 product as the reference, so the angle (up to 32K rad) is bit-identical.
    angle = pos[:, None] * inv_freq[None, :]  # [T, HALF]
    c, sn = tl.cos(angle)[:, None, :], (tl.sin(angle) * sign)[:, None, :]
    ok = tok_ok[:, None, None] & (offs_h[None, :, None] < H) & (offs_i[None, None, :] < HALF_D)
    src = (x_ptr + (b * sxb + s * sxs)[:, None, None] + offs_h[None, :, None] * sxh + 2 * offs_i[None, None, :])
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + 1, mask=ok, other=0.0).to(tl.float32)
    dst = (y_ptr + (b * syb + s * sys)[:, None, None] + offs_h[None, :, None] * syh + 2 * offs_i[None, None, :])
    tl.store(dst, (x1 * c - x2 * sn).to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + 1, (x1 * sn + x2 * c).to(y_ptr.dtype.element_ty), mask=ok)


def rope_inv_freq(dim: int, theta: float, device) -> torch.Tensor:
    # Same expression as reference.rope_angles, so the frequencies match bit for bit.
    return 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))


def rope_tokens_per_program(block_h: int, block_half: int) -> int:
    """Tokens per program: about 2K rotated pairs each (1 token of 16 heads x 64 pairs at D = 128)."""
    return max(1, min(64, 2048 // (block_h * block_half)))


def rope_fwd(x, position_ids, theta=500000.0, inverse=False):
    """x [B, S, H, D], position_ids [B, S] -> rotated x (inverse=True rotates back: the backward)."""
    if x.dim() != 4 or x.shape[-1] % 2 or tuple(position_ids.shape) != tuple(x.shape[:2]):
        raise ValueError(f"rope: x must be [B, S, H, D] with even D and position_ids [B, S]; got "
                         f"{tuple(x.shape)} and {tuple(position_ids.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    B, S, H, D = x.shape
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if x.numel() == 0:
        return y
    inv_freq = rope_inv_freq(D, theta, x.device)
    block_h = min(16, triton.next_power_of_2(H))
    block_half = triton.next_power_of_2(D // 2)
    block_t = rope_tokens_per_program(block_h, block_half)
    _rope_kernel[(triton.cdiv(B * S, block_t), triton.cdiv(H, block_h))](
        x, y, position_ids, inv_freq, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        position_ids.stride(0), position_ids.stride(1), S, H, B * S, -1.0 if inverse else 1.0,
        HALF_D=D // 2, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4)
    return y


# ---- RMSNorm -------------------------------------------------------------------------------------

@triton.jit
def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, sx, sy, M, N, eps, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    # BLOCK_R rows per program (several short rows share a program; one long row has it alone).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = tl.arange(0, BLOCK)
    ok = (rows[:, None] < M) & (offs[None, :] < N)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sx + offs[None, :], mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / N + eps)
    # Round the normalised value to x's dtype before the weight, as the HF Ernie 4.5 module does.
    xhat = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * sy + offs[None, :], (xhat * w[None, :]).to(y_ptr.dtype.element_ty),
             mask=ok)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _rms_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, sdy, sx, sdx, M, N, rows_per_prog,
                    BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    # Each program owns a contiguous run of rows, BLOCK_R at a time, and keeps its dW partial sum in
    # registers (fp32); the partials are summed by the wrapper, so no atomics and a deterministic dW.
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    col_ok = offs < N
    w = tl.load(w_ptr + offs, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    end = tl.minimum((pid + 1) * rows_per_prog, M)
    for r0 in range(pid * rows_per_prog, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < end
        ok = row_ok[:, None] & col_ok[None, :]
        r64 = rows[:, None].to(tl.int64)
        x = tl.load(x_ptr + r64 * sx + offs[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r64 * sdy + offs[None, :], mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        dw += tl.sum(dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32), 0)
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, 1) / N)[:, None])
        tl.store(dx_ptr + r64 * sdx + offs[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_part_ptr + pid * N + offs, dw, mask=col_ok)


def rms_rows_per_block(block: int) -> int:
    """Rows a program handles at once: about 4K elements (one row alone from hidden size 4096 up)."""
    return max(1, min(64, 4096 // block))


def _rows(t, n):
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, n)


def _out_dtype(x, w):
    return x.dtype if x.dtype == w.dtype else torch.float32


def rms_norm_fwd(x, w, eps):
    """x [..., N], w [N] -> (y [..., N], rstd [...] fp32)."""
    N = x.shape[-1]
    if w.dim() != 1 or w.shape[0] != N:
        raise ValueError(f"rms_norm: weight {tuple(w.shape)} must be [H] for x {tuple(x.shape)}")
    x2 = _rows(x, N)
    y = torch.empty(x2.shape, device=x.device, dtype=_out_dtype(x, w))
    rstd = torch.empty(x2.shape[0], device=x.device, dtype=torch.float32)
    if x2.shape[0]:
        block = triton.next_power_of_2(N)
        block_r = rms_rows_per_block(block)
        _rms_fwd_kernel[(triton.cdiv(x2.shape[0], block_r),)](
            x2, w.contiguous(), y, rstd, x2.stride(0), y.stride(0), x2.shape[0], N, float(eps),
            BLOCK_R=block_r, BLOCK=block, num_warps=min(16, max(1, block_r * block // 256)))
    return y.view(x.shape), rstd.view(x.shape[:-1])


def rms_norm_bwd(dy, x, w, rstd, *, n_programs=None):
    """-> (dx like x, dw like w)."""
    N = x.shape[-1]
    x2, dy2 = _rows(x, N), _rows(dy, N)
    M = x2.shape[0]
    dx = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    if M == 0:
        return dx.view(x.shape), torch.zeros_like(w)
    if n_programs is None:
        n_programs = torch.cuda.get_device_properties(x.device).multi_processor_count * 4 if x.is_cuda else 4
    n_programs = max(1, min(n_programs, M))
    rows_per = triton.cdiv(M, n_programs)
    n_programs = triton.cdiv(M, rows_per)
    dw_part = torch.empty((n_programs, N), device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(N)
    block_r = min(rms_rows_per_block(block), triton.next_power_of_2(rows_per))
    _rms_bwd_kernel[(n_programs,)](dy2, x2, w.contiguous(), rstd.reshape(-1).float().contiguous(), dx, dw_part,
                                   dy2.stride(0), x2.stride(0), dx.stride(0), M, N, rows_per,
                                   BLOCK_R=block_r, BLOCK=block, num_warps=min(16, max(1, block_r * block // 256)))
    return dx.view(x.shape), dw_part.sum(0).to(w.dtype)


# ---- SwiGLU --------------------------------------------------------------------------------------

@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (g * tl.sigmoid(g) * u).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu / dg = sig * (1 + g * (1 - sig))
    tl.store(dg_ptr + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=ok)
    tl.store(du_ptr + offs, (dy * silu).to(du_ptr.dtype.element_ty), mask=ok)


_SWIGLU_BLOCK = 1024


def swiglu_fwd(g, u):
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ValueError(f"swiglu: gate {tuple(g.shape)} {g.dtype} and up {tuple(u.shape)} {u.dtype} must match")
    g, u = g.contiguous(), u.contiguous()
    y = torch.empty_like(g)
    n = g.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, _SWIGLU_BLOCK),)](g, u, y, n, BLOCK=_SWIGLU_BLOCK, num_warps=4)
    return y


def swiglu_bwd(dy, g, u):
    dy, g, u = dy.contiguous(), g.contiguous(), u.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, _SWIGLU_BLOCK),)](dy, g, u, dg, du, n, BLOCK=_SWIGLU_BLOCK, num_warps=4)
    return dg, du
