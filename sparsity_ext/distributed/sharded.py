"""Block-norm masks of tables whose rows are sharded over the ranks of a process group.

Rank r holds rows [start_r, start_r + rows_r) of the table, ranks in row order (uneven sizes and empty
shards allowed; a shard may start inside a block row). The mask each rank gets is its rows of the
single-process mask of the whole table (sparsity_ext.ops.block_norm_mask's contract, or
DataNormSparsifier's), bit for bit:
  1. each rank scores the blocks that start in its rows (row chunks of at most max_chunk_bytes) into
     integer order keys; a block row split between ranks is completed from the next rank's rows first;
  2. the k-th smallest key over all ranks is found by a distributed radix select
     (sparsity_ext.distributed._select): a few all-reduces of 2^11 counts, then one of the per-rank tie
     counts, independent of the table's size;
  3. each rank writes the mask of its own rows.
The row shards are the one-column case of the rectangular pieces of _pieces.py (which TorchRec uses).
Failure semantics: a step first checks every rank's input in one all_gather_object (bad input anywhere:
ValueError on every rank, nothing changed), computes every mask into temporaries, then votes; masks are
stored only if every rank succeeded, else RuntimeError on every rank naming the failed rank(s). No rank
is left waiting in a collective: see _select.Exchange.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from .. import checks
from ..data_sparsifier._chunked import DEFAULT_MAX_CHUNK_BYTES, packed_ones
from ..data_sparsifier.data_norm_sparsifier import DataNormSparsifier, data_norm_level
from ..reference import num_selected_blocks
from ._pieces import Piece, Rect, TablePlan, check_tiling, piece_masks
from ._select import Exchange, PeerFailure

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


def _describe(data: torch.Tensor, level: float, block, zeros: int, norm_code: int) -> dict[str, Any]:
    """What the other ranks must agree with about one local shard."""
    return {"rows": int(data.shape[0]), "width": int(data.shape[1]), "dtype": str(data.dtype),
            "level": level, "block": tuple(block), "zeros": zeros, "norm": norm_code}


def plan_table(name, shards: list[dict[str, Any]], height: int, pieces: list[Piece], data_norm_levels: bool,
               where: str) -> TablePlan:
    """The plan of one table of `height` rows from every rank's descriptor of it (checked to agree) and its
    pieces; ValueError if they do not agree or the pieces do not tile the table."""
    label = f"{name!r}: " if name is not None else ""
    for key in ("width", "dtype", "level", "block", "zeros", "norm"):
        values = [s[key] for s in shards]
        if any(v != values[0] for v in values):
            raise ValueError(f"{where}: {label}every rank's shard must have the same {key}; by rank: {values}")
    first = shards[0]
    shape = (height, first["width"])
    problem = check_tiling(shape, pieces)
    if problem:
        raise ValueError(f"{where}: {label}the shards do not tile the table: {problem}")
    bh, bw = first["block"]
    num_blocks = -(-shape[0] // bh) * -(-shape[1] // bw)
    level = data_norm_level(first["level"], num_blocks) if data_norm_levels else first["level"]
    return TablePlan(shape, tuple(pieces), (bh, bw), first["zeros"], first["norm"],
                     num_selected_blocks(level, num_blocks), first["dtype"] == str(torch.float64))


def gather_descriptors(group, names: list, shards: list[dict] | None, error: str | None,
                       where: str) -> list[list[dict[str, Any]]]:
    """Every rank's descriptors of its shards (one per name, in the same order on every rank), as a list per
    name of one descriptor per rank; a collective. ValueError on every rank when any rank reported an error
    or the ranks hold different names."""
    descriptors: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(descriptors, {"error": error, "names": names, "shards": shards}, group=group)
    errors = [f"rank {rank}: {d['error']}" for rank, d in enumerate(descriptors) if d["error"]]
    if errors:
        raise ValueError(f"{where}: bad input ({'; '.join(errors)}); nothing was changed")
    for rank, d in enumerate(descriptors):
        if d["names"] != names:
            raise ValueError(f"{where}: every rank must hold the same names in the same order; rank 0 holds "
                             f"{descriptors[0]['names']}, rank {rank} holds {d['names']}")
    return [[d["shards"][i] for d in descriptors] for i in range(len(names))]


def _gather_plans(group, names: list, shards: list[dict] | None, error: str | None,
                  data_norm_levels: bool, where: str) -> list[TablePlan]:
    """One plan per row-sharded table, its rows held by the ranks in rank order (see gather_descriptors)."""
    plans = []
    for name, by_rank in zip(names, gather_descriptors(group, names, shards, error, where)):
        pieces, start = [], 0
        for rank, shard in enumerate(by_rank):
            if shard["rows"]:
                pieces.append(Piece(rank, Rect(start, 0, shard["rows"], shard["width"])))
            start += shard["rows"]
        plans.append(plan_table(name, by_rank, start, pieces, data_norm_levels, where))
    return plans


# ------------------------------------------------------------------------------------- masks
def _local_keep(local: torch.Tensor, plan: TablePlan, exchange: Exchange, packed: bool,
                max_chunk_bytes: int) -> torch.Tensor:
    """This rank's rows of the whole table's mask (bool of local's shape, or packed bits); an empty shard
    holds no piece but takes part in the collectives."""
    holds_rows = any(piece.rank == exchange.rank for piece in plan.pieces)
    masks = piece_masks(plan, [local] if holds_rows else [], exchange, packed, max_chunk_bytes)
    if masks:
        return masks[0]
    return packed_ones(0, local.device) if packed else torch.ones(local.shape, dtype=torch.bool, device=local.device)


def run_all_or_none(exchange: Exchange, compute: Callable[[], Any], where: str):
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
        checks.check_float_data(local, where, dims=(2,))
        level = checks.check_level(sparsity_level, where)
        block = checks.check_block_shape(block_shape, where)
        zeros = checks.check_zeros(zeros_per_block, block, where)
        budget = checks.check_int("max_chunk_bytes", max_chunk_bytes, where, 1)
        shard = _describe(local, level, block, zeros, checks.parse_norm(norm))
    except Exception as exc:  # noqa: BLE001 -- reported to every rank by the gather below
        error = f"{type(exc).__name__}: {exc}"
    plan, = _gather_plans(group, [None], None if error else [shard], error, False, where)
    exchange = Exchange(group, local.device)
    return run_all_or_none(exchange, lambda: _local_keep(local, plan, exchange, bool(packed), budget), where)


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
                shards.append(_describe(data, level, block, zeros, checks.parse_norm(self.norm)))
        except Exception as exc:  # noqa: BLE001 -- reported to every rank by the gather below
            error = f"{type(exc).__name__}: {exc}"
        plans = _gather_plans(group, [name for name, _, _ in items], None if error else shards, error, True, where)
        exchange = Exchange(group, _device_of([data for _, data, _ in items]))
        packed = self.mask_dtype == "packed"

        def compute():
            return {name: _local_keep(data, plan, exchange, packed, self.max_chunk_bytes)
                    for (name, data, _), plan in zip(items, plans)}

        keeps = run_all_or_none(exchange, compute, where)
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
