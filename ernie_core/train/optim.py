"""AdamW parameter groups and the five learning-rate schedules (ernie_reference §12.1, §12.3)."""
from __future__ import annotations

import math
import re

import torch

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """ERNIEKit exempts names containing 'bias' or 'norm' from weight decay."""
    return "bias" in name or "norm" in name


def layerwise_ratio(name: str, num_layers: int, bound: float, tied_embedding: bool) -> float:
    """LR multiplier b + depth/(L+2)*(1-b): depth 0 for embeddings, i for layers.i, L+2 for the
    final norm and LM head. The tied embedding/head tensor gets no recorded ratio (1.0)."""
    if bound >= 1.0:
        return 1.0
    match = _LAYER_RE.search(name)
    if match:
        depth = int(match.group(1))
    elif "embed_tokens" in name:
        if tied_embedding:
            return 1.0
        depth = 0
    else:  # final norm, lm_head and anything after the decoder stack
        depth = num_layers + 2
    return bound + depth / (num_layers + 2) * (1.0 - bound)


def param_groups(model: torch.nn.Module, *, weight_decay: float, layerwise_bound: float = 1.0,
                 num_layers: int = 0, tied_embedding: bool = True, lr_multiplier=None) -> list[dict]:
    """One group per (decay?, lr ratio). `lr_multiplier(name) -> float` stacks on top (LoRA+)."""
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not no_weight_decay(name, p)
        ratio = layerwise_ratio(name, num_layers, layerwise_bound, tied_embedding)
        if lr_multiplier is not None:
            ratio *= lr_multiplier(name)
        key = (decay, ratio)
        group = groups.setdefault(key, {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
                                        "lr_ratio": ratio})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    for g in groups:
        g["lr"] = lr * g["lr_ratio"]
    # foreach=False keeps the update bitwise identical across resumes and layouts on CPU.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)


def lr_factor(step: int, *, kind: str, warmup: int, total: int, base_lr: float, min_lr: float = 0.0,
              num_cycles: float = 0.5, lr_end: float = 1e-7, power: float = 1.0) -> float:
    """Multiplier on the base LR at `step` (0-based count of optimizer steps taken)."""
    if kind != "constant" and step < warmup:
        return step / max(1, warmup)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if kind == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        r = max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * progress)))
        floor = min_lr / base_lr if base_lr > 0 else 0.0
        return r * (1.0 - floor) + floor
    if kind == "polynomial":
        if base_lr <= lr_end:
            raise ValueError(f"polynomial schedule needs learning_rate ({base_lr}) > lr_end ({lr_end})")
        if step > total:
            return lr_end / base_lr
        remaining = 1.0 - (step - warmup) / max(1, total - warmup)
        return ((base_lr - lr_end) * remaining**power + lr_end) / base_lr
    raise ValueError(f"unknown lr_scheduler_type {kind!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, *, kind: str, warmup: int, total: int, base_lr: float,
                    min_lr: float, num_cycles: float, lr_end: float, power: float):
    def fn(step: int) -> float:
        return lr_factor(step, kind=kind, warmup=warmup, total=total, base_lr=base_lr, min_lr=min_lr,
                         num_cycles=num_cycles, lr_end=lr_end, power=power)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
