"""Every Triton kernel compiles ahead of time for Hopper (sm_90) here, without a GPU, and the
attention kernels' dots become wgmma. Uses the ptxas inside Triton's wheel."""
from __future__ import annotations

import pytest

pytest.importorskip("triton")
aot = pytest.importorskip("ernie_core.ops.triton.aot")

SPECS = {s.name: s for s in aot.kernel_specs()}
H100_MAX_SHARED = 232448  # bytes of shared memory one block may opt into on sm_90


@pytest.mark.parametrize("name", list(SPECS))
def test_compiles_for_sm90(name):
    spec = SPECS[name]
    k = aot.compile_spec(spec, arch=90)
    assert len(k.asm["cubin"]) > 0
    assert k.metadata.shared <= H100_MAX_SHARED, f"{name} needs {k.metadata.shared} B of shared memory"
    if spec.expect_wgmma:
        assert "wgmma.mma_async" in k.asm["ptx"], f"{name}: dots did not lower to wgmma on sm_90"


def test_every_jit_kernel_has_a_spec():
    import triton

    from ernie_core.ops.triton import flashmask, head_ce, pointwise

    kernels = {f"{m.__name__}.{n}" for m in (flashmask, head_ce, pointwise) for n, f in vars(m).items()
               if isinstance(f, triton.runtime.jit.JITFunction) and n.endswith("_kernel")}
    covered = {f"{s.fn.fn.__module__}.{s.fn.fn.__name__}" for s in SPECS.values()}
    assert kernels <= covered, f"kernels without an AOT spec: {sorted(kernels - covered)}"
