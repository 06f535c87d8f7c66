"""Command line of the trainer: parse the config, build the run, nothing else."""
from __future__ import annotations

import argparse
import sys

from ..errors import UserError

USAGE = "python -m ernie_core.train CONFIG.yaml [key=value ...] [--print-config]"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ernie_core.train", usage=USAGE,
                                     description="Train an ERNIE 4.5 model (SFT, LoRA, DPO) from one YAML config.")
    parser.add_argument("config", help="YAML config file (ERNIEKit keys)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, applied after the file")
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved config as YAML and exit without training")
    return parser.parse_args(argv)


def run(argv: list[str]) -> int:
    from ..config import config_to_yaml, load_config, unsupported_options

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(config_to_yaml(cfg))
        return 0
    missing = unsupported_options(cfg)
    if missing:
        raise UserError("not supported yet: " + ", ".join(missing))
    from .runner import run_training

    run_training(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; the newest complete checkpoint is intact and a re-run resumes from it", file=sys.stderr)
        return 130
