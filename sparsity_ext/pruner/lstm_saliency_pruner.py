"""LSTMSaliencyPruner (mirrors torch.ao.pruning._experimental.pruner.LSTMSaliencyPruner)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._scores import check_level, row_l1_norms, smallest
from .base_structured_sparsifier import BaseStructuredSparsifier
from .parametrization import FakeStructuredSparsity

__all__ = ["LSTMSaliencyPruner"]


class LSTMSaliencyPruner(BaseStructuredSparsifier):
    """Saliency pruning of packed LSTM weights, gate by gate.

    weight_ih_l{k} and weight_hh_l{k} stack the rows of the four gates (input, forget, cell, output).
    The rows' L1 saliencies are split into those four parts (torch.split into len // 4 rows), and each
    part loses its int(part rows * sparsity_level) least salient rows, so every gate keeps the same
    number of units. Masks only grow across steps; ties go to the lower row index.
    """

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if self._unmasked(group).dim() <= 1:
            raise ValueError(f"{group['tensor_fqn']}: structured pruning needs a tensor with at least 2 dims")
        check_level(group)

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        weight = getattr(module, tensor_name)
        saliency = row_l1_norms(weight)
        for p in getattr(module.parametrizations, tensor_name):
            if not isinstance(p, FakeStructuredSparsity):
                continue
            part = len(p.mask) // 4
            for gate_mask, gate_saliency in zip(torch.split(p.mask, part), torch.split(saliency, part)):
                gate_mask[smallest(gate_saliency, int(len(gate_mask) * kwargs["sparsity_level"]))] = False
