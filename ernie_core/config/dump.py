"""`config_to_yaml`: every option of a config as flat YAML, grouped by section."""
from __future__ import annotations

import yaml

from .train_config import SECTION_CLASSES, TrainConfig


def _line(key: str, value) -> str:
    # width: never fold long strings, so each option stays on one line; lists in [a, b] form
    if isinstance(value, list):
        return f"{key}: " + yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return yaml.safe_dump({key: value}, default_flow_style=False, sort_keys=False, width=1 << 20,
                          allow_unicode=True).rstrip("\n")


def config_to_yaml(cfg: TrainConfig) -> str:
    """Flat ERNIEKit-style YAML with every option (defaults included); `load_config` reads it back
    to an equal config."""
    lines = ["# ernie_core config: every option, flat keys grouped by section (see docs/config.md)"]
    for section, values in cfg.to_dict().items():
        doc = (SECTION_CLASSES[section].__doc__ or "").strip().splitlines()[0]
        lines += ["", f"# --- {section}: {doc}"]
        lines += [_line(key, value) for key, value in values.items()]
    return "\n".join(lines) + "\n"
