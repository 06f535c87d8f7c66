"""Pure-PyTorch references for every op: the oracle for the kernels and the fallback backend.

Shapes follow the op front doors (see docs/dev/CONTRACTS.md). Math is done in fp32 and cast back,
which is what the kernels do too.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def startend_row_indices_to_mask(idx: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Dense "may attend" mask from FlashMask start/end row indices (docs/behaviour.md#flashmask-row-indices).

    idx: int [B, Hm, S, n] with n in {1, 2, 4}; column j's entries bound the masked rows.
    Returns bool [B, Hm, S, S] indexed [b, h, row i, col j]; True = row i may attend column j.
    """
    B, Hm, S, n = idx.shape
    rows = torch.arange(S, device=idx.device).view(1, 1, S, 1)
    cols = torch.arange(S, device=idx.device).view(1, 1, 1, S)
    col_idx = idx.to(torch.int64).transpose(2, 3)  # [B, Hm, n, S]: per column j
    lower = rows >= cols  # lower triangle, diagonal included
    upper = ~lower

    def bound(k):
        return col_idx[:, :, k, :].unsqueeze(2)  # [B, Hm, 1, S], broadcast over rows

    if causal:
        if n == 1:
            masked_lower = rows >= bound(0)
        elif n == 2:
            masked_lower = (rows >= bound(0)) & (rows < bound(1))
        else:
            raise ValueError(f"causal FlashMask takes 1 or 2 indices per column, got {n}")
        return lower & ~masked_lower
    if n == 2:  # LTS, UTE
        masked = (lower & (rows >= bound(0))) | (upper & (rows < bound(1)))
    elif n == 4:  # LTS, LTE, UTS, UTE
        masked = (lower & (rows >= bound(0)) & (rows < bound(1))) | (
            upper & (rows >= bound(2)) & (rows < bound(3))
        )
    else:
        raise ValueError(f"bidirectional FlashMask takes 2 or 4 indices per column, got {n}")
    return ~masked


# ---- attention dropout: the counter-based keep mask of the kernels (csrc/cpu/flashmask.h) ---------
# uint64 arithmetic written with int64 tensors: +, *, ^ wrap the same way in two's complement; only
# right shifts differ (arithmetic), so they are masked down to logical shifts.
_U64 = 1 << 64
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _i64(x: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    x %= _U64
    return x - _U64 if x >= 1 << 63 else x


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on the uint64 bits of an int64 tensor (any shape)."""
    z = (z ^ _srl(z, 30)) * _i64(_MIX1)
    z = (z ^ _srl(z, 27)) * _i64(_MIX2)
    return z ^ _srl(z, 31)


def draw_dropout_rng_state() -> torch.Tensor:
    """(seed, offset) int64 [2] on CPU, drawn from torch's default CPU generator: `torch.manual_seed`
    makes the dropout masks reproducible, and `torch.set_rng_state` (checkpoint resume) replays them."""
    return torch.empty(2, dtype=torch.int64).random_()


def dropout_threshold(dropout_p: float) -> int:
    """t = floor(p * 2^32): a 32-bit draw u is kept when u >= t."""
    return min(int(dropout_p * 4294967296.0), 1 << 32)


def dropout_head_keys(rng_state: torch.Tensor, B: int, H: int, device=None) -> torch.Tensor:
    """int64 [B, H]: the per-(batch, query head) keys mix64(mix64(mix64(seed) ^ offset) ^ (b << 32 | h))
    of the keep mask (uint64 bits). The Triton kernels take these from here and hash rows and columns
    themselves (ops/triton/flashmask.py)."""
    seed, offset = (int(x) for x in rng_state.reshape(-1).tolist())
    seed_key = mix64(mix64(torch.tensor(seed, dtype=torch.int64, device=device)) ^ offset)
    b = torch.arange(B, dtype=torch.int64, device=device).view(B, 1)
    h = torch.arange(H, dtype=torch.int64, device=device).view(1, H)
    return mix64(seed_key ^ ((b << 32) | h))


def dropout_keep_mask(rng_state: torch.Tensor, B: int, H: int, S: int, dropout_p: float, device=None,
                      chunk_elems: int = 1 << 22) -> torch.Tensor:
    """bool [B, H, S, S] indexed [b, query head, row i, column j]: True = probability kept.

    rng_state int64 [2] = (seed, offset). The kernels' scheme (csrc/cpu/flashmask.h), with mix64
    the SplitMix64 output function:
      head = mix64(mix64(mix64(seed) ^ offset) ^ (b << 32 | h)),  row = mix64(head ^ i),
      x = mix64(row + (j // 2 + 1) * 0x9E3779B97F4A7C15),  u = low 32 bits of x (j even) or high (j odd),
      keep = u >= floor(p * 2^32).
    Rows are hashed in chunks of about chunk_elems entries, so int64 temporaries stay small.
    """
    t = dropout_threshold(dropout_p)
    head = dropout_head_keys(rng_state, B, H, device).unsqueeze(-1)  # [B, H, 1]
    rows = mix64(head ^ torch.arange(S, dtype=torch.int64, device=device).view(1, 1, S))  # [B, H, S]
    j = torch.arange(S, dtype=torch.int64, device=device)
    pair = ((j >> 1) + 1) * _i64(_GOLDEN)
    odd = (j & 1).bool()
    keep = torch.empty(B, H, S, S, dtype=torch.bool, device=device)
    step = max(1, chunk_elems // max(1, B * H * S))
    for i0 in range(0, S, step):
        x = mix64(rows[:, :, i0:i0 + step, None] + pair)  # [B, H, rows, S]
        u = torch.where(odd, _srl(x, 32), x & 0xFFFFFFFF)
        keep[:, :, i0:i0 + step] = u >= t
    return keep


def _apply_dropout(probs: torch.Tensor, dropout_p: float, rng_state: torch.Tensor | None) -> torch.Tensor:
    """probs [B, H, S, S] fp32 -> keep * probs / (1 - p) with the kernels' keep mask (scale 0 for p = 1)."""
    B, H, S, _ = probs.shape
    if rng_state is None:
        rng_state = draw_dropout_rng_state()
    keep = dropout_keep_mask(rng_state, B, H, S, dropout_p, probs.device)
    scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
    return probs * keep * torch.tensor(scale, dtype=torch.float32, device=probs.device)


def flashmask_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    startend_row_indices: torch.Tensor | None,
    causal: bool = True,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    rng_state: torch.Tensor | None = None,
):
    """Attention with a FlashMask mask, materialising the [S, S] scores (reference only).

    q [B, S, Hq, D], k/v [B, S, Hkv, D] (Hq a multiple of Hkv); indices [B, 1|Hkv, S, n] or None
    (plain causal / full attention). Returns out [B, S, Hq, D] in q's dtype (and lse [B, Hq, S] fp32,
    the normaliser of the undropped probabilities). Rows that may attend nothing give 0, not NaN.
    dropout_p > 0: out = dropout(softmax(s)) v with the kernels' keep mask (`dropout_keep_mask`) of
    rng_state int64 [2] = (seed, offset); None draws it from the default CPU generator, as the op does.
    """
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    group = Hq // Hkv
    qf = q.float().transpose(1, 2)  # [B, Hq, S, D]
    kf = k.float().transpose(1, 2).repeat_interleave(group, dim=1)
    vf = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, Hq, S, S]
    if startend_row_indices is None:
        allowed = torch.ones(S, S, dtype=torch.bool, device=q.device)
        if causal:
            allowed = torch.tril(allowed)
        allowed = allowed.view(1, 1, S, S)
    else:
        allowed = startend_row_indices_to_mask(startend_row_indices, causal)
        if allowed.shape[1] != 1:  # one mask per kv head -> per query head
            allowed = allowed.repeat_interleave(Hq // allowed.shape[1], dim=1)
    # A finite fill keeps fully masked rows NaN-free in forward and backward; multiplying by the
    # mask afterwards zeroes those rows (softmax over them would be uniform).
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1) * allowed
    any_allowed = allowed.any(dim=-1)
    lse = torch.where(any_allowed, torch.logsumexp(scores, dim=-1), torch.full_like(scores[..., 0], float("-inf")))
    if dropout_p > 0.0:
        probs = _apply_dropout(probs, dropout_p, rng_state)
    out = torch.matmul(probs, vf).transpose(1, 2).to(q.dtype)
    return (out, lse) if return_lse else out


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, theta: float = 500000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved-pair rotary embedding (pairs (2i, 2i+1)), fp32 math (docs/behaviour.md#model).

    q [B, S, Hq, D], k [B, S, Hkv, D], position_ids [B, S]. Returns rotated (q, k) in their dtypes.
    """
    return rope_reference_one(q, position_ids, theta), rope_reference_one(k, position_ids, theta)


def rope_inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    """theta^(-2i/dim), i < dim/2, fp32 [dim/2] (the kernels take it from here so angles match)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))


def rope_angles(position_ids: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, S, 1, D/2] for interleaved RoPE with angle pos * theta^(-2i/dim)."""
    inv_freq = rope_inv_freq(dim, theta, position_ids.device)
    angles = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq  # [B, S, D/2]
    return angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)


def rope_reference_one(x: torch.Tensor, position_ids: torch.Tensor, theta: float = 500000.0, inverse: bool = False):
    cos, sin = rope_angles(position_ids, x.shape[-1], theta)
    if inverse:
        sin = -sin
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """fp32 mean(x^2), x * rsqrt(mean + eps), cast back, times weight (HF Ernie 4.5 order)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return F.silu(gate) * up


def fused_head_ce_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """LM head + cross-entropy, materialising the logits (reference only).

    hidden [N, H], weight [V, H], labels [N]. Returns (sum of fp32 CE over labelled tokens, token count).
    """
    logits = torch.matmul(hidden, weight.t()).float()
    loss_sum = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return loss_sum, (labels != ignore_index).sum()


# ---- Backward references ------------------------------------------------------------------------
# Explicit gradient formulas in fp32: the "reference" backend's backward kernels. (Op
# implementations run below autograd, so they cannot differentiate the forward references; the
# tests check these formulas against autograd through the forward references.)


def _flashmask_allowed(idx, causal, S, Hq, device):
    if idx is None:
        allowed = torch.ones(S, S, dtype=torch.bool, device=device)
        return (torch.tril(allowed) if causal else allowed).view(1, 1, S, S)
    allowed = startend_row_indices_to_mask(idx, causal)
    return allowed.repeat_interleave(Hq // allowed.shape[1], dim=1) if allowed.shape[1] != 1 else allowed


def flashmask_attention_backward_reference(dout, q, k, v, out, lse, startend_row_indices, causal=True,
                                           softmax_scale=None, dlse=None, dropout_p=0.0, rng_state=None):
    """dq, dk, dv of flashmask_attention given the saved out and lse [B, Hq, S] (fp32 math).

    P = exp(s - lse) on visible entries, delta = rowsum(dO * O) - dlse, dS = P (dP - delta),
    dq = scale dS k, dk = scale dS^T q, dv = P^T dO (summed over the query heads of a kv head).
    With dropout (keep mask Z, r = 1/(1-p), from the forward's rng_state): dv = (r Z P)^T dO,
    dP = r Z (dO v^T), and delta is unchanged since sum_j P dP = dO . O (O includes the dropout).
    """
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    group = Hq // Hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qf, dof, of = (t.float().transpose(1, 2) for t in (q, dout, out))  # [B, Hq, S, D]
    kf = k.float().transpose(1, 2).repeat_interleave(group, dim=1)
    vf = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    allowed = _flashmask_allowed(startend_row_indices, causal, S, Hq, q.device)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    probs = torch.where(allowed, torch.exp(scores - lse.float().unsqueeze(-1)), torch.zeros((), device=q.device))
    delta = (dof * of).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.float().unsqueeze(-1)
    dp = torch.matmul(dof, vf.transpose(-1, -2))
    dropped = probs
    if dropout_p > 0.0:
        if rng_state is None:
            raise ValueError("the dropout backward needs the forward's rng_state")
        dropped = _apply_dropout(probs, dropout_p, rng_state)  # r Z P
        dp = _apply_dropout(dp, dropout_p, rng_state)  # r Z dP
    ds = probs * (dp - delta)
    dq = torch.matmul(ds, kf) * scale
    dk = (torch.matmul(ds.transpose(-1, -2), qf) * scale).view(B, Hkv, group, S, D).sum(2)
    dv = torch.matmul(dropped.transpose(-1, -2), dof).view(B, Hkv, group, S, D).sum(2)
    return (dq.transpose(1, 2).to(q.dtype).contiguous(), dk.transpose(1, 2).to(k.dtype).contiguous(),
            dv.transpose(1, 2).to(v.dtype).contiguous())


def rms_norm_rstd_reference(x: torch.Tensor, eps: float) -> torch.Tensor:
    """rsqrt(mean(x^2) + eps) in fp32, [...] (x without its last dim)."""
    return torch.rsqrt(x.float().pow(2).mean(-1) + eps)


def rms_norm_backward_reference(dy, x, weight, rstd):
    """dx = rstd (dn - n mean(dn n)) with n = x rstd, dn = dy w; dw = sum over rows of dy cast(n)."""
    xf, dyf, wf = x.float(), dy.float(), weight.float()
    r = rstd.float().unsqueeze(-1)
    n = xf * r
    dn = dyf * wf
    dx = r * (dn - n * (dn * n).mean(-1, keepdim=True))
    dw = (dyf * n.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


def swiglu_backward_reference(dy, gate, up):
    """dgate = dy up sig(g) (1 + g (1 - sig(g))), dup = dy silu(g), fp32 math."""
    g, u, d = gate.float(), up.float(), dy.float()
    sig = torch.sigmoid(g)
    dg = d * u * sig * (1 + g * (1 - sig))
    du = d * g * sig
    return dg.to(gate.dtype), du.to(up.dtype)


def fused_head_ce_fwd_bwd_reference(hidden, weight, labels, ignore_index=-100, chunk_tokens=0,
                                    grad_hidden=True, grad_weight=True):
    """(loss_sum, n_tokens, dhidden, dweight) of LM head + CE for an upstream grad of 1 on loss_sum,
    materialising the [N, V] logits (reference only; chunk_tokens is ignored). Gradients not asked
    for come back as empty tensors."""
    logits = torch.matmul(hidden, weight.t()).float()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss_sum = torch.where(valid, lse - target, torch.zeros_like(lse)).sum()
    dlogits = torch.softmax(logits, dim=-1)
    dlogits.scatter_add_(1, safe.unsqueeze(1), -torch.ones_like(lse).unsqueeze(1))
    dlogits = dlogits * valid.unsqueeze(1)
    empty_h, empty_w = hidden.new_empty(0), weight.new_empty(0)
    dhidden = torch.matmul(dlogits.to(hidden.dtype), weight) if grad_hidden else empty_h
    dweight = torch.matmul(dlogits.t(), hidden.float()).to(weight.dtype) if grad_weight else empty_w
    return loss_sum, valid.sum(), dhidden, dweight
