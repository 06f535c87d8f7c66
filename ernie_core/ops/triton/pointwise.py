"""RoPE, RMSNorm and SwiGLU in Triton. Loads in the storage dtype, all math in fp32, one rounding
at the store. Wrappers follow the backend kernel signatures of docs/dev/CONTRACTS.md."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# ---- RoPE (interleaved pairs (2i, 2i+1), angle pos * theta^(-2i/D)) -----------------------------

@triton.jit
def _rope_kernel(x_ptr, y_ptr, pos_ptr, inv_freq_ptr, sxb, sxs, sxh, syb, sys, syh, spb, sps, S, H, sign,
                 HALF_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    row = tl.program_id(0)  # one (batch, position) per program, all heads
    b, s = row // S, row % S
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, BLOCK_HALF)
    ok = (offs_h[:, None] < H) & (offs_i[None, :] < HALF_D)
    pos = tl.load(pos_ptr + b * spb + s * sps).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + offs_i, mask=offs_i < HALF_D, other=0.0)
    # The same fp32 product as the reference, so the angle (up to 32K rad) is bit-identical.
    angle = pos * inv_freq
    c, sn = tl.cos(angle)[None, :], (tl.sin(angle) * sign)[None, :]
    src = x_ptr + b * sxb + s * sxs + offs_h[:, None] * sxh + 2 * offs_i[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + 1, mask=ok, other=0.0).to(tl.float32)
    dst = y_ptr + b * syb + s * sys + offs_h[:, None] * syh + 2 * offs_i[None, :]
    tl.store(dst, (x1 * c - x2 * sn).to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + 1, (x1 * sn + x2 * c).to(y_ptr.dtype.element_ty), mask=ok)


def rope_inv_freq(dim: int, theta: float, device) -> torch.Tensor:
    # Same expression as reference.rope_angles, so the frequencies match bit for bit.
    return 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))


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
    _rope_kernel[(B * S, triton.cdiv(H, block_h))](
        x, y, position_ids, inv_freq, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        position_ids.stride(0), position_ids.stride(1), S, H, -1.0 if inverse else 1.0,
        HALF_D=D // 2, BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(D // 2), num_warps=4)
    return y


# ---- RMSNorm -------------------------------------------------------------------------------------

@triton.jit
def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, sx, sy, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(x_ptr + row * sx + offs, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    # Round the normalised value to x's dtype before the weight, as the HF Ernie 4.5 module does.
    xhat = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * sy + offs, (xhat * w).to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, sdy, sx, sdx, M, N, rows_per_prog,
                    BLOCK: tl.constexpr):
    # Each program owns a contiguous run of rows and keeps its dW partial sum in registers (fp32);
    # the partials are summed by the wrapper, so no atomics and a deterministic dW.
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    for r in range(pid * rows_per_prog, tl.minimum((pid + 1) * rows_per_prog, M)):
        x = tl.load(x_ptr + r * sx + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r * sdy + offs, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r)
        xhat = x * rstd
        dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, 0) / N))
        tl.store(dx_ptr + r * sdx + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_part_ptr + pid * N + offs, dw, mask=ok)


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
        _rms_fwd_kernel[(x2.shape[0],)](x2, w.contiguous(), y, rstd, x2.stride(0), y.stride(0), N, float(eps),
                                        BLOCK=block, num_warps=min(16, max(1, block // 256)))
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
    _rms_bwd_kernel[(n_programs,)](dy2, x2, w.contiguous(), rstd.reshape(-1).float().contiguous(), dx, dw_part,
                                   dy2.stride(0), x2.stride(0), dx.stride(0), M, N, rows_per,
                                   BLOCK=block, num_warps=min(16, max(1, block // 256)))
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
