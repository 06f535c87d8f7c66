"""Every Triton kernel compiles ahead of time for Hopper (sm_90) here, without a GPU, and the
attention kernels' dots become wgmma. Uses the ptxas inside Triton's wheel."""
from __future__ import annotations

import pytest

pytest.importorskip("triton")
aot = pytest.importorskip("ernie_core.ops.triton.aot")

SPECS = {s.name: s for s in aot.kernel_specs()}
H100_MAX_SHARED = 232448  # bytes of shared memory one block may opt into on sm_90


# Spill bytes per thread allowed (ptxas -v on the PTX), so a change that adds spills fails here. The
# attention backward kernels already spill a little at their 64x64 / 4-warp bf16 tiles (428 B dK/dV,
# 20 B dQ with Triton 3.6); the dropout variants run 8 warps to stay close (76 B each). The fp32
# kernels (the exact-dot oracle path, never the fast one) spill a lot: 664 B forward, 6888 B dK/dV.
MAX_SPILL = {"flashmask_bwd_dkdv_bf16": 512, "flashmask_bwd_dq_bf16": 64, "flashmask_bwd_dkdv_dropout_bf16": 128,
             "flashmask_bwd_dq_dropout_bf16": 128, "flashmask_fwd_fp32": 1024, "flashmask_bwd_dkdv_fp32": 8192}


@pytest.mark.parametrize("name", list(SPECS))
def test_compiles_for_sm90(name):
    spec = SPECS[name]
    k = aot.compile_spec(spec, arch=90)
    assert len(k.asm["cubin"]) > 0
    assert k.metadata.shared <= H100_MAX_SHARED, f"{name} needs {k.metadata.shared} B of shared memory"
    if spec.expect_wgmma:
        assert "wgmma.mma_async" in k.asm["ptx"], f"{name}: dots did not lower to wgmma on sm_90"
    rep = aot.ptxas_report(k)
    print(f"{name}: {rep['registers']} registers, {rep['spill_stores']} B spill stores (ptxas -v, sm_90a)")
    assert rep["spill_stores"] <= MAX_SPILL.get(name, 0), f"{name} spills: {rep}"


def test_every_jit_kernel_has_a_spec():
    import triton

    from ernie_core.ops.triton import flashmask, head_ce, pointwise

    kernels = {f"{m.__name__}.{n}" for m in (flashmask, head_ce, pointwise) for n, f in vars(m).items()
               if isinstance(f, triton.runtime.jit.JITFunction) and n.endswith("_kernel")}
    covered = {f"{s.fn.fn.__module__}.{s.fn.fn.__name__}" for s in SPECS.values()}
    assert kernels <= covered, f"kernels without an AOT spec: {sorted(kernels - covered)}"
