"""The `option()` field helper and the value checks every config section shares.

A section is a plain dataclass whose fields are built with `option(...)`. The field metadata
carries what the loader, the docs generator and `unsupported_options` need: help text, choices,
a numeric range, the list separator for string lists, and `implemented` (flip it to True, in the
field's one line, when the capability lands).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Callable

import yaml

from ernie_core.errors import ConfigError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def option(default: Any, help: str, *, implemented: bool = True, choices: tuple | None = None,
           ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, special: tuple = (), supported: tuple | None = None,
           sep: str = ",", item_choices: tuple | None = None,
           normalize: Callable[[str, Any], Any] | None = None) -> Any:
    """A config field.

    choices: allowed values (strings match case-insensitively and are stored in this spelling).
    ge/gt/le/lt: numeric range; `special` values (e.g. -1 = "off") are allowed outside it.
    supported: values that work without the capability, even while implemented is False
      (for options whose default is not the "off" value, e.g. `lora`).
    sep: separator used when a YAML list is given for a string option.
    item_choices: allowed items of a list option (or of a space-separated string option).
    normalize: extra per-field check/normalisation, called as normalize(key, value).
    """
    meta = dict(help=help, implemented=implemented, choices=choices, ge=ge, gt=gt, le=le, lt=lt,
                special=special, supported=supported, sep=sep, item_choices=item_choices,
                normalize=normalize)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def default_of(f: dataclasses.Field) -> Any:
    """The default value of a dataclass field (calls default_factory when there is one)."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def show(value: Any) -> str:
    """A value as the user would write it in YAML (for messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def suggest(word: str, candidates) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or ''."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_error(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"config key '{key}': expected {expected}, got {show(value)}")


# ---------------------------------------------------------------- scalar coercion


def _to_bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):  # the table types distributed_dataloader as int
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    raise _type_error(key, v, "true or false")


def _to_int(key: str, v: Any) -> int:
    if isinstance(v, bool):
        raise _type_error(key, v, "an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            try:
                v = float(v.strip())  # "1e5" is a string to PyYAML
            except ValueError:
                raise _type_error(key, v, "an integer") from None
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    raise _type_error(key, v, "an integer")


def _to_float(key: str, v: Any) -> float:
    if isinstance(v, bool):
        raise _type_error(key, v, "a number")
    out = None
    if isinstance(v, (int, float)):
        out = float(v)
    elif isinstance(v, str):
        # PyYAML (YAML 1.1) reads 1e-5 as a string; only 1.0e-5 is a float there
        try:
            out = float(v.strip())
        except ValueError:
            out = None
    if out is None or math.isnan(out):
        raise _type_error(key, v, "a number")
    return out


def _to_str(key: str, v: Any, sep: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        raise _type_error(key, v, "a string (quote it)")
    if isinstance(v, (int, float)):
        return str(v)  # e.g. train_dataset_prob: 1.0 written without quotes
    if isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float)) for x in v):
        return sep.join(str(x) for x in v)
    raise _type_error(key, v, "a string")


def _to_list(key: str, v: Any, item: type) -> list:
    if isinstance(v, str):
        v = [t for t in v.replace(",", " ").split()]
    if not isinstance(v, (list, tuple)):
        if item is int and not isinstance(v, bool) and isinstance(v, int):
            return [v]
        raise _type_error(key, v, f"a list of {item.__name__}")
    conv = _to_int if item is int else (lambda k, x: _to_str(k, x, ","))
    return [conv(key, x) for x in v]


# ---------------------------------------------------------------- typed coercion


def _members(tp: Any) -> tuple[list, bool]:
    """(non-None members of a Union, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        real = [a for a in args if a is not type(None)]
        return real, len(real) < len(args)
    return [tp], False


def coerce(key: str, value: Any, tp: Any, f: dataclasses.Field) -> Any:
    """Convert a YAML/override value to the field's declared type, or raise ConfigError."""
    members, optional = _members(tp)
    if value is None or (optional and isinstance(value, str)
                         and value.strip().lower() in ("", "none", "null", "~")):
        if optional:
            return None
        if str in members and default_of(f) == "":
            return ""  # `key:` with nothing after it means an empty string option
        raise _type_error(key, value, type_name(tp))
    sep = f.metadata.get("sep", ",")
    if len(members) > 1:  # str | list[int] (pp_seg_method)
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise _type_error(key, value, type_name(tp)) from None
        if isinstance(value, (list, tuple)):
            return _to_list(key, value, int)
        return _to_str(key, value, sep)
    tp = members[0]
    if tp is bool:
        return _to_bool(key, value)
    if tp is int:
        return _to_int(key, value)
    if tp is float:
        return _to_float(key, value)
    if tp is str:
        choices = f.metadata.get("choices") or ()
        if isinstance(value, bool) and "no" in choices and value is False:
            return "no"  # YAML 1.1 turns an unquoted `no` into false
        return _to_str(key, value, sep)
    if typing.get_origin(tp) is list:
        return _to_list(key, value, typing.get_args(tp)[0])
    raise TypeError(f"config field {key!r} has an unsupported type {tp!r}")


def type_name(tp: Any) -> str:
    members, optional = _members(tp)
    names = []
    for m in members:
        if typing.get_origin(m) is list:
            names.append(f"list[{typing.get_args(m)[0].__name__}]")
        else:
            names.append(m.__name__)
    name = " or ".join(names)
    return f"{name} or null" if optional else name


# ---------------------------------------------------------------- value checks


def _range_text(m: dict) -> str:
    lo = f"{_num(m['ge'])} <= " if m["ge"] is not None else (f"{_num(m['gt'])} < " if m["gt"] is not None else "")
    hi = f" <= {_num(m['le'])}" if m["le"] is not None else (f" < {_num(m['lt'])}" if m["lt"] is not None else "")
    if lo and not hi:  # read "value >= 1" rather than "1 <= value"
        lo, hi = "", (f" >= {_num(m['ge'])}" if m["ge"] is not None else f" > {_num(m['gt'])}")
    text = f"{lo}value{hi}"
    if m["special"]:
        text = " or ".join(_num(s) for s in m["special"]) + " or " + text
    return text


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def range_text(f: dataclasses.Field) -> str | None:
    """The allowed range in words, e.g. '0 <= value < 1', or None if unrestricted."""
    m = f.metadata
    if all(m.get(k) is None for k in ("ge", "gt", "le", "lt")):
        return None
    return _range_text(m)


def check_value(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Choices, range and per-field normalisation of an already coerced value."""
    m = f.metadata
    if value is None:
        return value
    choices = m.get("choices")
    if choices and isinstance(value, str):
        canon = {str(c).lower(): c for c in choices}
        if value.lower() not in canon:
            raise ConfigError(f"config key '{key}': {show(value)} is not a valid choice (expected one of: "
                              f"{', '.join(map(str, choices))}){suggest(value, map(str, choices))}")
        value = canon[value.lower()]
    items = m.get("item_choices")
    if items:
        seq = value.split() if isinstance(value, str) else value
        for item in seq:
            if item not in items:
                raise ConfigError(f"config key '{key}': {show(item)} is not a valid item (expected items from: "
                                  f"{', '.join(items)}){suggest(str(item), items)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and range_text(f):
        if value not in m["special"] and not _in_range(value, m):
            raise ConfigError(f"config key '{key}': {show(value)} is out of range (expected {_range_text(m)})")
    if m.get("normalize") is not None:
        value = m["normalize"](key, value)
    return value


def _in_range(v: float, m: dict) -> bool:
    return ((m["ge"] is None or v >= m["ge"]) and (m["gt"] is None or v > m["gt"])
            and (m["le"] is None or v <= m["le"]) and (m["lt"] is None or v < m["lt"]))
