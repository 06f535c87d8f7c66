"""File readers: erniekit JSONL (+ .gz) and alpaca (JSON list or JSONL); the row formats are in
docs/behaviour.md ("Data format").

The public reader API, shared by SFT (here) and DPO (data/dpo.py): `iter_rows` (a file's JSON rows with
their line numbers), `turn_list`, `optional_str`, `read_is_system` / `split_system` (the system-prompt
fields). Every malformed line raises DataError(path, line, reason) at once: training never starts on
data it would silently skip. Blank lines in JSONL files carry no row and are ignored.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ernie_core.errors import DataError

SFT_TYPES = ("erniekit", "alpaca")


@dataclass(frozen=True)
class Example:
    """One conversation: optional system prompt, user turns `src`, assistant turns `tgt`, and a
    per-turn loss weight `label` (1 = train the answer, 0 = context only)."""

    src: tuple[str, ...]
    tgt: tuple[str, ...]
    label: tuple[int, ...]
    system: str | None = None

    def messages(self, turns: int | None = None) -> list[dict]:
        """Chat messages [system?, user, assistant, ...]; `turns` keeps only the first n turns."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for user, reply in list(zip(self.src, self.tgt))[:turns]:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return msgs


def read_bytes(path: Path) -> bytes:
    """The file's bytes (.gz decompressed); DataError naming the file when it is missing or unreadable."""
    if not path.is_file():
        raise DataError(path, None, "file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:  # EOFError: truncated .gz
        raise DataError(path, None, f"cannot read file: {e}") from None


def _decode_line(path: Path, line_no: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, line_no, f"invalid UTF-8 (byte {e.start} of the line)") from None


def iter_jsonl(path: Path, data: bytes) -> Iterator[tuple[int, object]]:
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        text = _decode_line(path, line_no, raw).strip()
        if not text:
            continue
        try:
            yield line_no, json.loads(text)
        except ValueError as e:
            raise DataError(path, line_no, f"invalid JSON: {e}") from None


def iter_json_array(path: Path, data: bytes) -> Iterator[tuple[int, object]]:
    """Elements of a top-level JSON list, each with the line it starts on."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, data.count(b"\n", 0, e.start) + 1, "invalid UTF-8") from None
    decoder, n = json.JSONDecoder(), len(text)

    def skip_ws(pos):
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos, line, counted = skip_ws(0) + 1, 1, 0  # past the opening "["
    if skip_ws(pos) < n and text[skip_ws(pos)] == "]":
        return
    while True:
        pos = skip_ws(pos)
        line, counted = line + text.count("\n", counted, pos), pos  # incremental: O(file) overall
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except ValueError as e:  # report the row's first line; the message has the exact spot
            raise DataError(path, line, f"invalid JSON: {e}") from None
        yield line, obj
        pos = skip_ws(pos)
        if pos < n and text[pos] == ",":
            pos += 1
        elif pos < n and text[pos] == "]":
            return
        else:
            line += text.count("\n", counted, pos)
            raise DataError(path, line, "invalid JSON: expected ',' or ']' after a list element")


def turn_list(path, line, row, key, skip_first: bool = False) -> list[str]:
    """row[key] as a list of stripped, non-blank strings (a single string is one turn); skip_first lets
    turn 0 be blank (is_system rows discard it)."""
    if key not in row:
        raise DataError(path, line, f"missing {key!r}")
    value = row[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise DataError(path, line, f"{key!r} must be a string or a list of strings, got {type(value).__name__}")
    if not value:
        raise DataError(path, line, f"{key!r} is an empty list")
    out = []
    for k, s in enumerate(value):
        if not isinstance(s, str):
            raise DataError(path, line, f"{key!r}[{k}] must be a string, got {type(s).__name__}")
        if not s.strip() and not (skip_first and k == 0):  # is_system discards turn 0
            raise DataError(path, line, f"{key!r}[{k}] is blank")
        out.append(s.strip())
    return out


def _labels(path, line, row, n_turns) -> list[int]:
    if row.get("label") is None:
        return [1] * n_turns
    value = row["label"]
    value = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(value, list):
        raise DataError(path, line, f"'label' must be a list of 0/1, got {type(value).__name__}")
    if len(value) != n_turns:
        raise DataError(path, line, f"'label' has {len(value)} entries but there are {n_turns} turns")
    for k, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v not in (0, 1):
            raise DataError(path, line, f"'label'[{k}] must be 0 or 1, got {v!r}")
    return [int(v) for v in value]


def optional_str(path, line, row, key) -> str | None:
    """row[key] stripped, None when absent or blank; DataError when it is not a string."""
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(path, line, f"{key!r} must be a string, got {type(value).__name__}")
    return value.strip() if value and value.strip() else None


def read_is_system(path, line, row) -> bool:
    """The row's `is_system` flag (0/1): src[0] (and tgt[0]) then carry the system prompt."""
    is_system = row.get("is_system", 0)
    if is_system not in (0, 1, True, False):
        raise DataError(path, line, f"'is_system' must be 0 or 1, got {is_system!r}")
    return bool(is_system)


def split_system(path, line, row, is_system: bool, src: list, *per_turn: list):
    """(system, src, *per_turn): the row's `system` string, or with is_system src[0] as the system
    prompt and the first entry dropped from src and every per-turn list (tgt, label...)."""
    system = optional_str(path, line, row, "system")
    if not is_system:
        return (system, src, *per_turn)
    if system is not None:
        raise DataError(path, line, "both 'system' and 'is_system' are set; keep one")
    if len(src) < 2:
        raise DataError(path, line, "'is_system' needs src[0] as system prompt plus at least one turn")
    return (src[0], src[1:], *(t[1:] for t in per_turn))


def iter_rows(path: Path, *, allow_array: bool) -> Iterator[tuple[int, object]]:
    """(line_no, JSON row) of a JSONL file, or of a top-level JSON list when allow_array and the file
    starts with '['; DataError when it holds no row."""
    data = read_bytes(path)
    is_array = allow_array and data.lstrip()[:1] == b"["
    count = 0
    for line_no, row in (iter_json_array if is_array else iter_jsonl)(path, data):
        count += 1
        yield line_no, row
    if count == 0:
        raise DataError(path, None, "the file holds no rows")


def parse_erniekit_row(path, line: int, row) -> Example:
    """Validate one erniekit row and turn it into an Example."""
    if not isinstance(row, dict):
        raise DataError(path, line, f"row must be a JSON object, got {type(row).__name__}")
    is_system = read_is_system(path, line, row)
    src = turn_list(path, line, row, "src")
    tgt = turn_list(path, line, row, "tgt", skip_first=is_system)
    if len(src) != len(tgt):
        raise DataError(path, line, f"'src' has {len(src)} turns but 'tgt' has {len(tgt)}")
    label = _labels(path, line, row, len(src))
    system, src, tgt, label = split_system(path, line, row, is_system, src, tgt, label)
    return Example(tuple(src), tuple(tgt), tuple(label), system)


def parse_alpaca_row(path, line: int, row) -> Example:
    """alpaca {instruction, input?, output, system?} -> src=[instruction+input], tgt=[output]."""
    if not isinstance(row, dict):
        raise DataError(path, line, f"row must be a JSON object, got {type(row).__name__}")
    for key in ("instruction", "output"):
        if key not in row:
            raise DataError(path, line, f"missing {key!r}")
    for key in ("instruction", "input", "output"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise DataError(path, line, f"{key!r} must be a string, got {type(row[key]).__name__}")
    # ERNIEKit joins instruction and input with no separator; the data decides the spacing.
    converted = {"src": row["instruction"] + (row.get("input") or ""), "tgt": row["output"]}
    if row.get("system") is not None:
        converted["system"] = row["system"]
    return parse_erniekit_row(path, line, converted)


def read_examples(path: str | Path, kind: str = "erniekit") -> Iterator[tuple[int, Example]]:
    """Yield (line_no, Example) for every row of an SFT file; raises DataError at the first bad one."""
    path = Path(path)
    if kind not in SFT_TYPES:
        raise DataError(path, None, f"dataset type {kind!r} is not supported; use one of {', '.join(SFT_TYPES)}")
    parse = parse_erniekit_row if kind == "erniekit" else parse_alpaca_row
    # alpaca files are usually one JSON list; JSONL is accepted for both types.
    for line_no, row in iter_rows(path, allow_array=kind == "alpaca"):
        yield line_no, parse(path, line_no, row)
