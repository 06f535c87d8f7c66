"""Generate docs/config.md from the config dataclasses.

    python -m ernie_core.config.docs           # rewrite docs/config.md
    python -m ernie_core.config.docs --check   # exit 1 if docs/config.md is stale
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._field import default_of, range_text, type_name
from .resolve import COMPUTE_TYPES
from .train_config import ALIASES, KEY_TYPE, SECTION_CLASSES, SECTION_FIELDS

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "config.md"

_INTRO = """\
# Configuration reference

Generated from the dataclasses in `ernie_core/config/` by `python -m ernie_core.config.docs`;
do not edit by hand (a test fails when this file is stale).

A run is one YAML file plus `key=value` overrides:

    python -m ernie_core.train run.yaml max_steps=50 learning_rate=1e-5 fine_tuning=Full

Keys are flat, as in ERNIEKit configs (every key is unique across sections); a nested
`section: {key: value}` form and `section.key=value` overrides are accepted too. Override values
are read as YAML scalars (`1e-5`, `true`, `[0, 29, 57]`, `a.jsonl,b.jsonl`). Code reads
`cfg.<section>.<key>`. Defaults are ERNIEKit's code defaults; where the ERNIEKit parameter table
says something else, the description says so.

**implemented**: `no` means ernie_core cannot do this yet. A config that sets such a key to a
value other than its default (or another value that works without the capability) stops with
`not supported yet: <key>`; keys that have no effect in the run (pipeline options at pipeline
degree 1, LoRA options with LoRA off, DPO options in SFT, ...) are not reported.

Derived values, resolved once when the config is loaded:

- `fine_tuning` sets `lora` (`LoRA` -> true, `Full` -> false); the default is `LoRA`, so write
  `fine_tuning: Full` for full fine-tuning. Giving only `lora` sets `fine_tuning` to match.
- `compute_type` sets `bf16`, `fp16` and `weight_quantize_algo` (table below); giving only one of
  those picks the matching `compute_type`; a contradiction is an error. `fp8` also sets
  `apply_hadamard`, `optim: adamw_custom`, `use_lowprecision_moment`,
  `tensorwise_offload_optimizer`, `optim_shard_num: 8` and
  `unified_checkpoint_config: ignore_merge_optimizer`.
- `logging_dir` follows `output_dir`; `per_device_eval_batch_size` follows
  `per_device_train_batch_size`; `eval_steps` follows `logging_steps` (strategy `steps`).
- `evaluation_strategy` other than `no` turns `do_eval` on; `do_eval` alone means `steps`.
- `rslora_plus` sets `rslora: true`, `lora_plus_scale: 4`, `lora_alpha: 4`; LoRA turns `fuse_linear`
  off; `cfg.lora.scaling()` gives alpha/r (alpha/sqrt(r) with `rslora`), alpha -1 meaning 2r (4
  with `rslora`).
- `loss_type: orpo` sets `reference_free` and `sft_loss_ratio: 1`; `max_prompt_len` is capped at
  `max_seq_len - 10`; DPO defaults `loss_subbatch_seqlen` to 1024; DPO with LoRA forces
  `ref_model_update_steps: -1`.
- `sequence_parallel` is off unless `tensor_parallel_degree > 1`; degrees of -1 read as 1.
- One `*_dataset_prob` / `*_dataset_type` value that was not written is repeated for every path.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _show_default(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if value == "":
        return '`""`'
    if isinstance(value, list):
        return "`[" + ", ".join(map(str, value)) + "]`"
    return f"`{value}`"


def _description(f) -> str:
    m = f.metadata
    parts = [m["help"]]
    if m.get("choices"):
        parts.append("Choices: " + ", ".join(f"`{c}`" for c in m["choices"]) + ".")
    if m.get("item_choices"):
        parts.append("Items: " + ", ".join(f"`{c}`" for c in m["item_choices"]) + ".")
    rng = range_text(f)
    if rng:
        parts.append(f"Range: {rng}.")
    aliases = [a for a, k in ALIASES.items() if k == f.name]
    if aliases:
        parts.append("Alias: " + ", ".join(f"`{a}`" for a in aliases) + ".")
    return _cell(" ".join(parts))


def _compute_table() -> list[str]:
    rows = ["| compute_type | bf16 | fp16 | weight_quantize_algo |", "| --- | --- | --- | --- |"]
    for name, implied in COMPUTE_TYPES.items():
        rows.append(_cell(f"| `{name}` | {_show_default(implied['bf16'])} | {_show_default(implied['fp16'])} | "
                          f"{_show_default(implied['weight_quantize_algo'])} |").replace("\\|", "|"))
    return rows


def _section_table(section: str) -> list[str]:
    doc = (SECTION_CLASSES[section].__doc__ or "").strip()
    lines = [f"## `{section}`", "", doc, "",
             "| key | type | default | implemented | description |",
             "| --- | --- | --- | --- | --- |"]
    for f in SECTION_FIELDS[section]:
        impl = "yes" if f.metadata["implemented"] else "no"
        lines.append(f"| `{f.name}` | {_cell(type_name(KEY_TYPE[f.name]))} | {_cell(_show_default(default_of(f)))} "
                     f"| {impl} | {_description(f)} |")
    return lines + [""]


def render() -> str:
    """The full text of docs/config.md."""
    lines = [_INTRO, *_compute_table(), ""]
    for section in SECTION_FIELDS:
        lines += _section_table(section)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale, write nothing")
    parser.add_argument("--output", type=Path, default=DOC_PATH, help="markdown file (default: docs/config.md)")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
        if current != text:
            print(f"{args.output} is stale; run: python -m ernie_core.config.docs", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
