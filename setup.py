"""Builds sparsity_ext._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA.

Environment overrides (read at build time):
  SPARSITY_EXT_USE_CPP=0   build no extension at all (the pure-torch reference serves every op)
  FORCE_CUDA=1             build the CUDA kernels even if torch.cuda.is_available() is False
                           (the default already builds them whenever torch.version.cuda and CUDA_HOME
                           are set: a build machine needs no GPU)
  SPARSITY_EXT_NO_CUDA=1   skip the CUDA kernels even where they could be built
  TORCH_CUDA_ARCH_LIST     GPU architectures (default "9.0" here: the H100 this project targets)
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[sparsity_ext setup] {msg}", file=sys.stderr)


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
