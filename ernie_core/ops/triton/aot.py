"""Ahead-of-time compilation of every Triton kernel for a GPU target, without a GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs the whole pipeline (TTIR ->
TTGIR -> LLVM -> PTX -> cubin with the ptxas in Triton's wheel), so CI checks here that each kernel
builds for Hopper and that its dots became wgmma. The specs use the tile sizes and warps the
wrappers launch with, and the argument types a launch on large tensors would specialise to.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import flashmask as fm
from . import head_ce, pointwise

# Pointer element types per argument name (everything else named *_ptr is the data dtype).
_PTR_TYPES = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "spans_ptr": "*i32", "kinds_ptr": "*i8",
              "cols_ptr": "*i32", "ncols_ptr": "*i32", "rows_ptr": "*i32", "nrows_ptr": "*i32",
              "rstd_ptr": "*fp32", "dw_part_ptr": "*fp32", "inv_freq_ptr": "*fp32", "pos_ptr": "*i64",
              "labels_ptr": "*i64", "loss_ptr": "*fp32", "drop_ptr": "*i64"}
_FLOAT_ARGS = {"qk_scale", "sm_scale", "eps", "sign", "rescale"}


@dataclass
class KernelSpec:
    name: str
    fn: object
    constexprs: dict
    dtype: str = "bf16"
    options: dict = field(default_factory=dict)
    expect_wgmma: bool = False

    def signature(self) -> dict:
        sig = {}
        for arg in self.fn.arg_names:
            if arg in self.constexprs:
                sig[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                sig[arg] = _PTR_TYPES.get(arg, "*" + self.dtype)
            elif arg in _FLOAT_ARGS:
                sig[arg] = "fp32"
            else:
                sig[arg] = "i32"
        return sig


def kernel_specs() -> list[KernelSpec]:
    attn = dict(D=128, BLOCK_D=128, DROPOUT=False)
    drop = dict(D=128, BLOCK_D=128, DROPOUT=True)
    fwd = dict(BLOCK_M=fm.FWD_CONFIG["block_m"], BLOCK_N=fm.FWD_CONFIG["block_n"])
    bwd = dict(BLOCK_M=fm.BWD_CONFIG["block_m"], BLOCK_N=fm.BWD_CONFIG["block_n"])
    fwd_opt = dict(num_warps=fm.FWD_CONFIG["num_warps"], num_stages=fm.FWD_CONFIG["num_stages"])
    bwd_opt = dict(num_warps=fm.BWD_CONFIG["num_warps"], num_stages=fm.BWD_CONFIG["num_stages"])
    bwd_drop_opt = {**bwd_opt, "num_warps": fm.BWD_DROPOUT_OVERRIDE.get("num_warps", bwd_opt["num_warps"])}
    specs = [
        KernelSpec("flashmask_fwd_bf16", fm._fwd_kernel, {**attn, **fwd, "PREC": "tf32"}, options=fwd_opt,
                   expect_wgmma=True),
        KernelSpec("flashmask_fwd_fp32", fm._fwd_kernel,
                   {**attn, "BLOCK_M": fm.FWD_CONFIG_FP32["block_m"], "BLOCK_N": fm.FWD_CONFIG_FP32["block_n"],
                    "PREC": "ieee"}, "fp32",
                   dict(num_warps=fm.FWD_CONFIG_FP32["num_warps"], num_stages=fm.FWD_CONFIG_FP32["num_stages"])),
        KernelSpec("flashmask_bwd_dkdv_fp32", fm._bwd_dkdv_kernel,
                   {**attn, "BLOCK_M": fm.BWD_CONFIG_FP32["block_m"], "BLOCK_N": fm.BWD_CONFIG_FP32["block_n"],
                    "PREC": "ieee"}, "fp32",
                   dict(num_warps=fm.BWD_CONFIG_FP32["num_warps"], num_stages=fm.BWD_CONFIG_FP32["num_stages"])),
        KernelSpec("flashmask_bwd_dkdv_bf16", fm._bwd_dkdv_kernel, {**attn, **bwd, "PREC": "tf32"},
                   options=bwd_opt, expect_wgmma=True),
        KernelSpec("flashmask_bwd_dq_bf16", fm._bwd_dq_kernel, {**attn, **bwd, "PREC": "tf32"}, options=bwd_opt,
                   expect_wgmma=True),
        # Attention dropout: the keep-mask hash (uint64 multiplies) in each kernel; the dots stay wgmma.
        KernelSpec("flashmask_fwd_dropout_bf16", fm._fwd_kernel, {**drop, **fwd, "PREC": "tf32"}, options=fwd_opt,
                   expect_wgmma=True),
        KernelSpec("flashmask_bwd_dkdv_dropout_bf16", fm._bwd_dkdv_kernel, {**drop, **bwd, "PREC": "tf32"},
                   options=bwd_drop_opt, expect_wgmma=True),
        KernelSpec("flashmask_bwd_dq_dropout_bf16", fm._bwd_dq_kernel, {**drop, **bwd, "PREC": "tf32"},
                   options=bwd_drop_opt, expect_wgmma=True),
        KernelSpec("rope_bf16", pointwise._rope_kernel,
                   dict(HALF_D=64, BLOCK_T=pointwise.rope_tokens_per_program(16, 64), BLOCK_H=16, BLOCK_HALF=64)),
        KernelSpec("rms_norm_fwd_bf16", pointwise._rms_fwd_kernel,
                   dict(BLOCK_R=pointwise.rms_rows_per_block(1024), BLOCK=1024), options=dict(num_warps=16)),
        KernelSpec("rms_norm_bwd_bf16", pointwise._rms_bwd_kernel,
                   dict(BLOCK_R=pointwise.rms_rows_per_block(1024), BLOCK=1024), options=dict(num_warps=16)),
        KernelSpec("swiglu_fwd_bf16", pointwise._swiglu_fwd_kernel, dict(BLOCK=1024)),
        KernelSpec("swiglu_bwd_bf16", pointwise._swiglu_bwd_kernel, dict(BLOCK=1024)),
        KernelSpec("ce_rows_bf16", head_ce._ce_rows_kernel, dict(BLOCK_V=4096), options=dict(num_warps=16)),
    ]
    return specs


def compile_spec(spec: KernelSpec, arch: int = 90):
    """The compiled kernel (asm dict has 'ttir', 'ttgir', 'llir', 'ptx', 'cubin')."""
    src = ASTSource(fn=spec.fn, signature=spec.signature(), constexprs=spec.constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec.options))


def ptxas_report(kernel, arch: str = "sm_90a") -> dict:
    """Registers and spill bytes of a compiled kernel, from `ptxas -v` (the ptxas in Triton's wheel)
    run on its PTX: {"registers": int, "spill_stores": int, "spill_loads": int}."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(int(re.sub(r"\D", "", arch))).path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        proc = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.devnull], capture_output=True, text=True)
    text = " ".join(proc.stderr.split())
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if proc.returncode or not regs or not spills:
        raise RuntimeError(f"ptxas -v failed ({proc.returncode}): {proc.stderr[-500:]}")
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}


def main() -> None:  # python -m ernie_core.ops.triton.aot : a table of what compiles
    for spec in kernel_specs():
        k = compile_spec(spec)
        ptx = k.asm["ptx"]
        rep = ptxas_report(k)
        print(f"{spec.name:34s} cubin {len(k.asm['cubin']):7d} B  shared {k.metadata.shared:6d} B  "
              f"wgmma {ptx.count('wgmma.mma_async'):3d}  regs {rep['registers']:3d}  spill {rep['spill_stores']:4d} B")


if __name__ == "__main__":
    main()
