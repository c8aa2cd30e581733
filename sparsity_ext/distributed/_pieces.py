"""Block-norm masks of a table split into rectangular pieces held by the ranks of a process group.

A table (H x W) is tiled by pieces: disjoint rectangles that cover it, each held by one rank (a rank may hold
several pieces, or none). Every rank knows where every piece lies (the layout) and holds the tensors of its
own pieces. Each piece gets its part of the single-process mask of the whole table, bit for bit.

Blocks need not lie on one piece (TorchRec splits 100 rows 50/50, and block height 4 puts rows 48-51 in one
block; a column shard can be narrower than a block). Each block is owned by the piece holding its first
(top-left) element; the owner scores and masks the block whole:
  1. halo: the elements of owned blocks that lie on other pieces are sent to the owner (nothing is sent when
     every piece starts on block boundaries, the common case);
  2. each owner scores its blocks into integer order keys with the single-process kernel's arithmetic (the
     same elements in the same order, so the same float);
  3. the k-th smallest key over all ranks: _select.distributed_select, ties by lower global block index;
  4. each owner writes the mask of its blocks, and the parts of it on other pieces are sent back.
Steps 1 and 4 move one int64 slot per boundary element; step 3 moves O(histogram) per pass. All collectives
are _select.Exchange all-reduces, so a rank that fails between them cannot leave the others waiting.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..data_sparsifier._chunked import chunk_keep, packed_ones, rows_per_chunk, score_chunk
from ._select import Exchange, distributed_select, order_keys

__all__ = ["Rect", "Piece", "TablePlan", "check_tiling", "piece_masks"]


@dataclass(frozen=True)
class Rect:
    """Rows [row, row + rows) x columns [col, col + cols) of a table."""
    row: int
    col: int
    rows: int
    cols: int

    @property
    def empty(self) -> bool:
        return self.rows <= 0 or self.cols <= 0

    def __and__(self, other: "Rect") -> "Rect":
        row, col = max(self.row, other.row), max(self.col, other.col)
        return Rect(row, col, max(0, min(self.row + self.rows, other.row + other.rows) - row),
                    max(0, min(self.col + self.cols, other.col + other.cols) - col))

    def within(self, other: "Rect") -> tuple[slice, slice]:
        """Index of this rectangle inside a tensor holding `other` (which contains it)."""
        return (slice(self.row - other.row, self.row - other.row + self.rows),
                slice(self.col - other.col, self.col - other.col + self.cols))


@dataclass(frozen=True)
class Piece:
    rank: int
    rect: Rect


@dataclass(frozen=True)
class TablePlan:
    """What every rank knows of one table's selection (the same on every rank)."""
    shape: tuple[int, int]
    pieces: tuple[Piece, ...]
    block: tuple[int, int]
    zeros: int
    norm_code: int
    k: int
    wide_keys: bool  # fp64 data: scores in fp64, int64 order keys (every rank must run the same passes)

    @property
    def grid(self) -> tuple[int, int]:
        return -(-self.shape[0] // self.block[0]), -(-self.shape[1] // self.block[1])

    @property
    def num_blocks(self) -> int:
        rows, cols = self.grid
        return rows * cols


def check_tiling(shape: tuple[int, int], pieces: list[Piece]) -> str | None:
    """Why `pieces` do not tile a table of `shape` (inside it, disjoint, covering it), or None if they do."""
    table = Rect(0, 0, *shape)
    area = 0
    for i, piece in enumerate(pieces):
        if (piece.rect & table) != piece.rect and not piece.rect.empty:
            return f"piece {piece.rect} of rank {piece.rank} lies outside the table {tuple(shape)}"
        area += max(piece.rect.rows, 0) * max(piece.rect.cols, 0)
        for other in pieces[:i]:
            if not (piece.rect & other.rect).empty:
                return f"pieces {other.rect} and {piece.rect} overlap"
    if area != shape[0] * shape[1]:
        return f"the pieces cover {area} of the table's {shape[0] * shape[1]} elements"
    return None


def _owned_rect(rect: Rect, plan: TablePlan) -> Rect:
    """The elements of the blocks whose first element lies in rect: rect moved to block boundaries."""
    (height, width), (bh, bw) = plan.shape, plan.block

    def span(start, count, size, step):
        first = -(-start // step) * step
        last = min(-(-(start + count) // step) * step, size)
        return first, max(0, last - first)

    row, rows = span(rect.row, rect.rows, height, bh)
    col, cols = span(rect.col, rect.cols, width, bw)
    return Rect(row, col, rows, cols)


_BITS_OF = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _as_slots(values: torch.Tensor) -> torch.Tensor:
    """The bit patterns of values as int64 slots (summing them with zeros keeps them exact)."""
    return values.contiguous().view(_BITS_OF[values.element_size()]).flatten().to(torch.int64)


def _from_slots(slots: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    return slots.to(_BITS_OF[size]).view(dtype).view(shape)


def _transfers(plan: TablePlan, owned: list[Rect]) -> list[tuple[int, int, Rect, int]]:
    """(owner piece, holder piece, region, first slot) of every part of an owned block that lies on another
    piece, in one order on every rank; slots number the exchanged elements."""
    transfers, slot = [], 0
    for q in range(len(plan.pieces)):
        for p, holder in enumerate(plan.pieces):
            region = owned[q] & holder.rect
            if q != p and not region.empty:
                transfers.append((q, p, region, slot))
                slot += region.rows * region.cols
    return transfers


def _exchange_regions(transfers, exchange: Exchange, read) -> dict[int, torch.Tensor]:
    """Every transfer's region, read by the rank for which read(transfer) is not None: all-reduced slots, as
    {index of the transfer: int64 slots}."""
    total = sum(region.rows * region.cols for _, _, region, _ in transfers)
    slots = torch.zeros(total, dtype=torch.int64, device=exchange.device)
    for transfer in transfers:
        values = read(transfer)
        if values is not None:
            slots[transfer[3]:transfer[3] + values.numel()] = _as_slots(values)
    slots = exchange.all_reduce_long(slots)
    return {i: slots[t[3]:t[3] + t[2].rows * t[2].cols] for i, t in enumerate(transfers)}


def piece_masks(plan: TablePlan, local: list[torch.Tensor], exchange: Exchange, packed: bool,
                max_chunk_bytes: int) -> list[torch.Tensor]:
    """Each of this rank's pieces' part of the whole table's mask (bool of the piece's shape, or its packed
    bits); `local` holds the tensors of the pieces with rank == exchange.rank, in plan order. A collective:
    every rank of the exchange calls it for the same plan."""
    mine = [i for i, piece in enumerate(plan.pieces) if piece.rank == exchange.rank]
    tensors = dict(zip(mine, local))
    if plan.k == 0 or plan.zeros == 0:  # nothing is zeroed
        return [packed_ones(t.numel(), t.device) if packed else torch.ones(t.shape, dtype=torch.bool,
                                                                            device=t.device) for t in local]
    pieces = plan.pieces
    owned = [_owned_rect(piece.rect, plan) for piece in pieces]
    transfers = _transfers(plan, owned)
    (_, grid_cols), (bh, bw) = plan.grid, plan.block

    # 1. halo: each owner's tile holds its blocks whole (a view of its piece when nothing lies elsewhere)
    halo = {}
    if transfers:
        halo = _exchange_regions(transfers, exchange, lambda t: tensors[t[1]][t[2].within(pieces[t[1]].rect)]
                                 if t[1] in tensors else None)
    tiles: dict[int, torch.Tensor] = {}
    for q in mine:
        rect, own = owned[q], pieces[q].rect
        if rect.empty:
            continue
        if (rect & own) == rect:
            tiles[q] = tensors[q][rect.within(own)]
            continue
        tile = torch.empty((rect.rows, rect.cols), dtype=tensors[q].dtype, device=tensors[q].device)
        inside = rect & own
        tile[inside.within(rect)] = tensors[q][inside.within(own)]
        for i, (owner, _, region, _) in enumerate(transfers):
            if owner == q:
                tile[region.within(rect)] = _from_slots(halo[i], tile.dtype, (region.rows, region.cols))
        tiles[q] = tile
    del halo

    def chunk_starts(tile: torch.Tensor) -> range:
        return range(0, tile.shape[0], rows_per_chunk(tuple(tile.shape), bh, tile.element_size(),
                                                      max_chunk_bytes, packed))

    # 2-3. scores of the owned blocks, then the global selection
    selected: dict[int, torch.Tensor | None] = {q: None for q in tiles}  # None: every block is selected
    if plan.k < plan.num_blocks:
        key_dtype = torch.int64 if plan.wide_keys else torch.int32
        counts = {q: -(-tile.shape[0] // bh) * -(-tile.shape[1] // bw) for q, tile in tiles.items()}
        keys = torch.empty(sum(counts.values()), dtype=key_dtype, device=exchange.device)
        firsts, first = {}, 0
        for q, tile in tiles.items():
            firsts[q] = first
            tile_cols = -(-tile.shape[1] // bw)
            for start in chunk_starts(tile):
                chunk_keys = order_keys(score_chunk(tile[start:start + chunk_starts(tile).step], plan.block,
                                                    plan.norm_code))
                at = first + start // bh * tile_cols
                keys[at:at + chunk_keys.numel()] = chunk_keys
            first += counts[q]
        # Global index of local key i: its tile's first block (row, col) and the tile's width in blocks.
        starts = torch.tensor([firsts[q] for q in tiles], dtype=torch.int64)
        origins = torch.tensor([[owned[q].row // bh, owned[q].col // bw, -(-tiles[q].shape[1] // bw)]
                                for q in tiles], dtype=torch.int64).view(-1, 3)

        def global_index(positions: torch.Tensor) -> torch.Tensor:
            positions = positions.cpu()
            which = torch.searchsorted(starts, positions, right=True) - 1
            offset = positions - starts[which]
            row0, col0, tile_cols = origins[which].unbind(1)
            return (row0 + offset // tile_cols) * grid_cols + col0 + offset % tile_cols

        flags = distributed_select(keys, plan.k, exchange, global_index, plan.num_blocks)
        del keys
        selected = {q: flags[firsts[q]:firsts[q] + counts[q]] for q in tiles}

    def tile_mask_chunks(q: int):
        """(first row, bool keep flags) of each row chunk of q's tile."""
        tile = tiles[q]
        tile_cols = -(-tile.shape[1] // bw)
        step = chunk_starts(tile).step
        for start in chunk_starts(tile):
            chunk = tile[start:start + step]
            chunk_selected = None
            if selected[q] is not None:
                first = start // bh * tile_cols
                chunk_selected = selected[q][first:first + -(-chunk.shape[0] // bh) * tile_cols]
            yield start, chunk_keep(chunk, chunk_selected, plan.block, plan.zeros, plan.norm_code)

    # 4. masks: an aligned piece's is its tile's, written chunk by chunk; others are assembled
    def aligned(p: int) -> bool:  # no block of the piece's crosses its edges: no transfer involves it
        return owned[p] == pieces[p].rect

    tile_masks = {}
    for q in tiles:
        if not aligned(q):
            tile_masks[q] = torch.empty((owned[q].rows, owned[q].cols), dtype=torch.bool, device=exchange.device)
            for start, keep in tile_mask_chunks(q):
                tile_masks[q][start:start + keep.shape[0]] = keep
    returned = {}
    if transfers:
        returned = _exchange_regions(transfers, exchange, lambda t: tile_masks[t[0]][t[2].within(owned[t[0]])]
                                     if t[0] in tile_masks else None)
    masks = []
    for p in mine:
        rect, tensor = pieces[p].rect, tensors[p]
        if p in tiles and aligned(p):
            masks.append(_written_in_chunks(tile_mask_chunks(p), tensor, packed))
            continue
        mask = torch.empty(tuple(tensor.shape), dtype=torch.bool, device=tensor.device)
        if p in tile_masks:
            inside = owned[p] & rect
            mask[inside.within(rect)] = tile_masks[p][inside.within(owned[p])]
        for i, (_, holder, region, _) in enumerate(transfers):
            if holder == p:
                mask[region.within(rect)] = returned[i].view(region.rows, region.cols).bool()
        masks.append(ops.pack_mask(mask) if packed else mask)
    return masks


def _written_in_chunks(chunks, tensor: torch.Tensor, packed: bool) -> torch.Tensor:
    """The mask of a piece from its row chunks' keep flags (packed chunk by chunk: no bool mask of the
    whole piece when packed)."""
    rows, width = tensor.shape
    if packed:
        mask = torch.empty(((tensor.numel() + 7) // 8,), dtype=torch.uint8, device=tensor.device)
    else:
        mask = torch.empty((rows, width), dtype=torch.bool, device=tensor.device)
    for start, keep in chunks:
        if packed:
            bits = ops.pack_mask(keep)
            mask[start * width // 8:start * width // 8 + bits.numel()] = bits
        else:
            mask[start:start + keep.shape[0]] = keep
    return mask
