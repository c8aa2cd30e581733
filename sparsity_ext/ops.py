"""The public surface over the kernels: validated, typed wrappers that dispatch to a backend.

Every wrapper checks its arguments and raises a clear exception before any kernel runs, then calls
the implementation chosen by sparsity_ext._backend (see use_backend / SPARSITY_EXT_BACKEND).
The contract of each op is DESIGN.md's "Mask semantics"; sparsity_ext.reference is its oracle.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from . import _backend, _extension, reference
from .semi_structured import _layout as _semi_structured_layout
from .semi_structured import reference as _semi_structured_reference

__all__ = ["block_norm_mask", "block_norm_mask_apply_", "block_norm_mask_into_", "block_norm_mask_update_",
           "block_scores",
           "block_norm_mask_select", "nm_mask",
           "select_threshold", "apply_mask_", "pack_mask", "unpack_mask", "parse_norm", "FLOAT_DTYPES",
           "sparsify_24_pack"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_NORM_NAMES = {"L1": 1, "L2": 2}


# ----------------------------------------------------------------------------------------- checks
def _check_tensor(name: str, t, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _check_float_data(data, op: str, dims: tuple[int, ...] = (1, 2)) -> None:
    _check_tensor("data", data, op)
    if data.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: data must be one of {[str(d) for d in FLOAT_DTYPES]}, got {data.dtype}")
    if data.dim() not in dims:
        raise ValueError(f"{op}: data must be {' or '.join(f'{d}-D' for d in dims)}, got shape {tuple(data.shape)}")


def _check_int(name: str, value, op: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{op}: {name} must be in {bounds}, got {value}")
    return value


def _check_block_shape(block_shape, op: str) -> tuple[int, int]:
    if not isinstance(block_shape, Sequence) or len(block_shape) != 2:
        raise ValueError(f"{op}: block_shape must be a pair (rows, cols), got {block_shape!r}")
    return (_check_int("block_shape[0]", block_shape[0], op, 1), _check_int("block_shape[1]", block_shape[1], op, 1))


def _check_zeros(zeros_per_block, block_shape: tuple[int, int], op: str) -> int:
    """zeros_per_block in [0, block size]; None is the whole block."""
    block_size = block_shape[0] * block_shape[1]
    if zeros_per_block is None:
        return block_size
    return _check_int("zeros_per_block", zeros_per_block, op, 0, block_size)


def _check_level(sparsity_level, op: str) -> float:
    if isinstance(sparsity_level, bool) or not isinstance(sparsity_level, numbers.Real):
        raise TypeError(f"{op}: sparsity_level must be a number, got {sparsity_level!r}")
    level = float(sparsity_level)
    if math.isnan(level) or not 0.0 <= level <= 1.0:
        raise ValueError(f"{op}: sparsity_level must be in [0, 1], got {sparsity_level}")
    return level


def parse_norm(norm) -> int:
    """1 / 'L1' -> 1 (|x|), 2 / 'L2' -> 2 (x*x), 0 -> identity (raw values, for callable norms)."""
    if isinstance(norm, str) and norm in _NORM_NAMES:
        return _NORM_NAMES[norm]
    if not isinstance(norm, bool) and isinstance(norm, numbers.Integral) and int(norm) in (0, 1, 2):
        return int(norm)
    raise ValueError(f"norm must be 1, 2, 'L1', 'L2' or 0 (identity), got {norm!r}")


def _as_2d(data: torch.Tensor) -> torch.Tensor:
    return data.view(1, -1) if data.dim() == 1 else data


def _run(op: str, like: torch.Tensor, *args):
    _, fn = _backend.resolve(op, like.device, like.dtype)
    return fn(*args)


def _block_mask(op: str, data, sparsity_level, block_shape, zeros_per_block, norm, packed) -> torch.Tensor:
    """Checks the arguments of block_norm_mask / block_norm_mask_apply_, then runs `op`."""
    _check_float_data(data, op)
    level = _check_level(sparsity_level, op)
    bshape = _check_block_shape(block_shape, op)
    zeros = _check_zeros(zeros_per_block, bshape, op)
    mask = _run(op, data, _as_2d(data), level, bshape, zeros, parse_norm(norm), bool(packed))
    return mask if packed else mask.view(data.shape)


# ------------------------------------------------------------------------------------------- ops
def block_norm_mask(data: torch.Tensor, sparsity_level: float, block_shape: Sequence[int] = (1, 4),
                    zeros_per_block: int | None = None, norm=2, packed: bool = False) -> torch.Tensor:
    """Block-norm top-k mask (DESIGN.md "Mask semantics").

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

    Returns the mask (bool, or packed bits with packed=True).
    """
    return _block_mask("block_norm_mask_apply_", data, sparsity_level, block_shape, zeros_per_block, norm, packed)


def _check_mask_format(mask: torch.Tensor, data: torch.Tensor, op: str) -> bool:
    """Checks that mask is a mask of data in one of the two formats (bool of data's shape, or packed uint8 bits,
    1-D with ceil(numel/8) bytes) on data's device; returns whether it is packed."""
    _check_tensor("mask", mask, op)
    if mask.device != data.device:
        raise ValueError(f"{op}: mask is on {mask.device} but data is on {data.device}")
    if mask.dtype == torch.bool:
        if mask.shape != data.shape:
            raise ValueError(f"{op}: mask shape {tuple(mask.shape)} != data shape {tuple(data.shape)}")
        return False
    if mask.dtype == torch.uint8:
        need = (data.numel() + 7) // 8
        if mask.dim() != 1 or mask.numel() != need:
            raise ValueError(f"{op}: packed mask must be 1-D with {need} bytes for data of shape "
                             f"{tuple(data.shape)}, got shape {tuple(mask.shape)}")
        return True
    raise TypeError(f"{op}: mask must be bool or packed uint8, got {mask.dtype}")


def block_norm_mask_into_(data: torch.Tensor, mask: torch.Tensor, sparsity_level: float,
                          block_shape: Sequence[int] = (1, 4), zeros_per_block: int | None = None,
                          norm=2) -> torch.Tensor:
    """block_norm_mask written into `mask` (bool of data's shape, or packed uint8 bits) instead of a new tensor:
    a mask updated every step keeps its memory (for a large table, fresh memory costs a page fault per page).

    Returns mask. Its old contents are not read.
    """
    op = "block_norm_mask_into_"
    _check_float_data(data, op)
    packed = _check_mask_format(mask, data, op)
    level = _check_level(sparsity_level, op)
    bshape = _check_block_shape(block_shape, op)
    zeros = _check_zeros(zeros_per_block, bshape, op)
    target = mask if mask.is_contiguous() else mask.contiguous()
    _run(op, data, _as_2d(data), target if packed else _as_2d(target), level, bshape, zeros, parse_norm(norm))
    if target is not mask:
        mask.copy_(target)
    return mask


def mask_into_from_block_norm_mask(data, mask, sparsity_level, block_shape, zeros_per_block, norm) -> None:
    """block_norm_mask_into_ for backends without a kernel of their own for it: their block_norm_mask, copied."""
    packed = mask.dtype == torch.uint8
    mask.copy_(block_norm_mask(data, sparsity_level, block_shape, zeros_per_block, norm, packed).view(mask.shape))


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
    _check_float_data(data, op)
    _check_tensor("mask", mask, op)
    level = _check_level(sparsity_level, op)
    bshape = _check_block_shape(block_shape, op)
    zeros = _check_zeros(zeros_per_block, bshape, op)
    if mask.device != data.device:
        raise ValueError(f"{op}: mask is on {mask.device} but data is on {data.device}")
    if mask.shape != data.shape:
        raise ValueError(f"{op}: mask shape {tuple(mask.shape)} != data shape {tuple(data.shape)}")
    if mask.dtype not in (torch.bool, torch.float32, data.dtype):
        raise TypeError(f"{op}: mask must be bool, float32 or data's dtype ({data.dtype}), got {mask.dtype}")
    target = mask if mask.is_contiguous() else mask.contiguous()
    _run(op, data, _as_2d(data), _as_2d(target), level, bshape, zeros, parse_norm(norm))
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
    _check_float_data(data, op)
    return _run(op, data, _as_2d(data), _check_block_shape(block_shape, op), parse_norm(norm))


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
    _check_float_data(data, op)
    _check_tensor("scores", scores, op)
    bshape = _check_block_shape(block_shape, op)
    zeros = _check_zeros(zeros_per_block, bshape, op)
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
    ties = _check_int("ties", ties, op, 0)
    mask = _run(op, data, matrix, scores, float(threshold), ties, bshape, zeros, parse_norm(norm), bool(packed))
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
    _check_tensor("data", data, op)
    if data.dim() == 0:
        raise ValueError(f"{op}: data must have at least 1 dimension, got a scalar")
    _check_float_data(data, op, dims=(data.dim(),))
    m = _check_int("m", m, op, 1)
    n = _check_int("n", n, op, 0, m)
    rows = data.reshape(-1, data.shape[-1]) if data.dim() != 2 else data
    return _run(op, data, rows, n, m).view(data.shape)


def select_threshold(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-th smallest of a 1-D float tensor (1-based, NaN largest), with its tie rank.

    Returns:
        (value, tie_rank): the k smallest elements (ties by lower index) are every element < value
        plus the first tie_rank elements equal to value. value equals torch.kthvalue(values, k).values
        (with -0.0 reported as +0.0).
    """
    op = "select_threshold"
    _check_float_data(values, op, dims=(1,))
    k = _check_int("k", k, op, 1, values.numel())
    return _run(op, values, values, k)


def apply_mask_(data: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero data in place where mask is False. mask: bool of data's shape, or packed uint8 bits."""
    op = "apply_mask_"
    _check_tensor("data", data, op)
    if data.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: data must be one of {[str(d) for d in FLOAT_DTYPES]}, got {data.dtype}")
    _check_mask_format(mask, data, op)
    _run(op, data, data, mask)  # the compiled op returns nothing: an aliased output cannot be functionalized
    return data


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool mask (any shape) -> uint8 of ceil(numel/8) bytes; row-major, bit i of byte j = element 8j+i."""
    op = "pack_mask"
    _check_tensor("mask", mask, op)
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be bool, got {mask.dtype}")
    return _run(op, mask, mask)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of pack_mask: uint8 bits -> bool mask of `shape`."""
    op = "unpack_mask"
    _check_tensor("packed", packed, op)
    if packed.dtype != torch.uint8:
        raise TypeError(f"{op}: packed must be uint8, got {packed.dtype}")
    shape = tuple(_check_int("shape[i]", s, op, 0) for s in shape)
    need = (math.prod(shape) + 7) // 8
    if packed.dim() != 1 or packed.numel() != need:
        raise ValueError(f"{op}: shape {shape} needs a 1-D packed tensor of {need} bytes, got {tuple(packed.shape)}")
    return _run(op, packed, packed, list(shape))



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
    return _run(op, data, data)

# ------------------------------------------------------------------------------ registrations
OP_NAMES = ("block_norm_mask", "block_norm_mask_apply_", "block_norm_mask_into_", "block_norm_mask_update_",
            "block_scores",
            "block_norm_mask_select", "nm_mask", "select_threshold", "apply_mask_", "pack_mask", "unpack_mask")
# fp64 data is scored by the reference only (rare in practice); the mask-format ops take any dtype.
_COMPILED_DTYPES = {op: (torch.float32, torch.float16, torch.bfloat16) for op in
                    ("block_norm_mask", "block_norm_mask_apply_", "block_norm_mask_into_", "block_norm_mask_update_",
                     "block_scores",
                     "block_norm_mask_select", "nm_mask", "select_threshold")}

_REFERENCES = {**{op: getattr(reference, op) for op in OP_NAMES},
               # its reference lives with the semi-structured layout (sparsity_ext.semi_structured)
               "sparsify_24_pack": _semi_structured_reference.sparsify_24_pack}
_COMPILED_DTYPES["sparsify_24_pack"] = _semi_structured_layout.PACK_DTYPES

for _op, _reference in _REFERENCES.items():
    _backend.register(_op, "reference", _reference, devices=("cpu", "cuda"))
    for _backend_name, _key in (("cpu", "CPU"), ("cuda", "CUDA")):
        _backend.register(
            _op, _backend_name,
            (lambda name: lambda *a: getattr(torch.ops.sparsity_ext, name)(*a))(_op),
            devices=(_backend_name,),
            dtypes=_COMPILED_DTYPES.get(_op),
            available=(lambda name, key: lambda: _extension.has_kernel(name, key))(_op, _key),
            unavailable_reason=(lambda key: lambda: (_extension.load_error or f"the {key} kernel was not compiled")
                                + f"; {_extension.BUILD_HINT}")(_key),
        )


def mask_of_selected_blocks(data: torch.Tensor, selected: torch.Tensor | None, block_shape, zeros_per_block: int,
                            norm) -> torch.Tensor:
    """bool keep flags of 2-D data given which of its blocks are selected (row-major over its blocks; None: all):
    the zeros_per_block smallest elements of each selected block are dropped, ranked by block_norm_mask at
    level 1 on the backend in force (the whole block when zeros_per_block is its size)."""
    rows, width = data.shape
    if zeros_per_block == block_shape[0] * block_shape[1]:
        keep = torch.zeros((rows, width), dtype=torch.bool, device=data.device)
    else:
        keep = block_norm_mask(data, 1.0, block_shape, zeros_per_block, norm)
    if selected is not None:
        keep |= ~reference.expand_block_flags(selected, (rows, width), tuple(block_shape))
    return keep


def select_on_level_one_mask(data, scores, threshold, ties, block_shape, zeros_per_block, norm, packed=False):
    """block_norm_mask_select for GPU backends that have a block_norm_mask kernel but none of their own for it
    (see mask_of_selected_blocks)."""
    keep = mask_of_selected_blocks(data, reference.blocks_at_threshold(scores, threshold, ties), block_shape,
                                   zeros_per_block, norm)
    return pack_mask(keep) if packed else keep


_backend.register("block_norm_mask_select", "cuda", select_on_level_one_mask, devices=("cuda",),
                  dtypes=_COMPILED_DTYPES["block_norm_mask_select"],
                  available=lambda: _extension.has_kernel("block_norm_mask", "CUDA"),
                  unavailable_reason=lambda: (_extension.load_error or "the CUDA kernels were not compiled")
                  + f"; {_extension.BUILD_HINT}")

_backend.register("block_norm_mask_into_", "cuda", mask_into_from_block_norm_mask, devices=("cuda",),
                  dtypes=_COMPILED_DTYPES["block_norm_mask_into_"],
                  available=lambda: _extension.has_kernel("block_norm_mask", "CUDA"),
                  unavailable_reason=lambda: (_extension.load_error or "the CUDA kernels were not compiled")
                  + f"; {_extension.BUILD_HINT}")

try:  # the optional triton backend registers itself (it imports triton only when first used)
    from . import triton as _triton_backend  # noqa: F401
except ImportError:
    pass
