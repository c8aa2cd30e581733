"""Pure-torch reference of sparsify_24_pack: the oracle of the CPU, CUDA and Triton kernels, and the
fallback wherever none is built. Clarity over speed. Inputs are validated by sparsity_ext.ops
(_layout.check_dense).
"""
from __future__ import annotations

import torch

from .. import reference as _mask_reference
from ._layout import PAIR_NIBBLES, meta_layout


def sparsify_24_pack(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 prune of `data` (nm_mask(data, 2, 4): the 2 largest |x| of each group of 4 kept), packed."""
    scored = data.to(torch.float32) if data.dtype == torch.int8 else data  # |int8| overflows at -128
    keep = _mask_reference.nm_mask(scored, 2, 4)
    return pack_pruned(data.masked_fill(~keep, 0))


def pack_pruned(pruned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, reordered metadata) of a tensor with at most 2 nonzeros in each group of 4 of a row.

    Group g of row r keeps its elements at positions idx0 < idx1: its nonzeros, padded with position
    2, then 3 (csrc/common/semi_structured.h describes the whole layout).
    """
    rows, cols = pruned.shape
    meta_dtype, groups_per_meta = meta_layout(pruned.dtype)
    device = pruned.device
    groups = pruned.reshape(rows, cols // 4, 4)
    weights = 1 << torch.arange(4, device=device)
    pattern = ((groups != 0).to(torch.int64) * weights).sum(-1)
    nibble = (PAIR_NIBBLES >> (4 * pattern)) & 0xF
    positions = torch.stack((nibble & 3, nibble >> 2), dim=-1)
    values = groups.gather(-1, positions).reshape(rows, cols // 2)

    shifts = 4 * torch.arange(groups_per_meta, device=device)
    meta = (nibble.reshape(rows, -1, groups_per_meta) << shifts).sum(-1)  # int64, < 2**(4 * groups_per_meta)
    bits = 4 * groups_per_meta
    meta = torch.where(meta >= 1 << (bits - 1), meta - (1 << bits), meta).to(meta_dtype)  # two's complement
    meta_cols = meta.shape[1]
    reordered = torch.empty(rows * meta_cols, dtype=meta_dtype, device=device)
    reordered[meta_reordered_offsets(rows, meta_cols, meta_dtype.itemsize, device).reshape(-1)] = meta.reshape(-1)
    return values, reordered.view(rows, meta_cols)


def meta_reordered_offsets(rows: int, meta_cols: int, meta_bytes: int, device) -> torch.Tensor:
    """Where each metadata element (row, col) goes in the CUTLASS-ordered buffer (rows x meta_cols int64),
    the function meta_reordered_offset of csrc/common/semi_structured.h over the whole matrix."""
    band = 32 if meta_bytes == 2 else 16
    row = torch.arange(rows, device=device)[:, None]
    col = torch.arange(meta_cols, device=device)[None, :]
    r = row - row % band + (row % 8) * (band // 8) + (row % band) // 8
    swap = (r & 1) ^ (col & 1)
    step = swap * (2 * (swap & col & 1) - 1)
    r, c = r + step, col - step
    return (c >> 1) * (2 * rows) + r * 2 + (c & 1)
