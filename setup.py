"""Builds sparsity_ext._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA.

Environment overrides (read at build time):
  SPARSITY_EXT_USE_CPP=0   build no extension at all (the pure-torch reference serves every op)
  FORCE_CUDA=1             build the CUDA kernels even if torch.cuda.is_available() is False
                           (the default already builds them whenever torch.version.cuda and CUDA_HOME
                           are set: a build machine needs no GPU)
  SPARSITY_EXT_NO_CUDA=1   skip the CUDA kernels even where they could be built
  TORCH_CUDA_ARCH_LIST     GPU architectures (default "9.0" here: the H100 this project targets)
  SPARSITY_EXT_CPU_ARCH    -march of the C++ CPU kernels: default x86-64-v3 (AVX2) on an x86-64 Linux machine
                           whose CPU has it, none elsewhere; "none" for the compiler's baseline (to run the
                           build on older CPUs), or any -march value such as "native"
"""
import glob
import os
import platform
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[sparsity_ext setup] {msg}", file=sys.stderr)


# x86-64-v3's CPU features, as /proc/cpuinfo names them (sparsity_ext/_extension.py checks them at import).
X86_64_V3_FLAGS = ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave", "abm")


def _cpu_arch() -> str | None:
    """-march for the CPU kernels. x86-64-v3 by default where this machine runs it: the kernels' loops over
    blocks vectorize in 8 lanes instead of SSE2's 4 (2:4 masks ~1.5x faster). Results are the same: no
    -ffast-math, no contraction (-ffp-contract=off), so every float operation rounds as before."""
    arch = os.environ.get("SPARSITY_EXT_CPU_ARCH")
    if arch is not None:
        return None if arch in ("", "none") else arch
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    if not all(flag in flags for flag in X86_64_V3_FLAGS):
        return None
    # GCC < 11 and clang < 12 do not know the name: build for the baseline rather than fail
    compiler = os.environ.get("CXX", "c++")
    try:
        probe = subprocess.run([compiler, "-march=x86-64-v3", "-x", "c++", "-E", "-o", os.devnull, os.devnull],
                               capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return "x86-64-v3" if probe.returncode == 0 else None


def _write_build_config(cpu_arch: str | None) -> None:
    """sparsity_ext/_build_config.py: what _extension.py checks before it loads the kernels."""
    with open(os.path.join(ROOT, "sparsity_ext", "_build_config.py"), "w") as f:
        f.write('"""Written by setup.py when it builds sparsity_ext._C."""\n'
                f"CPU_ARCH = {cpu_arch!r}\nCPU_ARCH_FLAGS = {X86_64_V3_FLAGS if cpu_arch == 'x86-64-v3' else ()!r}\n")


def _extensions():
    if os.environ.get("SPARSITY_EXT_USE_CPP", "1") == "0":
        _log("SPARSITY_EXT_USE_CPP=0: building no extension; the reference ops will serve")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _log("torch is not importable at build time: building no extension. Install torch first and "
             "use `pip install --no-build-isolation -e .`")
        return [], {}

    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
               + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    cuda_sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]

    want_cuda = os.environ.get("SPARSITY_EXT_NO_CUDA", "0") != "1" and bool(cuda_sources)
    if want_cuda and not (torch.version.cuda and CUDA_HOME):
        why = "torch is a CPU build" if not torch.version.cuda else "CUDA_HOME (nvcc) was not found"
        _log(f"skipping the CUDA kernels: {why}")
        want_cuda = False
    if want_cuda and os.environ.get("FORCE_CUDA", "0") != "1" and not torch.cuda.is_available():
        _log("no GPU visible; building the CUDA kernels anyway (torch has CUDA and nvcc is present)")

    # No -std here: torch's BuildExtension adds the standard its own headers and libraries were built
    # for (C++20 in current releases). Forcing an older one compiled, but an extension whose c10 types
    # disagree with libc10's crashed on the first TORCH_CHECK that threw (seen with torch 2.11 on a GPU).
    cxx_flags = ["-O3", "-ffp-contract=off"]
    cpu_arch = _cpu_arch()
    if cpu_arch:
        cxx_flags.append(f"-march={cpu_arch}")
    _write_build_config(cpu_arch)
    _log(f"CPU kernels for -march={cpu_arch or '(compiler default)'}")
    extra_link = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")  # at::parallel_for's OpenMP pragmas live in the headers
        extra_link.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]

    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        ext = CUDAExtension(
            "sparsity_ext._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("SPARSITY_EXT_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                # -fmad=false: block scores must round exactly like the CPU kernels and avg_pool2d
                "nvcc": ["-O3", "-fmad=false", "-lineinfo", "--expt-relaxed-constexpr"],
            },
            extra_link_args=extra_link,
        )
        _log(f"building CPU + CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        ext = CppExtension(
            "sparsity_ext._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link,
        )
        _log("building the C++ CPU kernels")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
