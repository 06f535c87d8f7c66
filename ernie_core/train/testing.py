"""Test helper of the training entry point (used by the multi-process tests with parallel.testing.spawn)."""
from __future__ import annotations

from .cli import main


def run_cli(runs: list[list[str]]) -> list[int]:
    """Each argv through `python -m ernie_core.train`'s main, in order (every rank runs the same list)."""
    codes = []
    for argv in runs:
        code = main(list(argv))
        if code != 0:
            raise RuntimeError(f"ernie_core.train {' '.join(argv)} exited with {code}")
        codes.append(code)
    return codes
