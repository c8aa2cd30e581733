"""BaseDataSparsifier: sparsifies data the sparsifier holds itself (tensors, parameters, embedding tables)
rather than the layers of a model.

Mirrors torch.ao.pruning._experimental.data_sparsifier.BaseDataSparsifier: same constructor, add_data /
get_data / get_mask / step / squash_mask, the `update_mask(name, data, **config)` hook, the internal
`_container` module that owns the parametrized data, `data_groups`, and the state_dict layout
{"state", "data_groups", "_container"} (masks saved as sparse COO tensors).

Beyond torch.ao.pruning (opt-in, `mask_dtype`): lean masks for huge tables. The default keeps
torch.ao.pruning's mask (a float tensor of the data's size; DataNormSparsifier turns it into int8 on
its first step). `mask_dtype=torch.bool` stores 1 byte per element, `mask_dtype="packed"` 1 bit per
element (uint8, sparsity_ext.ops.pack_mask's layout); with either, squash_mask zeroes the data in place
instead of building `mask * data`, and state_dict keeps these masks as they are (no COO conversion),
so a 10^8-row table never needs a float mask, or any other temporary, of its own size.
"""
from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import ops
from ..sparsifier.base_sparsifier import BaseSparsifier
from ..sparsifier.utils import FakeSparsity
from ._chunked import packed_ones

__all__ = ["BaseDataSparsifier", "PackedFakeSparsity", "SUPPORTED_TYPES", "EMBEDDING_TYPES"]

EMBEDDING_TYPES = {nn.Embedding, nn.EmbeddingBag}
SUPPORTED_TYPES = {torch.Tensor, nn.Parameter, *EMBEDDING_TYPES}
MASK_DTYPES = (None, torch.bool, "packed")


class _Container(nn.Module):
    """Holds each piece of data as a buffer named after it, parametrized by its mask."""


class PackedFakeSparsity(FakeSparsity):
    """FakeSparsity whose `mask` buffer is bit-packed (1 bit per element, ops.pack_mask's layout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask.dim() != 1 or self.mask.numel() != (x.numel() + 7) // 8:
            raise AssertionError(f"PackedFakeSparsity: a packed mask of {tuple(self.mask.shape)} bytes does not "
                                 f"fit a tensor of shape {tuple(x.shape)}")
        return ops.unpack_mask(self.mask, x.shape) * x


def _keep_flags(mask: torch.Tensor) -> torch.Tensor:
    """A dense mask as bool (True = keep); a bool mask is returned as it is, since `bool_mask != 0`
    computes in int64 (torch promotes bool against an int): a temporary of 8 bytes per element."""
    return mask if mask.dtype == torch.bool else mask != 0


def _is_packed_for(mask: torch.Tensor, data: torch.Tensor) -> bool:
    """mask holds data's elements as bits (a 1-D uint8 of ceil(numel/8) bytes) rather than one per element."""
    return (mask.dtype == torch.uint8 and mask.dim() == 1 and mask.shape != data.shape
            and mask.numel() == (data.numel() + 7) // 8)


class BaseDataSparsifier(BaseSparsifier):
    """Base class of the data sparsifiers: subclasses implement `update_mask(name, data, **config)`.

    Args:
        data_list: [(name, data)] added with the defaults (see add_data for the supported types).
        mask_dtype: None (torch.ao.pruning's float mask), torch.bool, or "packed" (1 bit per element);
            see the module docstring.
        **defaults: default config of every piece of data; add_data's keyword arguments override them.

    Attributes:
        data_groups: {name: config}; step() calls update_mask(name, original data, **config).
        state: {name: {"mask": mask, ...}}; the mask object is the one in the parametrization, and
            update_mask changes it in place (or through `mask.data`), never replaces it.
        _container: the nn.Module holding the data (as buffers) and their parametrizations.
    Names may not contain '.' (they are attribute names of the container); the usual choice is the
    parameter's name with '.' replaced by '_'.
    """

    def __init__(self, data_list: list[tuple[str, Any]] | None = None, mask_dtype=None, **defaults):
        if not any(mask_dtype is choice or mask_dtype == choice for choice in MASK_DTYPES):
            raise ValueError(f"mask_dtype must be None (float mask, as torch.ao.pruning), torch.bool or 'packed', "
                             f"got {mask_dtype!r}")
        super().__init__(defaults=defaults)
        self.mask_dtype = mask_dtype
        self._container = _Container()
        self.data_groups: dict[str, dict] = defaultdict(dict)
        for name, data in data_list or ():
            self.add_data(name, data, **self.defaults)

    def prepare(self, model, config):
        raise NotImplementedError("a data sparsifier holds its own data: use add_data(name, data), not prepare")

    # ------------------------------------------------------------------------------------ masks
    @property
    def _lean(self) -> bool:
        return self.mask_dtype is not None

    def _new_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The all-keep mask of `weight` in this sparsifier's mask format."""
        if self.mask_dtype is None:
            return torch.ones_like(weight)
        if self.mask_dtype == "packed":
            return packed_ones(weight.numel(), weight.device)
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)

    def _to_mask_format(self, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A given mask (dense of weight's shape, or packed bits) in this sparsifier's mask format."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        packed = _is_packed_for(mask, weight)
        if not packed and mask.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != data shape {tuple(weight.shape)}")
        if self.mask_dtype is None:
            return ops.unpack_mask(mask, weight.shape).to(weight.dtype) if packed else mask
        if self.mask_dtype == "packed":
            return mask if packed else ops.pack_mask(_keep_flags(mask))
        return ops.unpack_mask(mask, weight.shape) if packed else _keep_flags(mask)

    def _default_parametrization(self) -> type[nn.Module]:
        return PackedFakeSparsity if self.mask_dtype == "packed" else FakeSparsity

    # ------------------------------------------------------------------------------------- data
    def _extract_weight(self, data) -> torch.Tensor:
        """The tensor to sparsify: the data itself, or an embedding's weight (the same object, not a copy)."""
        if type(data) in EMBEDDING_TYPES:
            return data.weight
        return data

    def add_data(self, name: str, data, reuse_mask: bool = True, **config):
        """Adds `data` (torch.Tensor, nn.Parameter, nn.Embedding or nn.EmbeddingBag) under `name` and
        parametrizes it with an all-keep mask (or config["mask"]); returns the parametrized data (with lean
        masks and a new all-keep mask, the data itself: the same values, without a table-sized copy).

        The data is held by reference: changes made to it outside the sparsifier are seen inside.
        If `name` exists, the new data replaces it (with a warning) and keeps the old config updated by
        `config`; with reuse_mask=True the old mask is kept too, and the new data must have its shape.
        """
        # Subclasses of nn.Parameter pass too: TorchRec's TableBatchedEmbeddingSlice (a sharded table's weight,
        # a view into a fused buffer) is one; torch.ao.pruning accepts the exact types only.
        if type(data) not in SUPPORTED_TYPES and not isinstance(data, nn.Parameter):
            raise TypeError(f"add_data: data of type {type(data).__name__} is not supported; expected one of "
                            f"{sorted(t.__name__ for t in SUPPORTED_TYPES)} (or a subclass of Parameter)")
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"add_data: name must be a non-empty string without '.', got {name!r}")
        if name not in self.state and hasattr(self._container, name):
            raise ValueError(f"add_data: name {name!r} is reserved (an attribute of nn.Module)")
        local_args = copy.deepcopy(self.defaults)
        local_args.update(config)
        weight = self._extract_weight(data)
        mask = local_args.get("mask")
        param_class = local_args.get("parametrization", self._default_parametrization())

        replacing = name in self.state
        if replacing:
            warnings.warn(f"add_data: replacing the data named {name!r} (did you mean another name?)", stacklevel=2)
            local_args = copy.deepcopy(self.data_groups[name])
            local_args.update(config)
            if reuse_mask:
                current = self.get_data(name=name)
                if weight.shape != current.shape:
                    raise ValueError(f"add_data: to reuse the mask of {name!r}, the new data must have its shape "
                                     f"{tuple(current.shape)}, got {tuple(weight.shape)} (or pass reuse_mask=False)")
                mask = self.get_mask(name=name)

        # Everything that can fail runs before an existing entry is removed: on error it stays as it was.
        all_keep = mask is None
        mask = self._new_mask(weight) if all_keep else self._to_mask_format(mask, weight)
        parametrization = param_class(mask)
        if not isinstance(parametrization, nn.Module):
            raise TypeError(f"add_data: the parametrization of {name!r} must be an nn.Module, "
                            f"got {type(parametrization).__name__}")
        if replacing:
            self._delete_data(name=name)
        self._container.register_buffer(name, weight)
        parametrize.register_parametrization(self._container, name, parametrization, unsafe=True)
        self.state[name]["mask"] = mask
        self.data_groups[name] = local_args
        if all_keep and self._lean and len(getattr(self._container.parametrizations, name)) == 1:
            # The sparsified data equals the data while its mask keeps everything: return the data itself,
            # not a table-sized product (the point of lean masks is to need no such copy).
            return weight
        return getattr(self._container, name)

    def get_data(self, name: str, return_original: bool = True):
        """The data named `name`: the original (unmasked) tensor, or with return_original=False the
        sparsified one (mask applied; after squash_mask, the squashed tensor).

        Raises ValueError for an unknown name, and for return_original=True after squash_mask.
        """
        if name not in self.data_groups:
            raise ValueError(f"get_data: no data named {name!r}")
        if not return_original:
            return getattr(self._container, name)
        if not parametrize.is_parametrized(self._container, name):
            raise ValueError(f"get_data: the mask of {name!r} was squashed, the original data no longer exists")
        return getattr(self._container.parametrizations, name).original

    def get_mask(self, name: str, as_bool: bool = False) -> torch.Tensor:
        """The mask of `name` (the live object, in this sparsifier's format); with as_bool=True a bool
        tensor of the data's shape instead (True = keep), whatever the format."""
        if name not in self.state:
            raise ValueError(f"get_mask: no data named {name!r}")
        mask = self.state[name]["mask"]
        if not as_bool:
            return mask
        data = self.get_data(name, return_original=not self._squashed(name))
        if _is_packed_for(mask, data):
            return ops.unpack_mask(mask, data.shape)
        return mask.clone() if mask.dtype == torch.bool else _keep_flags(mask)

    def _squashed(self, name: str) -> bool:
        return not parametrize.is_parametrized(self._container, name)

    def _delete_data(self, name: str) -> None:
        """Removes `name` (data, mask and config) without applying its mask."""
        if not self._squashed(name):
            self.squash_mask(names=[name], leave_parametrized=False)
        delattr(self._container, name)
        self.state.pop(name)
        self.data_groups.pop(name)

    # ----------------------------------------------------------------------------- step, squash
    def _validate_data(self, name: str, data: torch.Tensor, **config) -> None:
        """Raises if update_mask cannot run on (data, config); step() runs it for every name before it
        changes any mask. Subclasses check their own arguments here."""

    def step(self) -> None:
        """update_mask(name, original data, **config) for every name whose mask is not squashed (torch.ao.pruning
        raises on squashed ones), unless enable_mask_update is False."""
        if not self.enable_mask_update:
            return
        with torch.no_grad():
            originals = {name: self.get_data(name) for name in self.data_groups if not self._squashed(name)}
            for name, original in originals.items():
                self._validate_data(name, original, **self.data_groups[name])
            for name, original in originals.items():
                self.update_mask(name, original, **self.data_groups[name])

    def update_mask(self, name: str, data: torch.Tensor, **kwargs) -> None:  # type: ignore[override]
        """Computes the mask of `name` from its original `data` and writes it into self.get_mask(name)."""
        raise NotImplementedError(f"{type(self).__name__} must implement update_mask(name, data, **config)")

    def _squashes_in_place(self, name: str) -> bool:
        """Lean masks are applied to the data in place, when the parametrization is only our mask."""
        plist = getattr(self._container.parametrizations, name)
        return (self._lean and len(plist) == 1 and type(plist[0]) in (FakeSparsity, PackedFakeSparsity)
                and plist.original.dtype in ops.FLOAT_DTYPES)

    def squash_mask(self, *args, leave_parametrized: bool = True, names=None, **kwargs) -> None:
        """Removes the parametrization of each name (default: all), leaving the masked data in place of
        the original (leave_parametrized=True) or the original itself.

        The data keeps its identity: an embedding's weight, or a tensor given to add_data, now holds the
        squashed values. Raises ValueError, before squashing anything, if a name is unknown or squashed.
        """
        names = list(self.data_groups) if names is None else list(names)
        for name in names:
            if name not in self.data_groups:
                raise ValueError(f"squash_mask: no data named {name!r}")
            if self._squashed(name):
                raise ValueError(f"squash_mask: the mask of {name!r} is already squashed")
        for name in names:
            if leave_parametrized and self._squashes_in_place(name):
                with torch.no_grad():
                    ops.apply_mask_(getattr(self._container.parametrizations, name).original, self.state[name]["mask"])
                parametrize.remove_parametrizations(self._container, name, leave_parametrized=False)
            else:
                parametrize.remove_parametrizations(self._container, name, leave_parametrized=leave_parametrized)

    # ------------------------------------------------------------------------------- state_dict
    def _convert_mask(self, states: dict, sparse_coo: bool = True) -> dict:
        """Copy of `states` with each float/int mask as sparse COO (sparse_coo=True) or dense; lean masks
        (bool, packed) are kept dense and shared, like the tensors of nn.Module.state_dict."""
        converted = {}
        for name, state in states.items():
            converted[name] = {}
            for key, value in state.items():
                if key != "mask" or not isinstance(value, torch.Tensor):
                    converted[name][key] = copy.deepcopy(value)
                elif value.is_sparse:
                    converted[name][key] = value.to_dense()
                elif sparse_coo and not self._lean:
                    converted[name][key] = value.to_sparse_coo()
                else:
                    converted[name][key] = value if self._lean else value.clone()
        return converted

    def state_dict(self) -> dict[str, Any]:
        """{"state": {name: {"mask": mask (sparse COO; lean masks as they are), ...}},
        "data_groups": {name: config}, "_container": the container's state_dict (the data: a squashed
        name under `name`, a parametrized one under `parametrizations.<name>.original`)}."""
        return {
            "state": self._convert_mask(self.state),
            "data_groups": copy.deepcopy(dict(self.data_groups)),
            "_container": self._container.state_dict(),
        }

    def _check_loadable(self, states: dict, data_groups: dict, container_state_dict: dict) -> None:
        for name, state in states.items():
            if name not in data_groups:
                raise RuntimeError(f"Error loading {name!r}: it has a state but no data_groups entry")
            data = container_state_dict.get(name, container_state_dict.get(f"parametrizations.{name}.original"))
            if data is None:
                raise RuntimeError(f"Error loading {name!r}: the _container state_dict holds no data for it")
            mask = state.get("mask")
            if mask is not None and name not in container_state_dict and not (
                    mask.shape == data.shape or _is_packed_for(mask, data)):
                raise RuntimeError(f"Error loading {name!r}: mask shape {tuple(mask.shape)} does not fit the "
                                   f"data shape {tuple(data.shape)}")

    def _load_container_from_state(self, states: dict, data_groups: dict, container_state_dict: dict) -> None:
        """Registers each name's data in self._container: parametrized with its mask if it was saved
        parametrized, as a plain buffer if it was saved squashed. Masks in `states` are made this
        sparsifier's format (and the state refers to the mask the parametrization holds)."""
        for name, state in states.items():
            squashed_data = container_state_dict.get(name)
            data = squashed_data if squashed_data is not None else container_state_dict[f"parametrizations.{name}.original"]
            self._container.register_buffer(name, data)
            if squashed_data is not None:
                continue
            mask = state.get("mask")
            mask = self._new_mask(data) if mask is None else self._to_mask_format(mask, data)
            state["mask"] = mask
            param_class = data_groups[name].get("parametrization", self._default_parametrization())
            parametrize.register_parametrization(self._container, name, param_class(mask), unsafe=True)

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restores data, masks and configs from `state_dict` (left unchanged: its tensors are copied).

        strict=True replaces everything this sparsifier holds; strict=False adds the saved names to it,
        names it already holds keeping their current data, mask and config. Every entry is checked
        before anything changes.
        """
        data_groups = copy.deepcopy(state_dict["data_groups"])
        states = self._convert_mask(state_dict["state"], sparse_coo=False)
        if not strict:
            states = {name: s for name, s in states.items() if name not in self.state}
        self._check_loadable(states, data_groups, state_dict["_container"])
        container_state_dict = {key: value.clone() for key, value in state_dict["_container"].items()}
        for state in states.values():
            if isinstance(state.get("mask"), torch.Tensor):
                state["mask"] = state["mask"].clone()
        if strict:
            self._container = _Container()
        self._load_container_from_state(states, data_groups, container_state_dict)
        if not strict:
            states.update(self.state)
            data_groups.update(self.data_groups)
        self.__setstate__({"state": states, "data_groups": data_groups})

    # --------------------------------------------------------------------------- pickling, repr
    def __getstate__(self) -> dict[str, Any]:
        # A scheduler's per-instance step wrapper (a closure over a weakref) is not picklable; the
        # unpickled sparsifier uses the class's step.
        state = {key: value for key, value in self.__dict__.items() if key not in ("_container", "step")}
        state["state"] = self._convert_mask(self.state)
        state["data_groups"] = dict(self.data_groups)
        state["_container"] = self._container.state_dict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        container_state_dict = state.pop("_container", None)
        state["state"] = defaultdict(dict, state["state"])
        state["data_groups"] = defaultdict(dict, state["data_groups"])
        self.__dict__.setdefault("mask_dtype", state.get("mask_dtype"))
        if container_state_dict is not None:  # unpickling: rebuild the container
            self._container = _Container()
            state["state"] = defaultdict(dict, self._convert_mask(state["state"], sparse_coo=False))
            self._load_container_from_state(state["state"], state["data_groups"], container_state_dict)
        super().__setstate__(state)

    def __repr__(self) -> str:
        text = f"{self.__class__.__name__} ("
        for name, config in self.data_groups.items():
            text += f"\n\tData Group\n\t    name: {name}\n"
            text += "".join(f"\t    {key}: {config[key]}\n" for key in sorted(config) if key != "data")
        return text + ")"
