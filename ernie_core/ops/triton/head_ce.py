"""Fused LM head + cross-entropy: the logits never exist for more than a chunk of tokens.

Per chunk of tokens: logits = h W^T (cuBLAS through torch.matmul), then one Triton kernel per token
row computes the fp32 log-sum-exp over the vocabulary (online, in blocks) and overwrites the logits
with d loss / d logits = softmax - onehot; two more GEMMs turn that into dh and the dW update.
So peak extra memory is one [chunk, V] logits buffer plus an fp32 dW accumulator, instead of
several [N, V] tensors (Liger-Kernel's fused linear cross-entropy does the same).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_rows_kernel(logits_ptr, labels_ptr, loss_ptr, stride, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    label = tl.load(labels_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        for v0 in range(0, V, BLOCK_V):
            tl.store(base + v0 + offs, tl.zeros([BLOCK_V], tl.float32).to(logits_ptr.dtype.element_ty),
                     mask=v0 + offs < V)
        tl.store(loss_ptr + row, 0.0)
    else:
        # Pass 1: running max and rescaled sum of exp, per lane, merged at the end (fp32).
        m = tl.full([BLOCK_V], float("-inf"), tl.float32)
        acc = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            x = tl.load(base + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp(m - m_safe) + tl.exp(x - m_safe)
            m = m_new
        m_all = tl.max(m, 0)
        lse = m_all + tl.log(tl.sum(acc * tl.exp(m - m_all), 0))
        target = tl.load(base + label).to(tl.float32)
        tl.store(loss_ptr + row, lse - target)
        # Pass 2: the gradient, written over the logits (each element read once more).
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
            tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < V)


def default_chunk_tokens(vocab: int, elem_bytes: int) -> int:
    # About 256 MiB of logits per chunk: big enough that the GEMMs run at full rate, and a small
    # fraction of the [N, V] logits at 32K tokens x 103K vocab (6.8 GB in bf16).
    return max(16, ((256 << 20) // (elem_bytes * vocab)) // 16 * 16)


def ce_rows_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """In place: logits [n, V] -> d(sum CE)/d logits; returns the per-row fp32 loss [n]."""
    n, V = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    if n:
        _ce_rows_kernel[(n,)](logits, labels, loss, logits.stride(0), V, ignore_index, BLOCK_V=4096, num_warps=16)
    return loss


def fused_head_ce_fwd_bwd(hidden, weight, labels, ignore_index=-100, chunk_tokens=0, grad_hidden=True,
                          grad_weight=True):
    """hidden [N, H], weight [V, H], labels [N] -> (loss_sum fp32 [], n_tokens int64 [], dhidden, dweight);
    the gradients are those of loss_sum (upstream gradient 1.0); one not asked for (grad_hidden /
    grad_weight False) is not computed and comes back as an empty tensor."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or labels.shape != hidden.shape[:1]:
        raise ValueError(f"fused_head_ce: hidden {tuple(hidden.shape)} must be [N, H], weight {tuple(weight.shape)} "
                         f"[V, H], labels {tuple(labels.shape)} [N]")
    N, V = hidden.shape[0], weight.shape[0]
    labels = labels.to(torch.int64).contiguous()
    live = labels != ignore_index
    bad = live & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"fused_head_ce: label {int(labels[i])} at token {i} is outside [0, {V}) "
                         f"and is not ignore_index ({ignore_index})")
    chunk = chunk_tokens if chunk_tokens and chunk_tokens > 0 else default_chunk_tokens(V, hidden.element_size())
    chunk = max(1, min(chunk, max(N, 1)))
    dhidden = torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0)
    # fp32 accumulator: summing many chunks' bf16 dW updates in bf16 would lose the small ones.
    dweight = (torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if grad_weight
               else weight.new_empty(0))
    loss_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
    for s in range(0, N, chunk):
        h = hidden[s:s + chunk]
        logits = h @ weight.t()  # [c, V] in the input dtype, fp32 accumulation inside the GEMM
        loss_sum += ce_rows_(logits, labels[s:s + chunk], ignore_index).sum()
        if grad_hidden:
            torch.matmul(logits, weight, out=dhidden[s:s + chunk])
        if not grad_weight:
            continue
        if weight.dtype == torch.float32:
            dweight.addmm_(logits.t(), h)
        else:  # each chunk's product rounds once to bf16 (as the naive dW does); the running sum stays fp32
            dweight.add_(logits.t() @ h)
    return loss_sum, live.sum(), dhidden, dweight.to(weight.dtype)
