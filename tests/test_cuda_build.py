"""The torch-free CUDA kernels (csrc/cuda/*.cu) compile with nvcc for Hopper (sm_90a) and Ampere
(sm_80), and the Hopper attention kernel's machine code uses wgmma (HGMMA in SASS). No GPU needed.

Objects are cached under build/cuda_build/, keyed by a hash of the sources, headers, flags and nvcc
version, so reruns cost nothing; the full matrix (every file x both targets, ~2 minutes cold on two
cores) is marked slow, the Hopper attention check is not.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
CACHE = os.path.join(ROOT, "build", "cuda_build")
ARCHS = {"sm_90a": "-gencode=arch=compute_90a,code=sm_90a", "sm_80": "-gencode=arch=compute_80,code=sm_80"}
FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "--expt-relaxed-constexpr"]
NEEDS_CUTLASS = {"flashmask_fwd_sm90.cu"}


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cand = os.path.join(home, "bin", "nvcc") if home else None
    return cand if cand and os.path.exists(cand) else shutil.which("nvcc")


def _cutlass_include():
    env = os.environ.get("ERNIE_CUTLASS_INCLUDE")
    if env and os.path.isdir(os.path.join(env, "cute")):
        return env
    try:
        import cutlass_library

        inc = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
        if os.path.isdir(os.path.join(inc, "cute")):
            return inc
    except ImportError:
        pass
    local = os.path.join(ROOT, "build", "cutlass", "cutlass_library", "source", "include")
    return local if os.path.isdir(os.path.join(local, "cute")) else None


def _cuobjdump():
    try:
        import triton

        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(cand):
            return cand
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def _sources():
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(CUDA_DIR, "*.cu")))


def compile_cu(name: str, arch: str) -> str:
    """Path of the object for csrc/cuda/<name> on `arch`, compiled now unless cached."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    includes = ["-I" + os.path.join(ROOT, "csrc")]
    if name in NEEDS_CUTLASS:
        inc = _cutlass_include()
        if inc is None:
            pytest.skip("CUTLASS headers not found: pip install nvidia-cutlass (or set ERNIE_CUTLASS_INCLUDE)")
        includes.append("-I" + inc)
    cmd = [nvcc, *FLAGS, ARCHS[arch], *includes, "-c", os.path.join(CUDA_DIR, name)]
    h = hashlib.sha256(" ".join(cmd[1:]).encode())
    h.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    for dep in sorted(glob.glob(os.path.join(CUDA_DIR, "*"))):
        with open(dep, "rb") as f:
            h.update(f.read())
    obj = os.path.join(CACHE, f"{name[:-3]}-{arch}-{h.hexdigest()[:16]}.o")
    if not os.path.exists(obj):
        os.makedirs(CACHE, exist_ok=True)
        proc = subprocess.run(cmd + ["-o", obj + ".tmp"], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"nvcc failed for {name} ({arch}):\n{proc.stderr[-6000:]}"
        os.replace(obj + ".tmp", obj)
    return obj


def test_every_cu_is_known():
    assert "flashmask_fwd_sm90.cu" in _sources()
    assert {"flashmask_sm80.cu", "flashmask_prep.cu", "rope.cu", "cross_entropy.cu"} <= set(_sources())


def test_hopper_attention_uses_wgmma():
    obj = compile_cu("flashmask_fwd_sm90.cu", "sm_90a")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (install triton or the nvidia-cuda-cuobjdump wheel)")
    sass = subprocess.run([tool, "--dump-sass", obj], capture_output=True, text=True, timeout=300).stdout
    n = sass.count("HGMMA")
    assert n > 0, "the sm_90a FlashMask kernel has no HGMMA (wgmma) instruction in its SASS"
    assert "LDL" not in sass and "STL" not in sass, "the sm_90a FlashMask kernel spills registers to local memory"


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("name", _sources())
def test_cu_compiles(name, arch):
    assert os.path.getsize(compile_cu(name, arch)) > 0
