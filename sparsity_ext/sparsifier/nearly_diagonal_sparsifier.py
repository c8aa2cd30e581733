"""NearlyDiagonalSparsifier: keep a band of diagonals around the main diagonal. Mirrors
torch.ao.pruning.NearlyDiagonalSparsifier, with the band built in one vectorized comparison."""
from __future__ import annotations

import numbers

import torch

from .base_sparsifier import BaseSparsifier, checked_shape, mask_of

__all__ = ["NearlyDiagonalSparsifier"]


def _check_nearliness(nearliness, shape, where: str) -> int:
    """Validated nearliness for a tensor of `shape`: an int; when > 0 the tensor must be 2-D and the
    nearliness odd with a half-width below min(rows, cols). (torch.ao.pruning's order of checks: a
    nearliness <= 0 masks a tensor of any shape.)"""
    if isinstance(nearliness, bool) or not isinstance(nearliness, numbers.Integral):
        raise TypeError(f"{where}: nearliness must be an int, got {nearliness!r}")
    nearliness = int(nearliness)
    if nearliness <= 0:
        return nearliness
    if len(shape) != 2:
        raise ValueError(f"{where}: needs a 2-D tensor, got shape {tuple(shape)}")
    if nearliness % 2 == 0:
        raise ValueError(f"{where}: nearliness can only be an odd number, got {nearliness}")
    if nearliness // 2 >= min(shape):
        raise ValueError(f"{where}: nearliness {nearliness} cannot be larger than the dimensions of tensor "
                         f"{tuple(shape)} (needs nearliness // 2 < {min(shape)})")
    return nearliness


class NearlyDiagonalSparsifier(BaseSparsifier):
    """Masks everything outside the `nearliness` diagonals closest to the main one: element (i, j) is kept
    when |i - j| <= nearliness // 2. For 4x4 and nearliness 3 (left) and 5 (right):

        1 1 0 0     1 1 1 0
        1 1 1 0     1 1 1 1
        0 1 1 1     1 1 1 1
        0 0 1 1     0 1 1 1

    Args:
        nearliness: number of kept diagonals; odd, with nearliness // 2 < min(rows, cols). 1 keeps the
            main diagonal only; nearliness <= 0 masks everything (as torch.ao.pruning does).
    Only 2-D tensors. As in torch.ao.pruning, prepare() accepts any nearliness and step() raises
    ValueError for an illegal one; the masks are left unchanged then (torch.ao.pruning zeroes them).
    """

    def __init__(self, nearliness: int = 1):
        super().__init__(defaults={"nearliness": nearliness})

    def step(self, use_path: bool = True) -> None:
        """Writes every group's band mask. As in torch.ao.pruning, a nearliness is checked here, not at
        prepare(): an illegal one (even, or too wide for the tensor) raises ValueError; unlike
        torch.ao.pruning, which zeroes the mask first, before any mask changes."""
        if self.enable_mask_update:
            for group in self.groups:
                where = f"{type(self).__name__} ({group['tensor_fqn']})"
                _check_nearliness(group["nearliness"], checked_shape(group["module"], group["tensor_name"], where),
                                  where)
        super().step(use_path)

    def update_mask(self, module, tensor_name, nearliness, **kwargs):
        """Writes the band mask into module.<tensor_name>'s mask buffer (in place)."""
        where = type(self).__name__
        mask = mask_of(module, tensor_name, where)
        nearliness = _check_nearliness(nearliness, mask.shape, where)
        with torch.no_grad():
            if nearliness <= 0:
                mask.fill_(0)
                return
            # zero, then one diagonal at a time: two passes of writes, no index tensors of the mask's size
            mask.fill_(0)
            half = nearliness // 2
            for offset in range(-half, half + 1):
                mask.diagonal(offset).fill_(1)
