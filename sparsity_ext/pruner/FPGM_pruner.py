"""FPGMPruner (mirrors torch.ao.pruning._experimental.pruner.FPGMPruner)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ._scores import check_level, smallest
from .base_structured_sparsifier import BaseStructuredSparsifier
from .parametrization import structured_mask

__all__ = ["FPGMPruner"]

# Above this many pairwise distances the default distances are summed in blocks of rows (bounded memory:
# 256 MiB of float64 distances at a time).
_MAX_DISTANCES_AT_ONCE = 1 << 25


class FPGMPruner(BaseStructuredSparsifier):
    """Filter Pruning via Geometric Median (He et al., 2019, arXiv:1811.00250): prunes the rows (filters)
    nearest to all the others, i.e. with the smallest sum of distances to every row, the most
    replaceable ones, rather than those of smallest norm.

    Args:
        sparsity_level: fraction of rows pruned: round(sparsity_level * rows) more rows each step;
            <= 0 resets the mask to all True, >= 1 prunes every row.
        dist: 1 (L1), 2 (L2, the default, also for None) or a callable mapping the (rows, features)
            matrix of flattened rows to a (rows, rows) distance matrix.

    Distances are one torch.cdist over the flattened rows (on the weight's device), summed in blocks of
    rows for very large layers. Ties go to the lower row index.

    The built-in distances are computed and summed in float64, then returned (and ranked) in the weight's
    dtype, as torch.ao.pruning returns them: a float32 cdist of many rows takes the matmul path
    (|x|^2 + |y|^2 - 2 x.y), whose cancellation error differs between CPU and CUDA GEMMs and can swap rows
    whose sums are a few float32 ulps apart, so the same weight would lose different filters on different
    devices; the float64 sums rounded once do not. torch.ao.pruning's masks are the same wherever its own
    rounding error does not reorder two rows. fp16/bf16 weights (which torch.ao.pruning's cdist rejects on
    the CPU) are scored in float32.
    """

    def __init__(self, sparsity_level: float = 0.5, dist: Callable | int | None = None):
        if dist is None:
            dist = 2
        if callable(dist):
            self.dist_fn, self._p = dist, None
        elif dist in (1, 2) and not isinstance(dist, bool):
            self.dist_fn, self._p = (lambda x, p=dist: torch.cdist(x, x, p=p)), dist
        else:
            raise NotImplementedError(f"FPGMPruner: dist must be 1, 2 or a callable, got {dist!r}")
        super().__init__(defaults={"sparsity_level": sparsity_level})

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_level(group, low=None, high=None)

    def _compute_distance(self, t: torch.Tensor) -> torch.Tensor:
        """For each row (dim-0 slice) of t, the sum of its distances to every row, in t's dtype (float32 for
        fp16/bf16; a custom dist_fn's result keeps its own dtype)."""
        rows = t.reshape(t.shape[0], -1)
        if self._p is None:
            return self.dist_fn(rows).abs().sum(dim=1)
        wide = rows.to(torch.float64)  # see the class docstring: the same ranking on every device
        block = max(1, _MAX_DISTANCES_AT_ONCE // max(wide.shape[0], 1))
        sums = torch.cat([torch.cdist(chunk, wide, p=self._p).sum(dim=1) for chunk in wide.split(block)])
        return sums.to(torch.promote_types(t.dtype, torch.float32))

    def update_mask(self, module: nn.Module, tensor_name: str, sparsity_level: float, **kwargs) -> None:
        weight = getattr(module, tensor_name)
        mask = structured_mask(module, tensor_name)
        if sparsity_level <= 0:
            mask.fill_(True)
        elif sparsity_level >= 1:
            mask.fill_(False)
        else:
            rows = weight.shape[0]
            k = min(max(round(sparsity_level * rows), 0), rows)
            mask[smallest(self._compute_distance(weight), k)] = False
