"""ActivationSparsifier: learns masks for the *inputs* of chosen layers from the activations that flow
into them, then applies those masks.

Mirrors torch.ao.pruning._experimental.activation_sparsifier.ActivationSparsifier: same constructor,
methods, `defaults` / `data_groups` / `state` attributes and their keys, hook names (`_aggregate_hook`,
`_sparsify_hook`), `update_mask`, state_dict layout (masks stored as sparse COO), so code and subclasses
written against torch.ao.pruning run unchanged.

Workflow: `register_layer` attaches a forward pre-hook that folds each input into a running aggregate
(`aggregate_fn(aggregate, input)`); `step` turns the aggregate into a mask,
`mask_fn(reduce_fn(aggregate), **sparse_config)`, and starts a new aggregate; `squash_mask` swaps the
aggregating hook for one that multiplies the input by the mask. With `features` / `feature_dim`, each
listed index along `feature_dim` gets its own aggregate and mask.

Differences from torch.ao.pruning (torch.ao.pruning raises, silently misbehaves or leaks there):
- mask_fn defaults to `block_norm_mask_fn` (sparsity_ext.ops.block_norm_mask); torch.ao.pruning has no
  default and rejects a missing mask_fn. `defaults["mask_fn"]` stays None, as given.
- Aggregation runs under torch.no_grad (no autograd graph is kept alive across forwards).
- The sparsify hook does not modify the caller's input tensor in place, and passes a layer's further
  positional inputs through (torch.ao.pruning drops them).
- Bad input raises ValueError/TypeError before anything changes: an unknown layer or layer name,
  non-callable functions, features without feature_dim, bad block-mask arguments, `step` without
  aggregated activations, `squash_mask` before any forward, a state_dict naming layers the model
  lacks.
- A mask_fn result that does not broadcast to the layer's input shape raises ValueError at the step()
  that produced it (torch.ao.pruning keeps it, and the forward after squash_mask fails).
- `squash_mask(attach_sparsify_hook=False)` records hook_state "None" (torch.ao.pruning records
  "sparsify" though no hook is attached); load_state_dict removes the hooks this sparsifier had
  attached before attaching the loaded ones.
"""
from __future__ import annotations

import copy
import numbers
import warnings
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import ops
from ..sparsifier.utils import fqn_to_module, module_to_fqn

__all__ = ["ActivationSparsifier", "block_norm_mask_fn"]

_FN_KEYS = ("aggregate_fn", "reduce_fn", "mask_fn")
_HOOK_AGGREGATE, _HOOK_SPARSIFY, _HOOK_NONE = "aggregate", "sparsify", "None"
_NOT_SERIALIZED = ("hook", "layer")  # live objects, re-attached on load
_NOT_IN_REPR = ("data", "hook", "reduce_fn", "mask_fn", "aggregate_fn")


def block_norm_mask_fn(data: torch.Tensor, sparsity_level: float = 0.5,
                       sparse_block_shape: Sequence[int] = (1, 1), zeros_per_block: int | None = None,
                       norm="L1") -> torch.Tensor:
    """The default mask_fn: a 0/1 mask in data's dtype that zeroes the `sparsity_level` fraction of blocks
    of `data` with the smallest mean norm (sparsity_ext.ops.block_norm_mask).

    With the default (1, 1) blocks and L1 norm this zeroes the round(sparsity_level * numel) elements of
    smallest |x| (ties: lower flat index first), the element-wise norm mask used with torch.ao.pruning's
    ActivationSparsifier. As everywhere in sparsity_ext, a sparsity_level below 1 keeps at least one block.
    Data of more than 2 dims is tiled as a (numel / last dim, last dim) matrix.

    Args:
        data: the reduced activations (float tensor of any shape).
        sparsity_level: fraction of blocks zeroed, in [0, 1].
        sparse_block_shape: (rows, cols) of a block.
        zeros_per_block: elements zeroed in each selected block (default: all of them).
        norm: "L1" / 1 (|x|) or "L2" / 2 (x*x).
    """
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"block_norm_mask_fn: data must be a torch.Tensor, got {type(data).__name__}")
    if data.dim() == 0:
        matrix = data.reshape(1)
    elif data.dim() > 2:
        matrix = data.reshape(-1, data.shape[-1])
    else:
        matrix = data
    keep = ops.block_norm_mask(matrix, sparsity_level, sparse_block_shape, zeros_per_block, norm)
    return keep.reshape(data.shape).to(data.dtype)


def _feature_index(feature, device: torch.device) -> torch.Tensor:
    """A feature (an index, or a list of indices) as the 1-D long tensor index_select takes."""
    return torch.as_tensor(feature, dtype=torch.long, device=device).reshape(-1)


class ActivationSparsifier:
    """Sparsifies the inputs of registered layers with masks computed from their aggregated activations:
    mask = mask_fn(reduce_fn(aggregate_fn(... aggregate_fn(zeros, x1) ..., xn)), **sparse_config).

    The mask is computed on a layer's input, and applied to that input before the layer runs.

    Args:
        model: the model whose layers are sparsified (register them with `register_layer`).
        aggregate_fn: default of `register_layer`'s aggregate_fn, (aggregate, input) -> aggregate,
            e.g. ``lambda a, x: a + x``.
        reduce_fn: default reduce_fn, aggregate -> the tensor masked, e.g. ``lambda a: a.mean(dim=0)``.
        mask_fn: default mask_fn, (reduced, **sparse_config) -> mask; None: `block_norm_mask_fn`.
        features: default list of indices along `feature_dim` that get their own aggregate and mask
            (None: the whole input is one feature).
        feature_dim: the dimension `features` index (required with features).
        **sparse_config: default keyword arguments of mask_fn (e.g. sparsity_level=0.5).

    Attributes:
        defaults: the constructor's arguments ({"sparse_config", "aggregate_fn", "reduce_fn",
            "mask_fn", "features", "feature_dim"}).
        data_groups: {layer name: config}: the defaults updated with register_layer's arguments, plus
            "layer", "hook" (the attached hook's handle), "hook_state" ("aggregate", "sparsify" or
            "None") and, between a forward and the next step, "data" (the aggregate).
        state: {layer name: {"mask": mask}}; the mask is None until the layer's first forward, then a
            tensor (a list of tensors, one per feature, with features).

    Example::

        >>> sparsifier = ActivationSparsifier(model, aggregate_fn=lambda a, x: a + x,
        ...                                   reduce_fn=lambda a: a.mean(dim=0), sparsity_level=0.5)
        >>> sparsifier.register_layer(model.fc2)
        >>> for batch in loader:          # train; the hook aggregates fc2's inputs
        ...     ...
        ...     sparsifier.step()         # a new mask from this epoch's activations
        >>> sparsifier.squash_mask()      # from now on fc2's input is multiplied by the mask
    """

    def __init__(self, model: nn.Module, aggregate_fn: Callable | None = None, reduce_fn: Callable | None = None,
                 mask_fn: Callable | None = None, features: Sequence | None = None, feature_dim: int | None = None,
                 **sparse_config):
        self.model = model
        self.defaults: dict[str, Any] = defaultdict()
        self.defaults["sparse_config"] = sparse_config
        self.defaults["aggregate_fn"] = aggregate_fn
        self.defaults["reduce_fn"] = reduce_fn
        self.defaults["mask_fn"] = mask_fn
        self.defaults["features"] = features
        self.defaults["feature_dim"] = feature_dim
        self.data_groups: dict[str, dict[str, Any]] = defaultdict(dict)
        self.state: dict[str, dict[str, Any]] = defaultdict(dict)
        # layer name -> the shape of its last input (a list, one per feature, with features): a mask_fn
        # result is checked against it at step(), not first found wrong at a forward after squash_mask()
        self._input_shapes: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------ checks
    @staticmethod
    def _safe_rail_checks(args: dict[str, Any]) -> None:
        """Raises unless a layer's config is usable: callable functions, features with a feature_dim."""
        features, feature_dim = args["features"], args["feature_dim"]
        if features is not None:
            if feature_dim is None:
                raise ValueError("features were given without feature_dim: the dimension they index is needed")
            if isinstance(feature_dim, bool) or not isinstance(feature_dim, numbers.Integral):
                raise TypeError(f"feature_dim must be an int, got {feature_dim!r}")
            if not isinstance(features, Sequence) or isinstance(features, str):
                raise TypeError(f"features must be a list of indices along feature_dim, got {features!r}")
        for key in _FN_KEYS:
            if not callable(args[key]):
                raise TypeError(f"{key} must be callable, got {args[key]!r} (give it to register_layer "
                                "or to the ActivationSparsifier constructor)")
        if args["mask_fn"] is block_norm_mask_fn:
            # Runs the checks of block_norm_mask on a 1-element tensor: bad arguments fail now, not at step.
            block_norm_mask_fn(torch.zeros(1), **args["sparse_config"])

    def _layer_name(self, layer: nn.Module, where: str) -> str:
        if not isinstance(layer, nn.Module):
            raise TypeError(f"{where}: layer must be an nn.Module, got {type(layer).__name__}")
        name = module_to_fqn(self.model, layer)
        if name is None:
            raise ValueError(f"{where}: the layer ({type(layer).__name__}) is not a submodule of the model")
        return name

    # -------------------------------------------------------------------------------------- hooks
    def _aggregate_hook(self, name: str) -> Callable:
        """The forward pre-hook that folds the layer's input into data_groups[name]["data"] and, when it
        starts an aggregate (the layer's first forward, and the first after each step), sets a new all-ones
        mask of the input's (per-feature) shape, as torch.ao.pruning does: squash_mask right after step()
        applies the stepped mask, squash_mask after a further forward applies none."""
        config = self.data_groups[name]
        features, feature_dim, aggregate_fn = config["features"], config["feature_dim"], config["aggregate_fn"]

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            state = self.state[name]
            aggregate = config.get("data")
            with torch.no_grad():
                if features is None:
                    self._input_shapes[name] = x.shape
                    if aggregate is None:
                        state["mask"] = torch.ones_like(x)
                    config["data"] = aggregate_fn(torch.zeros_like(x) if aggregate is None else aggregate, x)
                    return
                selected = [torch.index_select(x, feature_dim, _feature_index(f, x.device)) for f in features]
                self._input_shapes[name] = [s.shape for s in selected]
                if aggregate is None:
                    state["mask"] = [torch.ones_like(s) for s in selected]
                previous = [torch.zeros_like(s) for s in selected] if aggregate is None else aggregate
                config["data"] = [aggregate_fn(p, s) for p, s in zip(previous, selected)]

        return hook

    def _sparsify_hook(self, name: str) -> Callable:
        """The forward pre-hook that multiplies the layer's input by its mask (per feature with features)."""
        mask = self.get_mask(name)
        config = self.data_groups[name]
        features, feature_dim = config["features"], config["feature_dim"]

        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            if features is None:
                return (x * mask,) + tuple(args[1:])
            out = x.clone()  # features are masked one after the other, as in torch.ao.pruning
            for feature, feature_mask in zip(features, mask):
                index = _feature_index(feature, x.device)
                out.index_copy_(feature_dim, index, torch.index_select(out, feature_dim, index) * feature_mask)
            return (out,) + tuple(args[1:])

        return hook

    # ------------------------------------------------------------------------------ registration
    def register_layer(self, layer: nn.Module, aggregate_fn: Callable | None = None,
                       reduce_fn: Callable | None = None, mask_fn: Callable | None = None,
                       features: Sequence | None = None, feature_dim: int | None = None, **sparse_config) -> None:
        """Attaches the aggregating pre-hook to `layer` (a submodule of the model, named by its fqn).

        Arguments left None take the constructor's defaults; **sparse_config updates the default
        sparse_config. A layer already registered is re-registered with the new config after a warning,
        its old config and mask dropped, as torch.ao.pruning does (after the new config is checked).
        """
        name = self._layer_name(layer, "register_layer")
        config = copy.deepcopy(dict(self.defaults))
        given = {"aggregate_fn": aggregate_fn, "reduce_fn": reduce_fn, "mask_fn": mask_fn,
                 "features": features, "feature_dim": feature_dim, "layer": layer}
        config.update((key, value) for key, value in given.items() if value is not None)
        config["sparse_config"].update(sparse_config)
        if config["mask_fn"] is None:
            config["mask_fn"] = block_norm_mask_fn
        self._safe_rail_checks(config)

        if name in self.data_groups:
            warnings.warn(f"register_layer: layer {name!r} is already registered; its config and mask are "
                          f"replaced by the new registration", stacklevel=2)
            self.unregister_layer(name)
        self.data_groups[name] = config
        self.state[name]["mask"] = None  # known once the layer has seen an input
        config["hook"] = layer.register_forward_pre_hook(self._aggregate_hook(name))
        config["hook_state"] = _HOOK_AGGREGATE

    def unregister_layer(self, name: str) -> None:
        """Removes the layer's hook, config and mask."""
        if name not in self.data_groups:
            raise ValueError(f"unregister_layer: no layer named {name!r} is registered "
                             f"(registered: {list(self.data_groups)})")
        hook = self.data_groups[name].get("hook")
        if hook is not None:
            hook.remove()
        self.state.pop(name, None)
        self.data_groups.pop(name)

    def get_mask(self, name: str | None = None, layer: nn.Module | None = None):
        """The layer's mask (by name, or by the layer itself): a tensor, or a list of tensors (one per
        feature). Raises ValueError before the layer's first forward (its shape is not known yet)."""
        if name is None:
            if layer is None:
                raise ValueError("get_mask: give the layer's name or the layer")
            name = self._layer_name(layer, "get_mask")
        if name not in self.state:
            raise ValueError(f"get_mask: no layer named {name!r} is registered")
        mask = self.state[name].get("mask")
        if mask is None:
            raise ValueError(f"get_mask: the mask of {name!r} does not exist yet; "
                             "run the model forward at least once to create it")
        return mask

    # --------------------------------------------------------------------------------- masks
    def step(self) -> None:
        """Computes every layer's mask from the activations aggregated since the last step (see
        `update_mask`), then starts new aggregates. Raises before changing any mask if a layer has
        aggregated nothing (no forward since the last step, or its aggregating hook was squashed)."""
        missing = [name for name, config in self.data_groups.items() if "data" not in config]
        if missing:
            raise RuntimeError(f"step: no activations were aggregated for {missing} since the last step "
                               "(run the model forward first; after squash_mask layers no longer aggregate)")
        with torch.no_grad():
            for name, config in self.data_groups.items():
                self.update_mask(name, config["data"], config)
                config.pop("data")

    def update_mask(self, name: str, data, configs: dict[str, Any]) -> None:
        """Sets the layer's mask to mask_fn(reduce_fn(data), **sparse_config), per feature with features.

        The mask tensors keep their identity (their .data is replaced), so hooks holding them see the
        new values. A mask_fn result that is no tensor, or that does not broadcast to the layer's last
        input shape (so the sparsify hook's input * mask would fail or change the input's shape), raises
        here, before this layer's mask changes (torch.ao.pruning takes it and fails at a later forward)."""
        mask = self.get_mask(name)
        sparse_config, reduce_fn, mask_fn = configs["sparse_config"], configs["reduce_fn"], configs["mask_fn"]
        input_shape = self._input_shapes.get(name)
        if configs["features"] is None:
            mask.data = self._checked_mask(mask_fn(reduce_fn(data), **sparse_config), name, input_shape)
            return
        shapes = input_shape if input_shape is not None else [None] * len(data)
        new_masks = [self._checked_mask(mask_fn(reduce_fn(d), **sparse_config), name, shape)
                     for d, shape in zip(data, shapes)]
        for feature_mask, new_mask in zip(mask, new_masks):
            feature_mask.data = new_mask

    @staticmethod
    def _checked_mask(mask, name: str, input_shape: torch.Size | None) -> torch.Tensor:
        """mask, if it is a tensor that broadcasts to input_shape (None: not known, not checked)."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask_fn of {name!r} must return a torch.Tensor, got {type(mask).__name__}")
        if input_shape is not None:
            try:
                fits = torch.broadcast_shapes(mask.shape, input_shape) == input_shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(f"mask_fn of {name!r} returned a mask of shape {tuple(mask.shape)}, which does "
                                 f"not broadcast to the layer's input shape {tuple(input_shape)}")
        return mask

    def squash_mask(self, attach_sparsify_hook: bool = True, **kwargs) -> None:
        """Detaches the aggregating hooks and, with attach_sparsify_hook, attaches hooks that multiply
        each layer's input by its mask (every layer must have run forward once)."""
        if attach_sparsify_hook:
            no_mask = [name for name in self.data_groups if self.state[name].get("mask") is None]
            if no_mask:
                raise ValueError(f"squash_mask: {no_mask} have no mask yet; run the model forward first")
        for name, config in self.data_groups.items():
            hook = config.pop("hook", None)
            if hook is not None:
                hook.remove()
            config["hook_state"] = _HOOK_NONE
            if attach_sparsify_hook:
                config["hook"] = config["layer"].register_forward_pre_hook(self._sparsify_hook(name))
                config["hook_state"] = _HOOK_SPARSIFY

    # ---------------------------------------------------------------------------- state_dict
    def _get_serializable_data_groups(self) -> dict[str, dict[str, Any]]:
        """data_groups without the live objects ("hook", "layer"); fresh dicts, shared values."""
        return {name: {key: value for key, value in config.items() if key not in _NOT_SERIALIZED}
                for name, config in self.data_groups.items()}

    @staticmethod
    def _convert_mask(states_dict: dict[str, dict[str, Any]], sparse_coo: bool = True) -> dict[str, dict[str, Any]]:
        """A copy of `states_dict` with every mask as a sparse COO tensor (sparse_coo) or a dense one."""
        def convert(mask: torch.Tensor) -> torch.Tensor:
            if sparse_coo:
                return mask.to_sparse_coo()
            return mask.to_dense() if mask.is_sparse else mask.clone()

        converted = {}
        for name, state in states_dict.items():
            state = dict(state)
            mask = state.get("mask")
            if isinstance(mask, list):
                state["mask"] = [convert(m) for m in mask]
            elif mask is not None:
                state["mask"] = convert(mask)
            converted[name] = state
        return converted

    def state_dict(self) -> dict[str, Any]:
        """{"state": {name: {"mask": sparse COO mask(s) or None}}, "data_groups": the configs without
        "hook" and "layer", "defaults": the constructor's defaults}."""
        return {"state": self._convert_mask(self.state), "data_groups": self._get_serializable_data_groups(),
                "defaults": self.defaults}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores defaults, configs and masks from `state_dict` (this class's or torch.ao.pruning's) and
        attaches to each layer of this sparsifier's model the hook its "hook_state" names. The hooks
        this sparsifier had attached are removed; `state_dict` itself is not modified."""
        self.__set_state__({"state": state_dict["state"], "data_groups": state_dict["data_groups"],
                            "defaults": state_dict["defaults"]})

    def __get_state__(self) -> dict[str, Any]:
        return {"defaults": self.defaults, "state": self._convert_mask(self.state),
                "data_groups": self._get_serializable_data_groups()}

    def __set_state__(self, state: dict[str, Any]) -> None:
        masks = self._convert_mask(state["state"], sparse_coo=False)
        layers = {}
        for name, config in state["data_groups"].items():
            layer = fqn_to_module(self.model, name)
            if not isinstance(layer, nn.Module):
                raise ValueError(f"load_state_dict: the model has no layer {name!r}")
            hook_state = config.get("hook_state", _HOOK_NONE)
            if hook_state not in (_HOOK_AGGREGATE, _HOOK_SPARSIFY, _HOOK_NONE):
                raise ValueError(f"load_state_dict: layer {name!r} has an unknown hook_state {hook_state!r}")
            if hook_state == _HOOK_SPARSIFY and masks.get(name, {}).get("mask") is None:
                raise ValueError(f"load_state_dict: layer {name!r} is in the sparsify state but has no mask")
            layers[name] = layer

        for config in self.data_groups.values():
            hook = config.get("hook")
            if hook is not None:
                hook.remove()
        extra = {key: value for key, value in state.items() if key not in ("state", "data_groups")}
        self.__dict__.update(extra)
        self.state = defaultdict(dict, masks)
        self.data_groups = defaultdict(dict, {name: dict(config) for name, config in state["data_groups"].items()})
        for name, config in self.data_groups.items():
            config["layer"] = layers[name]
            hook_state = config.get("hook_state", _HOOK_NONE)
            if hook_state == _HOOK_AGGREGATE:
                config["hook"] = layers[name].register_forward_pre_hook(self._aggregate_hook(name))
            elif hook_state == _HOOK_SPARSIFY:
                config["hook"] = layers[name].register_forward_pre_hook(self._sparsify_hook(name))

    def __repr__(self) -> str:
        text = self.__class__.__name__ + " ("
        for name, config in self.data_groups.items():
            text += f"\n\tData Group\n\t    name: {name}\n"
            text += "".join(f"\t    {key}: {config[key]}\n" for key in sorted(config) if key not in _NOT_IN_REPR)
        return text + ")"
