"""Block-norm masks of tables too large to process in one piece: the same mask, computed in row chunks.

The block top-k is global over the whole table, so chunks cannot be masked independently. The
chunked path keeps the global selection in three steps:
  1. score every block, chunk by chunk, with ops.block_scores into one float per block (O(num_blocks)
     memory);
  2. pick the k-th smallest score over all blocks with ops.select_threshold, plus its tie rank (how
     many blocks scoring exactly the threshold are selected, lowest index first);
  3. write the mask chunk by chunk with ops.block_norm_mask_select, handing each chunk the ties that
     earlier chunks did not take. Chunks start on block-row boundaries, so their blocks are the
     table's blocks and the result is the one-shot op's, bit for bit.
Working memory beyond the output mask is O(num_blocks) plus the temporaries of one chunk.

Where a compiled kernel serves ops.block_norm_mask, the table goes to it in one piece
(ops.block_norm_mask / block_norm_mask_apply_): it runs the same three steps inside, with the same
O(num_blocks) working memory and no temporary of the table's size, as long as it can read the rows in
place (a unit column stride); other layouts, which it would copy whole, take the chunked path when
larger than the budget. The pure-torch reference sorts every element for clarity, and the three steps
above are faster than it on any size, so on the reference backend every table takes the chunked path
(a single chunk when it fits).
"""
from __future__ import annotations

import math

import torch

from .. import _backend, _composites, checks, ops, reference

__all__ = ["block_norm_mask_chunked", "packed_ones", "rows_per_chunk", "score_chunk", "chunk_keep",
           "DEFAULT_MAX_CHUNK_BYTES"]

DEFAULT_MAX_CHUNK_BYTES = 256 << 20  # table bytes processed at once


def packed_ones(numel: int, device) -> torch.Tensor:
    """ops.pack_mask of an all-True mask of numel elements, without building that mask."""
    bits = torch.full(((numel + 7) // 8,), 0xFF, dtype=torch.uint8, device=device)
    if numel % 8:
        bits[-1] = (1 << (numel % 8)) - 1  # bits past the end are 0, as pack_mask writes them
    return bits


def rows_per_chunk(shape: tuple[int, int], block_rows: int, itemsize: int, max_chunk_bytes: int,
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
    return ops.block_scores(chunk, block_shape, norm_code)


def chunk_keep(chunk: torch.Tensor, selected: torch.Tensor | None, block_shape: tuple[int, int],
               zeros_per_block: int, norm_code: int) -> torch.Tensor:
    """Keep flags (bool, chunk's shape) of a 2-D chunk whose first row starts a block row, given which of its
    blocks are selected (row-major over the chunk's blocks; None: all): _composites.mask_of_selected_blocks."""
    return _composites.mask_of_selected_blocks(chunk, selected, block_shape, zeros_per_block, norm_code)


def _one_shot_preferred(table: torch.Tensor, max_chunk_bytes: int) -> bool:
    """A compiled kernel serves ops.block_norm_mask for this 2-D table, and either the table fits the budget or
    the kernel reads its rows in place (no copy of it; see the module docstring)."""
    if _backend.resolve("block_norm_mask", table.device, table.dtype)[0] == "reference":
        return False
    return checks.rows_readable_in_place(table) or table.numel() * table.element_size() <= max_chunk_bytes


def block_norm_mask_chunked(data: torch.Tensor, sparsity_level: float, block_shape=(1, 4),
                            zeros_per_block: int | None = None, norm=1, *, packed: bool = False,
                            apply: bool = False, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """ops.block_norm_mask (or, with apply=True, ops.block_norm_mask_apply_) without temporaries of the table's
    size: a compiled kernel takes the table whole (its working memory is O(num_blocks)), the reference and
    layouts the kernel would copy go in row chunks of about max_chunk_bytes; the result is the one-shot op's,
    bit for bit.

    Args:
        data: 1-D (one row) or 2-D float tensor; zeroed in place where the mask is False when apply=True.
        sparsity_level, block_shape, zeros_per_block, norm: as ops.block_norm_mask (norm 'L1'/'L2'/1/2).
        packed: return the mask bit-packed (ops.pack_mask layout) instead of bool.
        max_chunk_bytes: bytes of `data` per chunk, where chunked (at least one block row per chunk).
        out: a contiguous mask in the format asked for (bool of data's shape, or packed bits) to write the mask
            into and return, instead of a new tensor.
    Returns:
        bool mask of data's shape (True = keep), or the packed bits.
    """
    where = "block_norm_mask_chunked"
    checks.check_float_data(data, where)
    level = checks.check_level(sparsity_level, where)
    block = checks.check_block_shape(block_shape, where)
    zeros = checks.check_zeros(zeros_per_block, block, where)
    norm_code = checks.parse_norm(norm)
    max_chunk_bytes = checks.check_int("max_chunk_bytes", max_chunk_bytes, where, 1)
    if out is not None and (checks.check_mask_format(out, data, where) != bool(packed) or not out.is_contiguous()):
        raise ValueError(f"{where}: out must be a contiguous {'packed' if packed else 'bool'} mask of the data")

    table = data.unsqueeze(0) if data.dim() == 1 else data
    height, width = table.shape
    if _one_shot_preferred(table, max_chunk_bytes):
        if out is None:
            one_shot = ops.block_norm_mask_apply_ if apply else ops.block_norm_mask
            return one_shot(data, level, block, zeros, norm_code, packed=packed)
        ops.block_norm_mask_into_(data, out, level, block, zeros, norm_code)
        if apply:
            ops.apply_mask_(data, out)
        return out

    block_cols = -(-width // block[1])
    num_blocks = -(-height // block[0]) * block_cols
    k = reference.num_selected_blocks(level, num_blocks)
    if k == 0 or zeros == 0:  # nothing is zeroed
        ones = packed_ones(table.numel(), data.device) if packed else \
            torch.ones(data.shape, dtype=torch.bool, device=data.device)
        return ones if out is None else out.copy_(ones)
    if out is not None:
        mask = out if packed else out.view(height, width)
    elif packed:
        mask = torch.empty(((table.numel() + 7) // 8,), dtype=torch.uint8, device=data.device)
    else:
        mask = torch.empty((height, width), dtype=torch.bool, device=data.device)

    chunk_rows = rows_per_chunk((height, width), block[0], table.element_size(), max_chunk_bytes, packed)

    def chunks():
        """(rows [start, stop), that chunk's slice of the blocks) of each chunk, in order."""
        for start in range(0, height, chunk_rows):
            stop = min(start + chunk_rows, height)
            first = start // block[0] * block_cols
            yield start, stop, slice(first, first + -(-(stop - start) // block[0]) * block_cols)

    scores = None  # None: every block is selected (k == num_blocks), no scores needed
    if k < num_blocks:
        scores = torch.empty(num_blocks, dtype=reference.score_dtype(data.dtype), device=data.device)
        for start, stop, blocks in chunks():
            scores[blocks] = score_chunk(table[start:stop], block, norm_code)
        threshold, tie_rank = (t.item() for t in ops.select_threshold(scores, k))
        ties_left = tie_rank  # ties at the threshold still to select, lowest block index first

    for start, stop, blocks in chunks():
        chunk = table[start:stop]
        if scores is None:
            keep = ops.block_norm_mask(chunk, 1.0, block, zeros, norm_code, packed=packed)
        else:
            chunk_scores = scores[blocks]
            keep = ops.block_norm_mask_select(chunk, chunk_scores, threshold, ties_left, block, zeros, norm_code,
                                              packed=packed)
            if ties_left and stop < height:  # later chunks get the ties this one did not take
                at_threshold = chunk_scores.isnan() if math.isnan(threshold) else chunk_scores == threshold
                ties_left = max(0, ties_left - int(at_threshold.sum()))
        if apply:
            ops.apply_mask_(chunk, keep)
        if packed:
            mask[start * width // 8:start * width // 8 + keep.numel()] = keep
        else:
            mask[start:stop] = keep
    if out is not None:
        return out
    return mask if packed else mask.view(data.shape)
