"""The whole model trains through the Triton backend: SFT (full), SFT with LoRA, and DPO (sigmoid,
LoRA, attention dropout 0.1 as the ERNIEKit 0.3B DPO config has it), 3 steps each, through the real
trainer (`ernie_core.train.cli.main`), with ERNIE_CORE_BACKEND=triton on CPU tensors under
TRITON_INTERPRET=1, against the same runs with ERNIE_CORE_BACKEND=cpu (the C++ kernels).

- Per step, loss and grad norm equal the cpu run's within the fp32 "reduction" row of
  tests/_tolerances.py (|a - b| <= atol + rtol |b|).
- Every op that has a Triton kernel -- attention forward and backward (with dropout in DPO), RoPE,
  RMSNorm, SwiGLU, fused LM head + CE (SFT) -- is counted at the dispatcher, and no kernel of another
  backend ran (a silent fallback to the reference or cpu fails the test).

TRITON_INTERPRET is read when Triton is imported, so the runs happen in one child process
(`python tests/test_train_triton.py --worker OUT.json`). Tiny model: 2 layers, hidden 128, 4 query /
2 kv heads of head_dim 32, sequences of 64 tokens. fp32 (the interpreter computes bf16 dots wrongly,
see tests/test_triton_interp.py).
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
STEPS = 3

# Every kernel a run must take, per run (op, function name).
COMMON = {("flashmask_attention", "fwd"), ("flashmask_attention", "bwd"), ("rope", "fwd"), ("rms_norm", "fwd"),
          ("rms_norm", "bwd"), ("swiglu", "fwd"), ("swiglu", "bwd")}
EXPECTED = {
    "sft_full": COMMON | {("fused_head_ce", "fwd_bwd")},
    "sft_lora": COMMON | {("fused_head_ce", "fwd_bwd")},
    # DPO scores its chosen/rejected tokens with its own sparse head (train/dpo.py), not fused_head_ce.
    "dpo_sigmoid": COMMON | {("flashmask_attention", "fwd_dropout"), ("flashmask_attention", "bwd_dropout")},
}


def tiny_model_dir(tmp: Path, name: str = "tiny2", **overrides) -> Path:
    """examples/tiny_model with 2 layers (random init: continue_training=false), plus `overrides`
    of its config.json (e.g. head_dim=64 for the CUDA attention kernels)."""
    out = tmp / name
    shutil.copytree(EXAMPLES / "tiny_model", out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(num_hidden_layers=2, **overrides)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def run_args(mode: str, model: Path, out: Path, compute_type: str = "fp32") -> list[str]:
    common = [f"output_dir={out}", f"model_name_or_path={model}", f"max_steps={STEPS}", "logging_steps=1",
              "do_eval=false", "save_strategy=no", "disable_tqdm=true", "per_device_train_batch_size=1",
              "fuse_rope=true", f"compute_type={compute_type}", "eval_generate_samples=0", "warmup_steps=1"]
    if mode in ("sft_full", "sft_lora"):
        args = [str(EXAMPLES / "configs/sft_tiny.yaml"), *common, "max_seq_len=64", "num_samples_each_epoch=200",
                f"train_dataset_path={EXAMPLES / 'data/sft-train.jsonl'},{EXAMPLES / 'data/alpaca-train.json'}",
                f"eval_dataset_path={EXAMPLES / 'data/sft-eval.jsonl'}", "use_fused_head_and_loss_fn=true"]
        if mode == "sft_lora":
            args += ["fine_tuning=LoRA", "lora_rank=8", "lora_alpha=16"]
        return args
    return [str(EXAMPLES / "configs/dpo_tiny.yaml"), *common, "max_seq_len=96", "max_prompt_len=48",
            f"train_dataset_path={EXAMPLES / 'data/dpo-train.jsonl'}", f"eval_dataset_path={EXAMPLES / 'data/dpo-eval.jsonl'}",
            "num_samples_each_epoch=200", "loss_type=sigmoid", "attention_probs_dropout_prob=0.1",
            "dropout_warmup_steps=0"]


# ---- the child ------------------------------------------------------------------------------------

def count_kernel_calls():
    """Wrap every registered kernel of every backend: counts[(op, backend, fn_name)] += 1 per call.
    Returns (counts, undo) where undo() puts the original kernels back."""
    from ernie_core import ops  # noqa: F401
    from ernie_core.ops import _backend

    counts = collections.Counter()
    originals = {k: f for k, f in _backend.registered().items() if k[2] != "supports"}
    for key, fn in originals.items():

        def counted(*args, _fn=fn, _key=key, **kwargs):
            counts[_key] += 1
            return _fn(*args, **kwargs)

        _backend._REGISTRY[key] = counted
    return counts, lambda: _backend._REGISTRY.update(originals)


def train_and_count(counts, args) -> dict:
    """Run the trainer CLI once; its logged steps, losses and grad norms, and the kernel calls."""
    from ernie_core.train.cli import main
    from ernie_core.train.loggers import read_log

    counts.clear()
    rc = main(args)
    out = Path(args[[a.startswith("output_dir=") for a in args].index(True)].split("=", 1)[1])
    rows = [r for r in read_log(out) if "loss" in r and "step" in r] if rc == 0 else []
    return {"rc": rc, "steps": [r["step"] for r in rows], "loss": [r["loss"] for r in rows],
            "grad_norm": [r.get("grad_norm") for r in rows], "calls": {"|".join(k): n for k, n in sorted(counts.items())}}


def _worker(out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before Triton is imported"
    sys.path.insert(0, str(ROOT))
    counts, _ = count_kernel_calls()
    tmp = Path(tempfile.mkdtemp(prefix="train_triton_"))
    model = tiny_model_dir(tmp)
    results = {}
    try:
        for mode in EXPECTED:
            results[mode] = {}
            for backend in ("cpu", "triton"):
                os.environ["ERNIE_CORE_BACKEND"] = backend
                results[mode][backend] = train_and_count(counts, run_args(mode, model, tmp / f"{mode}_{backend}"))
    finally:
        os.environ.pop("ERNIE_CORE_BACKEND", None)
        shutil.rmtree(tmp, ignore_errors=True)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


# ---- the parent (pytest) --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("triton")
    from ernie_core.ops import _backend

    if not _backend.has_kernel("rms_norm", "cpu"):
        pytest.fail("the cpu backend (ernie_core._C) is not built here: it is the comparison")
    out = tmp_path_factory.mktemp("train_triton") / "runs.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("ERNIE_CORE_BACKEND", None)
    proc = subprocess.run([sys.executable, __file__, "--worker", str(out)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"training worker failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def assert_same_run(got: dict, want: dict, kind: str, dtype: torch.dtype, what: str) -> None:
    """Per step, loss and grad norm within tests/_tolerances.py's (kind, dtype) row."""
    from _tolerances import tol

    assert got["rc"] == 0 and want["rc"] == 0, f"{what}: exit codes {got['rc']}, {want['rc']}"
    assert got["steps"] == want["steps"] == list(range(1, STEPS + 1)), (got["steps"], want["steps"])
    atol, rtol = tol(kind, dtype)
    for key in ("loss", "grad_norm"):
        for step, (a, b) in enumerate(zip(got[key], want[key]), 1):
            assert a is not None and b is not None, f"{what}: {key} missing at step {step}"
            assert abs(a - b) <= atol + rtol * abs(b), f"{what}: step {step} {key}: {a!r} vs {b!r}"


def assert_took_every_kernel(run: dict, backend: str, expected: set, accept=()) -> None:
    """Every expected (op, fn_name) ran on `backend` (or one of `accept`), and nothing else ran."""
    calls = {tuple(k.split("|")): n for k, n in run["calls"].items()}
    ok = {backend, *accept}
    elsewhere = {k: n for k, n in calls.items() if k[1] not in ok}
    assert not elsewhere, f"kernels of other backends ran with ERNIE_CORE_BACKEND={backend}: {elsewhere}"
    missing = {f"{op}.{fn}" for op, fn in expected if not any(calls.get((op, b, fn)) for b in ok)}
    assert not missing, f"{backend} kernels never called: {sorted(missing)}; calls: {calls}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(EXPECTED))
def test_triton_training_matches_cpu(runs, mode):
    assert_same_run(runs[mode]["triton"], runs[mode]["cpu"], "reduction", torch.float32, f"{mode} triton vs cpu")


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(EXPECTED))
def test_triton_training_takes_every_triton_kernel(runs, mode):
    assert_took_every_kernel(runs[mode]["triton"], "triton", EXPECTED[mode])
    # The cpu run is what we compare with: it must really have run the C++ kernels.
    cpu_calls = {tuple(k.split("|")) for k in runs[mode]["cpu"]["calls"]}
    assert all(b == "cpu" for _, b, _ in cpu_calls), f"cpu run used other backends: {sorted(cpu_calls)}"


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
