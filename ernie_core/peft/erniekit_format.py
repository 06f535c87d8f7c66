"""LoRA adapters as ERNIEKit / PaddleFormers write them (read only; docs/behaviour.md#lora, #checkpoints).

A directory holds `lora_config.json` (PaddleFormers' LoRAConfig: r, lora_alpha, rslora,
lora_plus_scale, target_modules, base_model_name_or_path, ...) and the adapter weights as one of

    peft_model.safetensors.index.json + peft_model-0000i-of-0000n.safetensors   (unified checkpoint)
    peft_model.safetensors | peft_model-*.safetensors
    lora_model_state.pdparams                                                     (paddle.save pickle)

Keys are Paddle's: `ernie.layers.{i}.self_attn.qkv_proj.lora_A` [in, r] and `...lora_B` [r, out]
(`model.` instead of `ernie.` in newer PaddleFormers), one adapter on the fused q|k|v weight and one
on gate|up. They become PEFT tensors in our split HF names ([r, in] / [out, r]): each part gets the
fused adapter's A and its columns of B (q | k | v, gate | up), which is the same function (docs/behaviour.md#lora), so
everything downstream (load_adapter, merge) reads one format. Reading needs the model config, for
the q/k/v split sizes and to check every shape.
"""
from __future__ import annotations

import importlib
import json
import pickle
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import UserError
from ..models.io import iter_checkpoint_tensors
from .lora import FUSED_PARTS, natural_key, resolve_alpha

CONFIG_NAME = "lora_config.json"
SAFE_SINGLE = "peft_model.safetensors"
SAFE_INDEX = "peft_model.safetensors.index.json"
PDPARAMS_NAME = "lora_model_state.pdparams"
PADDLE_PREFIXES = ("ernie.", "model.")
# LoRAConfig switches for variants whose weights are not plain x·A·B (or that rewrite the base).
UNSUPPORTED_FLAGS = ("pissa", "use_mora", "lora_use_mixer", "use_dora", "nola", "vera")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLP = ("gate_proj", "up_proj", "down_proj", "up_gate_proj")


def is_erniekit_adapter_dir(path) -> bool:
    """Anything ERNIEKit's LoRA save writes (a missing part is reported when reading)."""
    path = Path(path)
    return path.is_dir() and ((path / CONFIG_NAME).is_file() or (path / SAFE_INDEX).is_file()
                              or (path / SAFE_SINGLE).is_file() or (path / PDPARAMS_NAME).is_file()
                              or any(path.glob("peft_model-*.safetensors")))


# ---- lora_config.json ----------------------------------------------------------------------------
def read_raw_config(path) -> dict:
    f = Path(path) / CONFIG_NAME
    if not f.is_file():
        raise UserError(f"{f}: missing (an ERNIEKit LoRA adapter needs {CONFIG_NAME} next to its weights)")
    try:
        raw = json.loads(f.read_text())
    except ValueError as e:
        raise UserError(f"{f}: invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{f}: expected a JSON object")
    return raw


def peft_config(path) -> dict:
    """lora_config.json as the adapter_config-like dict the rest of ernie_core.peft reads:
    r, lora_alpha (resolved: -1 -> 2r, 4 with rslora), use_rslora, base_model_name_or_path, plus
    `erniekit` (the raw file) and `source` (its path)."""
    f = Path(path) / CONFIG_NAME
    raw = read_raw_config(path)
    for flag in UNSUPPORTED_FLAGS:
        if raw.get(flag):
            raise UserError(f"{f}: {flag}: {raw[flag]!r} adapters are not supported (plain LoRA / rsLoRA only)")
    r = raw.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UserError(f"{f}: key 'r' must be a positive integer, got {r!r}")
    rslora = bool(raw.get("rslora", False))
    alpha = raw.get("lora_alpha", 8)  # PaddleFormers' LoRAConfig default
    if raw.get("rslora_plus"):  # ERNIEKit's shortcut (docs/behaviour.md#lora)
        rslora, alpha = True, 4
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or (alpha <= 0 and alpha != -1):
        raise UserError(f"{f}: key 'lora_alpha' must be > 0 or -1, got {alpha!r}")
    return {"peft_type": "LORA", "r": r, "lora_alpha": resolve_alpha(r, float(alpha), rslora), "use_rslora": rslora,
            "base_model_name_or_path": raw.get("base_model_name_or_path"), "erniekit": raw, "source": str(f)}


def check_matches_run(cfg: dict, spec) -> None:
    """Stop when lora_config.json's r / lora_alpha / rslora differ from the run's (LoraSpec): an
    adapter continues only under the settings it was trained with. Names the key and both values."""
    raw, src = cfg["erniekit"], cfg["source"]
    if cfg["r"] != spec.rank:
        raise UserError(f"{src}: r is {cfg['r']} but this run has lora_rank {spec.rank}; "
                        f"set lora_rank: {cfg['r']} to continue from this adapter")
    if cfg["use_rslora"] != spec.rslora:
        raise UserError(f"{src}: rslora is {str(cfg['use_rslora']).lower()} but this run has rslora "
                        f"{str(spec.rslora).lower()}; set rslora: {str(cfg['use_rslora']).lower()} to continue "
                        "from this adapter")
    if abs(cfg["lora_alpha"] - spec.alpha) > 1e-6 * max(1.0, spec.alpha):
        shown = raw.get("lora_alpha", 8)
        resolved = "" if shown == cfg["lora_alpha"] else f" (= {cfg['lora_alpha']:g})"
        raise UserError(f"{src}: lora_alpha is {shown:g}{resolved} but this run has lora_alpha {spec.alpha:g} "
                        f"(after -1 -> 2r / 4 with rslora); set lora_alpha: {cfg['lora_alpha']:g} to continue "
                        "from this adapter")


# ---- weight files --------------------------------------------------------------------------------
def weight_files(path) -> list[Path]:
    """The adapter's weight files: the index's shards, one safetensors file, the shards by name,
    or the .pdparams pickle (safetensors preferred when both are there)."""
    path = Path(path)
    index = path / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [path / f for f in dict.fromkeys(weight_map.values())]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index}: not a safetensors index ({e})") from None
        for f in files:
            if not f.is_file():
                raise UserError(f"{f}: shard listed in {SAFE_INDEX} is missing")
        return files
    if (path / SAFE_SINGLE).is_file():
        return [path / SAFE_SINGLE]
    shards = sorted(path.glob("peft_model-*.safetensors"))
    if shards:
        return shards
    if (path / PDPARAMS_NAME).is_file():
        return [path / PDPARAMS_NAME]
    raise UserError(f"{path}: no ERNIEKit LoRA weights (expected {SAFE_SINGLE}, {SAFE_INDEX} with its "
                    f"peft_model-*.safetensors shards, or {PDPARAMS_NAME})")


class _PaddleUnpickler(pickle.Unpickler):
    """paddle.save's pickle without paddle, and without running arbitrary code: only numpy arrays,
    dicts, tuples and strings are rebuilt. Paddle >= 2.1 stores a tensor as (name, ndarray), older
    versions as the ndarray; a LoDTensor pickles as eval('data', {'data': ndarray})."""

    _ALLOWED = {("collections", "OrderedDict"), ("builtins", "tuple"), ("builtins", "list"), ("builtins", "dict"),
                ("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def __init__(self, f, source):
        super().__init__(f)
        self.source = source

    def find_class(self, module, name):
        if (module, name) == ("builtins", "eval"):
            return _lod_tensor_data
        if (module, name) not in self._ALLOWED:
            raise UserError(f"{self.source}: the pickle refers to {module}.{name}; only paddle.save state dicts "
                            "of arrays are read")
        if module.startswith("numpy.core.") or module.startswith("numpy._core."):  # numpy 1 vs 2 spelling
            module = ("numpy._core." if hasattr(np, "_core") else "numpy.core.") + module.split(".", 2)[2]
        return getattr(importlib.import_module(module), name)


def _lod_tensor_data(expr, env):
    if expr != "data" or not isinstance(env, dict) or set(env) != {"data"}:
        raise pickle.UnpicklingError("unexpected eval() in a paddle.save pickle")
    return env["data"]


def _to_torch(a) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if a.dtype == np.uint16:  # Paddle's numpy form of bfloat16
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def read_pdparams(f: Path) -> dict[str, torch.Tensor]:
    """{key: tensor} of a paddle.save state-dict pickle (.pdparams)."""
    try:
        with open(f, "rb") as handle:
            obj = _PaddleUnpickler(handle, f).load()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise UserError(f"{f}: cannot read as a paddle.save pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{f}: expected a state dict (a dict of arrays), got {type(obj).__name__}")
    obj = dict(obj)
    big = obj.pop("UnpackBigParamInfor@@", None) or {}  # tensors > 4 GB split by paddle.save
    for key, info in big.items():
        parts = [np.asarray(_array(obj.pop(p))).ravel() for p in info["slices"]]
        obj[key] = np.concatenate(parts).reshape(info["OriginShape"])
    out = {}
    for key, value in obj.items():
        if key.endswith("@@"):  # StructuredToParameterName@@ and other paddle bookkeeping
            continue
        arr = _array(value)
        if arr is None:
            raise UserError(f"{f}: key {key!r} is not an array ({type(value).__name__})")
        out[key] = _to_torch(arr)
    return out


def _array(value):
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        value = value[1]
    return value if isinstance(value, np.ndarray) else None


def iter_weights(path) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, key, tensor) for every weight of the adapter."""
    for f in weight_files(path):
        if f.suffix == ".pdparams":
            for key, t in read_pdparams(f).items():
                yield f, key, t
        else:
            for key, t in iter_checkpoint_tensors(Path(path), [f]):
                yield f, key, t


# ---- Paddle keys -> PEFT tensors ---------------------------------------------------------------
def _shapes(leaf: str, mc) -> tuple[int, list[int]] | None:
    """(in_features, [out features of each split part]) of a Paddle adapter target, None if unknown."""
    h, q, kv, i = mc.hidden_size, mc.q_dim, mc.kv_dim, mc.intermediate_size
    return {"qkv_proj": (h, [q, kv, kv]), "q_proj": (h, [q]), "k_proj": (h, [kv]), "v_proj": (h, [kv]),
            "o_proj": (q, [h]), "up_gate_proj": (h, [i, i]), "gate_proj": (h, [i]), "up_proj": (h, [i]),
            "down_proj": (i, [h])}.get(leaf)


def _hf_module(key: str, module: str, mc, f: Path) -> tuple[str, str]:
    """Paddle module name -> (our HF module prefix without the leaf, leaf); UserError for names
    that are not an attention/FFN linear of this model."""
    core = next((module[len(p):] for p in PADDLE_PREFIXES if module.startswith(p)), None)
    parts = (core or "").split(".")
    ok = (core is not None and len(parts) == 4 and parts[0] == "layers" and parts[1].isdigit()
          and ((parts[2] == "self_attn" and parts[3] in ATTN) or (parts[2] == "mlp" and parts[3] in MLP)))
    if not ok:
        raise UserError(f"{f}: key {key!r} is not a LoRA adapter of an attention or FFN linear "
                        "(expected ernie.layers.<i>.self_attn.qkv_proj.lora_A and the like)")
    if int(parts[1]) >= mc.num_hidden_layers:
        raise UserError(f"{f}: key {key!r} names layer {parts[1]}, but the model has {mc.num_hidden_layers} layers")
    return f"model.layers.{parts[1]}.{parts[2]}", parts[3]


def to_peft_tensors(items, r: int, model_config, source) -> dict[str, torch.Tensor]:
    """(file, Paddle key, tensor) triples -> {PEFT key: tensor}; checks every key and shape."""
    from .peft_format import PEFT_PREFIX

    grouped: dict[str, dict[str, tuple[Path, str, torch.Tensor]]] = {}
    for f, key, t in items:
        module, _, which = key.rpartition(".")
        if which not in ("lora_A", "lora_B"):
            raise UserError(f"{f}: key {key!r} is not a lora_A / lora_B weight")
        if which in grouped.setdefault(module, {}):
            raise UserError(f"{f}: key {key!r} appears twice (also in {grouped[module][which][0].name})")
        grouped[module][which] = (f, key, t)
    if not grouped:
        raise UserError(f"{source}: the adapter holds no weights")
    out = {}
    for module, ab in grouped.items():
        f, key, _ = next(iter(ab.values()))
        prefix, leaf = _hf_module(key, module, model_config, f)
        for need in ("lora_A", "lora_B"):
            if need not in ab:
                raise UserError(f"{f}: {key!r} has no matching {module}.{need}")
        fan_in, outs = _shapes(leaf, model_config)
        (fa, ka, a), (fb, kb, b) = ab["lora_A"], ab["lora_B"]
        if tuple(a.shape) != (fan_in, r):
            raise UserError(f"{fa}: {ka} has shape {list(a.shape)}, expected [{fan_in}, {r}] (lora_A [in, r], "
                            f"r={r} from {CONFIG_NAME})")
        if tuple(b.shape) != (r, sum(outs)):
            raise UserError(f"{fb}: {kb} has shape {list(b.shape)}, expected [{r}, {sum(outs)}] (lora_B [r, out], "
                            f"r={r} from {CONFIG_NAME})")
        a_peft = a.t().contiguous()
        for name, b_part in zip(FUSED_PARTS.get(leaf, (leaf,)), b.split(outs, dim=1)):
            out[f"{PEFT_PREFIX}{prefix}.{name}.lora_A.weight"] = a_peft
            out[f"{PEFT_PREFIX}{prefix}.{name}.lora_B.weight"] = b_part.t().contiguous()
    return dict(sorted(out.items(), key=lambda kv: natural_key(kv[0])))


def read_erniekit_adapter(path, model_config) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter config dict as `peft_config` gives it, {PEFT key: tensor}) of an ERNIEKit adapter dir."""
    cfg = peft_config(path)
    return cfg, to_peft_tensors(iter_weights(path), cfg["r"], model_config, Path(path))
