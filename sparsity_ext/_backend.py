"""The one dispatch table: which implementation of each op runs for a given tensor.

Each backend registers its own implementations of the ops it has a kernel for:
  - "reference" (pure torch, the oracle, every op): registered here, below;
  - "cpu" / "cuda" (the compiled extension, torch.ops.sparsity_ext.*): sparsity_ext._extension, from what
    the extension registered with torch's dispatcher at load time;
  - "triton": sparsity_ext.triton.
An op a backend has no kernel for gets a named composite of that backend's other ops
(sparsity_ext._composites), so each (op, backend) has exactly one implementation or none.

"auto" (the default) picks, for the tensor's device type, the first backend in AUTO_ORDER that is
available and supports the dtype; an explicit choice (`use_backend(name)` or SPARSITY_EXT_BACKEND=name)
uses that backend or raises why it cannot. Meta (shape-only) tensors get the op's fake implementation
(sparsity_ext._fake), whatever the choice. Resolution reads only Python state fixed at registration,
so torch.compile traces through it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Callable, Iterator

import torch

from . import _fake, reference
from .semi_structured import reference as _semi_structured_reference
from .semi_structured._layout import PACK_DTYPES

BACKENDS = ("reference", "cpu", "cuda", "triton")
AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}
OP_NAMES = ("block_norm_mask", "block_norm_mask_apply_", "block_norm_mask_into_", "block_norm_mask_update_",
            "block_scores", "block_norm_mask_select", "nm_mask", "select_threshold", "apply_mask_", "pack_mask",
            "unpack_mask", "sparsify_24_pack")
# The dtypes the compiled kernels take: float data in fp32/fp16/bf16 for the ops that score it (fp64 data, rare
# in practice, is scored by the reference); any dtype its wrapper validates for the mask-format ops and
# apply_mask_; sparsify_24_pack torch's semi-structured dtypes. The Triton kernels take the same, but for
# apply_mask_ only fp32/fp16/bf16 (TRITON_DTYPES).
FLOAT_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_DTYPES: dict[str, tuple[torch.dtype, ...] | None] = {
    **{op: FLOAT_KERNEL_DTYPES for op in OP_NAMES},
    "apply_mask_": None, "pack_mask": None, "unpack_mask": None, "sparsify_24_pack": PACK_DTYPES,
}
TRITON_DTYPES = {**KERNEL_DTYPES, "apply_mask_": FLOAT_KERNEL_DTYPES}


@dataclasses.dataclass(frozen=True)
class Impl:
    fn: Callable
    devices: tuple[str, ...]                # device types this implementation accepts
    dtypes: tuple[torch.dtype, ...] | None  # None: every dtype the op's contract accepts
    available: bool                         # e.g. "was the kernel compiled", fixed when registered
    unavailable_reason: str = ""
    composite: str | None = None            # the composite's description; None for a backend's own kernel


_registry: dict[str, dict[str, Impl]] = {}
_local = threading.local()


def register(op: str, backend: str, fn: Callable, *, devices: tuple[str, ...],
             dtypes: tuple[torch.dtype, ...] | None = None, available: bool = True,
             unavailable_reason: str = "", composite: str | None = None) -> None:
    """Make `fn` backend's implementation of `op` (replacing any earlier one)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if op not in OP_NAMES:
        raise ValueError(f"unknown op {op!r}; expected one of {OP_NAMES}")
    _registry.setdefault(op, {})[backend] = Impl(fn, devices, dtypes, available, unavailable_reason, composite)


def implementation(op: str, backend: str) -> Impl | None:
    return _registry.get(op, {}).get(backend)


def _check_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown sparsity_ext backend {name!r}; expected 'auto' or one of {BACKENDS}")
    return name


def current_backend() -> str:
    """The backend in force: the innermost use_backend(), else SPARSITY_EXT_BACKEND, else 'auto'."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _check_name(os.environ.get("SPARSITY_EXT_BACKEND", "auto").strip() or "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed sparsity_ext ops on backend `name` ('auto', 'reference', 'cpu', 'cuda', 'triton')."""
    _check_name(name)
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _why_not(op: str, backend: str, impl: Impl | None, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when impl can run op on (device, dtype); else the reason it cannot."""
    if impl is None:
        return f"backend {backend!r} has no implementation of {op}"
    if device.type not in impl.devices:
        return f"backend {backend!r} runs {op} on {'/'.join(impl.devices)} tensors, not {device.type}"
    if impl.dtypes is not None and dtype not in impl.dtypes:
        return f"backend {backend!r} does not support dtype {dtype} for {op}"
    if not impl.available:
        return f"backend {backend!r} is not available: {impl.unavailable_reason}"
    return None


def resolve(op: str, device: torch.device, dtype: torch.dtype) -> tuple[str, Callable]:
    """(backend name, implementation) that runs `op` for a tensor on `device` with `dtype`."""
    if device.type == "meta":  # shapes only, like torch's own ops on meta tensors: in-place ops do nothing
        return "meta", _fake.FAKES[op]
    impls = _registry.get(op, {})
    chosen = current_backend()
    if chosen != "auto":
        reason = _why_not(op, chosen, impls.get(chosen), device, dtype)
        if reason is not None:
            raise RuntimeError(f"sparsity_ext: cannot run {op} on the requested backend: {reason}")
        return chosen, impls[chosen].fn
    for name in AUTO_ORDER.get(device.type, ("reference",)):
        if _why_not(op, name, impls.get(name), device, dtype) is None:
            return name, impls[name].fn
    raise RuntimeError(f"sparsity_ext: no backend runs {op} for {device.type} tensors of dtype {dtype}")


def call(op: str, like: torch.Tensor, *args):
    """Run `op` on the implementation chosen for `like`'s device and dtype (the public wrappers validate first)."""
    return resolve(op, like.device, like.dtype)[1](*args)


def describe(op: str, backend: str) -> str:
    """What runs `op` on `backend`: 'kernel', 'torch ops' (the reference), 'composite: <how>', 'not built: <why>'
    or '-' (nothing)."""
    impl = implementation(op, backend)
    if impl is None:
        return "-"
    if not impl.available:
        return "not built: " + impl.unavailable_reason
    if impl.composite:
        return f"composite: {impl.composite}"
    return "torch ops" if backend == "reference" else "kernel"


def backend_table() -> dict[str, dict[str, str]]:
    """{op: {backend: describe(op, backend)}} for info()."""
    return {op: {backend: describe(op, backend) for backend in BACKENDS} for op in OP_NAMES}


# The reference backend: every op, on any device, in pure torch.
for _op in OP_NAMES:
    register(_op, "reference", getattr(_semi_structured_reference if _op == "sparsify_24_pack" else reference, _op),
             devices=("cpu", "cuda"))
