"""`load_config`: one YAML file (flat ERNIEKit keys or nested by section) + `key=value` overrides."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ernie_core.errors import ConfigError

from ._field import check_value, coerce, show, suggest
from .resolve import LINKED_KEYS, resolve
from .train_config import ALIASES, KEY_FIELD, KEY_SECTION, KEY_TYPE, SECTION_CLASSES, TrainConfig


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read, check and resolve a config. Every problem raises ConfigError with a one-line message.

    path: YAML file, or None for defaults only. overrides: "key=value" or "section.key=value"
    strings, values parsed as YAML scalars; they win over the file.
    """
    file_vals = _flatten(_read_yaml(Path(path)), str(path)) if path is not None else {}
    over_vals = _parse_overrides(overrides or [])
    merged = _merge(file_vals, over_vals)
    cfg = build_config(merged)
    resolve(cfg, explicit=set(merged))
    return cfg


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Like load_config for an in-memory mapping (flat or nested keys, Python or YAML-style values)."""
    merged = _flatten(values, "config")
    cfg = build_config(merged)
    resolve(cfg, explicit=set(merged))
    return cfg


def build_config(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from canonical flat keys (coerced and checked, not yet resolved)."""
    per_section: dict[str, dict[str, Any]] = {name: {} for name in SECTION_CLASSES}
    for key, raw in values.items():
        f = KEY_FIELD[key]
        per_section[KEY_SECTION[key]][key] = check_value(key, coerce(key, raw, KEY_TYPE[key], f), f)
    return TrainConfig(**{name: cls(**per_section[name]) for name, cls in SECTION_CLASSES.items()})


# ---------------------------------------------------------------- YAML file


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice (PyYAML would keep the last one silently)."""


def _mapping(loader: _Loader, node: yaml.MappingNode) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise ConfigError(f"{loader.name}:{key_node.start_mark.line + 1}: config key '{key}' is given twice")
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" if not path.exists()
                          else f"config path is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    loader = _Loader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML syntax error: {e}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------- keys


def canonical_key(key: Any, section: str | None = None) -> str:
    """The option name for a user key (aliases resolved); ConfigError for unknown keys."""
    if not isinstance(key, str):
        raise ConfigError(f"config keys must be strings, got {show(key)}")
    name = ALIASES.get(key, key)
    if name not in KEY_SECTION:
        raise ConfigError(f"unknown config key '{key}'{suggest(key, list(KEY_SECTION) + list(ALIASES))}")
    if section is not None and KEY_SECTION[name] != section:
        raise ConfigError(f"config key '{key}' belongs to section '{KEY_SECTION[name]}', not '{section}'")
    return name


def _put(out: dict, raw_keys: dict, key: str, value: Any, source: str, section: str | None = None) -> None:
    name = canonical_key(key, section)
    if name in out and out[name] != value:
        raise ConfigError(f"{source}: '{raw_keys[name]}' and '{key}' set the same option "
                          f"'{name}' to different values ({show(out[name])} vs {show(value)})")
    out[name], raw_keys[name] = value, key


def _flatten(data: dict, source: str) -> dict[str, Any]:
    """Flat or nested (`section: {key: value}`) YAML -> {canonical key: raw value}."""
    out: dict[str, Any] = {}
    raw_keys: dict[str, str] = {}
    for key, value in data.items():
        if key in SECTION_CLASSES and isinstance(value, dict):  # `lora:` is a key and a section
            for sub_key, sub_value in value.items():
                _put(out, raw_keys, sub_key, sub_value, source, section=key)
        elif key in SECTION_CLASSES and key not in KEY_SECTION:
            raise ConfigError(f"{source}: config section '{key}' must be a mapping of keys, got {show(value)}")
        else:
            _put(out, raw_keys, key, value, source)
    return out


# ---------------------------------------------------------------- overrides


def _parse_value(text: str) -> Any:
    """A YAML scalar/flow value; text YAML cannot read (or reads as a mapping) stays a string."""
    if text.strip() == "":
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, dict) else value


def _parse_overrides(overrides: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in overrides:
        key, eq, text = str(item).partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        section = None
        if "." in key:
            section, _, key = key.partition(".")
            if section not in SECTION_CLASSES:
                raise ConfigError(f"override {item!r}: unknown section '{section}'"
                                  f"{suggest(section, SECTION_CLASSES)}")
        out[canonical_key(key, section)] = _parse_value(text)  # a repeated key: the last one wins
    return out


def _merge(file_vals: dict[str, Any], over_vals: dict[str, Any]) -> dict[str, Any]:
    """Overrides win; an override also drops the file's value of linked keys (e.g. lora vs
    fine_tuning), so `lora=true` on a `fine_tuning: Full` file means LoRA, not a conflict."""
    merged = dict(file_vals)
    for key in over_vals:
        for other in LINKED_KEYS.get(key, ()):
            merged.pop(other, None)
    merged.update(over_vals)
    return merged
