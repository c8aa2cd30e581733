"""Argument checks shared by the public ops (sparsity_ext.ops), the sparsifier classes, accelerate and
the distributed engine: one message per mistake, raised before any kernel runs or any mask changes.

Each check takes `where` (the op or class named in the message) and returns the validated value.
The C++ ops check their arguments again (csrc/common/op_args.h); these run first so that Python callers
get a TypeError/ValueError naming their own call rather than a RuntimeError from a kernel.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

__all__ = ["FLOAT_DTYPES", "check_tensor", "check_float_data", "check_int", "check_block_shape", "check_zeros",
           "check_level", "check_mask_format", "parse_norm", "rows_readable_in_place"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_NORM_NAMES = {"L1": 1, "L2": 2}


def check_tensor(name: str, t, where: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_float_data(data, where: str, dims: tuple[int, ...] = (1, 2)) -> None:
    check_tensor("data", data, where)
    if data.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: data must be one of {[str(d) for d in FLOAT_DTYPES]}, got {data.dtype}")
    if data.dim() not in dims:
        raise ValueError(f"{where}: data must be {' or '.join(f'{d}-D' for d in dims)}, "
                         f"got shape {tuple(data.shape)}")


def check_int(name: str, value, where: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an int, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{where}: {name} must be in {bounds}, got {value}")
    return value


def check_block_shape(block_shape, where: str) -> tuple[int, int]:
    if not isinstance(block_shape, Sequence) or len(block_shape) != 2:
        raise ValueError(f"{where}: block_shape must be a pair (rows, cols), got {block_shape!r}")
    return (check_int("block_shape[0]", block_shape[0], where, 1),
            check_int("block_shape[1]", block_shape[1], where, 1))


def check_zeros(zeros_per_block, block_shape: tuple[int, int], where: str) -> int:
    """zeros_per_block in [0, block size]; None is the whole block."""
    block_size = block_shape[0] * block_shape[1]
    if zeros_per_block is None:
        return block_size
    return check_int("zeros_per_block", zeros_per_block, where, 0, block_size)


def check_level(sparsity_level, where: str) -> float:
    """A sparsity level in [0, 1] (the ops are strict; the sparsifier classes clamp first, as torch.ao does)."""
    if isinstance(sparsity_level, bool) or not isinstance(sparsity_level, numbers.Real):
        raise TypeError(f"{where}: sparsity_level must be a number, got {sparsity_level!r}")
    level = float(sparsity_level)
    if math.isnan(level) or not 0.0 <= level <= 1.0:
        raise ValueError(f"{where}: sparsity_level must be in [0, 1], got {sparsity_level}")
    return level


def parse_norm(norm) -> int:
    """1 / 'L1' -> 1 (|x|), 2 / 'L2' -> 2 (x*x), 0 -> identity (raw values, for callable norms)."""
    if isinstance(norm, str) and norm in _NORM_NAMES:
        return _NORM_NAMES[norm]
    if not isinstance(norm, bool) and isinstance(norm, numbers.Integral) and int(norm) in (0, 1, 2):
        return int(norm)
    raise ValueError(f"norm must be 1, 2, 'L1', 'L2' or 0 (identity), got {norm!r}")


def check_mask_format(mask, data: torch.Tensor, where: str) -> bool:
    """Checks that mask is a mask of data in one of the two formats (bool of data's shape, or packed uint8
    bits, 1-D with ceil(numel/8) bytes) on data's device; returns whether it is packed."""
    check_tensor("mask", mask, where)
    if mask.device != data.device:
        raise ValueError(f"{where}: mask is on {mask.device} but data is on {data.device}")
    if mask.dtype == torch.bool:
        if mask.shape != data.shape:
            raise ValueError(f"{where}: mask shape {tuple(mask.shape)} != data shape {tuple(data.shape)}")
        return False
    if mask.dtype == torch.uint8:
        need = (data.numel() + 7) // 8
        if mask.dim() != 1 or mask.numel() != need:
            raise ValueError(f"{where}: packed mask must be 1-D with {need} bytes for data of shape "
                             f"{tuple(data.shape)}, got shape {tuple(mask.shape)}")
        return True
    raise TypeError(f"{where}: mask must be bool or packed uint8, got {mask.dtype}")


def rows_readable_in_place(t: torch.Tensor) -> bool:
    """Whether the compiled kernels read a 2-D tensor's rows where they are (unit column stride, rows that
    do not overlap) instead of copying it to a contiguous buffer first. The kernels decide this with
    csrc/common/op_args.h's rule of the same name; tests/test_checks.py holds the two to the same cases."""
    rows, cols = t.shape
    return (cols <= 1 or t.stride(1) == 1) and (rows <= 1 or t.stride(0) >= cols)
