"""Block-norm masks of tables whose rows are sharded over the ranks of a process group.

Rank r holds rows [start_r, start_r + rows_r) of the table, ranks in row order (uneven sizes and empty
shards allowed). Every shard that holds rows must start on a block-row boundary, so each block lies on
one rank; otherwise ValueError on every rank before anything changes. The mask each rank gets is its
rows of the single-process mask of the whole table (sparsity_ext.ops.block_norm_mask's contract, or
DataNormSparsifier's), bit for bit:
  1. each rank scores its own blocks (row chunks of at most max_chunk_bytes) into integer order keys;
  2. the k-th smallest key over all ranks is found by a distributed radix select
     (sparsity_ext.distributed._select): a few all-reduces of 2^11 counts, then one of the per-rank tie
     counts, independent of the table's size;
  3. each rank writes the mask of its own rows.
Failure semantics: a step first checks every rank's input in one all_gather_object (bad input anywhere:
ValueError on every rank, nothing changed), computes every mask into temporaries, then votes; masks are
stored only if every rank succeeded, else RuntimeError on every rank naming the failed rank(s). No rank
is left waiting in a collective: see _select.Exchange.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from .. import ops
from ..data_sparsifier._chunked import (DEFAULT_MAX_CHUNK_BYTES, chunk_keep, packed_ones, rows_per_chunk,
                                        score_chunk)
from ..data_sparsifier.data_norm_sparsifier import DataNormSparsifier, data_norm_level
from ..reference import num_selected_blocks, score_dtype
from ._select import Exchange, PeerFailure, distributed_select, order_keys

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch without DTensor: plain tensors only
    DTensor = Shard = None

__all__ = ["sharded_block_norm_mask", "ShardedDataNormSparsifier"]


# ------------------------------------------------------------------------------------ shards
def _resolve_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sharded masks need torch.distributed: call torch.distributed.init_process_group first")
    return dist.group.WORLD if group is None else group


def _same_ranks(a, b) -> bool:
    return dist.get_process_group_ranks(a) == dist.get_process_group_ranks(b)


def _local_shard(data, group, where: str):
    """(local tensor, process group) of a shard: a DTensor gives its local rows and its mesh's group (which
    must have group's ranks when group is given); anything else is the local shard of `group`. The checks
    here depend only on properties every rank's DTensor shares, so they raise on every rank alike."""
    if DTensor is None or not isinstance(data, DTensor):
        return data, _resolve_group(group)
    mesh = data.device_mesh
    if mesh.ndim != 1 or tuple(data.placements) != (Shard(0),):
        raise ValueError(f"{where}: a DTensor must be row-sharded on a 1-D mesh (placements (Shard(0),)), got "
                         f"placements {tuple(data.placements)} on a {mesh.ndim}-D mesh")
    mesh_group = mesh.get_group()
    # Shard i of a DTensor lives at mesh position i; shards are ordered here by group rank.
    if mesh.mesh.flatten().tolist() != dist.get_process_group_ranks(mesh_group):
        raise ValueError(f"{where}: the DTensor's mesh orders ranks {mesh.mesh.flatten().tolist()}, its group "
                         f"{dist.get_process_group_ranks(mesh_group)}; only meshes in group-rank order are supported")
    if group is not None and not _same_ranks(group, mesh_group):
        raise ValueError(f"{where}: the DTensor's mesh spans ranks {dist.get_process_group_ranks(mesh_group)}, "
                         f"the process group ranks {dist.get_process_group_ranks(group)}")
    with torch.no_grad():
        return data.to_local(), mesh_group  # shares the DTensor's storage


@dataclass(frozen=True)
class _ShardPlan:
    """What every rank needs to know of one table's selection (the same on every rank)."""
    block: tuple[int, int]
    zeros: int
    norm_code: int
    k: int
    num_blocks: int


def _describe(data: torch.Tensor, level: float, block, zeros: int, norm_code: int) -> dict[str, Any]:
    """What the other ranks must agree with about one local shard."""
    return {"rows": int(data.shape[0]), "width": int(data.shape[1]), "dtype": str(data.dtype),
            "level": level, "block": tuple(block), "zeros": zeros, "norm": norm_code}


def _plan_all(descriptors: list[dict[str, Any]], data_norm_levels: bool, where: str) -> list[_ShardPlan]:
    """Checks the gathered descriptors of every rank (each {"error": str | None, "names": [...],
    "shards": [...]}) and builds one plan per table; the same ValueError on every rank if they do not fit."""
    errors = [f"rank {rank}: {d['error']}" for rank, d in enumerate(descriptors) if d["error"]]
    if errors:
        raise ValueError(f"{where}: bad input ({'; '.join(errors)}); nothing was changed")
    names = descriptors[0]["names"]
    for rank, d in enumerate(descriptors):
        if d["names"] != names:
            raise ValueError(f"{where}: every rank must hold the same names in the same order; rank 0 holds "
                             f"{names}, rank {rank} holds {d['names']}")
    plans = []
    for i, name in enumerate(names):
        shards = [d["shards"][i] for d in descriptors]
        label = f"{name!r}: " if name is not None else ""
        for key in ("width", "dtype", "level", "block", "zeros", "norm"):
            values = [s[key] for s in shards]
            if any(v != values[0] for v in values):
                raise ValueError(f"{where}: {label}every rank's shard must have the same {key}; "
                                 f"by rank: {values}")
        rows = tuple(s["rows"] for s in shards)
        bh, bw = shards[0]["block"]
        start = 0
        for rank, count in enumerate(rows):
            if count and start % bh:
                raise ValueError(f"{where}: {label}the shard of rank {rank} starts at row {start}, not a multiple of "
                                 f"the block height {bh}; shard boundaries must fall on block-row boundaries "
                                 f"(rows by rank: {list(rows)})")
            start += count
        num_blocks = -(-start // bh) * -(-shards[0]["width"] // bw)
        level = shards[0]["level"]
        if data_norm_levels:
            level = data_norm_level(level, num_blocks)
        plans.append(_ShardPlan((bh, bw), shards[0]["zeros"], shards[0]["norm"],
                                num_selected_blocks(level, num_blocks), num_blocks))
    return plans


def _gather_plans(group, names: list, shards: list[dict] | None, error: str | None,
                  data_norm_levels: bool, where: str) -> list[_ShardPlan]:
    descriptors: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(descriptors, {"error": error, "names": names, "shards": shards}, group=group)
    return _plan_all(descriptors, data_norm_levels, where)


# ------------------------------------------------------------------------------------- masks
def _all_keep(local: torch.Tensor, packed: bool) -> torch.Tensor:
    if packed:
        return packed_ones(local.numel(), local.device)
    return torch.ones(local.shape, dtype=torch.bool, device=local.device)


def _local_keep(local: torch.Tensor, plan: _ShardPlan, exchange: Exchange, packed: bool,
                max_chunk_bytes: int) -> torch.Tensor:
    """This rank's rows of the whole table's mask (bool of local's shape, or packed bits)."""
    rows, width = local.shape
    if plan.k == 0 or plan.zeros == 0:  # nothing is zeroed
        return _all_keep(local, packed)
    bh, bw = plan.block
    block_cols = -(-width // bw)
    step = rows_per_chunk((local.shape[0], width), bh, local.element_size(), max_chunk_bytes, packed)
    starts = range(0, rows, step)

    selected = None  # None: every block is selected
    if plan.k < plan.num_blocks:  # an empty shard too takes part in the selection's collectives
        key_dtype = torch.int64 if score_dtype(local.dtype) == torch.float64 else torch.int32
        keys = torch.empty(-(-rows // bh) * block_cols, dtype=key_dtype, device=local.device)
        for start in starts:
            chunk_keys = order_keys(score_chunk(local[start:start + step], plan.block, plan.norm_code))
            first = start // bh * block_cols
            keys[first:first + chunk_keys.numel()] = chunk_keys
        selected = distributed_select(keys, plan.k, exchange)
        del keys

    def chunk_mask(start: int) -> torch.Tensor:
        chunk = local[start:start + step]
        chunk_selected = None
        if selected is not None:
            first = start // bh * block_cols
            chunk_selected = selected[first:first + -(-chunk.shape[0] // bh) * block_cols]
        keep = chunk_keep(chunk, chunk_selected, plan.block, plan.zeros, plan.norm_code)
        return ops.pack_mask(keep) if packed else keep

    if rows <= step:  # one chunk: its mask as it is (or an empty shard's)
        return chunk_mask(0) if rows else _all_keep(local, packed)
    if packed:
        mask = torch.empty(((local.numel() + 7) // 8,), dtype=torch.uint8, device=local.device)
    else:
        mask = torch.empty((rows, width), dtype=torch.bool, device=local.device)
    for start in starts:
        part = chunk_mask(start)
        if packed:
            mask[start * width // 8:start * width // 8 + part.numel()] = part
        else:
            mask[start:start + part.shape[0]] = part
    return mask


def _run_all_or_none(exchange: Exchange, compute: Callable[[], Any], where: str):
    """compute() on every rank, then a vote: its result if every rank succeeded, else RuntimeError on every
    rank naming the failed ranks and their errors (the failed rank's own error chained)."""
    local_error = None
    try:
        result = compute()
        exchange.all_reduce()  # the vote: every rank got here without raising
        return result
    except PeerFailure as failure:
        failed = failure.ranks
    except Exception as exc:  # noqa: BLE001 -- any local failure must reach the other ranks
        local_error = exc
        failed = exchange.fail()
    messages: list[Any] = [None] * exchange.world_size
    dist.all_gather_object(messages, None if local_error is None else f"{type(local_error).__name__}: {local_error}",
                           group=exchange.group)
    details = "; ".join(f"rank {rank}: {messages[rank]}" for rank in failed)
    raise RuntimeError(f"{where}: failed on rank(s) {failed} ({details}); no shard's mask was changed") from local_error


def _device_of(tensors: list[torch.Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


# ------------------------------------------------------------------------------- function
def sharded_block_norm_mask(local_shard: torch.Tensor, sparsity_level: float, block_shape=(1, 4),
                            zeros_per_block: int | None = None, norm=2, group=None, *, packed: bool = False,
                            max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> torch.Tensor:
    """This rank's rows of ops.block_norm_mask of the whole row-sharded table; a collective: every rank
    of the group calls it, in the same order as its other collectives.

    Args:
        local_shard: this rank's rows (2-D float tensor; ranks hold consecutive row ranges in rank order,
            each non-empty shard starting on a block-row boundary), or a DTensor with placements
            (Shard(0),) on a 1-D mesh (its local rows; its mesh's group serves when group is None).
        sparsity_level, block_shape, zeros_per_block, norm: as ops.block_norm_mask, applied to the whole
            table (k counts the blocks of every rank).
        group: the process group over which the table is sharded (default: the world).
        packed: return this shard's mask bit-packed (ops.pack_mask of the local mask).
        max_chunk_bytes: bytes of the local shard scored or masked at a time.
    Returns:
        bool mask of the local shard's shape (True = keep), or its packed bits; a plain tensor.
    Raises:
        ValueError on every rank when any rank's input is bad or the shards do not fit together;
        RuntimeError on every rank when any rank fails while computing.
    """
    where = "sharded_block_norm_mask"
    local, group = _local_shard(local_shard, group, where)
    error, shard = None, None
    try:
        ops._check_float_data(local, where, dims=(2,))
        level = ops._check_level(sparsity_level, where)
        block = ops._check_block_shape(block_shape, where)
        zeros = ops._check_zeros(zeros_per_block, block, where)
        budget = ops._check_int("max_chunk_bytes", max_chunk_bytes, where, 1)
        shard = _describe(local, level, block, zeros, ops.parse_norm(norm))
    except Exception as exc:  # noqa: BLE001 -- reported to every rank by the gather below
        error = f"{type(exc).__name__}: {exc}"
    plan, = _gather_plans(group, [None], None if error else [shard], error, False, where)
    exchange = Exchange(group, local.device)
    return _run_all_or_none(exchange, lambda: _local_keep(local, plan, exchange, bool(packed), budget), where)


# ---------------------------------------------------------------------------- sparsifier
class ShardedDataNormSparsifier(DataNormSparsifier):
    """DataNormSparsifier over row-sharded tables: each rank adds its own shard of every table (same names,
    same order, same config on every rank) and step() gives each shard its rows of the mask that
    DataNormSparsifier gives the whole table. add_data, get_mask, squash_mask, state_dict behave as in
    DataNormSparsifier, on the local shard; step() and update_mask() are collectives over the group.

    Args:
        process_group: the group the tables are sharded over (default: the world); keyword-only.
        data_list, sparsity_level, sparse_block_shape, zeros_per_block, norm, mask_dtype, max_chunk_bytes:
            as DataNormSparsifier (max_chunk_bytes bounds the local rows scored or masked at a time).
    Data: a 2-D tensor, nn.Parameter or nn.Embedding(Bag) holding this rank's rows, or a DTensor (or an
    embedding whose weight is one) with placements (Shard(0),) on a 1-D mesh over the group's ranks: its
    local rows are added (the same storage, so squash_mask zeroes the DTensor's shard).
    step() is all-or-none across ranks: bad input anywhere raises ValueError on every rank, a failure while
    computing raises RuntimeError on every rank, and then no rank's masks change.
    """

    def __init__(self, data_list=None, sparsity_level: float = 0.5, sparse_block_shape=(1, 4),
                 zeros_per_block: int | None = None, norm: str = "L1", *, process_group=None, mask_dtype=None,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES):
        self.process_group = process_group  # set first: the base constructor adds data_list
        super().__init__(data_list, sparsity_level, sparse_block_shape, zeros_per_block, norm,
                         mask_dtype=mask_dtype, max_chunk_bytes=max_chunk_bytes)
        self.last_step_bytes = 0  # bytes this rank contributed to the collectives of the last mask update

    @property
    def group(self):
        return _resolve_group(self.process_group)

    def add_data(self, name: str, data, reuse_mask: bool = True, **config):
        """DataNormSparsifier.add_data on this rank's shard (a DTensor, or an embedding whose weight is one,
        is replaced by its local rows)."""
        weight = self._extract_weight(data)
        if DTensor is not None and isinstance(weight, DTensor):
            group = self.group
            data, mesh_group = _local_shard(weight, None, "ShardedDataNormSparsifier.add_data")
            if not _same_ranks(mesh_group, group):
                raise ValueError(f"ShardedDataNormSparsifier.add_data: the DTensor's mesh spans ranks "
                                 f"{dist.get_process_group_ranks(mesh_group)}, the sparsifier's group ranks "
                                 f"{dist.get_process_group_ranks(group)}")
        return super().add_data(name, data, reuse_mask, **config)

    def step(self) -> None:
        """Updates the mask of every unsquashed name from the whole table's blocks; a collective."""
        if not self.enable_mask_update:
            return
        with torch.no_grad():
            names = [name for name in self.data_groups if not self._squashed(name)]
            self._update_masks([(name, self.get_data(name), self.data_groups[name]) for name in names])

    def update_mask(self, name, data, sparsity_level, sparse_block_shape, zeros_per_block, **kwargs):
        """The mask of one name (a collective: every rank calls it for the same name)."""
        config = dict(kwargs, sparsity_level=sparsity_level, sparse_block_shape=sparse_block_shape,
                      zeros_per_block=zeros_per_block)
        with torch.no_grad():
            self._update_masks([(name, data, config)])

    def _update_masks(self, items: list[tuple[str, torch.Tensor, dict]]) -> None:
        where = f"{type(self).__name__}.step"
        group = self.group
        error, shards = None, []
        try:
            for name, data, config in items:
                self._validate_data(name, data, **config)
                if data.dim() != 2:
                    raise ValueError(f"data {name!r} must be 2-D (its rows are sharded over ranks), "
                                     f"got shape {tuple(data.shape)}")
                level, block, zeros = self._check_config(config["sparsity_level"], config["sparse_block_shape"],
                                                         config["zeros_per_block"])
                shards.append(_describe(data, level, block, zeros, ops.parse_norm(self.norm)))
        except Exception as exc:  # noqa: BLE001 -- reported to every rank by the gather below
            error = f"{type(exc).__name__}: {exc}"
        plans = _gather_plans(group, [name for name, _, _ in items], None if error else shards, error, True, where)
        exchange = Exchange(group, _device_of([data for _, data, _ in items]))
        packed = self.mask_dtype == "packed"

        def compute():
            return {name: _local_keep(data, plan, exchange, packed, self.max_chunk_bytes)
                    for (name, data, _), plan in zip(items, plans)}

        keeps = _run_all_or_none(exchange, compute, where)
        self.last_step_bytes = exchange.bytes_sent
        for name, keep in keeps.items():
            self.get_mask(name).data = keep.to(torch.int8) if self.mask_dtype is None else keep

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("process_group", None)  # a process group does not pickle; the unpickled one uses the world
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("process_group", None)
