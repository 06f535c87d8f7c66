"""ERNIE 4.5 dense model configuration: the `config.json` of a checkpoint, as a dataclass.

Keys are those transformers' `ernie4_5` uses, so files round-trip between the two. Real ERNIE
`config.json` files carry many Paddle-era keys (`use_flash_attention`, `compression_ratio`, ...);
those are kept in `extra` and written back unchanged, so saving never loses information.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

CONFIG_NAME = "config.json"

# Keys read under another name: older transformers wrote `torch_dtype`, v5 writes `dtype`.
_ALIASES = {"torch_dtype": "dtype"}


# The fused linears (fuse_linear) and their parts in row order, in HF split names. Sizes come from
# `Ernie4_5Config.fused_parts`.
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "up_gate_proj": ("gate_proj", "up_proj")}


def natural_key(name: str):
    """Sort key for parameter names: layers numerically (layers.10 after layers.9), the embedding and
    decoder layers first, then the final norm, then lm_head."""
    rank = 2 if name.startswith("lm_head") else (1 if name.startswith("model.norm") else 0)
    return rank, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@dataclass
class Ernie4_5Config:
    """Architecture of a dense ERNIE 4.5 model (defaults: ERNIE-4.5-0.3B, docs/behaviour.md#model)."""

    vocab_size: int = 103424
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 18
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 2
    head_dim: int | None = 128  # not hidden_size / heads in ERNIE 4.5 (0.3B: 16 heads x 128 = 2048 != 1024)
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02  # kept for the file; fresh weights use std sqrt(0.3333/H) (docs/behaviour.md#model)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_type: str = "default"
    use_bias: bool = False
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    dtype: str | None = None  # dtype of the stored weights ("bfloat16", "float32"); None = unknown
    model_type: str = "ernie4_5"
    architectures: list[str] = field(default_factory=lambda: ["Ernie4_5ForCausalLM"])
    extra: dict[str, Any] = field(default_factory=dict)  # every other key of config.json, kept verbatim

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    # ---- dict / file round trip -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "Ernie4_5Config":
        d = dict(d)
        for old, new in _ALIASES.items():
            if old in d:
                value = d.pop(old)
                d.setdefault(new, value)
        # transformers 5 nests RoPE settings; older files (and Paddle ones) have `rope_theta` on top.
        rope = d.pop("rope_parameters", None) or {}
        rope_extra = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
        if "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        if "rope_type" in rope:
            d["rope_type"] = rope["rope_type"]
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if rope_extra:
            extra["_rope_parameters_extra"] = rope_extra
        cfg = cls(**known, extra=extra)
        cfg.rope_theta = float(cfg.rope_theta)
        return cfg

    def to_dict(self) -> dict:
        """The config.json content: extra keys first, then ours; RoPE written both ways."""
        out = {k: v for k, v in self.extra.items() if k != "_rope_parameters_extra"}
        for f in dataclasses.fields(self):
            if f.name not in ("extra", "rope_type"):
                out[f.name] = getattr(self, f.name)
        if out.get("dtype") is None:
            out.pop("dtype", None)
        out["rope_parameters"] = {**self.extra.get("_rope_parameters_extra", {}),
                                  "rope_theta": self.rope_theta, "rope_type": self.rope_type}
        return dict(sorted(out.items()))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Ernie4_5Config":
        """Read `<dir>/config.json` (or a config.json path). Raises UserError when missing or malformed."""
        path = Path(path)
        file = path if path.is_file() else path / CONFIG_NAME
        if not path.exists():
            raise UserError(f"{path}: model directory does not exist")
        if not file.is_file():
            raise UserError(f"{file}: no config.json in the model directory")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise UserError(f"{file}: expected a JSON object")
        try:
            return cls.from_dict(data)
        except TypeError as e:
            raise UserError(f"{file}: {e}") from None

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        file = path / CONFIG_NAME
        file.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return file

    # ---- derived sizes ---------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def fused_parts(self, fused: str) -> tuple[tuple[str, int], ...]:
        """The parts of a fused linear (`qkv_proj`, `up_gate_proj`) in row order ([out, in] layout):
        ((HF split name, rows), ...). The one definition io, peft and parallel split and join by."""
        if fused == "qkv_proj":
            return ("q_proj", self.q_dim), ("k_proj", self.kv_dim), ("v_proj", self.kv_dim)
        if fused == "up_gate_proj":
            return ("gate_proj", self.intermediate_size), ("up_proj", self.intermediate_size)
        raise KeyError(f"{fused!r} is not a fused linear (expected one of {', '.join(FUSED_PROJECTIONS)})")

    def validate_dense(self) -> None:
        """Raise UserError for configs the dense model cannot run (MoE, other activations, RoPE scaling)."""
        where = "config.json"
        if self.model_type not in ("ernie4_5", None) or self.extra.get("moe_num_experts"):
            raise UserError(f"{where}: model_type {self.model_type!r} (MoE) is not supported yet; "
                            "only the dense ernie4_5 model is")
        if self.hidden_act != "silu":
            raise UserError(f"{where}: hidden_act {self.hidden_act!r} is not supported; ERNIE 4.5 uses 'silu'")
        if self.rope_type != "default":
            raise UserError(f"{where}: rope_type {self.rope_type!r} is not supported; only 'default' RoPE is")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"{where}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                            f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise UserError(f"{where}: head_dim ({self.head_dim}) must be even for RoPE")
