"""Drop-in acceleration of torch.ao.pruning's own sparsifier classes.

`accelerate_torch_ao()` replaces `update_mask` on torch.ao.pruning's WeightNormSparsifier,
DataNormSparsifier and NearlyDiagonalSparsifier (at the class level, so instances that already exist are
covered) with versions that compute the mask with sparsity_ext.ops (on the backend in force, see
use_backend), or, for NearlyDiagonalSparsifier, fill the band one diagonal at a time instead of one row
at a time. Everything else about those objects is torch.ao.pruning's own: prepare, step, schedulers,
state_dict, squash_mask.

The patched method gives the mask torch.ao.pruning would: same values (on tie-free data: tie choices of
torch.topk / torch.sort are unspecified), stored the way torch.ao.pruning stores it, by rebinding the
live mask tensor's `.data` (so the FakeSparsity parametrization and the sparsifier's state, which hold
that tensor, see the new mask) with torch.ao.pruning's dtype and device. (WeightNormSparsifier, when the
weight is just FakeSparsity's mask * original and the mask already has the dtype below: the new values are
written into the mask in place by ops.block_norm_mask_update_, which scores the masked weight without
materializing it.) The dtypes:
  WeightNormSparsifier: default-dtype float when whole blocks are zeroed, bool when zeros_per_block is
    smaller than the block (torch.ao.pruning's logical_or);
  DataNormSparsifier: int8;
  NearlyDiagonalSparsifier: the mask's own dtype.
Any call the kernels would not answer exactly as torch.ao.pruning does goes to torch.ao.pruning's
original method, so behaviour never changes: a custom norm callable, overridden mask hooks
(_make_tensor_mask, _make_block_mask, ...), non-fp32 or non-2-D tensors, sparsity levels outside [0, 1]
(DataNormSparsifier) or trivial ones (all kept / all zeroed), zeros_per_block out of range (the original
raises its own error), DataNormSparsifier data that torch.ao.pruning's squeeze reshapes (1-D, one
column), WeightNormSparsifier's partial edge blocks with zeros_per_block smaller than the block, and
NearlyDiagonalSparsifier on a tensor with more than one parametrization or with a nearliness it rejects.
On meta (shape-only) tensors the ops return shape-only results (sparsity_ext._fake), so a step there gives
torch.ao.pruning's mask shape, dtype and device, as the original does.

Usage::

    sparsity_ext.accelerate_torch_ao()        # patch; idempotent
    ...                                        # torch.ao.pruning code, unchanged
    sparsity_ext.restore_torch_ao()           # torch.ao.pruning's own methods again

    with sparsity_ext.accelerate_torch_ao():  # or scoped: restored on exit (unless it was already on)
        sparsifier.step()
"""
from __future__ import annotations

import functools
import math
import numbers

import torch

from . import ops
from .data_sparsifier._chunked import block_norm_mask_chunked
from .data_sparsifier.data_norm_sparsifier import data_norm_level
from .sparsifier.weight_norm_sparsifier import fused_update_operand, hooks_overridden

__all__ = ["accelerate_torch_ao", "restore_torch_ao", "torch_ao_accelerated", "TorchAOAcceleration"]

# (class, attribute) -> torch.ao.pruning's original function, while patched.
_ORIGINALS: dict[tuple[type, str], object] = {}


# --------------------------------------------------------------------------------- argument checks
def _real_level(value) -> float | None:
    """A finite sparsity level as a float, or None for anything else (bool, tensor, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    return float(value)


def _exact_int(value) -> int | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def _block_args(sparse_block_shape, zeros_per_block) -> tuple[tuple[int, int], int] | None:
    """((rows, cols), zeros) when the block shape is two positive ints and 0 <= zeros <= block size."""
    try:
        rows, cols = sparse_block_shape
    except (TypeError, ValueError):
        return None
    rows, cols, zeros = _exact_int(rows), _exact_int(cols), _exact_int(zeros_per_block)
    if rows is None or cols is None or zeros is None or rows < 1 or cols < 1 or not 0 <= zeros <= rows * cols:
        return None
    return (rows, cols), zeros


def _whole_blocks_or_no_partial(shape, block: tuple[int, int], zeros: int) -> bool:
    """WeightNormSparsifier: with zeros_per_block smaller than the block, torch.ao.pruning crashes on
    partial edge blocks (and on blocks larger than the weight); whole-block masks handle them."""
    partial = shape[0] % block[0] != 0 or shape[1] % block[1] != 0
    return zeros == block[0] * block[1] or not partial


# ------------------------------------------------------------------------------- WeightNormSparsifier
def _weight_norm_codes(ao_class: type) -> dict:
    """The code objects of torch.ao.pruning's built-in L1 / L2 norm lambdas -> ops norm code."""
    return {ao_class(norm=code).norm_fn.__code__: code for code in (1, 2)}


def _weight_norm_update_mask(ao_class: type, original):
    from torch.ao.pruning.sparsifier.utils import FakeSparsity as ao_fake_sparsity  # torch.ao is there: we patch it
    norm_codes = _weight_norm_codes(ao_class)
    hooks = ("_make_tensor_mask", "_make_block_mask", "_scatter_fold_block_mask")

    @functools.wraps(original)
    def update_mask(self, module, tensor_name, sparsity_level, sparse_block_shape, zeros_per_block, **kwargs):
        def fallback():
            return original(self, module, tensor_name, sparsity_level, sparse_block_shape, zeros_per_block,
                            **kwargs)

        level, block_args = _real_level(sparsity_level), _block_args(sparse_block_shape, zeros_per_block)
        norm_fn = getattr(self, "norm_fn", None)
        norm = norm_codes.get(getattr(norm_fn, "__code__", None))
        if level is None or block_args is None or norm is None or hooks_overridden(self, ao_class, hooks):
            return fallback()
        block, zeros = block_args
        block_size = block[0] * block[1]
        if level <= 0 or zeros == 0 or (level >= 1 and zeros == block_size):
            return fallback()  # all kept / all zeroed: no scoring to accelerate
        mask = getattr(module.parametrizations, tensor_name)[0].mask
        # torch.ao.pruning's mask dtype after this step: its logical_or's bool, or its float tensor mask
        mask_dtype = torch.bool if zeros < block_size else torch.get_default_dtype()
        unmasked = fused_update_operand(module, tensor_name, ao_fake_sparsity, (mask_dtype,))
        if (unmasked is not None and mask.dtype == mask_dtype and unmasked.dtype == torch.float32
                and unmasked.dim() == 2 and _whole_blocks_or_no_partial(unmasked.shape, block, zeros)):
            # The weight is mask * original and the mask already has the dtype the step gives it: the new mask
            # is written over it in place.
            ops.block_norm_mask_update_(unmasked, mask.data, min(level, 1.0), block, zeros, norm)
            return
        weight = getattr(module, tensor_name)
        if not (isinstance(weight, torch.Tensor) and weight.dtype == torch.float32 and weight.dim() == 2
                and _whole_blocks_or_no_partial(weight.shape, block, zeros)):
            return fallback()
        # torch.ao.pruning: a level >= 1 (with zeros < block size) selects every block.
        keep = ops.block_norm_mask(weight.detach(), min(level, 1.0), block, zeros, norm)
        # Whole blocks: torch.ao.pruning's float tensor mask; partial: its logical_or, a bool mask.
        mask.data = keep if zeros < block_size else keep.to(torch.get_default_dtype())

    return update_mask


# -------------------------------------------------------------------------------- DataNormSparsifier
def _data_norm_update_mask(ao_class: type, original):
    private = f"_{ao_class.__name__}__"  # its helpers are name-mangled
    hooks = tuple(private + name for name in ("get_scatter_folded_mask", "get_block_level_mask",
                                              "get_data_level_mask"))

    @functools.wraps(original)
    def update_mask(self, name, data, sparsity_level, sparse_block_shape, zeros_per_block, **kwargs):
        level, block_args = _real_level(sparsity_level), _block_args(sparse_block_shape, zeros_per_block)
        # torch.ao.pruning squeezes the data: 2-D with one column, or fewer than 2 dims, change meaning.
        accelerated = (level is not None and 0 <= level <= 1 and block_args is not None
                       and getattr(self, "norm", None) in ("L1", "L2") and not hooks_overridden(self, ao_class, hooks)
                       and isinstance(data, torch.Tensor) and data.dtype == torch.float32 and data.dim() == 2
                       and data.shape[1] >= 2)
        if not accelerated:
            return original(self, name, data, sparsity_level, sparse_block_shape, zeros_per_block, **kwargs)
        block, zeros = block_args
        num_blocks = -(-data.shape[0] // block[0]) * -(-data.shape[1] // block[1])
        mask = self.get_mask(name)
        keep = block_norm_mask_chunked(data.detach(), data_norm_level(level, num_blocks), block, zeros, self.norm)
        mask.data = keep.to(torch.int8)

    return update_mask


# -------------------------------------------------------------------------- NearlyDiagonalSparsifier
def _nearly_diagonal_update_mask(ao_class: type, original):
    @functools.wraps(original)
    def update_mask(self, module, tensor_name, nearliness, **kwargs):
        parametrizations = getattr(module.parametrizations, tensor_name)
        mask = parametrizations[0].mask
        nearliness_int = _exact_int(nearliness)
        # A lone parametrization whose mask has the tensor's shape: the band needs no weight computed.
        if (nearliness_int is None or nearliness_int <= 0 or nearliness_int % 2 == 0 or len(parametrizations) != 1
                or mask.dim() != 2 or mask.shape != parametrizations.original.shape
                or nearliness_int // 2 >= min(mask.shape)):
            return original(self, module, tensor_name, nearliness, **kwargs)
        band = torch.zeros_like(mask)
        # torch.ao.pruning fills mask[row, max(0, row - d): row + d + 1] row by row: the diagonals -d..d.
        for offset in range(-(nearliness_int // 2), nearliness_int // 2 + 1):
            band.diagonal(offset).fill_(1)
        mask.data = band

    return update_mask


# ----------------------------------------------------------------------------------- patch / restore
def _targets():
    """(torch.ao.pruning class, attribute, factory of the accelerated function)."""
    # From the defining modules, so the classes are torch.ao.pruning's own whatever a package re-exports.
    from torch.ao.pruning._experimental.data_sparsifier.data_norm_sparsifier import DataNormSparsifier
    from torch.ao.pruning.sparsifier.nearly_diagonal_sparsifier import NearlyDiagonalSparsifier
    from torch.ao.pruning.sparsifier.weight_norm_sparsifier import WeightNormSparsifier
    return ((WeightNormSparsifier, "update_mask", _weight_norm_update_mask),
            (DataNormSparsifier, "update_mask", _data_norm_update_mask),
            (NearlyDiagonalSparsifier, "update_mask", _nearly_diagonal_update_mask))


def torch_ao_accelerated() -> bool:
    """Whether accelerate_torch_ao() is in force."""
    return bool(_ORIGINALS)


class TorchAOAcceleration:
    """What accelerate_torch_ao() returns: a context manager that restores torch.ao.pruning's methods on
    exit if this call was the one that patched them (so nested or repeated uses do not undo an outer one)."""

    def __init__(self, patched_here: bool):
        self.patched_here = patched_here

    def __enter__(self) -> "TorchAOAcceleration":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.patched_here:
            restore_torch_ao()

    def restore(self) -> None:
        """restore_torch_ao()."""
        restore_torch_ao()


def accelerate_torch_ao() -> TorchAOAcceleration:
    """Make torch.ao.pruning's WeightNormSparsifier, DataNormSparsifier and NearlyDiagonalSparsifier compute
    their masks with sparsity_ext's kernels (see the module docstring). Idempotent; undo with
    restore_torch_ao() or by using the returned object as a context manager."""
    if torch_ao_accelerated():
        return TorchAOAcceleration(patched_here=False)
    for cls, attribute, factory in _targets():
        original = cls.__dict__[attribute]
        _ORIGINALS[(cls, attribute)] = original
        setattr(cls, attribute, factory(cls, original))
    return TorchAOAcceleration(patched_here=True)


def restore_torch_ao() -> None:
    """Put torch.ao.pruning's own methods back (a no-op when they are not patched)."""
    while _ORIGINALS:
        (cls, attribute), original = _ORIGINALS.popitem()
        setattr(cls, attribute, original)
