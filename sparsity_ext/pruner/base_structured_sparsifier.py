"""BaseStructuredSparsifier: row (channel) masks on Linear / Conv2d / LSTM weights, and prune(), which
traces the model with torch.fx, finds the supported layer chains and physically removes the pruned
channels. Mirrors torch.ao.pruning._experimental.pruner.base_structured_sparsifier.

Differences from torch.ao.pruning: prune() plans every conversion before changing anything, and raises
a ValueError (model untouched) where torch.ao.pruning would prune part of the model and then fail, or
leave a model that crashes or silently computes something else: a masked layer no supported pattern
starts at, a chain whose intermediate output also feeds another layer (e.g. a residual connection),
a layer called more than once, a grouped convolution, a flatten whose Linear width is not a multiple of
the channels, LSTM masks whose layers or gates keep different numbers of units, a non-bool mask.
prepare() raises (model untouched) on a tensor listed twice or prepared twice. make_config_from_model
lists an LSTM's weight_ih_l{k} / weight_hh_l{k} (torch.ao.pruning lists "lstm.weight", which does not
exist). More chains are supported (see prune_functions), and torch.relu / torch.sigmoid / torch.tanh
count as activations.
"""
from __future__ import annotations

import operator
from collections import Counter
from itertools import chain
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node, symbolic_trace
from torch.fx.node import map_arg
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import type_before_parametrizations

from ..sparsifier.base_sparsifier import BaseSparsifier
from ..sparsifier.utils import fqn_to_module
from . import prune_functions as pf
from .match_utils import apply_match
from .parametrization import (BiasHook, FakeStructuredSparsity, module_contains_param, structured_mask,
                             structured_parametrization)

__all__ = ["BaseStructuredSparsifier"]

Pattern = tuple[Any, ...]


def _get_supported_structured_pruning_modules() -> set[type[nn.Module]]:
    """Module types make_config_from_model picks when prepare() gets no config."""
    return {nn.Linear, nn.Conv2d, nn.LSTM}


def _get_supported_activation_functions() -> set[Callable]:
    return {
        F.relu, F.rrelu, F.hardtanh, F.relu6, F.sigmoid, F.hardsigmoid, F.tanh, F.silu, F.mish, F.hardswish,
        F.elu, F.celu, F.selu, F.hardshrink, F.leaky_relu, F.logsigmoid, F.softplus, F.prelu, F.softsign,
        F.tanhshrink, F.gelu, torch.relu, torch.sigmoid, torch.tanh,
    }


def _get_supported_activation_modules() -> set[type[nn.Module]]:
    return {
        nn.ReLU, nn.RReLU, nn.Hardtanh, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.SiLU, nn.Mish,
        nn.Hardswish, nn.ELU, nn.CELU, nn.SELU, nn.Hardshrink, nn.LeakyReLU, nn.LogSigmoid, nn.Softplus,
        nn.PReLU, nn.Softsign, nn.Tanhshrink, nn.GELU,
    }


_POOLS = (nn.AvgPool2d, F.avg_pool2d, nn.MaxPool2d, F.max_pool2d)
_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_FLATTENS = (nn.Flatten, torch.flatten)
# Functions whose extra arguments the conversion needs (the activation's value, the pool's padding).
_BOUND_FUNCTIONS = _get_supported_activation_functions() | {F.avg_pool2d, F.max_pool2d}
# Module types a chain passes through without changing them; every other module in a chain is changed.
_PASS_THROUGH_MODULES = tuple(_get_supported_activation_modules()) + (nn.AvgPool2d, nn.MaxPool2d) + \
    _ADAPTIVE_POOLS + (nn.Flatten,)


def _get_default_structured_pruning_patterns() -> dict[Pattern, Callable[..., None]]:
    """{chain of module types / functions: the function that prunes it}; the torch.ao.pruning patterns
    first, then the ones sparsity_ext adds."""
    patterns: dict[Pattern, Callable[..., None]] = {
        (nn.Linear, "output"): pf.prune_linear,
        (nn.Linear, nn.Linear): pf.prune_linear_linear,
        (nn.Conv2d, "output"): pf.prune_conv2d,
        (nn.Conv2d, nn.Conv2d): pf.prune_conv2d_conv2d,
        # The LSTM chains follow the first getitem, output[0]; the returned state is not adjusted.
        (nn.LSTM, operator.getitem, nn.Linear): pf.prune_lstm_output_linear,
        (nn.LSTM, operator.getitem, nn.LayerNorm, nn.Linear): pf.prune_lstm_output_layernorm_linear,
    }
    activations = list(chain(_get_supported_activation_functions(), _get_supported_activation_modules()))
    for act in activations:
        patterns[(nn.Linear, act, nn.Linear)] = pf.prune_linear_activation_linear
        patterns[(nn.Conv2d, act, nn.Conv2d)] = pf.prune_conv2d_activation_conv2d
        for pool in _POOLS:
            patterns[(nn.Conv2d, act, pool, nn.Conv2d)] = pf.prune_conv2d_activation_pool_conv2d
            patterns[(nn.Conv2d, pool, act, nn.Conv2d)] = pf.prune_conv2d_pool_activation_conv2d
    for pool in _ADAPTIVE_POOLS:
        for flatten in _FLATTENS:
            patterns[(nn.Conv2d, pool, flatten, nn.Linear)] = pf.prune_conv2d_pool_flatten_linear

    # Added by sparsity_ext: BatchNorm after the conv, and activation -> adaptive pool -> flatten -> Linear.
    bn = nn.BatchNorm2d
    patterns[(nn.Conv2d, bn, "output")] = pf.prune_conv2d_batchnorm
    patterns[(nn.Conv2d, bn, nn.Conv2d)] = pf.prune_conv2d_batchnorm_conv2d
    for pool in _ADAPTIVE_POOLS:
        for flatten in _FLATTENS:
            patterns[(nn.Conv2d, bn, pool, flatten, nn.Linear)] = pf.prune_conv2d_batchnorm_pool_flatten_linear
    for act in activations:
        patterns[(nn.Conv2d, bn, act, nn.Conv2d)] = pf.prune_conv2d_batchnorm_activation_conv2d
        for pool in _POOLS:
            patterns[(nn.Conv2d, bn, act, pool, nn.Conv2d)] = pf.prune_conv2d_batchnorm_activation_pool_conv2d
            patterns[(nn.Conv2d, bn, pool, act, nn.Conv2d)] = pf.prune_conv2d_batchnorm_pool_activation_conv2d
        for pool in _ADAPTIVE_POOLS:
            for flatten in _FLATTENS:
                patterns[(nn.Conv2d, act, pool, flatten, nn.Linear)] = pf.prune_conv2d_activation_pool_flatten_linear
                patterns[(nn.Conv2d, bn, act, pool, flatten, nn.Linear)] = \
                    pf.prune_conv2d_batchnorm_activation_pool_flatten_linear
    return patterns


_BUILTIN_PRUNE_FUNCTIONS = frozenset(getattr(pf, name) for name in pf.__all__ if name.startswith("prune_"))


# ------------------------------------------------------------------------------ prune() checks
def _describe(node: Node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type_before_parametrizations(node.graph.owning_module.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _chain_from(node: Node, length: int = 5) -> str:
    """'a (Conv2d) -> relu -> ...': the first-user chain a pattern would have to match."""
    names = [_describe(node)]
    while node.users and len(names) < length:
        node = next(iter(node.users))
        names.append(_describe(node))
    return " -> ".join(names)


def _leaves_graph(node: Node) -> bool:
    """True when the node's value only leaves the model (returned, or unpacked and returned / unused)."""
    if node.op == "output":
        return True
    return node.op == "call_function" and node.target is operator.getitem and all(_leaves_graph(u) for u in node.users)


def _check_mask(mask: torch.Tensor, rows: int, where: str) -> None:
    if mask.dtype != torch.bool or mask.dim() != 1 or mask.shape[0] != rows:
        raise ValueError(f"{where}: the mask must be a 1-D bool tensor with one entry per row ({rows}), "
                         f"got {mask.dtype} of shape {tuple(mask.shape)}")


def _check_lstm(lstm: nn.LSTM, name: str) -> None:
    """The LSTM conversion needs every layer's weight_ih and weight_hh masked, with every gate of every
    layer keeping the same number of units (else the pruned LSTM's shapes do not fit together)."""
    if lstm.bidirectional or lstm.proj_size > 0:
        raise ValueError(f"{name}: pruning bidirectional LSTMs or LSTMs with proj_size is not supported")
    kept = set()
    for layer in range(lstm.num_layers):
        for kind in ("ih", "hh"):
            tensor_name = f"weight_{kind}_l{layer}"
            try:
                mask = structured_mask(lstm, tensor_name)
            except ValueError:
                raise ValueError(f"{name}: every layer's weight_ih and weight_hh must be pruned together; "
                                 f"{tensor_name} has no FakeStructuredSparsity") from None
            _check_mask(mask, 4 * lstm.hidden_size, f"{name}.{tensor_name}")
            kept.update(mask.reshape(4, lstm.hidden_size).sum(dim=1).tolist())
    if len(kept) != 1:
        raise ValueError(f"{name}: every gate of every layer must keep the same number of hidden units, "
                         f"the masks keep {sorted(kept)}")


def _check_block(block: list, name: str) -> None:
    """Checks the modules of a chain the built-in prune functions are about to convert."""
    first, last = block[0], block[-1]
    if isinstance(first, nn.LSTM):
        _check_lstm(first, name)
        return
    mask = structured_mask(first)
    _check_mask(mask, pf._weight_tensor(first).shape[0], name)
    for module in (first, last):
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ValueError(f"{name}: grouped convolutions (groups={module.groups}) are not supported")
    if any(isinstance(op, nn.Flatten) or op is torch.flatten for op in block):
        width = pf._weight_tensor(last).shape[1]
        if width % mask.shape[0]:
            raise ValueError(f"{name}: cannot map {mask.shape[0]} channels onto the {width} inputs of the "
                             "Linear after the flatten (not a multiple)")


def _constant_argument(arg, graph_module: GraphModule):
    """A call's argument as a value: get_attr nodes are fetched, nodes computed by the graph rejected."""
    def fetch(node: Node):
        if node.op != "get_attr":
            raise ValueError(f"cannot prune through {node.target}: one of its arguments is computed in the graph")
        return fqn_to_module(graph_module, node.target)
    return map_arg(arg, fetch)


def _conversion_argument(node: Node, modules: dict[str, nn.Module], graph_module: GraphModule):
    """What a matched node contributes to the prune function's arguments: its module, its function, or
    (functions in _BOUND_FUNCTIONS called with extra arguments) a BoundFunction."""
    if node.op == "call_module":
        return modules[node.target]
    args, kwargs = list(node.args), dict(node.kwargs)
    if node.target not in _BOUND_FUNCTIONS or (len(args) <= 1 and set(kwargs) <= {"input"}):
        return node.target
    if args:
        args.pop(0)
    else:
        kwargs.pop("input", None)
    return pf.BoundFunction(node.target, _constant_argument(tuple(args), graph_module),
                            _constant_argument(kwargs, graph_module))


class BaseStructuredSparsifier(BaseSparsifier):
    """Base class of the structured pruners: subclasses implement update_mask(module, tensor_name, **kwargs),
    which sets rows of the tensor's FakeStructuredSparsity mask to False.

    Args:
        defaults: default per-tensor arguments (e.g. sparsity_level); config entries override them.
            A config entry may also set `prune_bias` (default True: a pruned row's bias is zeroed too;
            False: it is kept and, at prune(), folded into the next layer's bias).
        patterns: {chain of module types / functions: prune function} used by prune() (default: every
            chain of _get_default_structured_pruning_patterns()).

    Workflow: prepare(model, config) -> step() (masks) -> prune() (a torch.fx GraphModule sharing the
    model's modules, with the pruned rows removed and the following layers shrunk to match).

    load_state_dict takes a pruner's state_dict (its row masks are checked, then become the
    FakeStructuredSparsity masks); torch.ao.pruning's pruners cannot load their own, they stack a second,
    weight-shaped FakeSparsity on each tensor.
    """

    def __init__(self, defaults: dict[str, Any] | None, patterns: dict[Pattern, Callable[..., None]] | None = None):
        super().__init__(defaults)
        if patterns is None:
            patterns = _get_default_structured_pruning_patterns()
        self.patterns = patterns

    def make_config_from_model(self, model: nn.Module, SUPPORTED_MODULES: set[type] | None = None) -> None:
        """One config entry per supported layer (default Linear, Conv2d, LSTM): its weight, or for an LSTM
        every weight_ih_l{k} and weight_hh_l{k}."""
        if SUPPORTED_MODULES is None:
            SUPPORTED_MODULES = _get_supported_structured_pruning_modules()
        super().make_config_from_model(model, SUPPORTED_MODULES=SUPPORTED_MODULES)
        config = []
        for entry in self.config:
            module_fqn = entry["tensor_fqn"].rpartition(".")[0]
            module = fqn_to_module(model, module_fqn)
            if isinstance(module, nn.LSTM):
                config.extend({"tensor_fqn": f"{module_fqn}.weight_{kind}_l{layer}"}
                              for layer in range(module.num_layers) for kind in ("ih", "hh"))
            else:
                config.append(entry)
        self.config = config

    def prepare(self, model: nn.Module, config: list[dict[str, Any]] | None) -> None:
        """Adds a FakeStructuredSparsity (row mask, all True unless the entry gives a 1-D bool `mask`) to each
        configured tensor, and a BiasHook to each configured Linear / Conv2d weight. On error, neither the
        model nor this pruner's groups change."""
        # A structured mask has one entry per row, so it is checked here rather than by BaseSparsifier.
        given_masks = {}
        if config is not None:
            config = [dict(entry) if isinstance(entry, dict) else entry for entry in config]
            for entry in config:
                if isinstance(entry, dict) and "mask" in entry:
                    given_masks[entry.get("tensor_fqn")] = entry.pop("mask")
        num_groups = len(self.groups)
        self._given_masks = given_masks
        try:
            super().prepare(model, config)
        except BaseException:
            del self.groups[num_groups:]
            raise
        finally:
            del self._given_masks

    @staticmethod
    def _unmasked(group: dict[str, Any]) -> torch.Tensor:
        """The group's tensor without computing its masked value (the parametrization's original)."""
        module, tensor_name = group["module"], group["tensor_name"]
        if parametrize.is_parametrized(module, tensor_name):
            return module.parametrizations[tensor_name].original
        return getattr(module, tensor_name)

    def _validate_group(self, group: dict[str, Any]) -> None:
        tensor = self._unmasked(group)
        if tensor.dim() < 1:
            raise ValueError(f"{group['tensor_fqn']}: structured pruning needs a tensor with at least one dimension")
        if not isinstance(group.get("prune_bias", True), bool):
            raise TypeError(f"{group['tensor_fqn']}: prune_bias must be a bool, got {group['prune_bias']!r}")

    def _prepare(self, *args, **kwargs) -> None:
        """Attaches the parametrizations and BiasHooks (see prepare), after checking every group."""
        given_masks = getattr(self, "_given_masks", {})
        pending, seen = [], set()
        for group in self.groups:
            module, tensor_name, tensor_fqn = group["module"], group["tensor_name"], group["tensor_fqn"]
            if tensor_fqn in seen:
                raise ValueError(f"{tensor_fqn} is listed more than once in this pruner's config")
            seen.add(tensor_fqn)
            existing = None
            if parametrize.is_parametrized(module, tensor_name):
                existing = next((p for p in module.parametrizations[tensor_name]
                                 if isinstance(p, FakeStructuredSparsity)), None)
            if existing is not None:
                if tensor_fqn in self.state and self.state[tensor_fqn].get("mask") is existing.mask:
                    continue  # prepared by an earlier prepare() call of this pruner
                raise ValueError(f"{tensor_fqn} already has a FakeStructuredSparsity parametrization")
            tensor = getattr(module, tensor_name)
            mask = given_masks.get(tensor_fqn)
            if mask is None:
                mask = torch.ones(tensor.shape[0], dtype=torch.bool, device=tensor.device)
            else:
                if not isinstance(mask, torch.Tensor):
                    raise TypeError(f"{tensor_fqn}: mask must be a torch.Tensor, got {type(mask).__name__}")
                _check_mask(mask, tensor.shape[0], tensor_fqn)
                if mask.device != tensor.device:
                    raise ValueError(f"{tensor_fqn}: mask is on {mask.device}, the tensor on {tensor.device}")
                group["mask"] = mask
            pending.append((group, mask))

        for group, mask in pending:
            self.state[group["tensor_fqn"]]["mask"] = mask
            self._attach(group["module"], group["tensor_name"], group, mask)

    @staticmethod
    def _attach(module: nn.Module, tensor_name: str, group: dict[str, Any], mask: torch.Tensor) -> None:
        """Registers the group's parametrization (default FakeStructuredSparsity) with `mask` on
        module.<tensor_name>, and for a Linear / Conv2d weight the BiasHook."""
        parametrization = group.get("parametrization", FakeStructuredSparsity)(mask)
        parametrize.register_parametrization(module, tensor_name, parametrization)
        if tensor_name == "weight" and isinstance(module, (nn.Linear, nn.Conv2d)):
            prune_bias = group.get("prune_bias", True)
            if module.bias is not None:
                # The bias moves to `_bias`, added back (masked when prune_bias) by the BiasHook.
                module.register_parameter("_bias", nn.Parameter(module.bias.detach()))
                module.bias = None
                module.prune_bias = prune_bias
            module.register_forward_hook(BiasHook(parametrization, prune_bias))

    # ------------------------------------------------------------------------------ load_state_dict
    # A pruner's masks have one entry per row, not the tensor's shape: BaseSparsifier.load_state_dict checks
    # them and finds their parametrizations through these two hooks.
    def _check_loaded_mask(self, mask: torch.Tensor, module: nn.Module, tensor_name: str, tensor_fqn: str) -> None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"load_state_dict: the mask of {tensor_fqn!r} must be a torch.Tensor, "
                            f"got {type(mask).__name__}")
        rows = self._unmasked({"module": module, "tensor_name": tensor_name}).shape[0]
        _check_mask(mask, rows, f"load_state_dict: {tensor_fqn}")

    def _parametrization_to_load_into(self, module: nn.Module, tensor_name: str,
                                      group: dict[str, Any]) -> FakeStructuredSparsity:
        """The tensor's FakeStructuredSparsity; one (all True) and its BiasHook are attached if it has none."""
        try:
            return structured_parametrization(module, tensor_name)
        except ValueError:
            tensor = self._unmasked({"module": module, "tensor_name": tensor_name})
            self._attach(module, tensor_name, group,
                         torch.ones(tensor.shape[0], dtype=torch.bool, device=tensor.device))
            return structured_parametrization(module, tensor_name)

    # ----------------------------------------------------------------------------------- prune
    def _plan(self, traced: GraphModule) -> list[tuple[Callable[..., None], list]]:
        """[(prune function, its arguments)] for every masked layer, in graph order; raises if a masked
        layer cannot be pruned safely (nothing has been changed then)."""
        modules = dict(traced.named_modules())
        call_counts = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")
        plan, planned = [], set()
        for node in traced.graph.nodes:
            if node.op != "call_module" or not module_contains_param(modules[node.target], FakeStructuredSparsity):
                continue
            for pattern, convert_fn in self.patterns.items():
                matched = apply_match(modules, pattern, node, [])
                if matched is None:
                    continue
                for current, following in zip(matched, matched[1:]):
                    others = [u for u in current.users if u is not following and not _leaves_graph(u)]
                    if others:
                        raise ValueError(f"cannot prune {node.target}: the output of {_describe(current)} also "
                                         f"feeds {_describe(others[0])}, which the chain {_chain_from(node)} "
                                         "does not adjust (e.g. a residual connection)")
                for n in matched:
                    if n.op == "call_module" and call_counts[n.target] > 1 and \
                            not isinstance(modules[n.target], _PASS_THROUGH_MODULES):
                        raise ValueError(f"cannot prune {node.target}: module {n.target} is called "
                                         f"{call_counts[n.target]} times in the model")
                block = [_conversion_argument(n, modules, traced) for n in matched
                         if n.op in ("call_module", "call_function")]
                if convert_fn in _BUILTIN_PRUNE_FUNCTIONS:
                    _check_block(block, node.target)
                plan.append((convert_fn, block))
                planned.add(node.target)
                break
        unplanned = [name for name, module in modules.items()
                     if module_contains_param(module, FakeStructuredSparsity) and name not in planned]
        if unplanned:
            chains = "; ".join(_chain_from(n) for n in traced.graph.nodes
                               if n.op == "call_module" and n.target in unplanned) or "not called in forward"
            raise ValueError(f"no supported pattern starts at the masked layers {unplanned} ({chains}); "
                             "pass patterns={...} to support more chains")
        return plan

    def prune(self) -> GraphModule:
        """Traces the model with torch.fx, matches self.patterns at every masked layer and runs each match's
        prune function: the masked rows are removed and the following layers adjusted.

        Returns the traced GraphModule; it shares its modules with the model, which is pruned too.
        Raises ValueError, with the model unchanged, when a masked layer cannot be pruned (see module doc).
        """
        if not hasattr(self, "model"):
            raise RuntimeError(f"{type(self).__name__}.prune: call prepare(model, config) first")
        traced = symbolic_trace(self.model)
        plan = self._plan(traced)
        for convert_fn, block in plan:
            convert_fn(*block)
        for name, module in traced.named_modules():
            if module_contains_param(module, FakeStructuredSparsity):
                raise RuntimeError(f"{name} still has a FakeStructuredSparsity parametrization after its prune "
                                   "function ran (a custom pattern's function must remove it)")
        traced.graph.lint()
        traced.recompile()
        self.traced = traced
        return traced
