"""Atomic checkpoints: `<output_dir>/checkpoint-<step>/` in HF layout plus training state.

A checkpoint is written into a temporary sibling folder and renamed into place only when every
file is on disk, so a crash mid-save leaves the previous checkpoint as the newest complete one.
`trainer_state.json` is written last; a folder without it is never resumed from.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(final_dir: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)` then rename tmp_dir to final_dir (replacing an older copy)."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.parent / f".{final_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    old = None
    if final_dir.exists():
        old = final_dir.parent / f".{final_dir.name}.old-{os.getpid()}"
        os.rename(final_dir, old)
    os.rename(tmp, final_dir)
    _fsync_dir(final_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final_dir


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with trainer_state.json), oldest first."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for child in root.iterdir():
        m = _CKPT_RE.match(child.name)
        if m and child.is_dir() and (child / TRAINER_STATE).is_file():
            out.append((int(m.group(1)), child))
    return sorted(out)


def latest_checkpoint(output_dir) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def remove_stale_temporaries(output_dir) -> None:
    """Leftovers of a crash mid-save are never complete; remove them."""
    root = Path(output_dir)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".checkpoint-") and (".tmp-" in child.name or ".old-" in child.name):
                shutil.rmtree(child, ignore_errors=True)


def rotate(output_dir, limit: int | None) -> None:
    """Keep only the newest `limit` checkpoints (None or <= 0: keep all)."""
    if not limit or limit <= 0:
        return
    ckpts = list_checkpoints(output_dir)
    for _, path in ckpts[: max(0, len(ckpts) - limit)]:
        shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_training_state(dir_: Path, *, optimizer=None, scheduler=None, data_state: dict, trainer_state: dict) -> None:
    """Everything but the model files. trainer_state.json last: it marks the folder complete."""
    if optimizer is not None:
        torch.save(optimizer.state_dict(), dir_ / "optimizer.pt")
    if scheduler is not None:
        (dir_ / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    torch.save(rng_state(), dir_ / "rng_state.pth")
    (dir_ / "data_state.json").write_text(json.dumps(data_state))
    (dir_ / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))


def load_training_state(dir_: Path, *, optimizer=None, scheduler=None) -> tuple[dict, dict]:
    """Restore optimizer/scheduler (when given and present) and RNG; return (trainer_state, data_state)."""
    dir_ = Path(dir_)
    if optimizer is not None and (dir_ / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(dir_ / "optimizer.pt", weights_only=True))
    if scheduler is not None and (dir_ / "scheduler.json").is_file():
        scheduler.load_state_dict(json.loads((dir_ / "scheduler.json").read_text()))
    if (dir_ / "rng_state.pth").is_file():
        set_rng_state(torch.load(dir_ / "rng_state.pth", weights_only=False))
    trainer_state = json.loads((dir_ / TRAINER_STATE).read_text())
    data_state = json.loads((dir_ / "data_state.json").read_text()) if (dir_ / "data_state.json").is_file() else {}
    return trainer_state, data_state
