"""The CPU-side parts of the GPU check: bench/gpu_check.sh parses, and the GPU benchmark scripts'
argument parsing and FLOP / memory formulas work with --dry-run (no GPU needed)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    proc = subprocess.run([bash, "-n", os.path.join(ROOT, "bench", "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_attention_defaults_cover_the_issue():
    mod = _load("attention_gpu")
    args = mod.parse_args([])
    assert args.seqlens == [8192, 32768] and args.head_dim == 128
    assert set(args.masks) == {"causal", "causal_doc", "share_prompt"}
    assert {"cuda", "triton", "sdpa", "flex"} <= set(args.impls)


def test_attention_flops_count_allowed_pairs():
    pytest.importorskip("ernie_core.ops.triton._mask")
    mod = _load("attention_gpu")
    S, H, D = 96, 3, 64
    fwd, bwd = mod.flops(None, True, S, H, D)
    assert fwd == 4.0 * D * H * S * (S + 1) / 2 and bwd == 2.5 * fwd
    rows = mod.main(["--dry-run", "--seqlens", "512", "--docs", "4"])
    by = {r["mask"]: r for r in rows}
    assert abs(by["causal"]["density"] - (513 / 2 / 512)) < 1e-9
    assert by["causal_doc"]["density"] < by["causal"]["density"]  # documents remove work
    assert by["share_prompt"]["density"] < by["causal"]["density"]


def test_head_ce_dry_run_estimate():
    mod = _load("head_ce_gpu")
    args = mod.parse_args([])
    assert (args.tokens, args.vocab) == (32768, 103424)
    rows = mod.main(["--dry-run", "--tokens", "1024", "--vocab", "1000", "--hidden", "64"])
    assert abs(rows[0]["logits"] - 1024 * 1000 * 2 / 2**20) < 1e-9
