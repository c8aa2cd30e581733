"""Helpers shared by the sparsifiers: fqn lookups, module swapping, and the FakeSparsity mask parametrization.

Mirrors torch.ao.pruning.sparsifier.utils (same names, arguments and results).
"""
from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn
from torch.nn.utils.parametrize import is_parametrized, type_before_parametrizations

__all__ = [
    "module_contains_param",
    "swap_module",
    "module_to_fqn",
    "fqn_to_module",
    "get_arg_info_from_tensor_fqn",
    "FakeSparsity",
]


def module_contains_param(module: nn.Module, parametrization: type[nn.Module]) -> bool:
    """True when any tensor of `module` carries a parametrization of class `parametrization`."""
    if not is_parametrized(module):
        return False
    return any(isinstance(p, parametrization)
               for plist in module.parametrizations.values() for p in plist)


def swap_module(mod: nn.Module, mapping: dict[type[nn.Module], type[nn.Module]]) -> nn.Module:
    """The module that replaces `mod` under `mapping` (built with the target class's `from_dense`).

    The new module gets `mod`'s forward pre-hooks and forward hooks and is moved to `mod`'s device.
    `mod` is returned unchanged when its (pre-parametrization) class is not in `mapping`.
    """
    source_type = type_before_parametrizations(mod)
    if source_type not in mapping:
        return mod
    devices = {t.device for t in itertools.chain(mod.parameters(), mod.buffers())}
    if len(devices) > 1:
        raise AssertionError(f"swap_module needs a module on a single device (cpu or one CUDA device), "
                             f"got tensors on {devices}")
    new_mod = mapping[source_type].from_dense(mod)
    for hook in mod._forward_pre_hooks.values():
        new_mod.register_forward_pre_hook(hook)
    for hook in mod._forward_hooks.values():
        new_mod.register_forward_hook(hook)
    if devices:
        new_mod.to(next(iter(devices)))
    return new_mod


def module_to_fqn(model: nn.Module, module: nn.Module, prefix: str = "") -> str | None:
    """The dotted path of `module` inside `model` ('' for model itself), or None if it is not a descendant."""
    if module is model:
        return ""
    for name, child in model.named_children():
        child_path = module_to_fqn(child, module, ".")
        if child_path is not None:
            return prefix + name + child_path
    return None


def fqn_to_module(model: nn.Module | None, path: str) -> Any:
    """The object (module, parameter, buffer, ...) at dotted `path` under `model`, or None if there is none.

    Like model.get_submodule(path), but also reaches tensors and returns None instead of raising.
    """
    obj = model
    if path != "":
        for name in path.split("."):
            obj = getattr(obj, name, None)
    return obj


def get_arg_info_from_tensor_fqn(model: nn.Module, tensor_fqn: str) -> dict[str, Any]:
    """Splits `tensor_fqn` ('a.b.weight') into module_fqn ('a.b') and tensor_name ('weight').

    Returns {"module_fqn", "module" (None when the path does not exist), "tensor_name", "tensor_fqn"}.
    """
    module_fqn, _, tensor_name = tensor_fqn.rpartition(".")
    return {
        "module_fqn": module_fqn,
        "module": fqn_to_module(model, module_fqn),
        "tensor_name": tensor_name,
        "tensor_fqn": tensor_fqn,
    }


class FakeSparsity(nn.Module):
    """Parametrization that multiplies a tensor by a mask held in the buffer `mask`.

    Sparsifiers update the mask's values in place; the buffer object itself is kept for the life of
    the parametrization, so references to it (e.g. the sparsifier's state) stay valid.
    The mask is deliberately left out of state_dict(): masks are saved by the sparsifier's own
    state_dict, not with the module's weights.
    """

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask.shape != x.shape:
            raise AssertionError(f"FakeSparsity: mask shape {tuple(self.mask.shape)} must match the tensor's "
                                 f"shape {tuple(x.shape)}")
        return self.mask * x

    def state_dict(self, *args, **kwargs):
        return {}
