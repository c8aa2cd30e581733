"""BaseSparsifier: config handling, mask parametrizations, state_dict and the step loop of every sparsifier.

Mirrors torch.ao.pruning.BaseSparsifier: same constructor, config keys, methods, hooks (`_prepare`,
`update_mask`), module-level SUPPORTED_MODULES / KEYS_NOT_IN_STATE_DICT and state_dict layout, so a
state_dict saved by either library loads into the other. Deviations, all on input torch.ao.pruning
mishandles, are listed in the methods' docstrings; in short: every config and loaded mask is
validated before the model is touched, and load_state_dict leaves the given state_dict unchanged
(torch.ao.pruning pops its masks).
"""
from __future__ import annotations

import abc
import copy
import math
import numbers
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import type_before_parametrizations

from .utils import FakeSparsity, get_arg_info_from_tensor_fqn, module_contains_param, module_to_fqn, swap_module

__all__ = ["BaseSparsifier"]

SUPPORTED_MODULES = {nn.Linear}

# Group keys that hold live objects (or are derived from tensor_fqn) and so are not saved.
KEYS_NOT_IN_STATE_DICT = ["module", "module_fqn", "tensor_name"]


def _resolve_tensor_fqn(model: nn.Module, tensor_fqn: str) -> dict[str, Any]:
    """get_arg_info_from_tensor_fqn, raising ValueError unless tensor_fqn names a tensor of a module of model."""
    info = get_arg_info_from_tensor_fqn(model, tensor_fqn)
    module = info["module"]
    if not isinstance(module, nn.Module):
        raise ValueError(f"tensor_fqn {tensor_fqn!r}: the model has no submodule {info['module_fqn']!r}")
    tensor_name = info["tensor_name"]  # a parametrized tensor is not computed just to be found
    if not (parametrize.is_parametrized(module, tensor_name)
            or isinstance(getattr(module, tensor_name, None), torch.Tensor)):
        raise ValueError(f"tensor_fqn {tensor_fqn!r}: module {info['module_fqn']!r} "
                         f"({type_before_parametrizations(module).__name__}) has no tensor {info['tensor_name']!r}")
    return info


def _check_mask_fits(mask, tensor: torch.Tensor, where: str) -> None:
    """A mask must be a tensor of the masked tensor's shape, on its device, that does not change its dtype."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where}: mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != tensor.shape:
        raise ValueError(f"{where}: mask shape {tuple(mask.shape)} != tensor shape {tuple(tensor.shape)}")
    if mask.device != tensor.device:
        raise ValueError(f"{where}: mask is on {mask.device} but the tensor is on {tensor.device}")
    if torch.result_type(mask, tensor) != tensor.dtype:
        raise ValueError(f"{where}: a {mask.dtype} mask would change the tensor's dtype {tensor.dtype}")


def clamped_level(sparsity_level, where: str) -> float:
    """sparsity_level clamped to [0, 1], as torch.ao.pruning's sparsifiers treat levels outside it (so a
    scheduler may overshoot 1); TypeError unless a real number, ValueError for NaN."""
    if isinstance(sparsity_level, bool) or not isinstance(sparsity_level, numbers.Real):
        raise TypeError(f"{where}: sparsity_level must be a number, got {sparsity_level!r}")
    if math.isnan(sparsity_level):
        raise ValueError(f"{where}: sparsity_level is NaN")
    return min(max(float(sparsity_level), 0.0), 1.0)


def _mask_for(mask: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """A loaded mask as the mask of `tensor`: the same tensor object where it can be (torch.ao.pruning keeps it);
    moved to the tensor's device, and cast to an fp16/bf16 tensor's dtype when a float mask would turn
    the tensor float32 (its module's forward would then fail on half-precision inputs)."""
    if mask.device != tensor.device:
        mask = mask.to(tensor.device)
    if (tensor.dtype in (torch.float16, torch.bfloat16) and mask.is_floating_point()
            and torch.result_type(mask, tensor) != tensor.dtype):
        mask = mask.to(tensor.dtype)
    return mask


def _find_fake_sparsity(module: nn.Module, tensor_name: str) -> FakeSparsity | None:
    """The FakeSparsity parametrization on module.<tensor_name>, if there is one."""
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    return next((p for p in module.parametrizations[tensor_name] if isinstance(p, FakeSparsity)), None)


def mask_of(module, tensor_name: str, where: str) -> torch.Tensor:
    """The mask buffer of the first parametrization of module.<tensor_name>, checked to match the tensor's shape."""
    parametrizations = module.parametrizations[tensor_name]
    mask, shape = parametrizations[0].mask, parametrizations.original.shape
    if mask.shape != shape:
        raise ValueError(f"{where}: the mask of {tensor_name!r} has shape {tuple(mask.shape)}, "
                         f"the tensor has shape {tuple(shape)}")
    return mask


def checked_shape(module, tensor_name: str, where: str) -> torch.Size:
    """The shape of module.<tensor_name>, read without running its parametrizations; when it has them,
    the first one's mask is checked to have that shape."""
    if parametrize.is_parametrized(module, tensor_name):
        return mask_of(module, tensor_name, where).shape
    return getattr(module, tensor_name).shape


class BaseSparsifier(abc.ABC):
    """Base class of the sparsifiers: subclasses implement `update_mask`.

    Args:
        defaults: default values of the per-tensor arguments; each config entry given to `prepare`
            overrides them for its tensor.

    Attributes:
        defaults: as given (or {}).
        groups: one dict per sparsified tensor: the defaults updated with its config entry, plus
            `module`, `module_fqn`, `tensor_name` and `tensor_fqn`. `step` calls
            `update_mask(**group)` for each.
        state: {tensor_fqn: {"mask": the mask buffer, ...}}; subclasses may add entries.
        enable_mask_update: when False, `step` does nothing (a scheduler's step turns it back on).

    Differs from torch.ao.pruning only on input it mishandles: configs are checked before the model
    changes, and load_state_dict leaves the given state dict (and so the saving sparsifier's state)
    with its masks, which torch.ao.pruning pops.

    Example::

        >>> sparsifier = WeightNormSparsifier(sparsity_level=0.5)  # a concrete subclass
        >>> sparsifier.prepare(model, [{"tensor_fqn": "fc1.weight"},
        ...                            {"tensor_fqn": "fc2.weight", "sparsity_level": 0.8}])
        >>> sparsifier.step()            # computes the masks
        >>> sparsifier.squash_mask()     # folds them into the weights
    """

    def __init__(self, defaults: dict[str, Any] | None = None):
        super().__init__()
        self.defaults: dict[str, Any] = defaults or {}
        self.state: dict[str, dict] = defaultdict(dict)
        self.groups: list[dict[str, Any]] = []
        self.enable_mask_update = True

    # --------------------------------------------------------------------------- pickling, repr
    def __getstate__(self) -> dict[str, Any]:
        # The model is not pickled (the groups' modules are); a scheduler's step wrapper is not either.
        return {"defaults": self.defaults, "state": self.state, "groups": self.groups}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("enable_mask_update", True)  # unpickled sparsifiers can step

    def __repr__(self) -> str:
        text = f"{self.__class__.__name__} ("
        for i, group in enumerate(self.groups):
            text += f"\n\tGroup {i}\n\t    module: {group['module']}\n"
            text += "".join(f"\t    {key}: {group[key]}\n" for key in sorted(group) if key != "module")
        return text + ")"

    # --------------------------------------------------------------------------------- state_dict
    def state_dict(self) -> dict[str, Any]:
        """{"state": {tensor_fqn: {"mask": mask, ...}}, "groups": [group without KEYS_NOT_IN_STATE_DICT]}.

        The masks are the live mask buffers, as in torch.ao.pruning (and nn.Module.state_dict); the dicts
        are fresh copies, so torch.ao.pruning's load_state_dict, which pops the masks out of the dicts
        it is given, leaves this sparsifier's state whole. (It does adopt the mask tensors themselves:
        save and load the dict, or clone the masks, to give it independent ones.)
        """
        return {
            "state": {fqn: dict(s) for fqn, s in self.state.items()},
            "groups": [{k: v for k, v in group.items() if k not in KEYS_NOT_IN_STATE_DICT} for group in self.groups],
        }

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Loads the groups and masks of `state_dict` (from this class or torch.ao.pruning's) into the
        model given to `prepare`.

        As in torch.ao.pruning, each saved mask tensor itself becomes the mask of the tensor's
        FakeSparsity (one is registered if the tensor has none) and of this sparsifier's state, so after
        `s1.load_state_dict(s0.state_dict())` the two sparsifiers (and models) share their mask tensors
        and `s0.state == s1.state` holds. A mask on another device than its tensor is moved there, and a
        float mask that would change an fp16/bf16 tensor's dtype is cast to it (those are copies).
        Unlike torch.ao.pruning, which pops the masks out of the given dicts (so neither sparsifier's
        state holds them any more), `state_dict` is left unchanged and the state keeps the masks; every
        entry is checked before anything is changed. With strict=False, state entries and groups whose
        tensor is not in the model are skipped instead of raising.
        """
        if not hasattr(self, "model"):
            raise RuntimeError(f"{type(self).__name__}.load_state_dict: call prepare(model, config) first")
        groups = copy.deepcopy(state_dict["groups"])
        found: dict[str, dict[str, Any]] = {}
        for tensor_fqn in list(state_dict["state"]) + [g["tensor_fqn"] for g in groups]:
            try:
                found[tensor_fqn] = _resolve_tensor_fqn(self.model, tensor_fqn)
            except ValueError as exc:
                if strict:
                    raise RuntimeError(f"Error loading {tensor_fqn} into the model: {exc}") from exc
        for tensor_fqn, saved in state_dict["state"].items():
            if tensor_fqn in found and saved.get("mask") is not None:
                self._check_loaded_mask(saved["mask"], found[tensor_fqn]["module"], found[tensor_fqn]["tensor_name"],
                                        tensor_fqn)

        saved_groups = {group["tensor_fqn"]: group for group in groups}
        state: dict[str, dict] = defaultdict(dict)
        for tensor_fqn, saved in state_dict["state"].items():
            if tensor_fqn not in found:
                continue
            module, tensor_name = found[tensor_fqn]["module"], found[tensor_fqn]["tensor_name"]
            parametrization = self._parametrization_to_load_into(module, tensor_name, saved_groups.get(tensor_fqn, {}))
            state[tensor_fqn] = dict(saved)
            if saved.get("mask") is not None:
                mask = _mask_for(saved["mask"], module.parametrizations[tensor_name].original)
                parametrization.mask = mask  # replaces the buffer, as torch.ao.pruning's load does
                state[tensor_fqn]["mask"] = mask
        for group in groups:
            if group["tensor_fqn"] in found:
                group.update(found[group["tensor_fqn"]])
        self.__setstate__({"state": state, "groups": [g for g in groups if g["tensor_fqn"] in found]})

    def _check_loaded_mask(self, mask: torch.Tensor, module: nn.Module, tensor_name: str, tensor_fqn: str) -> None:
        """Raises unless a saved mask fits module.<tensor_name> (a mask of the tensor's shape); load_state_dict
        runs it on every mask before changing anything."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"load_state_dict: the mask of {tensor_fqn!r} must be a torch.Tensor, "
                            f"got {type(mask).__name__}")
        shape = checked_shape(module, tensor_name, "load_state_dict")
        if mask.shape != shape:
            raise ValueError(f"load_state_dict: mask of {tensor_fqn!r} has shape {tuple(mask.shape)}, "
                             f"the tensor has shape {tuple(shape)}")

    def _parametrization_to_load_into(self, module: nn.Module, tensor_name: str, group: dict[str, Any]) -> nn.Module:
        """The parametrization whose mask load_state_dict replaces by module.<tensor_name>'s saved mask: its
        FakeSparsity, registered first (all ones) if it has none. `group` is the tensor's saved group ({} if none)."""
        fake_sparsity = _find_fake_sparsity(module, tensor_name)
        if fake_sparsity is None:
            fake_sparsity = FakeSparsity(torch.ones_like(getattr(module, tensor_name)))
            parametrize.register_parametrization(module, tensor_name, fake_sparsity)
        return fake_sparsity

    # ------------------------------------------------------------------------------------ prepare
    def make_config_from_model(self, model: nn.Module,
                               SUPPORTED_MODULES: set[type[nn.Module]] = SUPPORTED_MODULES) -> None:
        """Sets self.config to one {"tensor_fqn": "<path>.weight"} per submodule whose type is exactly in
        SUPPORTED_MODULES (torch.ao.pruning's order: depth-first, the last-visited child first)."""
        self.config = []
        pending = [model]
        while pending:
            parent = pending.pop()
            for _name, child in parent.named_children():
                if type(child) in SUPPORTED_MODULES:
                    module_fqn = module_to_fqn(model, child)
                    if not isinstance(module_fqn, str):
                        raise AssertionError("module_fqn must be a string")
                    self.config.append({"tensor_fqn": module_fqn + ".weight"})
                else:
                    pending.append(child)

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raises if `group` (a complete group dict) cannot be sparsified; run by prepare and step before
        anything is changed. Subclasses check their own arguments here."""

    def prepare(self, model: nn.Module, config: list[dict[str, Any]] | None) -> None:
        """Builds the groups from `config` (None: every supported layer's weight) and parametrizes each
        tensor with its mask (see `_prepare`). The model is modified in place.

        Every config entry is checked (a dict with a `tensor_fqn` naming a tensor of the model, keys
        that agree with it, a given `mask` of the tensor's shape, the subclass's arguments) before any
        module is changed.
        """
        self.model = model
        self.config = config
        if self.config is None:
            self.make_config_from_model(model)
        if not isinstance(self.defaults, dict):
            raise AssertionError("defaults must be a dict")

        new_groups = []
        for module_config in self.config:
            if not isinstance(module_config, dict):
                raise AssertionError("each config entry must be a dict such as {'tensor_fqn': 'foo.bar.weight'}, "
                                     f"got {type(module_config).__name__}")
            group = copy.deepcopy(self.defaults)
            group.update(module_config)
            tensor_fqn = group.get("tensor_fqn")
            if tensor_fqn is None:
                raise AssertionError("tensor_fqn is a required key of each config entry "
                                     "(it replaces the older `module` and `fqn` keys)")
            info = _resolve_tensor_fqn(model, tensor_fqn)
            for key, value in info.items():
                if key in group and group[key] != value:
                    raise AssertionError(f"config entry gives both `{key}` and `tensor_fqn`, and they disagree: "
                                         f"{group[key]!r} vs {value!r}")
            group.update(info)
            if "mask" in group:
                _check_mask_fits(group["mask"], getattr(info["module"], info["tensor_name"]), f"tensor {tensor_fqn!r}")
            self._validate_group(group)
            new_groups.append(group)
        self.groups.extend(new_groups)
        self._prepare()

    def _prepare(self, *args, **kwargs) -> None:
        """Registers each group's parametrization (default FakeSparsity; a group may give its own class
        under `parametrization`) with its mask (the group's `mask`, default all ones), and records the
        mask in self.state."""
        for group in self.groups:
            module, tensor_name = group["module"], group["tensor_name"]
            parametrization = group.get("parametrization", FakeSparsity)
            mask = group.get("mask")
            if mask is None:
                mask = torch.ones_like(getattr(module, tensor_name))
            self.state[group["tensor_fqn"]]["mask"] = mask
            parametrize.register_parametrization(module, tensor_name, parametrization(mask))

    # ------------------------------------------------------------------------------- step, masks
    def step(self, use_path: bool = True) -> None:
        """Updates every group's mask (`update_mask(**group)`), unless enable_mask_update is False.

        All groups are validated first, so a bad group leaves every mask unchanged.
        """
        if not self.enable_mask_update:
            return
        for group in self.groups:
            self._validate_group(group)
        with torch.no_grad():
            for group in self.groups:
                self.update_mask(**group)

    @abc.abstractmethod
    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs) -> None:
        """Computes the mask of module.<tensor_name> and writes it into its mask buffer."""

    # ------------------------------------------------------------------------- squash, convert
    def squash_mask(self, params_to_keep: tuple[str, ...] | None = None,
                    params_to_keep_per_layer: dict[str, tuple[str, ...]] | None = None,
                    *args, **kwargs) -> None:
        """Folds each mask into its tensor and removes the parametrizations.

        Args:
            params_to_keep: group keys to keep, for every layer, in `module.sparse_params`.
            params_to_keep_per_layer: {module_fqn: keys} to keep for that layer only (added to the above).
        A module gets `sparse_params` only when some key is kept for it. Missing keys raise KeyError
        before any module is changed.
        """
        kept = []
        for group in self.groups:
            sparse_params = {}
            if params_to_keep is not None:
                sparse_params.update({key: group[key] for key in params_to_keep})
            if params_to_keep_per_layer is not None:
                sparse_params.update({key: group[key] for key in params_to_keep_per_layer.get(group["module_fqn"], ())})
            kept.append(sparse_params)
        for group, sparse_params in zip(self.groups, kept):
            module = group["module"]
            parametrize.remove_parametrizations(module, group["tensor_name"], leave_parametrized=True)
            if sparse_params:
                module.sparse_params = sparse_params

    def convert(self, module: nn.Module, mapping: dict[type[nn.Module], type[nn.Module]] | None = None,
                inplace: bool = False, parameterization: type[nn.Module] = FakeSparsity) -> nn.Module:
        """Replaces every submodule that carries `parameterization` and whose type is in `mapping` by
        `mapping[type].from_dense(submodule)` (see swap_module); recurses into the others.

        Args:
            module: the module to convert.
            mapping: {source class: target class with a from_dense classmethod}; required.
            inplace: change `module` itself instead of a deep copy.
        Returns:
            the converted module.
        """
        if mapping is None:
            raise NotImplementedError("convert needs a mapping {source module class: sparse module class}")
        if not inplace:
            module = copy.deepcopy(module)
        replacements = {}
        for name, child in module.named_children():
            if module_contains_param(child, parameterization) and type_before_parametrizations(child) in mapping:
                replacements[name] = swap_module(child, mapping)
            else:
                replacements[name] = self.convert(child, mapping=mapping, inplace=True,
                                                  parameterization=parameterization)
        for name, child in replacements.items():
            module._modules[name] = child
        return module
