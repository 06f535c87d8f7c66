"""Convert a Paddle-format ERNIE 4.5 checkpoint (`ernie.*` keys, [in, out] linears, fused qkv_proj /
up_gate_proj) into an HF-layout copy that transformers and serving engines load.

    python -m ernie_core.models.convert_paddle SRC_DIR DST_DIR [--max-shard-size 5GB]

Non-weight files (tokenizer, generation config, ...) are copied; config.json is rewritten with the
same keys. DST_DIR appears only when complete (written to a temp dir, then renamed).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

from ..errors import UserError
from .config import CONFIG_NAME, Ernie4_5Config
from .ernie4_5 import Ernie4_5ForCausalLM
from .io import INDEX_NAME, checkpoint_files, hf_views, is_paddle_checkpoint, iter_hf_tensors, write_hf_checkpoint


def _expected_shapes(cfg: Ernie4_5Config) -> dict[str, tuple] | None:
    """HF name -> shape for the dense model; None for configs this project cannot build (MoE)."""
    try:
        cfg.validate_dense()
    except UserError:
        return None
    with torch.device("meta"):
        model = Ernie4_5ForCausalLM(cfg)
    return {k: tuple(v.shape) for k, v in hf_views(model).items()}


def convert(src, dst, max_shard_size="5GB") -> Path:
    src, dst = Path(src), Path(dst)
    cfg = Ernie4_5Config.from_pretrained(src)
    files = checkpoint_files(src)
    if not is_paddle_checkpoint(files, src):
        raise UserError(f"{src}: not a Paddle-format checkpoint (no 'ernie.*' weights); it loads as is")
    tensors = dict(iter_hf_tensors(src, cfg))
    expected = _expected_shapes(cfg)
    if expected is not None:
        for key, shape in expected.items():
            if key not in tensors:
                raise UserError(f"{src}: checkpoint lacks weight {key} {list(shape)}")
            if tuple(tensors[key].shape) != shape:
                raise UserError(f"{src}: weight {key} has shape {list(tensors[key].shape)} after conversion, "
                                f"but config.json implies {list(shape)}")
        tensors = {k: tensors[k] for k in expected}  # drops MTP and a tied lm_head
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_files = {f.name for f in files} | {INDEX_NAME, CONFIG_NAME}
    for f in src.iterdir():
        if f.name not in weight_files and f.suffix not in (".pdparams", ".safetensors"):
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
    write_hf_checkpoint(tensors, cfg, tmp, max_shard_size)
    if dst.exists():
        raise UserError(f"{dst}: already exists; choose a new output directory")
    os.replace(tmp, dst)
    return dst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ernie_core.models.convert_paddle", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="Paddle-format checkpoint directory (config.json + safetensors)")
    parser.add_argument("dst", help="output directory for the HF-layout copy (must not exist)")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    try:
        if Path(args.dst).exists():
            raise UserError(f"{args.dst}: already exists; choose a new output directory")
        out = convert(args.src, args.dst, args.max_shard_size)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
