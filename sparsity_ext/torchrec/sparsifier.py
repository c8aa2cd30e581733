"""TorchRecSparsifier: DataNormSparsifier's masks for the embedding tables of a TorchRec model, in place.

The tables are the model's own storage (see _tables.py), so there is no parametrization to keep the
original weights: step() computes each table's mask from its current weights and zeroes the masked entries
in place. Each table's mask is the one DataNormSparsifier gives the whole table (gathered on one process),
bit for bit: sharded tables go through the distributed engine of sparsity_ext.distributed (_pieces.py),
whole tables (unsharded, data-parallel) through the same kernels locally.
Fused optimizers update the weights inside backward, which would undo the masks: hold_masks() (on by
default) re-applies them after each update of a TBE module, in place.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import checks, ops
from ..data_sparsifier._chunked import DEFAULT_MAX_CHUNK_BYTES, block_norm_mask_chunked
from ..data_sparsifier.data_norm_sparsifier import DataNormSparsifier, data_norm_level
from ..distributed._pieces import piece_masks
from ..distributed._select import Exchange
from ..distributed.sharded import gather_descriptors, plan_table, run_all_or_none
from ._tables import Table, find_tables, tbe_modules

__all__ = ["TorchRecSparsifier", "sparsify_torchrec"]

_CONFIG_KEYS = ("sparsity_level", "sparse_block_shape", "zeros_per_block")


class TorchRecSparsifier:
    """Block-norm sparsity of a TorchRec model's embedding tables, sharded (DistributedModelParallel) or not.

    Args:
        model: a module holding EmbeddingBagCollection / EmbeddingCollection / FusedEmbeddingBagCollection /
            FBGEMM TBE modules, or a DistributedModelParallel model (every rank constructs the sparsifier).
        sparsity_level, sparse_block_shape, zeros_per_block, norm: as DataNormSparsifier (the defaults of
            every table).
        tables: None (every table), a list of table names, or {name: {config overrides}}.
        mask_dtype: torch.bool (1 byte per element) or "packed" (1 bit per element).
        hold_masks: re-apply the masks after every fused-optimizer update (see hold_masks()).
        process_group: the group a sharded model is sharded over (default: the world).
        max_chunk_bytes: table bytes scored or masked at a time.
    Raises ValueError / TypeError for unknown table names or bad configs before anything changes (the same
    arguments give the same error on every rank).
    """

    def __init__(self, model: nn.Module, sparsity_level: float = 0.5, sparse_block_shape=(1, 4),
                 zeros_per_block: int | None = None, norm: str = "L1", tables=None, *,
                 mask_dtype=torch.bool, hold_masks: bool = True, process_group=None,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES):
        where = "TorchRecSparsifier"
        if norm not in ("L1", "L2"):
            raise ValueError(f"{where}: norm must be 'L1' or 'L2', got {norm!r}")
        if not (mask_dtype is torch.bool or mask_dtype == "packed"):
            raise ValueError(f"{where}: mask_dtype must be torch.bool or 'packed', got {mask_dtype!r}")
        self.max_chunk_bytes = checks.check_int("max_chunk_bytes", max_chunk_bytes, where, 1)
        found = {table.name: table for table in find_tables(model)}
        if tables is None:
            tables = list(found)
        overrides = dict(tables) if isinstance(tables, dict) else {name: {} for name in tables}
        unknown = sorted(set(overrides) - set(found), key=str)
        if unknown:
            raise ValueError(f"{where}: no table named {unknown} in the model; its tables: {sorted(found)}")
        defaults = {"sparsity_level": sparsity_level, "sparse_block_shape": sparse_block_shape,
                    "zeros_per_block": zeros_per_block}
        self.configs: dict[str, dict[str, Any]] = {}
        for name, override in overrides.items():
            if not isinstance(override, dict) or set(override) - set(_CONFIG_KEYS):
                raise ValueError(f"{where}: the config of table {name!r} must be a dict with keys from "
                                 f"{_CONFIG_KEYS}, got {override!r}")
            config = dict(defaults, **override)
            block = checks.check_block_shape(config["sparse_block_shape"], where)
            zeros = math.prod(block) if config["zeros_per_block"] is None else config["zeros_per_block"]
            level, block, zeros = DataNormSparsifier._check_config(config["sparsity_level"], block, zeros)
            self.configs[name] = {"sparsity_level": level, "sparse_block_shape": block, "zeros_per_block": zeros}
        self.tables: dict[str, Table] = {name: found[name] for name in self.configs}
        for table in self.tables.values():
            if table.dtype not in checks.FLOAT_DTYPES:
                raise TypeError(f"{where}: table {table.name!r} is {table.dtype}, not a float table")
        self.model = model
        self.norm = norm
        self.mask_dtype = mask_dtype
        self.process_group = process_group
        self.masks: dict[str, list[torch.Tensor]] = {}  # per table, one mask per local piece
        self.last_step_bytes = 0
        self._hooks: list[Any] = []
        if hold_masks:
            self.hold_masks()

    # ------------------------------------------------------------------------------------ masks
    @property
    def _packed(self) -> bool:
        return self.mask_dtype == "packed"

    def _group(self):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchRecSparsifier: the model has sharded tables: call "
                               "torch.distributed.init_process_group first")
        return dist.group.WORLD if self.process_group is None else self.process_group

    def step(self) -> None:
        """Computes every table's mask from its current weights and zeroes the masked entries in place.
        A collective when any table is sharded (every rank calls it); all-or-none across ranks: bad input
        anywhere raises ValueError, a failure while computing RuntimeError, on every rank, and then no
        weight or mask changes."""
        where = "TorchRecSparsifier.step"
        norm_code = checks.parse_norm(self.norm)
        sharded = [table for table in self.tables.values() if table.sharded]
        whole = [table for table in self.tables.values() if not table.sharded]
        plans = {}
        exchange = None
        if sharded:
            group = self._group()
            descriptors = []
            for table in sharded:
                config = self.configs[table.name]
                descriptors.append({"width": table.shape[1], "dtype": str(table.dtype),
                                    "level": config["sparsity_level"], "block": config["sparse_block_shape"],
                                    "zeros": config["zeros_per_block"], "norm": norm_code})
            by_table = gather_descriptors(group, [t.name for t in sharded], descriptors, None, where)
            for table, by_rank in zip(sharded, by_table):
                plans[table.name] = plan_table(table.name, by_rank, table.shape[0], list(table.pieces), True, where)
            exchange = Exchange(group, next((t.local[0].device for t in sharded if t.local), torch.device("cpu")))

        def compute() -> dict[str, list[torch.Tensor]]:
            masks = {}
            with torch.no_grad():
                for table in sharded:
                    masks[table.name] = piece_masks(plans[table.name], table.local, exchange, self._packed,
                                                    self.max_chunk_bytes)
                for table in whole:
                    config = self.configs[table.name]
                    (bh, bw), (rows, cols) = config["sparse_block_shape"], table.shape
                    level = data_norm_level(config["sparsity_level"], -(-rows // bh) * -(-cols // bw))
                    masks[table.name] = [block_norm_mask_chunked(
                        table.local[0], level, config["sparse_block_shape"], config["zeros_per_block"], self.norm,
                        packed=self._packed, max_chunk_bytes=self.max_chunk_bytes)]
            return masks

        masks = run_all_or_none(exchange, compute, where) if exchange is not None else compute()
        self.last_step_bytes = exchange.bytes_sent if exchange is not None else 0
        self.masks.update(masks)
        self.apply_masks()

    def apply_masks(self) -> None:
        """Zeroes the masked entries of every table in place (ops.apply_mask_: no temporary of a table's size)."""
        with torch.no_grad():
            for name, masks in self.masks.items():
                for tensor, mask in zip(self.tables[name].local, masks):
                    ops.apply_mask_(tensor, mask)

    def hold_masks(self) -> None:
        """Re-applies the masks after each update of a fused (TBE) optimizer: a forward hook on every TBE module
        of the model registers, on its output's autograd node, a hook that runs once that node's backward (which
        updates the weights) is done. Tables outside TBE modules are updated by optimizers the caller steps:
        call apply_masks() after optimizer.step()."""
        if self._hooks:
            return
        for module in tbe_modules(self.model):
            self._hooks.append(module.register_forward_hook(self._after_backward_hook))

    def release_masks(self) -> None:
        """Stops re-applying the masks after fused-optimizer updates."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _after_backward_hook(self, module, inputs, output) -> None:
        grad_fn = getattr(output, "grad_fn", None)
        if grad_fn is not None:
            grad_fn.register_hook(lambda grad_inputs, grad_outputs: self.apply_masks())

    def squash_mask(self) -> None:
        """Applies the masks one last time, stops holding them and forgets them; the weights stay sparse."""
        self.apply_masks()
        self.release_masks()
        self.masks = {}

    def get_mask(self, name: str) -> list[torch.Tensor]:
        """The masks of this rank's pieces of table `name` (bool of each piece's shape, True = keep)."""
        if name not in self.masks:
            raise ValueError(f"get_mask: no mask for table {name!r} (unknown, or step() has not run)")
        return [ops.unpack_mask(mask, tensor.shape) if self._packed else mask
                for tensor, mask in zip(self.tables[name].local, self.masks[name])]

    # ------------------------------------------------------------------------------- state_dict
    def _offsets(self, name: str) -> list[tuple[int, int]]:
        table = self.tables[name]
        if not table.sharded:
            return [(0, 0)]
        rank = dist.get_rank()
        return [(p.rect.row, p.rect.col) for p in table.pieces if p.rank == rank]

    def state_dict(self) -> dict[str, Any]:
        """{"masks": {table: {(row offset, column offset) of a local piece: its mask}}, "configs": {table: config},
        "norm", "mask_dtype"}: this rank's masks, keyed by table and shard offsets."""
        return {"masks": {name: dict(zip(self._offsets(name), masks)) for name, masks in self.masks.items()},
                "configs": {name: dict(config) for name, config in self.configs.items()},
                "norm": self.norm, "mask_dtype": self.mask_dtype}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores masks and configs saved by state_dict() for the same tables and shard layout (the masks
        are copied; the weights are not changed until apply_masks() or the next fused update). Every entry is
        checked before anything changes."""
        where = "TorchRecSparsifier.load_state_dict"
        masks = {}
        for name, by_offset in state_dict["masks"].items():
            if name not in self.tables:
                raise ValueError(f"{where}: no table named {name!r} in this sparsifier")
            offsets = self._offsets(name)
            if sorted(by_offset) != sorted(offsets):
                raise ValueError(f"{where}: table {name!r} has local pieces at {offsets}, the state_dict at "
                                 f"{sorted(by_offset)}")
            masks[name] = []
            for offset, tensor in zip(offsets, self.tables[name].local):
                mask = by_offset[offset]
                if checks.check_mask_format(mask, tensor, where) != self._packed:
                    raise ValueError(f"{where}: the mask of {name!r} at {offset} is not a "
                                     f"{'packed' if self._packed else 'bool'} mask")
                masks[name].append(mask.clone())
        for name in state_dict["configs"]:
            if name not in self.tables:
                raise ValueError(f"{where}: no table named {name!r} in this sparsifier")
        self.configs.update({name: dict(config) for name, config in state_dict["configs"].items()})
        self.masks = masks


def sparsify_torchrec(model: nn.Module, **kwargs) -> TorchRecSparsifier:
    """Sparsifies a TorchRec model's tables in place in one call (TorchRecSparsifier(model, **kwargs).step());
    returns the sparsifier, which keeps holding the masks through fused-optimizer updates unless
    hold_masks=False is passed."""
    sparsifier = TorchRecSparsifier(model, **kwargs)
    sparsifier.step()
    return sparsifier
