"""Checkpoint IO for Ernie4_5ForCausalLM: Hugging Face safetensors (single or sharded + index) and
Paddle-format checkpoints (read only; converted on the fly, docs/behaviour.md#checkpoints-and-paddle-names).

On disk the layout is always HF's split one (`q_proj`/`k_proj`/`v_proj`, `gate_proj`/`up_proj`,
[out, in]); a model built with `fuse_linear=True` is split on save and joined on load here. With
tied embeddings `lm_head.weight` is not written, and ignored when a checkpoint has it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError
from .config import CONFIG_NAME, FUSED_PROJECTIONS, Ernie4_5Config, natural_key
from .ernie4_5 import Ernie4_5ForCausalLM

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PADDLE_PREFIX = "ernie."
# Keys a checkpoint may carry that the dense model does not use: the 21B release's MTP block
# (fine-tuning ignores it, docs/behaviour.md#model) and rotary caches some older exports saved.
_IGNORED_KEY = re.compile(r"(^|\.)mtp_|rotary_emb\.inv_freq$")
# Adapter weights that may sit next to a LoRA run's base weights (PEFT's, ERNIEKit's).
_ADAPTER_FILES = ("adapter_model", "peft_model")


# ---- names and views ---------------------------------------------------------------------------
def hf_views(model: Ernie4_5ForCausalLM, grads: bool = False) -> dict[str, torch.Tensor]:
    """HF checkpoint name -> the tensor (a parameter or a row slice of a fused one) holding it.
    grads=True gives the same views of the parameters' .grad (None entries skipped)."""
    cfg = model.config
    views = {}
    for name, p in model.named_parameters():
        if grads:
            p = p.grad
            if p is None:
                continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # the embedding (named_parameters lists a shared tensor once, but be explicit)
        module, _, fused = name.rpartition(".")[0].rpartition(".")
        if fused in FUSED_PROJECTIONS:
            leaf = name.rpartition(".")[2]
            parts = cfg.fused_parts(fused)
            for (part, _), chunk in zip(parts, p.split([n for _, n in parts], dim=0)):
                views[f"{module}.{part}.{leaf}"] = chunk
        else:
            views[name] = p
    return views


def to_hf_state_dict(model: Ernie4_5ForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under HF names and in HF layout (fused weights split; views, not copies)."""
    return {k: v.detach() for k, v in sorted(hf_views(model).items(), key=lambda kv: natural_key(kv[0]))}


# ---- reading -------------------------------------------------------------------------------------
def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint dir, from its index when there is one."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index}: not a safetensors index ({e})") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise UserError(f"{f}: shard listed in {INDEX_NAME} is missing")
        return files
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    found = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith(_ADAPTER_FILES))
    if found:
        return found
    others = sorted(p.name for p in path.iterdir() if p.suffix in (".pdparams", ".bin", ".pt", ".pth"))
    hint = (f" (found {', '.join(others)}: only safetensors checkpoints are read; convert them first)"
            if others else "")
    raise UserError(f"{path}: no model weights (expected {SINGLE_NAME} or {INDEX_NAME} with its shards){hint}")


def iter_checkpoint_tensors(path: Path, files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) one at a time, so loading needs the model plus one tensor, not two models."""
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    t = handle.get_tensor(key)
                    if t.dtype == torch.uint16:  # older Paddle exports store bf16 bits as uint16
                        t = t.view(torch.bfloat16)
                    yield key, t
        except (OSError, ValueError, RuntimeError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"{f}: cannot read safetensors file ({e})") from None


def is_paddle_checkpoint(files: list[Path], path: Path) -> bool:
    index = path / INDEX_NAME
    if index.is_file():
        keys = json.loads(index.read_text())["weight_map"].keys()
    else:
        with safe_open(str(files[0]), framework="pt") as handle:
            keys = list(handle.keys())
    return any(k.startswith(PADDLE_PREFIX) for k in keys)


def paddle_to_hf(key: str, t: torch.Tensor, cfg: Ernie4_5Config) -> list[tuple[str, torch.Tensor]]:
    """One Paddle tensor -> its HF tensor(s) (docs/behaviour.md#checkpoints-and-paddle-names): `ernie.` -> `model.`, linears
    [in, out] -> [out, in], qkv_proj columns Q|K|V and up_gate_proj columns gate|up split."""
    if key.startswith(PADDLE_PREFIX):
        key = "model." + key[len(PADDLE_PREFIX):]
    prefix, _, leaf = key.rpartition(".")
    module = prefix.rpartition(".")[2]
    if module in FUSED_PROJECTIONS:
        base = prefix.rpartition(".")[0]
        names = FUSED_PROJECTIONS[module]
        if module == "qkv_proj":
            sizes = [n for _, n in cfg.fused_parts(module)]
        else:  # the checkpoint's own width (its gate and up halves are equal)
            sizes = (t.shape[-1] // 2,) * 2
        parts = t.split(sizes, dim=-1)  # columns for weights [in, out]; the only dim for biases
        return [(f"{base}.{name}.{leaf}", p.t() if p.dim() == 2 else p) for name, p in zip(names, parts)]
    if leaf == "weight" and t.dim() == 2 and (module.endswith("_proj") or key.endswith("mlp.gate.weight")):
        return [(key, t.t())]
    if key == "lm_head.weight" and tuple(t.shape) == (cfg.hidden_size, cfg.vocab_size):
        return [(key, t.t())]
    return [(key, t)]


def iter_hf_tensors(path: Path, cfg: Ernie4_5Config) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint under its HF name and layout, Paddle ones converted."""
    files = checkpoint_files(path)
    paddle = is_paddle_checkpoint(files, path)
    for key, t in iter_checkpoint_tensors(path, files):
        if paddle:
            yield from paddle_to_hf(key, t, cfg)
        else:
            yield key, t


def load_hf_tensors(model: Ernie4_5ForCausalLM, tensors, source) -> None:
    """Copy (name, tensor) pairs in HF layout into the model; every weight must come exactly once
    with the shape config.json implies. Raises UserError naming the key otherwise."""
    views = hf_views(model)
    loaded, unexpected = set(), []
    with torch.no_grad():
        for key, t in tensors:
            if key not in views:
                if not (_IGNORED_KEY.search(key) or (key == "lm_head.weight" and model.config.tie_word_embeddings)):
                    unexpected.append(key)
                continue
            target = views[key]
            if tuple(t.shape) != tuple(target.shape):
                raise UserError(f"{source}: weight {key} has shape {list(t.shape)}, but config.json implies "
                                f"{list(target.shape)}")
            target.copy_(t)
            loaded.add(key)
    missing = [k for k in views if k not in loaded]
    if missing:
        shown = ", ".join(f"{k} {list(views[k].shape)}" for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(f"{source}: checkpoint lacks weight {shown}{more}")
    if unexpected:
        warnings.warn(f"{source}: ignored {len(unexpected)} unknown weight(s): {', '.join(unexpected[:5])}",
                      stacklevel=3)


def resolve_dtype(dtype, cfg: Ernie4_5Config) -> torch.dtype:
    """None -> float32 (training keeps fp32 parameters; bf16 comes from autocast); "auto" -> the
    checkpoint's dtype from config.json; a torch.dtype or its name -> that."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        dtype = cfg.dtype or "float32"
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise UserError(f"dtype: unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
        return resolved
    return dtype


def load_pretrained(path, dtype=None, merge_lora: bool = True, base_model=None, **runtime) -> Ernie4_5ForCausalLM:
    """Build the model from `<path>/config.json` and load its HF or Paddle safetensors weights.

    A LoRA adapter dir (a LoRA run's output_dir or checkpoint, a PEFT adapter, or ERNIEKit's
    lora_config.json + peft_model*.safetensors / lora_model_state.pdparams) loads as base + adapter:
    the base is `path` itself when it has model weights (a run on a freshly initialised base saves
    it there), else `base_model` if given, else the adapter config's base_model_name_or_path.
    merge_lora=True (default) folds the adapter into the weights (W + scaling·B A in fp32), giving a
    plain model that runs at base speed; merge_lora=False keeps LoRALinear modules (`model.lora_spec`
    set, adapters trainable, `peft.adapters_disabled` works) for inspection or further training.
    Both are ignored for a plain model dir.
    """
    path = Path(path)
    if path.is_dir() and _is_adapter_dir(path):
        return _adapter_loader()(path, dtype=dtype, merge_lora=merge_lora, base_model=base_model, **runtime)
    return load_model_dir(path, dtype, runtime)


# A LoRA adapter directory: PEFT's adapter_config.json or ERNIEKit's lora_config.json. Reading one is
# peft/'s job (peft depends on models, never the reverse): the loader is found by name, in
# ADAPTER_LOADER, when such a directory is opened.
ADAPTER_LOADER = "ernie_core.peft.loading:load_lora_pretrained"
_ADAPTER_CONFIGS = ("adapter_config.json", "lora_config.json")


def _is_adapter_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in _ADAPTER_CONFIGS)


def _adapter_loader():
    import importlib

    module, _, name = ADAPTER_LOADER.partition(":")
    return getattr(importlib.import_module(module), name)


def load_model_dir(path: Path, dtype=None, runtime: dict | None = None) -> Ernie4_5ForCausalLM:
    """The model in an HF/Paddle model directory (no adapter handling)."""
    runtime = runtime or {}
    cfg = Ernie4_5Config.from_pretrained(path)
    checkpoint_files(path)  # fail on missing weights before allocating the model
    target = resolve_dtype(dtype, cfg)
    with torch.device("meta"):  # no random init: every weight is overwritten below
        model = Ernie4_5ForCausalLM(cfg, **runtime)
    model = model.to(target).to_empty(device="cpu")
    model.tie_weights()  # to_empty gives each module its own tensor; share the embedding again
    load_hf_tensors(model, iter_hf_tensors(path, cfg), path)
    return model


def has_model_files(path) -> bool:
    """config.json plus HF/Paddle safetensors model weights (not an adapter's) in `path`."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        return False
    return (path / INDEX_NAME).is_file() or any(path.glob("model*.safetensors"))


# ---- writing -------------------------------------------------------------------------------------
def parse_size(size) -> int:
    """"5GB" -> 5e9 bytes (HF's convention: GB = 10^9, GiB = 2^30); ints are bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise UserError(f"max_shard_size: cannot parse {size!r} (use e.g. 5GB, 500MB, 2GiB or bytes)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base ** power)


def plan_shards(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Consecutive groups of names, each at most `limit` bytes (a bigger tensor gets its own shard)."""
    shards, current, used = [], [], 0
    for name, n in sizes.items():
        if current and used + n > limit:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += n
    if current:
        shards.append(current)
    return shards


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_hf_checkpoint(tensors: dict[str, torch.Tensor], cfg: Ernie4_5Config, path, max_shard_size="5GB",
                        dtype: torch.dtype | None = None) -> list[Path]:
    """Write config.json, model-0000i-of-0000n.safetensors and model.safetensors.index.json into the
    existing dir `path` (no atomic rename here). Tensors are copied to CPU one shard at a time."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = dtype or next(iter(tensors.values())).dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {k: t.numel() * itemsize for k, t in tensors.items()}
    shards = plan_shards(sizes, parse_size(max_shard_size))
    weight_map, written = {}, []
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        # clone: fused q|k|v parts share storage, and safetensors refuses shared tensors.
        shard = {k: tensors[k].detach().to("cpu", dtype).clone().contiguous() for k in names}
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
        written.append(path / fname)
        del shard
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    dataclasses.replace(cfg, dtype=_dtype_name(dtype)).save_pretrained(path)
    return written + [path / INDEX_NAME, path / CONFIG_NAME]


def save_model_files(model: Ernie4_5ForCausalLM, path, max_shard_size="5GB", dtype=None) -> list[Path]:
    """Write the model's HF files into the existing dir `path` (the trainer's temporary checkpoint
    dir, renamed into place by the trainer). dtype: None keeps the parameters' dtype."""
    return write_hf_checkpoint(to_hf_state_dict(model), model.config, path, max_shard_size,
                               resolve_dtype(dtype, model.config) if dtype is not None else None)


def _is_model_file(name: str) -> bool:
    return name == CONFIG_NAME or name == INDEX_NAME or (name.startswith("model") and name.endswith(".safetensors"))


def save_pretrained(model: Ernie4_5ForCausalLM, path, max_shard_size="5GB", dtype=None) -> Path:
    """Write the model as an HF checkpoint dir, atomically: everything goes to a sibling temp dir,
    which then replaces `path`. Files already in `path` that are not model files (tokenizer, ...)
    are carried over; old shards are not. A crash leaves the old dir (or none) plus a `.tmp` dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if path.is_dir():
        for f in path.iterdir():
            if not _is_model_file(f.name):
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
    save_model_files(model, tmp, max_shard_size, dtype)
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path
