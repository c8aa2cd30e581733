"""Backend registry: which implementation of each op runs for a given tensor.

Every op has a "reference" implementation (pure torch, the oracle). Compiled and Triton backends
register theirs with `register`. "auto" (the default) picks, for the tensor's device type, the first
backend in AUTO_ORDER that is available and supports the dtype; an explicit choice
(`use_backend(name)` or SPARSITY_EXT_BACKEND=name) uses that backend or raises why it cannot.
Meta (shape-only) tensors always get the op's fake implementation (sparsity_ext._fake), whatever the choice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Callable, Iterator

import torch

from . import _fake

BACKENDS = ("reference", "cpu", "cuda", "triton")
AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}


@dataclasses.dataclass(frozen=True)
class Impl:
    fn: Callable
    devices: tuple[str, ...]            # device types this implementation accepts
    dtypes: tuple[torch.dtype, ...] | None  # None: every dtype the op's contract accepts
    available: Callable[[], bool]       # e.g. "was the kernel compiled"
    unavailable_reason: Callable[[], str]


_registry: dict[str, dict[str, Impl]] = {}
_local = threading.local()


def register(op: str, backend: str, fn: Callable, *, devices: tuple[str, ...],
             dtypes: tuple[torch.dtype, ...] | None = None,
             available: Callable[[], bool] = lambda: True,
             unavailable_reason: Callable[[], str] = lambda: "") -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _registry.setdefault(op, {})[backend] = Impl(fn, devices, dtypes, available, unavailable_reason)


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
    if not impl.available():
        return f"backend {backend!r} is not available: {impl.unavailable_reason()}"
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



def runs_on_a_kernel(op: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the current choice runs `op` here without the reference: False as well where a pinned backend
    has no implementation of it. For callers choosing a fused path, which pays only on a compiled kernel."""
    try:
        return resolve(op, device, dtype)[0] != "reference"
    except RuntimeError:
        return False

def backend_table() -> dict[str, dict[str, str]]:
    """{op: {backend: 'yes' or the reason it is unavailable}} for info()."""
    table: dict[str, dict[str, str]] = {}
    for op, impls in sorted(_registry.items()):
        row = {}
        for backend in BACKENDS:
            impl = impls.get(backend)
            if impl is None:
                row[backend] = "-"
            elif not impl.available():
                row[backend] = "not built: " + impl.unavailable_reason()
            else:
                row[backend] = "yes"
        table[op] = row
    return table
