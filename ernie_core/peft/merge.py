"""Merging a PEFT adapter into base weights (docs/behaviour.md#lora, Merge): W <- W + scaling·B A, in
fp32, cast back to W's dtype. Works on (name, tensor) streams in HF names, so a checkpoint is
merged one tensor at a time without building a model."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from .peft_format import PEFT_PREFIX, _peft_module, config_scaling


def adapter_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{PEFT key: t} -> {HF weight name ("model.layers.0.self_attn.q_proj.weight"): (A [r,in], B [out,r])}."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, which = _peft_module(key)
        grouped.setdefault(module, {})[which] = t
    out = {}
    for module, ab in grouped.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"adapter module {module} lacks {({'lora_A', 'lora_B'} - set(ab)).pop()}")
        out[f"{module}.weight"] = (ab["lora_A"], ab["lora_B"])
    return out


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling · B A computed in fp32, returned in W's dtype ([out, in] layout)."""
    if tuple(b.shape[:1]) + tuple(a.shape[1:]) != tuple(weight.shape):
        raise ValueError(f"adapter B {list(b.shape)} x A {list(a.shape)} does not fit weight {list(weight.shape)}")
    return (weight.float() + scaling * (b.float() @ a.float())).to(weight.dtype)


def merge_stream(base: Iterable[tuple[str, torch.Tensor]], adapter_cfg: dict,
                 adapter_tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the base's (name, tensor) pairs with every adapted weight merged; raises if an adapter
    module has no weight in the base (the wrong base model)."""
    pairs = adapter_pairs(adapter_tensors)
    scaling = config_scaling(adapter_cfg)
    used = set()
    for name, t in base:
        if name in pairs:
            a, b = pairs[name]
            t = merged_weight(t, a, b, scaling)
            used.add(name)
        yield name, t
    unused = sorted(set(pairs) - used)
    if unused:
        raise ValueError(f"adapter weights without a base weight: {', '.join(unused[:3])} "
                         f"({PEFT_PREFIX}... keys must name the base model's modules)")
