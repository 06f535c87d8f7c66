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


def test_gpu_check_script_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed here")
    proc = subprocess.run(["shellcheck", os.path.join(ROOT, "bench", "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_train_dry_run_is_a_valid_config(tmp_path):
    """The 0.3B SFT run's trainer arguments load as a config with nothing unsupported, for each variant."""
    from ernie_core.config import load_config, unsupported_options

    mod = _load("gpu_train")
    res = mod.main(["--dry-run", "--variants", "plain", "dropout", "--json", str(tmp_path / "gpu_train.json")])
    assert res["shape"]["hidden_size"] == 1024 and res["shape"]["num_hidden_layers"] == 18
    for row in res["rows"]:
        args = row["trainer_args"]
        cfg = load_config(args[0], args[1:])
        assert unsupported_options(cfg) == [], row["variant"]
        assert cfg.train.max_steps == 20 and cfg.train.max_seq_len == 8192
        assert cfg.memory.use_fused_head_and_loss_fn and cfg.accel.fuse_rope
        assert (cfg.basic.attention_probs_dropout_prob > 0) == (row["variant"] == "dropout")


_BENCH_IMPLS_UNDER_INTERPRETER = r"""
import os, sys, importlib.util
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, ROOT)
import torch
from ernie_core.ops import reference as ref
spec = importlib.util.spec_from_file_location("attention_gpu", os.path.join(ROOT, "bench", "attention_gpu.py"))
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
S, D = 48, 32
idx = mod.make_indices("causal_doc", S, "cpu", 3)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, S, h, D, generator=g).requires_grad_() for h in (4, 2, 2))
dout = torch.randn(1, S, 4, D, generator=g)
for name in ("triton", "triton_dropout"):
    p = mod.DROPOUT_P if name.endswith("_dropout") else 0.0
    fn = mod.make_impl(name, idx, True, S, "cpu")
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want = ref.flashmask_attention_reference(q, k, v, idx, True, None, p, rng_state=torch.tensor([1234, 5678]))
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    for a, b in zip((out, *grads), (want, *want_grads)):
        err = float((a - b).norm() / b.norm())
        assert err < 1e-4, (name, err)
print("ok")
"""


def test_attention_bench_impls_run_under_the_interpreter():
    """The benchmark's own calls into the triton kernels (with and without dropout) give the reference's
    values and gradients (TRITON_INTERPRET=1 on CPU tensors, in a child process)."""
    pytest.importorskip("triton")
    import sys

    code = f"ROOT = {ROOT!r}\n" + _BENCH_IMPLS_UNDER_INTERPRETER
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
