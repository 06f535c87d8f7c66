"""`python -m ernie_core.export <checkpoint_or_output_dir> [--merge-lora] [--out DIR] [--max-shard-size 5GB]`

Writes a Hugging Face checkpoint (config.json, sharded safetensors + index, tokenizer files) that
transformers loads directly. With `--merge-lora` the directory's PEFT adapter is folded into its base
(W + scaling·B A in fp32, docs/behaviour.md#lora); without it a full model directory is re-sharded. The
base is streamed one tensor at a time and shards are written as they fill, so memory stays at about
one shard, whatever the model size.

The adapter is a PEFT one (adapter_config.json + adapter_model.safetensors, what ernie_core runs
write) or ERNIEKit's (lora_config.json + peft_model*.safetensors or lora_model_state.pdparams, its
fused q|k|v and gate|up adapters split exactly). The LoRA base is, in order: model files in the
directory itself (a run whose base was freshly initialised saves it there), `--base`, or the
adapter's `base_model_name_or_path`. Default output: `<dir>/export`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import UserError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


class ShardWriter:
    """Writes (name, tensor) pairs into model-0000i-of-0000n.safetensors shards of at most `limit`
    bytes (a bigger tensor gets its own), plus model.safetensors.index.json."""

    def __init__(self, out: Path, limit: int):
        self.out, self.limit = out, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + n > self.limit:
            self.flush()
        self.pending[name] = t.detach().to("cpu").contiguous()
        self.pending_bytes += n
        self.total += n

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.out / f"shard-{len(self.files):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Name the shards now that their count is known, then write the index."""
        from .models.io import INDEX_NAME

        self.flush()
        weight_map = {}
        for i, (path, names) in enumerate(self.files, 1):
            final = self.out / f"model-{i:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(path, final)
            weight_map.update({n: final.name for n in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def find_base(src: Path, override: str | None) -> Path:
    """Where the LoRA base weights live (see the module docstring for the order)."""
    from .peft.loading import find_lora_base

    return find_lora_base(src, override, hint="pass --base DIR")


def export(src, *, merge_lora: bool, out=None, max_shard_size="5GB", base=None) -> Path:
    """Write the merged (or re-sharded) HF checkpoint of `src` into `out`; returns `out`."""
    from .models import Ernie4_5Config
    from .models.io import iter_hf_tensors, parse_size
    from .peft import is_adapter_dir, read_any_adapter
    from .peft.merge import merge_stream

    src = Path(src)
    if not src.is_dir():
        raise UserError(f"{src}: no such directory")
    lora = is_adapter_dir(src)
    if lora and not merge_lora:
        raise UserError(f"{src} holds a LoRA adapter; pass --merge-lora to fold it into its base")
    if merge_lora and not lora:
        raise UserError(f"{src}: --merge-lora needs adapter_config.json + adapter_model.safetensors there (or "
                        "ERNIEKit's lora_config.json + peft_model*.safetensors / lora_model_state.pdparams)")
    base_dir = find_base(src, base) if lora else src
    cfg = Ernie4_5Config.from_pretrained(base_dir)
    adapter_cfg, adapter = read_any_adapter(src, cfg) if lora else ({}, {})
    out = Path(out) if out is not None else src / "export"
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardWriter(tmp, parse_size(max_shard_size))
    stream = iter_hf_tensors(base_dir, cfg)
    if lora:
        stream = merge_stream(stream, adapter_cfg, adapter)
    dtype = None
    try:
        for name, t in stream:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # tied: the embedding is the head
            dtype = dtype or t.dtype
            writer.add(name, t)
    except ValueError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{src}: {e}") from None
    writer.close()
    dataclasses.replace(cfg, dtype=str(dtype or torch.float32).removeprefix("torch.")).save_pretrained(tmp)
    for name in TOKENIZER_FILES:  # the run's tokenizer, else the base's
        for where in (src, base_dir):
            if (where / name).is_file():
                shutil.copyfile(where / name, tmp / name)
                break
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ernie_core.export", description=__doc__.split("\n\n")[1])
    p.add_argument("path", help="a checkpoint-N folder or a run's output_dir")
    p.add_argument("--merge-lora", action="store_true", help="fold the LoRA adapter into its base weights")
    p.add_argument("--out", default=None, help="output folder (default: <path>/export)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--base", default=None, help="base model folder, overriding the adapter's base_model_name_or_path")
    args = p.parse_args(argv)
    try:
        out = export(args.path, merge_lora=args.merge_lora, out=args.out, max_shard_size=args.max_shard_size,
                     base=args.base)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
