"""DataNormSparsifier: zero the blocks of each piece of data with the smallest mean norm, or the smallest
elements within them. Mirrors torch.ao.pruning._experimental.data_sparsifier.DataNormSparsifier; the
mask comes from sparsity_ext.ops (through block_norm_mask_chunked: no temporary of the table's size; on the
reference backend, tables larger than max_chunk_bytes are processed in row chunks with the same result)."""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .. import checks, ops
from ..sparsifier.base_sparsifier import clamped_level
from ._chunked import DEFAULT_MAX_CHUNK_BYTES, block_norm_mask_chunked
from .base_data_sparsifier import BaseDataSparsifier, _is_packed_for

__all__ = ["DataNormSparsifier"]


def data_norm_level(sparsity_level: float, num_blocks: int) -> float:
    """The ops-contract sparsity level that selects the blocks torch.ao.pruning's DataNormSparsifier does.

    DataNormSparsifier removes round(s * num_blocks) blocks, clamped to [0, num_blocks] only: unlike
    WeightNormSparsifier (and ops.block_norm_mask), a level just below 1 may remove every block. Such
    levels map to 1; levels outside [0, 1] are clamped (torch.ao.pruning's tests expect -1 -> none, 2 -> all).
    """
    if sparsity_level <= 0:
        return 0.0
    if sparsity_level >= 1 or round(sparsity_level * num_blocks) >= num_blocks:
        return 1.0
    return float(sparsity_level)


class DataNormSparsifier(BaseDataSparsifier):
    """Masks the sparsity_level fraction of blocks of each piece of data with the smallest mean norm
    (|x| for "L1", x*x for "L2"); within each masked block, the zeros_per_block smallest elements
    (all of them by default).

    Blocks tile the data from the top-left (edge blocks are partial and scored by the mean over their
    valid elements); 1-D data is one row. The scores are the original (unmasked) data's. Ties rank by
    lower index; fp16/bf16 data is scored in fp32 (torch.ao.pruning scores in the data's dtype).

    Args:
        data_list: [(name, data)] to add with the defaults.
        sparsity_level: fraction of blocks masked; values outside [0, 1] are clamped (as
            WeightNormSparsifier clamps them), so a scheduler may overshoot. torch.ao.pruning's own
            result is wrong below 0: it slices its sorted blocks with a negative count, which masks all
            but round(-s * num_blocks) blocks (90 % of a table at s = -0.1); here s < 0 masks nothing.
        sparse_block_shape: (rows, cols) of a block.
        zeros_per_block: elements zeroed in each masked block (default: the whole block); (1, 4) with
            zeros_per_block=2 and sparsity_level=1 is 2:4.
        norm: "L1" or "L2".
        mask_dtype: None (torch.ao.pruning's float mask, int8 after the first step), torch.bool or
            "packed" (1 bit per element); see sparsity_ext.data_sparsifier.base_data_sparsifier.
        max_chunk_bytes: where the mask is not computed by a compiled kernel in one piece (the reference backend,
            layouts the kernel would copy), data larger than this is processed in row chunks (same mask).
    sparsity_level, sparse_block_shape and zeros_per_block are defaults; add_data may override them.

    Deviations from torch.ao.pruning, which squeezes every size-1 dimension out of the data and computes the
    mask of what is left:
      - 1-D data and (N, 1) data (where torch.ao.pruning crashes or gives an (N, N)-broadcasting mask) follow
        the mask contract of sparsity_ext.ops: one row, and one column.
      - Data with more dimensions, all of size 1 but the last two (e.g. (1, 12, 16), (1, 1, 16)), is masked as
        its last two dimensions, as torch.ao.pruning's squeeze does, but the mask keeps the data's shape
        (torch.ao.pruning's is the squeezed (12, 16) or (1, 16), which its own FakeSparsity then rejects);
        its values are torch.ao.pruning's mask broadcast to the data's shape.
      - Other data of more than 2 dimensions raises ValueError naming the shape: torch.ao.pruning steps on
        some of it (e.g. (12, 1, 16), (1, 12, 1)), but its squeezed mask broadcasts to a different shape
        ((12, 12, 16), (1, 12, 12)), so it is no mask of the data's elements.
      - Bad arguments raise ValueError/TypeError (torch.ao.pruning: AssertionError) before any mask changes.
    """

    def __init__(self, data_list: list[tuple[str, Any]] | None = None, sparsity_level: float = 0.5,
                 sparse_block_shape: tuple[int, int] = (1, 4), zeros_per_block: int | None = None,
                 norm: str = "L1", *, mask_dtype=None, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES):
        if zeros_per_block is None:
            zeros_per_block = math.prod(sparse_block_shape)
        if norm not in ("L1", "L2"):
            raise ValueError(f"DataNormSparsifier: norm must be 'L1' or 'L2', got {norm!r}")
        self.norm = norm
        self.max_chunk_bytes = checks.check_int("max_chunk_bytes", max_chunk_bytes, "DataNormSparsifier", 1)
        super().__init__(data_list=data_list, mask_dtype=mask_dtype, sparsity_level=sparsity_level,
                         sparse_block_shape=sparse_block_shape, zeros_per_block=zeros_per_block)

    @staticmethod
    def _check_config(sparsity_level, sparse_block_shape, zeros_per_block) -> tuple[float, tuple[int, int], int]:
        """(sparsity_level clamped to [0, 1], block shape, zeros_per_block), validated."""
        where = "DataNormSparsifier"
        level = clamped_level(sparsity_level, where)
        block = checks.check_block_shape(sparse_block_shape, where)
        if isinstance(zeros_per_block, bool) or not isinstance(zeros_per_block, numbers.Integral):
            raise TypeError(f"{where}: zeros_per_block must be an int, got {zeros_per_block!r}")
        if zeros_per_block > block[0] * block[1]:
            raise ValueError(f"{where}: zeros_per_block ({zeros_per_block}) cannot exceed the number of elements "
                             f"in a block ({block[0] * block[1]})")
        if zeros_per_block < 0:
            raise ValueError(f"{where}: zeros_per_block must be >= 0, got {zeros_per_block}")
        return level, block, int(zeros_per_block)

    def _validate_data(self, name, data, sparsity_level, sparse_block_shape, zeros_per_block, **kwargs) -> None:
        self._check_config(sparsity_level, sparse_block_shape, zeros_per_block)
        if data.dtype not in ops.FLOAT_DTYPES:
            raise TypeError(f"DataNormSparsifier: data {name!r} must be a float tensor, got {data.dtype}")
        leading_ones = data.dim() > 2 and all(size == 1 for size in data.shape[:-2]) and data.shape[-1] != 1
        if data.dim() not in (1, 2) and not leading_ones:
            raise ValueError(f"DataNormSparsifier: data {name!r} must be 1-D, 2-D, or N-D with every dim but the "
                             f"last two of size 1 and the last not 1 (torch.ao.pruning's squeezed mask of other "
                             f"shapes does not line up with the data's elements), got shape {tuple(data.shape)}")

    @staticmethod
    def _matrix(data: torch.Tensor) -> torch.Tensor:
        """The 2-D view the blocks tile: 1-D data as one row, data with leading size-1 dims as its last two."""
        return data.view(1, -1) if data.dim() == 1 else data.view(data.shape[-2:])

    def update_mask(self, name, data, sparsity_level, sparse_block_shape, zeros_per_block, **kwargs):
        """Computes the mask of `name` from `data` and stores it in the live mask object (via mask.data):
        int8 with the default mask_dtype (as torch.ao.pruning), bool or packed otherwise."""
        self._validate_data(name, data, sparsity_level, sparse_block_shape, zeros_per_block)
        level, block, zeros = self._check_config(sparsity_level, sparse_block_shape, zeros_per_block)
        mask = self.get_mask(name)
        matrix = self._matrix(data)
        rows, cols = matrix.shape
        level = data_norm_level(level, -(-rows // block[0]) * -(-cols // block[1]))
        packed = self.mask_dtype == "packed"
        # A lean mask in its own format is rewritten in place: no fresh table-sized memory every step.
        reusable = (self._lean and mask.device == data.device and mask.is_contiguous()
                    and (_is_packed_for(mask, data) if packed else
                         mask.dtype == torch.bool and mask.shape == data.shape))
        out = None if not reusable else mask if packed else mask.view(matrix.shape)
        with torch.no_grad():
            keep = block_norm_mask_chunked(matrix, level, block, zeros, self.norm, packed=packed,
                                           max_chunk_bytes=self.max_chunk_bytes, out=out)
        if not reusable:
            keep = keep if packed else keep.view(data.shape)  # the mask has the data's own shape
            # bool -> int8 as a view (same bytes, 0/1): no copy of a table-sized mask
            mask.data = keep.view(torch.int8) if self.mask_dtype is None else keep
