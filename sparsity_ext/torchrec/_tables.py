"""Where a TorchRec model keeps its embedding tables: one Table per table, with this rank's live tensors of it.

Found through the model's state_dict, whose tensors share storage with the weights the model reads
(EmbeddingBagCollection / EmbeddingCollection parameters, the flat buffer of fused FBGEMM TBE modules, the
local shards of DistributedModelParallel-sharded collections), so writing into them edits the model:
  - `...embedding_bags.<table>.weight` / `...embeddings.<table>.weight` as a plain tensor: the whole table
    on this rank (an unsharded collection, or a data-parallel table replicated on every rank);
  - the same keys as a ShardedTensor: its shards' offsets and ranks (the same metadata on every rank) give
    the table's layout, its local shards this rank's pieces (table-wise, row-wise, column-wise,
    table-row-wise, table-column-wise);
  - raw TBE modules outside any collection: their split_embedding_weights(), named `<module>[i]`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..distributed._pieces import Piece, Rect

__all__ = ["Table", "find_tables", "tbe_modules"]

_WEIGHT_KEY = re.compile(r"(?:^|\.)(?:embedding_bags|embeddings)\.([^.]+)\.weight$")


@dataclass
class Table:
    name: str
    key: str                        # its state_dict key (or `<TBE module>[i]`)
    shape: tuple[int, int]
    dtype: torch.dtype
    local: list[torch.Tensor]       # this rank's pieces (live views), in the order of `pieces`' own ones
    pieces: tuple[Piece, ...] | None  # every rank's pieces; None: the whole table is held here

    @property
    def sharded(self) -> bool:
        return self.pieces is not None


def tbe_modules(model: nn.Module) -> list[nn.Module]:
    """The FBGEMM table-batched embedding modules of a model, also those a TorchRec module keeps in plain
    attributes (FusedEmbeddingBagCollection's `_emb_modules` list) rather than as submodules."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (DenseTableBatchedEmbeddingBagsCodegen,
                                                                         SplitTableBatchedEmbeddingBagsCodegen)
    kinds = (SplitTableBatchedEmbeddingBagsCodegen, DenseTableBatchedEmbeddingBagsCodegen)
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        for candidate in [module, getattr(module, "_emb_module", None), *getattr(module, "_emb_modules", ())]:
            inner = getattr(candidate, "_emb_module", candidate)
            if isinstance(inner, kinds):
                found.setdefault(id(inner), inner)
    return list(found.values())


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _sharded_table(name: str, key: str, value) -> Table:
    metadata = value.metadata()
    pieces = tuple(Piece(shard.placement.rank(), Rect(*shard.shard_offsets, *shard.shard_sizes))
                   for shard in metadata.shards_metadata)
    local_by_offset = {tuple(shard.metadata.shard_offsets): shard.tensor for shard in value.local_shards()}
    rank = torch.distributed.get_rank()
    local = [local_by_offset[(piece.rect.row, piece.rect.col)] for piece in pieces if piece.rank == rank]
    return Table(name, key, tuple(metadata.size), metadata.tensor_properties.dtype, local, pieces)


def find_tables(model: nn.Module) -> list[Table]:
    """Every embedding table of a TorchRec model (see the module docstring), in state_dict order.
    ValueError when two tables share a name."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    tables: list[Table] = []
    seen_storages = set()
    for key, value in model.state_dict().items():
        match = _WEIGHT_KEY.search(key)
        if match is None:
            continue
        if isinstance(value, ShardedTensor):
            table = _sharded_table(match.group(1), key, value)
        elif isinstance(value, torch.Tensor) and value.dim() == 2:
            table = Table(match.group(1), key, tuple(value.shape), value.dtype, [value], None)
        else:
            continue
        tables.append(table)
        seen_storages.update(_storage(t) for t in table.local)
    for module_name, module in _named_tbes(model):
        weights = module.split_embedding_weights()
        if any(_storage(w) in seen_storages for w in weights):
            continue  # a collection's TBE: its tables were found by name above
        tables.extend(Table(f"{module_name}[{i}]", f"{module_name}[{i}]", tuple(w.shape), w.dtype, [w], None)
                      for i, w in enumerate(weights))
    names = [table.name for table in tables]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"TorchRecSparsifier: tables {duplicates} appear more than once in the model "
                         f"(state_dict keys {[t.key for t in tables if t.name in duplicates]})")
    return tables


def _named_tbes(model: nn.Module):
    """(name, module) of the TBE modules that are submodules of the model (a raw TBE, or one inside a
    module that is not a TorchRec collection)."""
    kinds = tuple({type(m) for m in tbe_modules(model)})
    return [(name or type(module).__name__, module) for name, module in model.named_modules()
            if kinds and isinstance(module, kinds)]
