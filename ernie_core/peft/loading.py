"""Loading a LoRA adapter directory as a model: find its base, build it, apply and load the adapter.

`Ernie4_5ForCausalLM.from_pretrained(adapter_dir)` lands here (models/io.py names this loader in
ADAPTER_LOADER, so models/ never imports peft/).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..models.config import FUSED_PROJECTIONS
from ..models.ernie4_5 import Ernie4_5ForCausalLM
from ..models.io import has_model_files, load_model_dir
from .lora import apply_lora
from .lora import merge_lora as fold_adapters
from .peft_format import adapter_format, adapter_leaves, load_adapter_tensors, read_any_adapter, read_any_config


def _candidate_dirs(name: str, adapter_dir: Path) -> list[Path]:
    """A relative base_model_name_or_path is tried from the working directory, then from the adapter's."""
    p = Path(name).expanduser()
    return [p] if p.is_absolute() else [p, adapter_dir / p]


def find_lora_base(adapter_dir, override=None, hint: str | None = None) -> Path:
    """Where the base weights of the adapter in `adapter_dir` are: the dir itself when it has model
    weights, else `override`, else the adapter config's base_model_name_or_path. UserError naming
    every place looked at otherwise."""
    adapter_dir = Path(adapter_dir)
    if has_model_files(adapter_dir):
        return adapter_dir
    if override is not None:
        if not has_model_files(override):
            raise UserError(f"base model {override} is not a model directory (config.json + model*.safetensors)")
        return Path(override)
    acfg = read_any_config(adapter_dir)
    cfg_file = acfg.get("source") or str(adapter_dir / "adapter_config.json")
    name = acfg.get("base_model_name_or_path")
    if name:
        for candidate in _candidate_dirs(str(name), adapter_dir):
            if has_model_files(candidate):
                return candidate
        named = f"its base_model_name_or_path {name} (from {cfg_file}) is not a model directory " \
                "(config.json + model*.safetensors)"
    else:
        named = f"{cfg_file} names no base_model_name_or_path"
    hint = hint or f"fix base_model_name_or_path in {cfg_file} or pass base_model=DIR to from_pretrained"
    raise UserError(f"LoRA adapter {adapter_dir} has no base model: {adapter_dir} holds no model weights and {named}; "
                    f"{hint}")


def load_lora_pretrained(path, dtype=None, merge_lora: bool = True, base_model=None, **runtime) -> Ernie4_5ForCausalLM:
    """Base model + the LoRA adapter in `path` (see `load_pretrained`)."""
    path = Path(path)
    if adapter_format(path) is None:  # an adapter config without adapter weights: a plain model dir
        return load_model_dir(path, dtype, runtime)
    base = find_lora_base(path, base_model)
    model = load_model_dir(base, dtype, runtime)
    cfg, tensors = read_any_adapter(path, model.config)
    leaves = adapter_leaves(tensors)
    if runtime.get("fuse_linear"):  # our fused linears carry the parts' adapters
        leaves |= {fused for fused, parts in FUSED_PROJECTIONS.items() if leaves & set(parts)}
    apply_lora(model, rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), rslora=bool(cfg.get("use_rslora")),
                    targets=tuple(sorted(leaves)))
    load_adapter_tensors(model, tensors, path)
    if merge_lora:
        fold_adapters(model)
    return model
