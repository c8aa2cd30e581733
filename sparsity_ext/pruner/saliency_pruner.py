"""SaliencyPruner (mirrors torch.ao.pruning._experimental.pruner.SaliencyPruner)."""
from __future__ import annotations

from typing import Any

from torch import nn

from ._scores import check_level, row_l1_norms, smallest
from .base_structured_sparsifier import BaseStructuredSparsifier
from .parametrization import structured_mask

__all__ = ["SaliencyPruner"]


class SaliencyPruner(BaseStructuredSparsifier):
    """Prunes the rows of smallest saliency, the L1 norm of the row (over all dims but the first).

    Each step prunes int(rows * sparsity_level) rows more among the current masked weight's rows
    (already pruned rows have saliency 0, so masks only grow), as torch.ao.pruning does. Ties go to
    the lower row index. Needs tensors of at least 2 dims and a sparsity_level in [0, 1]; both are
    checked when the pruner is prepared.
    """

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if self._unmasked(group).dim() <= 1:
            raise ValueError(f"{group['tensor_fqn']}: structured pruning needs a tensor with at least 2 dims")
        check_level(group)

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs) -> None:
        weight = getattr(module, tensor_name)
        mask = structured_mask(module, tensor_name)
        saliency = row_l1_norms(weight)
        if saliency.shape != mask.shape:
            raise ValueError(f"saliency shape {tuple(saliency.shape)} != mask shape {tuple(mask.shape)}")
        mask[smallest(saliency, int(len(mask) * kwargs["sparsity_level"]))] = False
