"""LM head + cross-entropy without the [tokens, vocab] logits: the public op `ernie_core::fused_head_ce`.

The forward runs the head chunk by chunk over tokens; per chunk it computes the logits, their
log-sum-exp, the loss and, right away, the gradients for hidden and weight (docs/behaviour.md#lm-head-variants,
`use_fused_head_and_loss_fn`). It returns (loss_sum, n_tokens, dhidden, dweight) with gradients for
an upstream grad of 1; the backward (`ernie_core::fused_head_ce_backward`, its own op) only scales
them (in place in eager mode, so it runs once per forward: no retain_graph). Gradients nobody needs
(no grad mode, frozen weight) are not computed.
A backend registers `fwd_bwd(hidden, weight, labels, ignore_index, chunk_tokens, grad_hidden=True,
grad_weight=True) -> (loss_sum, n_tokens, dhidden, dweight)` (empty tensors for grads not asked).
"""
import torch

from . import _backend, _dtypes
from . import reference as ref

OP = "fused_head_ce"


@torch.library.custom_op("ernie_core::fused_head_ce", mutates_args=())
def fused_head_ce_op(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, chunk_tokens: int,
    grad_hidden: bool, grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = _backend.choose_backend(OP, hidden, weight, fn_name="fwd_bwd")
    with _dtypes.no_autocast(hidden):
        return _backend.kernel(OP, backend, "fwd_bwd")(
            hidden, weight, labels, ignore_index, chunk_tokens, grad_hidden=grad_hidden, grad_weight=grad_weight
        )


@fused_head_ce_op.register_fake
def _(hidden, weight, labels, ignore_index, chunk_tokens, grad_hidden, grad_weight):
    return (
        hidden.new_empty((), dtype=torch.float32),
        labels.new_empty((), dtype=torch.int64),
        hidden.new_empty(hidden.shape if grad_hidden else (0,)),
        weight.new_empty(weight.shape if grad_weight else (0,)),
    )


@torch.library.custom_op("ernie_core::fused_head_ce_backward", mutates_args=())
def fused_head_ce_backward_op(
    grad_loss: torch.Tensor, dhidden: torch.Tensor, dweight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    g = grad_loss.float()
    return (dhidden * g).to(dhidden.dtype), (dweight * g).to(dweight.dtype)


@fused_head_ce_backward_op.register_fake
def _(grad_loss, dhidden, dweight):
    return dhidden.new_empty(dhidden.shape), dweight.new_empty(dweight.shape)


def _setup_context(ctx, inputs, output):
    ctx.grad_hidden, ctx.grad_weight = inputs[5], inputs[6]
    ctx.save_for_backward(output[2], output[3])


def _backward(ctx, grad_loss, _grad_n, _grad_dh, _grad_dw):
    dhidden, dweight = ctx.saved_tensors
    if type(dweight) is torch.Tensor and type(dhidden) is torch.Tensor:
        # Eager: scale the saved gradients in place. A scaled copy would be a second [V, H] buffer at
        # the memory peak, and these gradients are used exactly once. (Under torch.compile / AOT
        # tracing the tensors are subclasses and the functional op below is used instead.) A second
        # backward through the same call (retain_graph) is refused by autograd's version check.
        g = grad_loss.float()
        gh, gw = dhidden.mul_(g), dweight.mul_(g)
    else:
        gh, gw = fused_head_ce_backward_op(grad_loss, dhidden, dweight)
    return (gh if ctx.grad_hidden else None), (gw if ctx.grad_weight else None), None, None, None, None, None


fused_head_ce_op.register_autograd(_backward, setup_context=_setup_context)
_backend.register(OP, "reference", "fwd_bwd", ref.fused_head_ce_fwd_bwd_reference)


def _fwd_bwd_contract(hidden, weight, labels, ignore_index, chunk_tokens, *, grad_hidden, grad_weight): ...


def _supports_contract(hidden, weight): ...


_backend.declare(OP, "fwd_bwd", _fwd_bwd_contract)
_backend.declare(OP, "supports", _supports_contract)


def _example():
    """Three chunks (the last partial), ignored labels, and a frozen weight (grad_weight=False)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 24, generator=g).requires_grad_()
    w = (0.2 * torch.randn(300, 24, generator=g)).requires_grad_()
    labels = torch.randint(0, 300, (37,), generator=g)
    labels[::5] = -100
    loss, n = fused_head_ce(h, w, labels, chunk_tokens=16)
    dh, dw = torch.autograd.grad(loss * 0.5, (h, w))
    loss_frozen, _ = fused_head_ce(h, w.detach(), labels, chunk_tokens=16)
    (dh_frozen,) = torch.autograd.grad(loss_frozen, (h,))
    return dict(loss=loss, n=n, dhidden=dh, dweight=dw, dhidden_frozen_weight=dh_frozen)


_backend.example(OP, _example)


def fused_head_ce(hidden, weight, labels, ignore_index=-100, chunk_tokens=None, sparse=False):
    """Sum of fp32 cross-entropy of (hidden @ weight.T) against labels, and the labelled-token count.

    hidden [..., H], weight [V, H], labels [...] int (ignore_index = no loss). Returns (loss_sum
    fp32 scalar, n_tokens int64 scalar); mean loss = loss_sum / n_tokens. chunk_tokens: tokens
    per chunk (None: about 256 MiB of fp32 logits per chunk). sparse=True first gathers the
    labelled positions (`use_sparse_head_and_loss_fn`), so unlabelled tokens cost nothing.
    Under autocast hidden and weight are cast to the autocast dtype (like a matmul), else to their
    common dtype; the softmax / CE math is fp32 and dweight is accumulated in fp32.
    """
    hidden, weight = _dtypes.matmul_inputs(hidden, weight)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if sparse:
        keep = (labels != ignore_index).nonzero().squeeze(1)
        hidden, labels = hidden.index_select(0, keep), labels.index_select(0, keep)
    grad_on = torch.is_grad_enabled()
    loss_sum, n_tokens, _, _ = fused_head_ce_op(
        hidden, weight, labels, int(ignore_index), int(chunk_tokens or 0),
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
    )
    return loss_sum, n_tokens
