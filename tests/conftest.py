"""Shared pytest setup: markers (also declared in pyproject.toml) and skipping `gpu` tests where
no CUDA device is present."""
import pytest
import torch


def pytest_configure(config):
    for line in (
        "slow: bigger sizes or long runs; deselect with -m 'not slow'",
        "distributed: spawns several processes (torch.distributed, gloo)",
        "gpu: needs a CUDA device; skipped where none is present",
    ):
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
