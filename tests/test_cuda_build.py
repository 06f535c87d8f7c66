"""The torch-free CUDA kernels (csrc/cuda/*.cu) compile with nvcc for Hopper (sm_90a) and Ampere
(sm_80); the Hopper attention kernels' machine code uses wgmma (HGMMA in SASS), the forward loads
with TMA (UTMALDG), neither spills (ptxas's register report is printed: run with -s to see it).
The CUDA binding takes exactly the CPU binding's arguments, and the dropout keep mask the CUDA
kernels include (csrc/common/dropout_hash.h) is bit-equal to the reference's. No GPU needed.

Objects are cached under build/cuda_build/, keyed by a hash of the sources, headers, flags and nvcc
version, so reruns cost nothing; the full matrix (every file x both targets, ~2 minutes cold on two
cores) is marked slow, the Hopper attention checks are not.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
CACHE = os.path.join(ROOT, "build", "cuda_build")
ARCHS = {"sm_90a": "-gencode=arch=compute_90a,code=sm_90a", "sm_80": "-gencode=arch=compute_80,code=sm_80"}
FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-Xptxas", "-v"]
NEEDS_CUTLASS = {"flashmask_fwd_sm90.cu", "flashmask_bwd_sm90.cu"}


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
    for dep in sorted(glob.glob(os.path.join(CUDA_DIR, "*")) + glob.glob(os.path.join(ROOT, "csrc", "common", "*.h"))):
        if os.path.isfile(dep):
            with open(dep, "rb") as f:
                h.update(f.read())
    obj = os.path.join(CACHE, f"{name[:-3]}-{arch}-{h.hexdigest()[:16]}.o")
    if not os.path.exists(obj):
        os.makedirs(CACHE, exist_ok=True)
        proc = subprocess.run(cmd + ["-o", obj + ".tmp"], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"nvcc failed for {name} ({arch}):\n{proc.stderr[-6000:]}"
        with open(obj + ".ptxas.txt", "w") as f:  # ptxas -v: registers and spills per kernel
            f.write(proc.stderr)
        os.replace(obj + ".tmp", obj)
    return obj


def build_host_test(name: str) -> str:
    """Executable of csrc/cuda/test/<name> (host code only: runs without a GPU), cached like objects."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    inc = _cutlass_include()
    if inc is None:
        pytest.skip("CUTLASS headers not found: pip install nvidia-cutlass (or set ERNIE_CUTLASS_INCLUDE)")
    src = os.path.join(CUDA_DIR, "test", name)
    cmd = [nvcc, "-std=c++17", "-O1", "--expt-relaxed-constexpr", "-I" + os.path.join(ROOT, "csrc"), "-I" + inc, src]
    h = hashlib.sha256(" ".join(cmd[1:]).encode())
    h.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    for dep in sorted(glob.glob(os.path.join(CUDA_DIR, "*")) + glob.glob(os.path.join(CUDA_DIR, "test", "*"))
                      + glob.glob(os.path.join(ROOT, "csrc", "common", "*.h"))):
        if os.path.isfile(dep):
            with open(dep, "rb") as f:
                h.update(f.read())
    exe = os.path.join(CACHE, f"{name[:-3]}-{h.hexdigest()[:16]}")
    if not os.path.exists(exe):
        os.makedirs(CACHE, exist_ok=True)
        proc = subprocess.run(cmd + ["-o", exe + ".tmp"], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"nvcc failed for {name}:\n{proc.stderr[-6000:]}"
        os.replace(exe + ".tmp", exe)
    return exe


def ptxas_report(obj: str) -> dict[str, tuple[int, int, int]]:
    """{kernel (mangled): (registers, spill store bytes, spill load bytes)} from the cached ptxas -v log."""
    with open(obj + ".ptxas.txt") as f:
        text = f.read()
    out, name = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            out[name] = [0, int(m.group(1)), int(m.group(2))]
        m = re.search(r"Used (\d+) registers", line)
        if m and name in out:
            out[name][0] = int(m.group(1))
    return {k: tuple(v) for k, v in out.items()}


def _sass(obj: str) -> str:
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (install triton or the nvidia-cuda-cuobjdump wheel)")
    return subprocess.run([tool, "--dump-sass", obj], capture_output=True, text=True, timeout=300).stdout


def test_every_cu_is_known():
    assert {"flashmask_fwd_sm90.cu", "flashmask_bwd_sm90.cu"} <= set(_sources())
    assert {"flashmask_sm80.cu", "flashmask_prep.cu", "rope.cu", "cross_entropy.cu"} <= set(_sources())


@pytest.mark.parametrize(
    "name, needs",
    [("flashmask_fwd_sm90.cu", ("HGMMA", "UTMALDG")), ("flashmask_bwd_sm90.cu", ("HGMMA", "REDG.E.ADD.F32x2"))],
)
def test_hopper_attention_sass(name, needs):
    """wgmma (HGMMA), the forward's TMA loads (UTMALDG) and the backward's vector dQ atomics are in the
    machine code; no kernel spills. Prints ptxas's register report (pytest -s)."""
    obj = compile_cu(name, "sm_90a")
    sass = _sass(obj)
    counts = {op: sass.count(op) for op in needs}
    report = ptxas_report(obj)
    print(f"\n{name} (sm_90a): SASS counts {counts}")
    for kernel, (regs, st, ld) in sorted(report.items()):
        print(f"  ptxas: {kernel}: {regs} registers, spill stores {st} B, spill loads {ld} B")
    for op, n in counts.items():
        assert n > 0, f"{name}: no {op} instruction in the sm_90a SASS"
    assert report, f"{name}: no ptxas report"
    spills = {k: v for k, v in report.items() if v[1] or v[2]}
    assert not spills, f"{name}: kernels spill registers: {spills}"
    assert not re.search(r"\b(LDL|STL)\b", sass), f"{name}: local-memory loads/stores in the sm_90a SASS"


# ---- index math of the kernels, run on the host ---------------------------------------------------

def test_hopper_index_math_on_host():
    """The Hopper kernels' CuTe layouts and MMA partitions (csrc/cuda/test/host_layout_test.cu): transposed
    views, TMA's 128-byte swizzle = the tiles wgmma reads = the backward's cp.async destinations,
    accumulator coverage / pairs / row slots / quads, the forward's P-as-A-operand regrouping."""
    exe = build_host_test("host_layout_test.cu")
    proc = subprocess.run([exe], capture_output=True, text=True, timeout=120)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def _mask_cases():
    from test_ops_flashmask_attention import (document_lts, global_token_docs, prefix_lm, share_prompt_lts,
                                              sliding_window, to_idx)

    S = 600  # not a multiple of any tile: padding rows and columns in the last blocks
    docs = [130, 70, 200, 111, 40]  # 551 tokens, then padding columns
    yield "causal", None, True, S
    yield "full", None, False, S
    yield "documents", to_idx(document_lts(docs, S), B=2), True, S
    yield "share_prompt", to_idx(share_prompt_lts([(100, 90, 80), (60, 150, 70)], S)), True, S
    yield "sliding", to_idx(*sliding_window(docs, S, 150)), True, S
    yield "prefix_lm", to_idx(*prefix_lm(S, 230)), False, S
    yield "global_docs", to_idx(*global_token_docs(docs, S)), False, S
    # Per-kv-head masks (Hm = 2): two different document splits.
    a, b = to_idx(document_lts(docs, S)), to_idx(document_lts([300, 250], S))
    yield "per_head_documents", torch.cat([a, b], dim=1), True, S


@pytest.mark.parametrize("case", list(_mask_cases()), ids=lambda c: c[0])
def test_mask_plan_on_host_matches_reference(case, tmp_path):
    """The CUDA kernels' FlashMask plan (column spans, min/max table, tile classification; their own
    __host__ __device__ code in flashmask_mask.cuh, run by csrc/cuda/test/host_mask_test.cu): the element
    mask equals the reference's dense mask, and no tile of the forward / backward geometries is
    classified skipped while it has a visible element or unmasked while it hides one."""
    from ernie_core.ops.reference import startend_row_indices_to_mask

    name, idx, causal, S = case
    exe = build_host_test("host_mask_test.cu")
    if idx is None:
        B, Hm, n, flat = 1, 1, 0, []
        want = torch.ones(S, S, dtype=torch.bool).tril() if causal else torch.ones(S, S, dtype=torch.bool)
        want = want.view(1, 1, S, S)
    else:
        B, Hm, _, n = idx.shape
        flat = idx.reshape(-1).tolist()
        want = startend_row_indices_to_mask(idx, causal)
    path = tmp_path / "idx.txt"
    path.write_text(f"{B} {Hm} {S} {n} {int(causal)}\n" + " ".join(map(str, flat)) + "\n")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=300)
    lines, rc = proc.stdout.splitlines(), proc.returncode
    assert rc == 0, lines[-1] if lines else proc.stderr
    got = torch.tensor([[c == "1" for c in line] for line in lines[:-1]]).view(B, Hm, S, S)
    assert torch.equal(got, want), f"{name}: the kernels' element mask differs from the reference"
    skipped, unmasked, partial = (int(x) for x in re.findall(r"\d+", lines[-1]))
    print(f"{name}: tiles skipped {skipped}, unmasked {unmasked}, partial {partial}")
    if causal or name == "global_docs":
        assert skipped > 0, "a test mask with hidden blocks should skip some tiles"


# ---- the dropout keep mask shared by the CPU and CUDA kernels -----------------------------------

def _build_hash_dump(compiler: str, tmp_path) -> str:
    src = os.path.join(ROOT, "csrc", "common", "test", "dropout_hash_dump.cpp")
    exe = str(tmp_path / f"dump_{compiler}")
    if compiler == "g++":
        cxx = shutil.which("g++")
        if cxx is None:
            pytest.skip("no g++")
        cmd = [cxx, "-std=c++17", "-O2", "-I" + os.path.join(ROOT, "csrc"), src, "-o", exe]
    else:  # nvcc: compiled as CUDA source, so the __host__ __device__ definitions are the ones tested
        nvcc = _nvcc()
        if nvcc is None:
            pytest.skip("nvcc not found")
        cmd = [nvcc, "-std=c++17", "-O2", "-x", "cu", "-I" + os.path.join(ROOT, "csrc"), src, "-o", exe]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


@pytest.mark.parametrize("compiler", ["g++", "nvcc"])
def test_dropout_hash_header_matches_reference(compiler, tmp_path):
    from ernie_core.ops.reference import dropout_keep_mask, dropout_threshold

    exe = _build_hash_dump(compiler, tmp_path)
    # Negative int64 seeds/offsets (torch draws them) become uint64 words; odd S checks the column pairs.
    for seed, offset, B, H, S, p in [(5, 7, 1, 2, 33, 0.5), (-(2**63), 2**40 + 3, 2, 3, 21, 0.1),
                                      (123456789, -1, 1, 1, 64, 0.9), (1, 0, 1, 1, 9, 0.0), (2, 2, 1, 1, 9, 1.0)]:
        out = subprocess.run([exe, str(seed), str(offset), str(B), str(H), str(S), repr(p)], capture_output=True,
                             text=True, timeout=60, check=True).stdout.splitlines()
        got = torch.tensor([[c == "1" for c in line] for line in out[:-1]]).view(B, H, S, S)
        want = dropout_keep_mask(torch.tensor([seed, offset], dtype=torch.int64), B, H, S, p)
        assert torch.equal(got, want), f"{compiler}: keep mask differs for seed={seed} offset={offset} p={p}"
        thr = int(out[-1].split()[1])
        assert thr == min(dropout_threshold(p), 2**32 - 1)  # the kernels saturate 2^32 (p = 1: scale 0 anyway)
        if 0.0 < p < 1.0:
            assert 0.2 < got.float().mean().item() / (1 - p) < 1.8  # the mask is not trivially all-kept


# ---- the CUDA binding takes the CPU binding's arguments -----------------------------------------

_SCHEMA_TYPES = {"Tensor": "const at::Tensor&", "Tensor?": "const std::optional<at::Tensor>&", "bool": "bool",
                 "float": "double", "int": "int64_t"}


def _schema_args(op: str) -> list[tuple[str, str]]:
    with open(os.path.join(ROOT, "python", "ops.cpp")) as f:
        text = re.sub(r'"\s*"', "", f.read())  # join adjacent string literals
    m = re.search(r'm\.def\("' + op + r"\((.*?)\) ->", text)
    assert m, f"no schema for {op} in python/ops.cpp"
    args = m.group(1)
    out = []
    for a in args.split(","):
        typ, name = a.strip().split()[:2]
        out.append((_SCHEMA_TYPES[typ], name.split("=")[0]))
    return out


def _impl_params(func: str) -> list[tuple[str, str]]:
    with open(os.path.join(ROOT, "python", "flashmask_cuda.cpp")) as f:
        text = f.read()
    m = re.search(r"\b" + func + r"\((.*?)\)\s*\{", text, re.S)
    assert m, f"no {func} in python/flashmask_cuda.cpp"
    out = []
    for a in re.sub(r"\s+", " ", m.group(1)).split(", "):
        typ, name = a.strip().rsplit(" ", 1)
        out.append((typ.replace("& ", "&").strip(), name.rstrip("_")))
    return out


@pytest.mark.parametrize("op, func", [("flashmask_fwd", "flashmask_fwd_cuda"), ("flashmask_bwd", "flashmask_bwd_cuda")])
def test_cuda_binding_takes_the_schema_arguments(op, func):
    """The CUDA impls registered for ernie_core_C::flashmask_fwd/bwd take the schema's arguments (the
    CPU binding's: dlse, dropout_p, seed, offset), in order and with the C++ types torch passes. The
    registration itself is only checked by torch when a CUDA build loads, so this guards it here."""
    schema = _schema_args(op)
    params = _impl_params(func)
    assert [t for t, _ in params] == [t for t, _ in schema], f"{func}: {params} vs schema {schema}"
    assert [n for _, n in params] == [n if n != "startend_row_indices" else "idx" for _, n in schema]
    with open(os.path.join(ROOT, "python", "flashmask_cuda.cpp")) as f:
        assert f'm.impl("{op}", &ernie_bind_cuda::{func});' in f.read()


def test_cuda_binding_compiles(tmp_path):
    """python/flashmask_cuda.cpp compiles against torch's headers (syntax and types: this torch has no
    CUDA libraries to link). CPU torch lacks one generated CUDA header; an empty stand-in replaces it."""
    from torch.utils import cpp_extension

    cxx = shutil.which("g++")
    homes = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    incs = [os.path.join(h, "include") for h in homes if h and os.path.exists(os.path.join(h, "include", "cuda_runtime.h"))]
    if cxx is None or not incs:
        pytest.skip("needs g++ and the CUDA toolkit headers")
    cuda_inc = incs[0]

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-w", *("-I" + p for p in cpp_extension.include_paths()),
           "-I" + str(tmp_path), "-I" + cuda_inc, "-I" + os.path.join(ROOT, "csrc"),
           os.path.join(ROOT, "python", "flashmask_cuda.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("name", _sources())
def test_cu_compiles(name, arch):
    assert os.path.getsize(compile_cu(name, arch)) > 0
