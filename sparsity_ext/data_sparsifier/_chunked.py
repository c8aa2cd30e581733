"""Block-norm masks of tables too large to process in one piece: the same mask, computed in row chunks.

The block top-k is global over the whole table, so chunks cannot be masked independently. The
chunked path keeps the global selection in three steps:
  1. score every block, chunk by chunk, into one float per block (O(num_blocks) memory);
  2. pick the k-th smallest score over all blocks with ops.select_threshold (plus its tie rank, so
     ties are broken by lower block index exactly as the one-shot op does);
  3. write the mask chunk by chunk: a block is masked when it is selected, and inside a masked block
     the zeros_per_block smallest elements are zeroed (ops.block_norm_mask at level 1 on the chunk,
     whose blocks are the table's blocks because chunks start on block-row boundaries).
Working memory beyond the output mask is O(num_blocks) plus the temporaries of one chunk.

Tables that fit in the budget go to the one-shot op (ops.block_norm_mask / block_norm_mask_apply_)
when a compiled kernel serves it; the pure-torch reference sorts every element for clarity, and the
three steps above are faster than it on any size, so on the reference backend every table takes
the chunked path (a single chunk when it fits).
"""
from __future__ import annotations

import math

import torch

from .. import _backend, ops, reference

__all__ = ["block_norm_mask_chunked", "packed_ones", "score_chunk", "select_blocks", "chunk_keep",
           "DEFAULT_MAX_CHUNK_BYTES"]

DEFAULT_MAX_CHUNK_BYTES = 256 << 20  # table bytes processed at once


def packed_ones(numel: int, device) -> torch.Tensor:
    """ops.pack_mask of an all-True mask of numel elements, without building that mask."""
    bits = torch.full(((numel + 7) // 8,), 0xFF, dtype=torch.uint8, device=device)
    if numel % 8:
        bits[-1] = (1 << (numel % 8)) - 1  # bits past the end are 0, as pack_mask writes them
    return bits


def _rows_per_chunk(shape: tuple[int, int], block_rows: int, itemsize: int, max_chunk_bytes: int,
                    packed: bool) -> int:
    """Rows per chunk: a multiple of the block height (chunks hold whole blocks) and, for packed masks, of
    what makes a chunk's elements a whole number of bytes; at least one such unit, however small the budget."""
    height, width = shape
    unit = block_rows
    if packed and width % 8:
        unit = math.lcm(unit, 8 // math.gcd(width, 8))
    rows = (max_chunk_bytes // max(1, width * itemsize)) // unit * unit
    return max(unit, min(rows, -(-height // unit) * unit))


def score_chunk(chunk: torch.Tensor, block_shape: tuple[int, int], norm_code: int) -> torch.Tensor:
    """Score (mean element norm, in the scoring dtype) of every block of a 2-D chunk whose first row starts a
    block row, row-major over the chunk's blocks: the chunk's slice of the whole table's block scores."""
    return reference.block_scores(reference.element_norm(chunk, norm_code), block_shape)


def select_blocks(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool per block: the k smallest scores, NaN largest, ties by lower index (ops.select_threshold's rule)."""
    threshold, tie_rank = ops.select_threshold(scores, k)
    if torch.isnan(threshold):
        selected, equal = ~torch.isnan(scores), torch.isnan(scores)
    else:
        selected, equal = scores < threshold, scores == threshold
    selected[equal.nonzero().flatten()[:int(tie_rank)]] = True
    return selected


def _expand_blocks(flags: torch.Tensor, block_shape: tuple[int, int], block_cols: int,
                   rows: int, width: int) -> torch.Tensor:
    """Per-block flags (row-major over a chunk's blocks) -> per-element flags of the chunk (rows x width)."""
    bh, bw = block_shape
    block_rows = flags.numel() // block_cols
    grid = flags.view(block_rows, 1, block_cols, 1).expand(block_rows, bh, block_cols, bw)
    return grid.reshape(block_rows * bh, block_cols * bw)[:rows, :width]


def chunk_keep(chunk: torch.Tensor, selected: torch.Tensor | None, block_shape: tuple[int, int],
               zeros_per_block: int, norm_code: int) -> torch.Tensor:
    """Keep flags (bool, chunk's shape) of a 2-D chunk whose first row starts a block row, given which of its
    blocks are selected (row-major over the chunk's blocks; None: all): the zeros_per_block smallest elements
    of each selected block are dropped, as ops.block_norm_mask ranks them."""
    rows, width = chunk.shape
    if zeros_per_block == block_shape[0] * block_shape[1]:
        keep = torch.zeros((rows, width), dtype=torch.bool, device=chunk.device)
    else:
        keep = ops.block_norm_mask(chunk, 1.0, block_shape, zeros_per_block, norm_code)
    if selected is not None:
        keep |= ~_expand_blocks(selected, block_shape, -(-width // block_shape[1]), rows, width)
    return keep


def _one_shot_preferred(data: torch.Tensor) -> bool:
    """A compiled kernel serves ops.block_norm_mask for this tensor (see the module docstring)."""
    return _backend.resolve("block_norm_mask", data.device, data.dtype)[0] != "reference"


def block_norm_mask_chunked(data: torch.Tensor, sparsity_level: float, block_shape=(1, 4),
                            zeros_per_block: int | None = None, norm=1, *, packed: bool = False,
                            apply: bool = False, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> torch.Tensor:
    """ops.block_norm_mask (or, with apply=True, ops.block_norm_mask_apply_), processing at most about
    max_chunk_bytes of `data` at a time; the result is the one-shot op's, bit for bit.

    Args:
        data: 1-D (one row) or 2-D float tensor; zeroed in place where the mask is False when apply=True.
        sparsity_level, block_shape, zeros_per_block, norm: as ops.block_norm_mask (norm 'L1'/'L2'/1/2).
        packed: return the mask bit-packed (ops.pack_mask layout) instead of bool.
        max_chunk_bytes: bytes of `data` per chunk (at least one block row is taken per chunk).
    Returns:
        bool mask of data's shape (True = keep), or the packed bits.
    """
    where = "block_norm_mask_chunked"
    ops._check_float_data(data, where)
    level = ops._check_level(sparsity_level, where)
    block = ops._check_block_shape(block_shape, where)
    block_size = block[0] * block[1]
    zeros = block_size if zeros_per_block is None else ops._check_int("zeros_per_block", zeros_per_block,
                                                                        where, 0, block_size)
    norm_code = ops.parse_norm(norm)
    max_chunk_bytes = ops._check_int("max_chunk_bytes", max_chunk_bytes, where, 1)

    table = data.unsqueeze(0) if data.dim() == 1 else data
    height, width = table.shape
    if table.numel() * table.element_size() <= max_chunk_bytes and _one_shot_preferred(data):
        one_shot = ops.block_norm_mask_apply_ if apply else ops.block_norm_mask
        return one_shot(data, level, block, zeros, norm_code, packed=packed)

    block_cols = -(-width // block[1])
    num_blocks = -(-height // block[0]) * block_cols
    k = reference.num_selected_blocks(level, num_blocks)
    if k == 0 or zeros == 0:  # nothing is zeroed
        if packed:
            return packed_ones(table.numel(), data.device)
        return torch.ones(data.shape, dtype=torch.bool, device=data.device)
    if packed:
        mask = torch.empty(((table.numel() + 7) // 8,), dtype=torch.uint8, device=data.device)
    else:
        mask = torch.empty((height, width), dtype=torch.bool, device=data.device)

    chunk_rows = _rows_per_chunk((height, width), block[0], table.element_size(), max_chunk_bytes, packed)
    starts = range(0, height, chunk_rows)

    selected = None  # None: every block is selected (k == num_blocks)
    if k < num_blocks:
        scores = torch.empty(num_blocks, dtype=reference.score_dtype(data.dtype), device=data.device)
        for start in starts:
            chunk = table[start:start + chunk_rows]
            first_block = start // block[0] * block_cols
            chunk_scores = score_chunk(chunk, block, norm_code)
            scores[first_block:first_block + chunk_scores.numel()] = chunk_scores
            del chunk_scores
        selected = select_blocks(scores, k)
        del scores

    for start in starts:
        chunk = table[start:start + chunk_rows]
        rows = chunk.shape[0]
        chunk_selected = None
        if selected is not None:
            first_block = start // block[0] * block_cols
            chunk_selected = selected[first_block:first_block + -(-rows // block[0]) * block_cols]
        keep = chunk_keep(chunk, chunk_selected, block, zeros, norm_code)
        if apply:
            ops.apply_mask_(chunk, keep)
        if packed:
            first_byte = start * width // 8
            bits = ops.pack_mask(keep)
            mask[first_byte:first_byte + bits.numel()] = bits
        else:
            mask[start:start + rows] = keep
    return mask if packed else mask.view(data.shape)
