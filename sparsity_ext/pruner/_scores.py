"""Shared pieces of the pruners: row scores and the choice of the rows to prune."""
from __future__ import annotations

import numbers

import torch


def row_l1_norms(weight: torch.Tensor) -> torch.Tensor:
    """L1 norm of each row (dim-0 slice) of a tensor with at least 2 dims, in one vectorized reduction."""
    return weight.norm(p=1, dim=tuple(range(1, weight.dim())))


def smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest scores; ties go to the lower index, NaN counts as the largest."""
    return torch.argsort(scores, stable=True)[:k]


def check_level(group: dict, low: float | None = 0.0, high: float | None = 1.0) -> None:
    """Raises unless the group's sparsity_level is a real number (within [low, high] where given)."""
    level = group.get("sparsity_level")
    if isinstance(level, bool) or not isinstance(level, numbers.Real):
        raise TypeError(f"{group['tensor_fqn']}: sparsity_level must be a number, got {level!r}")
    if (low is not None and level < low) or (high is not None and level > high):
        raise ValueError(f"{group['tensor_fqn']}: sparsity_level must be in [{low}, {high}], got {level}")
