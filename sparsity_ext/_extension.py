"""Loads the compiled extension sparsity_ext._C (its import registers torch.ops.sparsity_ext.*), and registers
its kernels as the "cpu" and "cuda" backends of sparsity_ext's dispatch (sparsity_ext._backend)."""
import os
import warnings

import torch

from . import _backend, _composites

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the repository "
    "(needs a C++ compiler; CUDA kernels also need a CUDA build of torch and nvcc)"
)


def _missing_cpu_features() -> list[str]:
    """The CPU features the kernels were built for (setup.py's -march) that this CPU lacks: loading them
    there would die of an illegal instruction, so they are not loaded."""
    try:
        from sparsity_ext._build_config import CPU_ARCH_FLAGS
    except ImportError:  # built otherwise (CMake): nothing recorded to check
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return []
    return [] if flags is None else [flag for flag in CPU_ARCH_FLAGS if flag not in flags]


load_error: str | None = None
try:
    if os.environ.get("SPARSITY_EXT_USE_CPP", "1") == "0":
        raise ImportError("disabled by SPARSITY_EXT_USE_CPP=0")
    if missing := _missing_cpu_features():
        raise ImportError(f"built for a CPU with {', '.join(missing)}, which this one lacks; rebuild it here "
                          f"(SPARSITY_EXT_CPU_ARCH=none builds for any x86-64)")
    from sparsity_ext import _C  # noqa: F401  (imported for its op registrations)
    from sparsity_ext import _fake
    _fake.register_with_torch()
except ImportError as exc:  # never break import: the reference ops serve every call
    load_error = str(exc)
    warnings.warn(f"sparsity_ext: compiled kernels unavailable ({load_error}); using the pure-torch reference "
                  f"ops. To get them, {BUILD_HINT}.", RuntimeWarning, stacklevel=2)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when the extension registered a kernel for torch.ops.sparsity_ext.<op> under dispatch_key."""
    if load_error is not None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsity_ext::{op}", dispatch_key)
    except RuntimeError:
        return False


def _compiled_op(op: str):
    def run(*args):
        return getattr(torch.ops.sparsity_ext, op)(*args)
    run.__name__ = f"compiled_{op}"
    return run


def _register_backends() -> None:
    """The "cpu" and "cuda" backends: torch.ops.sparsity_ext.<op> for every op with a kernel under that
    dispatch key, composites for the rest; every op marked not built, with the reason, where the backend has
    no kernel at all. Asked of the dispatcher once, here, so that dispatch never calls into it."""
    for backend, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        kernels = [op for op in _backend.OP_NAMES if has_kernel(op, key)]
        why = load_error or ("this torch has no CUDA" if key == "CUDA" and torch.version.cuda is None
                             else f"the {key} kernels were not compiled")
        reason = "" if kernels else f"{why}; {BUILD_HINT}"
        for op in (kernels or _backend.OP_NAMES):
            _backend.register(op, backend, _compiled_op(op), devices=(backend,), dtypes=_backend.KERNEL_DTYPES[op],
                              available=bool(kernels), unavailable_reason=reason)
        _composites.register_for(backend, (backend,), bool(kernels), reason)


_register_backends()
