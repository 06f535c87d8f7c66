"""Adapters on disk in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`
with PEFT's names for transformers' Ernie 4.5 modules, so
`peft.PeftModel.from_pretrained(transformers_model, adapter_dir)` runs them unchanged.

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]

Fused q|k|v or gate|up adapters (ours with fuse_linear, or ERNIEKit's) are written split: each part
gets a copy of A and its rows of B, which is the same function (docs/behaviour.md#lora, "Export to split PEFT form is
exact"). Reading back, parts whose A's are equal become one shared A again.

`load_adapter` / `read_any_adapter` also read ERNIEKit's adapters (lora_config.json +
peft_model*.safetensors or lora_model_state.pdparams, `erniekit_format`), converted to these names.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError
from .lora import _ACache, FOLLOWER_OF, FUSED_PARTS, LoRALinear, LoraSpec, lora_modules, lora_scaling, natural_key

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def is_peft_adapter_dir(path) -> bool:
    """A PEFT adapter dir (or what is left of one: a missing file is reported when reading)."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() or (path / WEIGHTS_NAME).is_file()


def adapter_format(path) -> str | None:
    """"peft", "erniekit" (lora_config.json + peft_model*.safetensors / lora_model_state.pdparams) or
    None when `path` holds no adapter."""
    from .erniekit_format import is_erniekit_adapter_dir

    path = Path(path)
    if not path.is_dir():
        return None
    if is_peft_adapter_dir(path):
        return "peft"
    return "erniekit" if is_erniekit_adapter_dir(path) else None


def is_adapter_dir(path) -> bool:
    """`path` holds a LoRA adapter, PEFT's or ERNIEKit's."""
    return adapter_format(path) is not None


def fused_sizes(leaf: str, model_config) -> tuple[int, ...]:
    """Row sizes of our fused linears' parts ([out, in] layout), from the model config."""
    return tuple(n for _, n in model_config.fused_parts(leaf))


def to_peft_tensors(state: dict[str, torch.Tensor], model_config=None) -> dict[str, torch.Tensor]:
    """{"<module>.lora_A"/"lora_B": t} (ours; a shared A may be given only for its leader) ->
    {PEFT key: contiguous CPU fp32 tensor}, fused modules split into their HF parts."""
    out = {}
    for key in sorted(k for k in state if k.endswith(".lora_B")):
        module = key[: -len(".lora_B")]
        parent, _, leaf = module.rpartition(".")
        a = state.get(f"{module}.lora_A")
        if a is None and leaf in FOLLOWER_OF:  # shared A: stored once, under the leader's name
            a = state.get(f"{parent}.{FOLLOWER_OF[leaf]}.lora_A")
        if a is None:
            raise KeyError(f"adapter state has {key} but no lora_A for it")
        b = state[key]
        if leaf in FUSED_PARTS:
            if model_config is None:
                raise ValueError(f"{module} is fused: the model config is needed to split it")
            parts = zip(FUSED_PARTS[leaf], b.split(fused_sizes(leaf, model_config), dim=0))
        else:
            parts = [(leaf, b)]
        for name, b_part in parts:
            base = f"{PEFT_PREFIX}{parent}.{name}"
            out[f"{base}.lora_A.weight"] = a.detach().to("cpu", torch.float32).clone().contiguous()
            out[f"{base}.lora_B.weight"] = b_part.detach().to("cpu", torch.float32).clone().contiguous()
    return dict(sorted(out.items(), key=lambda kv: natural_key(kv[0])))


def adapter_config(spec: LoraSpec, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json for PEFT's LoraConfig (fields PEFT 0.x reads; everything else defaults)."""
    leaves = set()
    for name in spec.modules:
        leaf = name.rpartition(".")[2]
        leaves.update(FUSED_PARTS.get(leaf, (leaf,)))
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
        "use_rslora": spec.rslora, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted(leaves), "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
    }


def save_adapter(path, state: dict[str, torch.Tensor], spec: LoraSpec, *, model_config=None,
                 base_model_name_or_path: str | None = None) -> list[Path]:
    """Write adapter_config.json + adapter_model.safetensors into the existing dir `path`."""
    path = Path(path)
    tensors = to_peft_tensors(state, model_config)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    cfg = adapter_config(spec, base_model_name_or_path)
    (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return [path / WEIGHTS_NAME, path / CONFIG_NAME]


def save_model_adapter(model, path, *, base_model_name_or_path: str | None = None) -> list[Path]:
    """save_adapter for a model with adapters applied (apply_lora)."""
    from .lora import lora_state

    return save_adapter(path, lora_state(model), model.lora_spec, model_config=getattr(model, "config", None),
                        base_model_name_or_path=base_model_name_or_path)


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config dict, {PEFT key: tensor}) of a PEFT adapter dir; UserError naming what is wrong."""
    path = Path(path)
    cfg = read_adapter_config(path)
    if not (path / WEIGHTS_NAME).is_file():
        raise UserError(f"{path / WEIGHTS_NAME}: missing (a PEFT adapter needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return cfg, tensors


def read_adapter_config(path) -> dict:
    """adapter_config.json of a PEFT adapter dir, checked for what this project supports."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such directory")
    if not (path / CONFIG_NAME).is_file():
        raise UserError(f"{path / CONFIG_NAME}: missing (a PEFT adapter needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        cfg = json.loads((path / CONFIG_NAME).read_text())
    except ValueError as e:
        raise UserError(f"{path / CONFIG_NAME}: invalid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path / CONFIG_NAME}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise UserError(f"{path / CONFIG_NAME}: per-module {key} is not supported; one rank and alpha for all")
    if cfg.get("use_dora"):
        raise UserError(f"{path / CONFIG_NAME}: DoRA adapters are not supported")
    if not isinstance(cfg.get("r"), int) or "lora_alpha" not in cfg:
        raise UserError(f"{path / CONFIG_NAME}: needs an integer 'r' and 'lora_alpha'")
    return cfg


def read_any_config(path) -> dict:
    """The adapter config (PEFT's adapter_config.json, or ERNIEKit's lora_config.json as
    `erniekit_format.peft_config` gives it) without reading the weights."""
    from .erniekit_format import peft_config

    fmt = adapter_format(path)
    if fmt is None:
        raise UserError(f"{path}: no LoRA adapter here (expected {CONFIG_NAME} + {WEIGHTS_NAME}, or ERNIEKit's "
                        "lora_config.json + peft_model*.safetensors / lora_model_state.pdparams)")
    return read_adapter_config(path) if fmt == "peft" else peft_config(path)


def read_any_adapter(path, model_config=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, {PEFT key: tensor}) of a PEFT or ERNIEKit adapter dir; ERNIEKit's fused q|k|v and
    gate|up adapters come split, which needs the base's `model_config`."""
    from .erniekit_format import read_erniekit_adapter

    read_any_config(path)  # the "no adapter here" error
    if adapter_format(path) == "peft":
        return read_adapter(path)
    if model_config is None:
        raise ValueError("reading an ERNIEKit adapter needs the model config (q/k/v split sizes)")
    return read_erniekit_adapter(path, model_config)


def config_scaling(cfg: dict) -> float:
    return lora_scaling(int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora", False)))


def _peft_module(key: str) -> tuple[str, str]:
    """PEFT key -> (our module name in HF split form, "lora_A" | "lora_B")."""
    core = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    core = core.removesuffix(".weight")
    module, _, which = core.rpartition(".")
    if which not in ("lora_A", "lora_B"):
        raise UserError(f"adapter weight {key!r} is not a lora_A/lora_B tensor")
    module = module.removesuffix(".default")  # adapter-name infix some PEFT exports keep
    return module, which


def load_adapter(model, path) -> None:
    """Copy a PEFT or ERNIEKit adapter into a model that has adapters (apply_lora).

    PEFT: same rank and scaling required. ERNIEKit: r, lora_alpha and rslora of lora_config.json
    must each equal the model's (`erniekit_format.check_matches_run`); its fused adapters load into
    our split linears with q|k|v (gate|up) sharing one A. q/k/v (gate/up) parts whose A's differ
    stop sharing one A in this model (per-projection adapters, as PEFT itself trains them); equal
    ones stay shared.
    """
    cfg, tensors = read_any_adapter(path, getattr(model, "config", None))
    spec: LoraSpec = model.lora_spec
    if "erniekit" in cfg:
        from .erniekit_format import check_matches_run

        check_matches_run(cfg, spec)
    elif int(cfg["r"]) != spec.rank or abs(config_scaling(cfg) - spec.scaling) > 1e-6 * max(1.0, spec.scaling):
        raise UserError(f"{path}: adapter has r={cfg['r']}, lora_alpha={cfg['lora_alpha']}, "
                        f"use_rslora={cfg.get('use_rslora', False)} (scaling {config_scaling(cfg):.4g}) but this run "
                        f"has lora_rank={spec.rank}, scaling {spec.scaling:.4g}; set lora_rank/lora_alpha/rslora to match")
    load_adapter_tensors(model, tensors, path)


def adapter_leaves(tensors: dict[str, torch.Tensor]) -> set[str]:
    """Leaf names ("q_proj", ...) of the modules a {PEFT key: tensor} adapter covers."""
    return {_peft_module(k)[0].rpartition(".")[2] for k in tensors}


@torch.no_grad()
def load_adapter_tensors(model, tensors: dict[str, torch.Tensor], path) -> None:
    """Copy {PEFT key: tensor} into the model's adapters (names and shapes must match exactly)."""
    wanted: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, which = _peft_module(key)
        wanted.setdefault(module, {})[which] = t
    mods = lora_modules(model)
    targets = _split_views(mods, model)
    missing = [m for m in targets if m not in wanted]
    unknown = [m for m in wanted if m not in targets]
    if missing or unknown:
        raise UserError(f"{path}: adapter modules do not match the model (missing {missing[:3]}, unknown {unknown[:3]})")
    for name, ab in wanted.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise UserError(f"{path}: adapter module {name} has no {({'lora_A', 'lora_B'} - set(ab)).pop()}")
    for name, (module, rows) in targets.items():
        a, b = wanted[name]["lora_A"], wanted[name]["lora_B"]
        view_b = module.lora_B[rows] if rows is not None else module.lora_B
        if tuple(a.shape) != tuple(module.lora_A.shape) or tuple(b.shape) != tuple(view_b.shape):
            raise UserError(f"{path}: {name} has lora_A {list(a.shape)}, lora_B {list(b.shape)}; the model expects "
                            f"{list(module.lora_A.shape)}, {list(view_b.shape)}")
        view_b.copy_(b)
    _load_a(mods, targets, wanted, path)


def _split_views(mods: dict[str, LoRALinear], model) -> dict[str, tuple[LoRALinear, slice | None]]:
    """HF split module name -> (our LoRALinear, row slice of its B or None)."""
    out = {}
    for name, m in mods.items():
        parent, _, leaf = name.rpartition(".")
        if leaf in FUSED_PARTS:
            lo = 0
            for part, n in zip(FUSED_PARTS[leaf], fused_sizes(leaf, model.config)):
                out[f"{parent}.{part}"] = (m, slice(lo, lo + n))
                lo += n
        else:
            out[name] = (m, None)
    return out


def _load_a(mods, targets, wanted, path) -> None:
    """Set every A; a module that shares A with its leader gets its own Parameter when the adapter's
    A's differ (fused modules cannot, so that is an error there)."""
    for name, (module, rows) in targets.items():
        a = wanted[name]["lora_A"]
        if rows is not None:  # one A for all parts of a fused linear
            if not torch.equal(a, wanted[next(n for n, (m, _) in targets.items() if m is module)]["lora_A"]):
                raise UserError(f"{path}: {name} has its own lora_A, but this model fuses it with its siblings; "
                                "train with fuse_linear: false to load per-projection adapters")
            module.lora_A.copy_(a)
            continue
        parent, _, leaf = name.rpartition(".")
        leader = mods.get(f"{parent}.{FOLLOWER_OF.get(leaf, leaf)}")
        if leader is not module and module.lora_A is leader.lora_A:
            if torch.equal(a, wanted[f"{parent}.{FOLLOWER_OF[leaf]}"]["lora_A"]):
                continue  # the leader's copy sets it
            module.lora_A = torch.nn.Parameter(a.to(module.lora_A.device, torch.float32).clone(),
                                               requires_grad=leader.lora_A.requires_grad)
            module._a_cache = _ACache()  # no longer shares the leader's x Aᵀ
            continue
        module.lora_A.copy_(a)
