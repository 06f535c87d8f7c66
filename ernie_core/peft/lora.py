"""LoRA adapters on a plain model (docs/behaviour.md#lora): `apply_lora(model, rank=..., ...)`.

Every attention and FFN linear gets `y = x Wᵀ + scaling · (x Aᵀ) Bᵀ` with A [r, in] (Kaiming-uniform,
a=√5) and B [out, r] (zeros), PEFT's [out, in] layout. ERNIEKit trains one adapter on the fused
q|k|v weight and one on gate|up; on our split linears that is the same function when q/k/v (and
gate/up) share one A and each keeps its rows of B, so that is what `share_fused=True` builds (one A
Parameter held by the sibling modules). Base weights stay where they are, under their own names
(`...q_proj.weight`), frozen; adapters add `...q_proj.lora_A` / `...lora_B`.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..models.config import FUSED_PROJECTIONS, natural_key

# Leaf names of the linears that get adapters: HF split names and our fused ones (fuse_linear),
# for dense layers and MoE experts alike. The router (`mlp.gate`), embeddings, norms and the LM
# head never match.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "up_gate_proj")
# Siblings that share the leader's A (ERNIEKit's fused q|k|v and gate|up adapters).
SHARED_A = {"q_proj": ("k_proj", "v_proj"), "gate_proj": ("up_proj",)}
FOLLOWER_OF = {f: lead for lead, fs in SHARED_A.items() for f in fs}
# Row order of our fused linears, in HF split names (one definition, on the model config).
FUSED_PARTS = FUSED_PROJECTIONS


def resolve_alpha(rank: int, alpha: float, rslora: bool) -> float:
    """lora_alpha -1 means 2r (4 with rsLoRA), ERNIEKit's default."""
    if alpha == -1:
        return 4.0 if rslora else 2.0 * rank
    return float(alpha)


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    """alpha/r, or alpha/√r with rsLoRA (keeps the update's scale stable as r grows)."""
    alpha = resolve_alpha(rank, alpha, rslora)
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclass
class LoraSpec:
    """What was applied: enough to write adapter_config.json and to check a loaded adapter."""

    rank: int
    alpha: float  # resolved (never -1)
    rslora: bool
    share_fused: bool
    modules: list[str] = field(default_factory=list)  # full names of the wrapped linears

    @property
    def scaling(self) -> float:
        return lora_scaling(self.rank, self.alpha, self.rslora)


class _ACache:
    """x Aᵀ of the last input, shared by siblings that share A (q|k|v, gate|up all read the same
    normed hidden state): the fused adapter's one skinny [T, in] x [in, r] product instead of three,
    in forward and in backward. Valid only for the very same input tensor, unchanged in place, the
    same A unchanged, and the same grad/autocast mode; anything else recomputes.

    The product is an ordinary autograd op in A (so a shared A's gradient sums over its siblings)
    but not in x: the adapted linears return x's whole gradient themselves (see _LoRALinearFn)."""

    def __init__(self):
        self.x, self.a, self.key, self.h = None, None, None, None

    def get(self, x: torch.Tensor, a: torch.Tensor, local=None) -> torch.Tensor:
        """h = x Aᵀ; `local(a)`, when given, is the tensor this rank multiplies with (tensor parallel)."""
        autocast = torch.is_autocast_enabled(x.device.type)
        key = (x._version, a._version, torch.is_grad_enabled(), autocast)
        if self.x is not None and self.x() is x and self.a is a and self.key == key:
            return self.h
        xd = x.detach()
        a_mm = a if local is None else local(a)
        h = F.linear(xd if autocast else xd.to(a_mm.dtype), a_mm)
        self.x, self.a, self.key, self.h = weakref.ref(x), a, key, h
        return h


def _autocast_off(device_type: str):
    """Autocast off for an op body that picks its own dtypes (a free no-op when it is off already)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _LoRALinearFn(torch.autograd.Function):
    """y = x Wᵀ + b + s · h Bᵀ (h = x Aᵀ, given) as one autograd node, the low-rank term added in
    place into the base output (no [T, out] delta or sum tensors), all in `dtype` (the autocast
    dtype, else x's).

    Backward: grad_x = gy (W + s B A), the whole gradient of x in one GEMM (h carries none: it is
    x.detach() Aᵀ, so A's gradient, s (gy B)ᵀ x, comes from its own node); grad_h = s gy B;
    grad_B = s gyᵀ h. Saves only what backward needs: W and A for grad_x, h for grad_B, B for
    grad_h and grad_x, and x only when W itself trains. Gradients come back in each input's own dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, h, lora_a, lora_b, scaling: float, dtype: torch.dtype):
        with _autocast_off(x.device.type):
            xc, wc, hc, bc = x.to(dtype), weight.to(dtype), h.to(dtype), lora_b.to(dtype)
            y = F.linear(xc, wc, None if bias is None else bias.to(dtype))
            # y += s · h Bᵀ, on the [T, out] view of y itself.
            y.view(-1, y.shape[-1]).addmm_(hc.reshape(-1, hc.shape[-1]), bc.t(), alpha=scaling)
        need_x, need_w, _, need_h, _, need_b = ctx.needs_input_grad[:6]
        ctx.save_for_backward(weight if need_x else None, lora_a if need_x else None,
                              lora_b if (need_x or need_h) else None,
                              xc if need_w else None, hc if need_b else None)
        ctx.scaling, ctx.dtype = scaling, dtype
        ctx.in_dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype, h.dtype, lora_b.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        w, a, b, xc, hc = ctx.saved_tensors
        need_x, need_w, need_bias, need_h, _, need_b = ctx.needs_input_grad[:6]
        x_dt, w_dt, bias_dt, h_dt, b_dt = ctx.in_dtypes
        s, dtype = ctx.scaling, ctx.dtype
        gx = gw = gbias = gh = gb = None
        with _autocast_off(gy.device.type):
            gy2 = gy.to(dtype).reshape(-1, gy.shape[-1])
            bc = None if b is None else b.to(dtype)
            if need_x:
                # W + s B A, [out, in], rounded once to the compute dtype: r << T, so merging costs far
                # less than the [T, r] x [r, in] product and [T, in] sum it replaces.
                w_eff = torch.addmm(w.to(dtype), bc, a.to(dtype), alpha=s)
                gx = torch.mm(gy2, w_eff).view(*gy.shape[:-1], w.shape[1]).to(x_dt)
            if need_w:
                gw = torch.mm(gy2.t(), xc.reshape(-1, xc.shape[-1])).to(w_dt)
            if need_bias:
                gbias = gy2.sum(0, dtype=torch.float32).to(bias_dt)
            # The skinny rank-r products are computed transposed, (Bᵀ gyᵀ)ᵀ and (hᵀ gy)ᵀ: the same
            # values, but BLAS runs these layouts 2-3x faster on CPU (fp32) than gy B and gyᵀ h. The
            # [T, r] grad_h stays a transposed view; A's backward reads it faster that way too.
            if need_h:
                gh = torch.mm(bc.t(), gy2.t()).mul_(s).t().view(*gy.shape[:-1], b.shape[1]).to(h_dt)
            if need_b:
                gb = torch.mm(hc.reshape(-1, hc.shape[-1]).t(), gy2).t().to(b_dt).mul_(s).contiguous()
        return gx, gw, gbias, gh, None, gb, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """x Wᵀ + bias + scaling · h Bᵀ in one autograd node, with h = x Aᵀ given (computed without a
    gradient path to x: this node returns x's whole gradient, through W + scaling · B A). Computes
    in the autocast dtype when autocast is on for x's device, else in x's dtype."""
    dev = x.device.type
    autocast = torch.is_autocast_enabled(dev) and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    dtype = torch.get_autocast_dtype(dev) if autocast else x.dtype
    return _LoRALinearFn.apply(x, weight, bias, h, lora_a, lora_b, float(scaling), dtype)


class LoRALinear(nn.Linear):
    """nn.Linear (same `weight`/`bias` Parameters, frozen) plus a trainable low-rank update.

    lora_A [r, in] and lora_B [out, r] are kept in fp32 whatever the base dtype: they are the only
    trained weights, and the optimizer updates them in place.

    `tp_view` (None on one process) is set by tensor parallelism (parallel/tensor_parallel.py): the
    parameters are then DTensors and the view maps each to the local tensor this rank computes with
    (`view.local(name, param)`), adding the gradient reduction a replicated factor needs. The forward
    is the same math on those local pieces.
    """

    tp_view = None

    def __init__(self, *args, **kwargs):  # built through `wrap`, never directly
        raise TypeError("use LoRALinear.wrap(linear, rank, scaling)")

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, scaling: float, share_with: "LoRALinear | None" = None) -> "LoRALinear":
        """Wrap `linear` (its Parameters are reused); `share_with`: a sibling whose A this one shares."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.rank, self.scaling = rank, float(scaling)
        self.enabled = True
        dev = linear.weight.device
        if share_with is not None:
            self.lora_A, self._a_cache = share_with.lora_A, share_with._a_cache
        else:
            self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=dev, dtype=torch.float32))
            # PEFT's and PaddleFormers' init: bound 1/sqrt(in) for A; B = 0 so training starts at the base.
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self._a_cache = _ACache()
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=dev, dtype=torch.float32))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = self.tp_view
        if view is None:
            weight, bias, lora_b, a_local = self.weight, self.bias, self.lora_B, None
        else:
            weight, bias = view.local("weight", self.weight), view.local("bias", self.bias)
            lora_b = view.local("lora_B", self.lora_B)
            a_local = partial(view.local, "lora_A")
        if not self.enabled:
            return F.linear(x, weight, bias)
        h = self._a_cache.get(x, self.lora_A, a_local)  # autograd op in A: a shared A's gradient accumulates
        lora_a = self.lora_A if view is None else view.local("lora_A", self.lora_A).detach()
        return lora_linear(x, weight, bias, h, lora_a, lora_b, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A in fp32, [out, in]: what merging adds to `weight`."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:.4g}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _split_name(name: str) -> tuple[str, str]:
    parent, _, leaf = name.rpartition(".")
    return parent, leaf


def apply_lora(model: nn.Module, *, rank: int, alpha: float = -1, rslora: bool = False, share_fused: bool = True,
               base_dtype: torch.dtype | None = None, targets=TARGETS) -> LoraSpec:
    """Freeze `model`, cast its (frozen) weights to `base_dtype` if given, and replace every target
    linear by a LoRALinear in place. Returns the LoraSpec (also stored as `model.lora_spec`).

    Adapter init uses the global torch RNG (seeded by the trainer), leaders before followers.
    """
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    if lora_modules(model):
        raise ValueError("model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    if base_dtype is not None:
        model.to(base_dtype)
    spec = LoraSpec(rank, resolve_alpha(rank, alpha, rslora), rslora, share_fused)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and _split_name(n)[1] in targets]
    # Leaders (and unshared linears) first, so a follower finds its leader's A already made.
    found.sort(key=lambda nm: _split_name(nm[0])[1] in FOLLOWER_OF)
    modules = dict(model.named_modules())
    for name, linear in found:
        parent, leaf = _split_name(name)
        leader = None
        if share_fused and leaf in FOLLOWER_OF:
            leader = modules.get(f"{parent}.{FOLLOWER_OF[leaf]}" if parent else FOLLOWER_OF[leaf])
            leader = leader if isinstance(leader, LoRALinear) else None
        wrapped = LoRALinear.wrap(linear, rank, spec.scaling, share_with=leader)
        setattr(modules[parent] if parent else model, leaf, wrapped)
        modules[name] = wrapped
        spec.modules.append(name)
    if not spec.modules:
        raise ValueError(f"no linear named one of {', '.join(targets)} found: nothing to adapt")
    spec.modules.sort(key=natural_key)
    model.lora_spec = spec
    return spec


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model: every adapter off inside the block (LoRA DPO's reference model, docs/behaviour.md#dpo-reference-model)."""
    mods = list(lora_modules(model).values())
    states = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, s in zip(mods, states):
            m.enabled = s


def lora_plus_multiplier(lora_plus_scale: float):
    """LoRA+ (docs/behaviour.md#lora): a learning-rate multiplier on the B matrices only; for train.optim.param_groups."""
    def multiplier(name: str) -> float:
        return float(lora_plus_scale) if name.endswith("lora_B") else 1.0

    return multiplier


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module>.lora_A" | "<module>.lora_B": tensor} for every adapter, shared A's repeated per
    module (the form `peft_format` writes and `merge` reads)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scaling·BA, in fp32) and put plain nn.Linear
    modules back; the model is then an ordinary, adapter-free model."""
    modules = dict(model.named_modules())
    for name, m in lora_modules(model).items():
        merged = (m.weight.float() + m.delta_weight().to(m.weight.device)).to(m.weight.dtype)
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight = nn.Parameter(merged, requires_grad=False)
        linear.bias = m.bias
        parent, leaf = _split_name(name)
        setattr(modules[parent] if parent else model, leaf, linear)
    if hasattr(model, "lora_spec"):
        del model.lora_spec
    return model
