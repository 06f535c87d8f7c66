"""Builds ernie_core._C: the C++ kernels (csrc/) and their torch bindings (python/).

CPU kernels always; CUDA kernels (csrc/cuda/*.cu + python/*_cuda.cpp) only when torch has CUDA
and CUDA_HOME is set (ERNIE_CORE_CPU_ONLY=1 skips them; TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0a";
the CUTLASS/CuTe headers come from the nvidia-cutlass wheel or $ERNIE_CUTLASS_INCLUDE). Only python/*.cpp include torch, so few translation units pay for the torch
headers; ninja compiles MAX_JOBS (default 2) of them at a time.

    pip install --no-build-isolation -e .        # after torch is installed
    ERNIE_CORE_CPU_ARCH=x86-64-v3 pip install ... # portable build instead of -march=native
"""
import glob
import os

from setuptools import setup

os.environ.setdefault("MAX_JOBS", "2")

from torch.utils import cpp_extension  # noqa: E402  (MAX_JOBS must be set before BuildExtension reads it)

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cpu_flags():
    # -march=native: the kernels' vector-extension code then uses AVX-512 where the build machine
    # has it (the machine that builds is the one that runs: editable installs). 512-bit vectors
    # are preferred because the micro-kernels keep 16 accumulators of 16 floats in registers.
    arch = os.environ.get("ERNIE_CORE_CPU_ARCH", "native")
    return ["-O3", "-fopenmp", f"-march={arch}", "-mprefer-vector-width=512", "-DNDEBUG",
            "-Wno-psabi", "-fno-math-errno", "-fno-trapping-math"]


def _with_cuda():
    import torch

    if os.environ.get("ERNIE_CORE_CPU_ONLY"):
        return False
    return torch.cuda.is_available() or (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None)


def _cutlass_include():
    """CUTLASS/CuTe headers for the Hopper kernel: $ERNIE_CUTLASS_INCLUDE, else the `nvidia-cutlass`
    wheel's copy (`pip install --no-deps nvidia-cutlass`, as `make` does), else build/cutlass/."""
    env = os.environ.get("ERNIE_CUTLASS_INCLUDE")
    candidates = [env] if env else []
    try:
        import cutlass_library

        candidates.append(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))
    except ImportError:
        pass
    candidates.append(os.path.join(ROOT, "build", "cutlass", "cutlass_library", "source", "include"))
    for inc in candidates:
        if inc and os.path.isdir(os.path.join(inc, "cute")):
            return inc
    raise SystemExit("ernie_core: building the CUDA kernels needs the CUTLASS headers: pip install --no-deps "
                     "nvidia-cutlass==4.2.0.0, or set ERNIE_CUTLASS_INCLUDE=<dir holding cute/ and cutlass/>, "
                     "or build CPU-only with ERNIE_CORE_CPU_ONLY=1")


def extensions():
    cpu_sources = [p for p in _rel("python/*.cpp") if not p.endswith("_cuda.cpp")] + _rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    flags = {"cxx": _cpu_flags()}
    if _with_cuda() and (_rel("csrc/cuda/*.cu") or _rel("python/*_cuda.cpp")):
        # Hook for the GPU kernels: their sources, flags and arch list are filled in by that work.
        sources = cpu_sources + _rel("python/*_cuda.cpp") + _rel("csrc/cuda/*.cu")
        # Hopper (wgmma needs the arch-specific sm_90a target) and Ampere unless the user chose.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        include_dirs.append(_cutlass_include())
        flags["nvcc"] = ["-O3", "--use_fast_math", "-std=c++17", "--expt-relaxed-constexpr", "-DERNIE_CORE_WITH_CUDA"]
        flags["cxx"].append("-DERNIE_CORE_WITH_CUDA")
        return [cpp_extension.CUDAExtension("ernie_core._C", sources, include_dirs=include_dirs,
                                            extra_compile_args=flags, extra_link_args=["-fopenmp"])]
    return [cpp_extension.CppExtension("ernie_core._C", cpu_sources, include_dirs=include_dirs,
                                       extra_compile_args=flags, extra_link_args=["-fopenmp"])]


class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    def finalize_options(self):
        super().finalize_options()
        # A fixed build folder (pip's editable builds otherwise use a fresh temporary one), so ninja
        # recompiles only what changed on the next `pip install -e .`.
        self.build_temp = os.path.join(ROOT, "build", "temp")


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
