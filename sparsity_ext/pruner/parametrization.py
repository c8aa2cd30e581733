"""The structured-pruning parametrization (a mask over a tensor's rows) and the hook that re-adds a
masked layer's bias. Mirrors torch.ao.pruning._experimental.pruner.parametrization."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..sparsifier.utils import module_contains_param

__all__ = ["FakeStructuredSparsity", "BiasHook", "module_contains_param", "structured_mask",
           "structured_parametrization"]


class FakeStructuredSparsity(nn.Module):
    """Parametrization that zeroes whole rows (dim-0 slices: output features / channels) of a tensor.

    `mask` is a 1-D bool buffer with one entry per row (True = keep); pruners update it in place, so
    its identity stays fixed for the life of the parametrization. It is left out of state_dict():
    the sparsifier's own state_dict holds it.
    """

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.mask, torch.Tensor):
            raise AssertionError(f"FakeStructuredSparsity: mask must be a torch.Tensor, got {type(self.mask).__name__}")
        if self.mask.shape[0] != x.shape[0]:
            raise AssertionError(f"FakeStructuredSparsity: mask has {self.mask.shape[0]} rows, "
                                 f"the tensor has {x.shape[0]}")
        return self.mask.reshape((-1,) + (1,) * (x.dim() - 1)) * x

    def state_dict(self, *args, **kwargs):
        return {}


class BiasHook:
    """Forward hook of a pruned Linear / Conv2d: adds the layer's original bias (kept in `_bias` while the
    layer is prepared) to its output, with the pruned rows' entries zeroed first when prune_bias.

    Attributes `param` (the FakeStructuredSparsity whose mask is used) and `prune_bias` as in
    torch.ao.pruning. Unlike torch.ao.pruning, the bias is added out of place as the parameter itself
    (so it receives gradients while the masked model trains), a Linear's bias is broadcast along the
    last dimension, so inputs of any rank (e.g. (batch, seq, features)) work, and unbatched conv
    inputs work.
    """

    def __init__(self, parametrization: FakeStructuredSparsity, prune_bias: bool):
        self.param = parametrization
        self.prune_bias = prune_bias

    def __call__(self, module: nn.Module, input, output: torch.Tensor) -> torch.Tensor:
        bias = getattr(module, "_bias", None)
        if bias is None:
            return output
        if self.prune_bias:
            with torch.no_grad():
                bias[~self.param.mask] = 0  # persistent, as in torch.ao.pruning: a pruned bias stays zero
        if isinstance(module, nn.Linear):
            return output + bias
        shape = [1] * output.dim()
        shape[output.dim() - 3] = -1  # the channel dim of a (N, C, H, W) or unbatched (C, H, W) conv output
        return output + bias.reshape(shape)


def structured_parametrization(module: nn.Module, tensor_name: str = "weight") -> FakeStructuredSparsity:
    """The FakeStructuredSparsity on module.<tensor_name>; ValueError if it has none."""
    if parametrize.is_parametrized(module, tensor_name):
        for p in module.parametrizations[tensor_name]:
            if isinstance(p, FakeStructuredSparsity):
                return p
    raise ValueError(f"{parametrize.type_before_parametrizations(module).__name__}.{tensor_name} "
                     "has no FakeStructuredSparsity parametrization (was the pruner prepared?)")


def structured_mask(module: nn.Module, tensor_name: str = "weight") -> torch.Tensor:
    """The mask of the FakeStructuredSparsity on module.<tensor_name>; ValueError if it has none."""
    return structured_parametrization(module, tensor_name).mask
