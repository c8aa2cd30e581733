"""The public surface over the kernels: validated, typed wrappers that dispatch to a backend.

Every wrapper checks its arguments (sparsity_ext.checks) and raises a clear exception before any kernel
runs, then calls the implementation sparsity_ext._backend chooses (see use_backend / SPARSITY_EXT_BACKEND).
The contract of each op is docs/design.md, "Mask semantics"; sparsity_ext.reference is its oracle.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

# Importing the backends registers them with the dispatch; the wrappers below only validate and call.
from . import _backend, _extension, reference, triton  # noqa: F401
from .checks import (FLOAT_DTYPES, check_block_shape, check_float_data, check_int, check_level, check_mask_format,
                     check_tensor, check_zeros, parse_norm)
from .semi_structured import _layout as _semi_structured_layout

__all__ = ["block_norm_mask", "block_norm_mask_apply_", "block_norm_mask_into_", "block_norm_mask_update_",
           "block_scores", "block_norm_mask_select", "nm_mask", "select_threshold", "apply_mask_", "pack_mask",
           "unpack_mask", "parse_norm", "FLOAT_DTYPES", "sparsify_24_pack"]


def _as_2d(data: torch.Tensor) -> torch.Tensor:
    return data.view(1, -1) if data.dim() == 1 else data


def _block_mask(op: str, data, sparsity_level, block_shape, zeros_per_block, norm, packed) -> torch.Tensor:
    """Checks the arguments of block_norm_mask / block_norm_mask_apply_, then runs `op`."""
    check_float_data(data, op)
    level = check_level(sparsity_level, op)
    bshape = check_block_shape(block_shape, op)
    zeros = check_zeros(zeros_per_block, bshape, op)
    mask = _backend.call(op, data, _as_2d(data), level, bshape, zeros, parse_norm(norm), bool(packed))
    return mask if packed else mask.view(data.shape)


# ------------------------------------------------------------------------------------------- ops
def block_norm_mask(data: torch.Tensor, sparsity_level: float, block_shape: Sequence[int] = (1, 4),
                    zeros_per_block: int | None = None, norm=2, packed: bool = False) -> torch.Tensor:
    """Block-norm top-k mask (docs/design.md, "Mask semantics").

    Args:
        data: 1-D (one row) or 2-D float tensor (fp32, fp16, bf16, fp64); not modified.
        sparsity_level: fraction of blocks selected, in [0, 1].
        block_shape: (rows, cols) of a block; blocks tile data from the top-left, edge blocks partial.
        zeros_per_block: elements zeroed in each selected block (default: the whole block).
        norm: 1/'L1' (|x|), 2/'L2' (x*x) or 0 (raw values).
        packed: return 1 bit per element (uint8, see pack_mask) instead of a bool tensor.
    Returns:
        bool mask of data's shape (True = keep), or the packed bits.
    """
    return _block_mask("block_norm_mask", data, sparsity_level, block_shape, zeros_per_block, norm, packed)


def block_norm_mask_apply_(data: torch.Tensor, sparsity_level: float, block_shape: Sequence[int] = (1, 4),
                           zeros_per_block: int | None = None, norm=2, packed: bool = False) -> torch.Tensor:
    """block_norm_mask, and data zeroed in place where the mask is False, in the same pass.

    Zeroing writes x * 0, the bytes of torch.ao.pruning's mask * data: -0.0 for a negative x, NaN for inf/NaN
    (reference.times_zero; bfloat16 NaN bytes may differ from torch's, which vary within one multiply).
    Returns the mask (bool, or packed bits with packed=True).
    """
    return _block_mask("block_norm_mask_apply_", data, sparsity_level, block_shape, zeros_per_block, norm, packed)


def block_norm_mask_into_(data: torch.Tensor, mask: torch.Tensor, sparsity_level: float,
                          block_shape: Sequence[int] = (1, 4), zeros_per_block: int | None = None,
                          norm=2) -> torch.Tensor:
    """block_norm_mask written into `mask` (bool of data's shape, or packed uint8 bits) instead of a new tensor:
    a mask updated every step keeps its memory (for a large table, fresh memory costs a page fault per page).

    Returns mask. Its old contents are not read.
    """
    op = "block_norm_mask_into_"
    check_float_data(data, op)
    packed = check_mask_format(mask, data, op)
    level = check_level(sparsity_level, op)
    bshape = check_block_shape(block_shape, op)
    zeros = check_zeros(zeros_per_block, bshape, op)
    target = mask if mask.is_contiguous() else mask.contiguous()
    _backend.call(op, data, _as_2d(data), target if packed else _as_2d(target), level, bshape, zeros, parse_norm(norm))
    if target is not mask:
        mask.copy_(target)
    return mask


def block_norm_mask_update_(data: torch.Tensor, mask: torch.Tensor, sparsity_level: float,
                            block_shape: Sequence[int] = (1, 4), zeros_per_block: int | None = None,
                            norm=2) -> torch.Tensor:
    """A sparsifier's mask update in one op: mask = block_norm_mask(mask * data, ...), written into `mask`.

    The masked weight mask * data (what a FakeSparsity parametrization computes) is scored without being
    materialized: the compiled kernels compute it a few rows at a time, in cache.

    Args:
        data: 1-D (one row) or 2-D float tensor; not modified.
        mask: data's shape and device; bool, float32 or data's dtype. Overwritten with 1 (keep) / 0 (drop).
        sparsity_level, block_shape, zeros_per_block, norm: as block_norm_mask.
    Returns:
        mask.
    """
    op = "block_norm_mask_update_"
    check_float_data(data, op)
    check_tensor("mask", mask, op)
    level = check_level(sparsity_level, op)
    bshape = check_block_shape(block_shape, op)
    zeros = check_zeros(zeros_per_block, bshape, op)
    if mask.device != data.device:
        raise ValueError(f"{op}: mask is on {mask.device} but data is on {data.device}")
    if mask.shape != data.shape:
        raise ValueError(f"{op}: mask shape {tuple(mask.shape)} != data shape {tuple(data.shape)}")
    if mask.dtype not in (torch.bool, torch.float32, data.dtype):
        raise TypeError(f"{op}: mask must be bool, float32 or data's dtype ({data.dtype}), got {mask.dtype}")
    target = mask if mask.is_contiguous() else mask.contiguous()
    _backend.call(op, data, _as_2d(data), _as_2d(target), level, bshape, zeros, parse_norm(norm))
    if target is not mask:
        mask.copy_(target)
    return mask


def block_scores(data: torch.Tensor, block_shape: Sequence[int] = (1, 4), norm=2) -> torch.Tensor:
    """The score of every block: its mean element norm over its valid elements, as block_norm_mask ranks it.

    With block_norm_mask_select and select_threshold it splits block_norm_mask in two, for a selection made
    across row chunks, shards or tensors.

    Args:
        data: 1-D (one row) or 2-D float tensor; block_shape and norm as block_norm_mask.
    Returns:
        1-D tensor, one score per block in row-major block order: fp32 (fp64 for fp64 data).
    """
    op = "block_scores"
    check_float_data(data, op)
    return _backend.call(op, data, _as_2d(data), check_block_shape(block_shape, op), parse_norm(norm))


def block_norm_mask_select(data: torch.Tensor, scores: torch.Tensor, threshold: float, ties: int,
                           block_shape: Sequence[int] = (1, 4), zeros_per_block: int | None = None, norm=2,
                           packed: bool = False) -> torch.Tensor:
    """block_norm_mask with the blocks selected by a threshold on given scores instead of by a level.

    A block is selected when its score is below `threshold`, or equal to it and among the first `ties` such
    blocks in row-major order (NaN ranks above every number and equals NaN). select_threshold(scores, k)
    returns the (threshold, ties) that select the k smallest; block_norm_mask(data, level, ...) equals
    block_norm_mask_select(data, block_scores(data), *select_threshold(scores, k), ...) for
    k = the level's number of blocks (0 < k).

    Args:
        data: 1-D (one row) or 2-D float tensor; block_shape, zeros_per_block, norm, packed as block_norm_mask.
        scores: one score per block of data (block_scores(data, block_shape, norm), or the same blocks' scores
            from elsewhere), 1-D, block_scores' dtype.
        threshold: a float (or 0-d tensor); ties: an int >= 0 (or 0-d integer tensor).
    Returns:
        bool mask of data's shape (True = keep), or the packed bits.
    """
    op = "block_norm_mask_select"
    check_float_data(data, op)
    check_tensor("scores", scores, op)
    bshape = check_block_shape(block_shape, op)
    zeros = check_zeros(zeros_per_block, bshape, op)
    matrix = _as_2d(data)
    num_blocks = -(-matrix.shape[0] // bshape[0]) * -(-matrix.shape[1] // bshape[1])
    if scores.device != data.device:
        raise ValueError(f"{op}: scores are on {scores.device} but data is on {data.device}")
    want_dtype = reference.score_dtype(data.dtype)
    if scores.dim() != 1 or scores.numel() != num_blocks or scores.dtype != want_dtype:
        raise ValueError(f"{op}: scores must be 1-D {want_dtype} with one value per block ({num_blocks}), got "
                         f"{scores.dtype} of shape {tuple(scores.shape)}")
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.item()
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"{op}: threshold must be a number, got {threshold!r}")
    if isinstance(ties, torch.Tensor) and ties.dim() == 0 and not ties.is_floating_point():
        ties = ties.item()
    ties = check_int("ties", ties, op, 0)
    mask = _backend.call(op, data, matrix, scores, float(threshold), ties, bshape, zeros, parse_norm(norm), bool(packed))
    return mask if packed else mask.view(data.shape)


def nm_mask(data: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M mask: keep the n largest |x| of every m consecutive elements along the last dimension.

    Args:
        data: float tensor of any rank >= 1 (leading dims are flattened into rows).
        n, m: keep n of every m (0 <= n <= m); a partial last group zeroes its min(m - n, size) smallest.
    Returns:
        bool mask of data's shape.
    """
    op = "nm_mask"
    check_tensor("data", data, op)
    if data.dim() == 0:
        raise ValueError(f"{op}: data must have at least 1 dimension, got a scalar")
    check_float_data(data, op, dims=(data.dim(),))
    m = check_int("m", m, op, 1)
    n = check_int("n", n, op, 0, m)
    rows = data.reshape(-1, data.shape[-1]) if data.dim() != 2 else data
    return _backend.call(op, data, rows, n, m).view(data.shape)


def select_threshold(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-th smallest of a 1-D float tensor (1-based, NaN largest), with its tie rank.

    Returns:
        (value, tie_rank): the k smallest elements (ties by lower index) are every element < value
        plus the first tie_rank elements equal to value. value equals torch.kthvalue(values, k).values
        (with -0.0 reported as +0.0).
    """
    op = "select_threshold"
    check_float_data(values, op, dims=(1,))
    k = check_int("k", k, op, 1, values.numel())
    return _backend.call(op, values, values, k)


def apply_mask_(data: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero data in place where mask is False. mask: bool of data's shape, or packed uint8 bits.

    Writes x * 0 where mask is False, the bytes of `data * mask`: -0.0 for a negative x, NaN for inf/NaN
    (reference.times_zero; bfloat16 NaN bytes may differ from torch's, which vary within one multiply)."""
    op = "apply_mask_"
    check_tensor("data", data, op)
    if data.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: data must be one of {[str(d) for d in FLOAT_DTYPES]}, got {data.dtype}")
    check_mask_format(mask, data, op)
    _backend.call(op, data, data, mask)  # the compiled op returns nothing: an aliased output cannot be functionalized
    return data


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool mask (any shape) -> uint8 of ceil(numel/8) bytes; row-major, bit i of byte j = element 8j+i."""
    op = "pack_mask"
    check_tensor("mask", mask, op)
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be bool, got {mask.dtype}")
    return _backend.call(op, mask, mask)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of pack_mask: uint8 bits -> bool mask of `shape`."""
    op = "unpack_mask"
    check_tensor("packed", packed, op)
    if packed.dtype != torch.uint8:
        raise TypeError(f"{op}: packed must be uint8, got {packed.dtype}")
    shape = tuple(check_int("shape[i]", s, op, 0) for s in shape)
    need = (math.prod(shape) + 7) // 8
    if packed.dim() != 1 or packed.numel() != need:
        raise ValueError(f"{op}: shape {shape} needs a 1-D packed tensor of {need} bytes, got {tuple(packed.shape)}")
    return _backend.call(op, packed, packed, list(shape))



def sparsify_24_pack(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused 2:4 prune + pack into the layout of torch's SparseSemiStructuredTensorCUTLASS.

    Args:
        data: 2-D float16, bfloat16 or int8 tensor (CPU or CUDA); rows a positive multiple of 32 and cols
            of 64 (int8: 16 and 128), torch's semi-structured shape constraints. Not modified.
    Returns:
        (values, metadata): values (rows, cols/2) of data's dtype, the 2 largest |x| of every 4
        consecutive elements of a row (ties as nm_mask(data, 2, 4)); metadata (rows, cols/16) int16
        (int8 data: (rows, cols/32) int32) in CUTLASS's reordered layout. Equal to torch's
        sparse_semi_structured_from_dense_cutlass of data zeroed where nm_mask(data, 2, 4) is False.
    """
    op = "sparsify_24_pack"
    _semi_structured_layout.check_dense(data, op)
    return _backend.call(op, data, data)
