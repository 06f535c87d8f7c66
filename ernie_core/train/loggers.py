"""Run logging: one JSON line per log step in trainer_log.jsonl, TensorBoard scalars, tqdm bar."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

LOG_FILE = "trainer_log.jsonl"


class RunLogger:
    """Writes `<output_dir>/trainer_log.jsonl` and TensorBoard events in `logging_dir` (rank 0 only)."""

    def __init__(self, output_dir, logging_dir, *, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / LOG_FILE
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(logging_dir))
            except ImportError:  # tensorboard not installed: JSONL still has everything
                self._tb = None

    def _truncate_after(self, step: int | None) -> None:
        """On resume, drop lines the interrupted run wrote after the checkpoint it resumes from, so
        the file reads like one uninterrupted run. A fresh run (step None) starts a new file."""
        if not self.path.exists():
            return
        if step is None:
            self.path.unlink()
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def progress_bar(total: int, initial: int, disable: bool):
    """tqdm bar over optimizer steps, with ETA; a no-op object when disabled."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=disable, desc="train", unit="step", dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)


def read_log(output_dir) -> list[dict]:
    path = Path(output_dir) / LOG_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
