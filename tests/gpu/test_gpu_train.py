"""The GPU version of tests/test_train_triton.py: the tiny model (2 layers, head_dim 64 so the CUDA
attention kernels take bf16) trains 3 steps on the GPU through the real trainer -- SFT full, SFT
LoRA, DPO sigmoid with attention dropout 0.1 -- with ERNIE_CORE_BACKEND=triton and with the default
dispatch ("auto": the CUDA kernel where one is built for the op and takes the inputs, else Triton; a
user's run), against ERNIE_CORE_BACKEND=reference (pure PyTorch on the same GPU). fp32 runs must
agree within the fp32 "reduction" tolerance row, the bf16 SFT run within the bf16 "attention" row;
every op with a kernel must have run on a GPU kernel backend, never on the reference, and with the
CUDA backend built, bf16 attention must have run its CUDA kernels. Marked `gpu`; run by
bench/gpu_check.sh."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import test_train_triton as tt  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BACKENDS = ["triton", "auto"]
# (mode, compute_type): the bf16 run checks the kernels' bf16 paths (the CUDA attention kernels are bf16-only).
RUNS = [(m, "fp32") for m in tt.EXPECTED] + [("sft_full", "bf16")]


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory):
    from ernie_core.ops import _backend

    tmp = tmp_path_factory.mktemp("gpu_train")
    model = tt.tiny_model_dir(tmp, "tiny_d64", hidden_size=256, head_dim=64)
    counts, undo = tt.count_kernel_calls()
    old = os.environ.get("ERNIE_CORE_BACKEND")
    results = {}
    try:
        for mode, ct in RUNS:
            for backend in ["reference"] + BACKENDS:
                if backend == "auto":
                    os.environ.pop("ERNIE_CORE_BACKEND", None)
                elif not _backend.has_kernel("flashmask_attention", backend):
                    results[(mode, ct, backend)] = None
                    continue
                else:
                    os.environ["ERNIE_CORE_BACKEND"] = backend
                try:
                    results[(mode, ct, backend)] = tt.train_and_count(
                        counts, tt.run_args(mode, model, tmp / f"{mode}_{ct}_{backend}", compute_type=ct))
                except Exception as e:  # reported per test
                    results[(mode, ct, backend)] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        undo()
        if old is None:
            os.environ.pop("ERNIE_CORE_BACKEND", None)
        else:
            os.environ["ERNIE_CORE_BACKEND"] = old
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,compute_type", RUNS)
def test_gpu_training_matches_reference(gpu_runs, mode, compute_type, backend):
    got, want = gpu_runs[(mode, compute_type, backend)], gpu_runs[(mode, compute_type, "reference")]
    if got is None:
        pytest.skip(f"{backend} is not built here")
    assert "error" not in got, got.get("error")
    assert "error" not in want, want.get("error")
    dtype = torch.float32 if compute_type == "fp32" else torch.bfloat16
    kind = "reduction" if compute_type == "fp32" else "attention"
    tt.assert_same_run(got, want, kind, dtype, f"{mode} {compute_type} {backend} vs reference")
    accept = ("cuda", "triton") if backend == "auto" else ()
    tt.assert_took_every_kernel(got, backend, tt.EXPECTED[mode], accept=accept)
    from ernie_core.ops import _backend

    if backend == "auto" and compute_type == "bf16" and _backend.has_kernel("flashmask_attention", "cuda"):
        ran = {k for k, n in got["calls"].items() if n}
        assert {"flashmask_attention|cuda|fwd", "flashmask_attention|cuda|bwd"} <= ran, sorted(ran)
