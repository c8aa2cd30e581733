"""LambdaSL: sparsity level = base level x a function of the epoch. Mirrors torch.ao.pruning.LambdaSL."""
from __future__ import annotations

from typing import Callable

from .base_scheduler import BaseScheduler, check_sparsifier

__all__ = ["LambdaSL"]


class LambdaSL(BaseScheduler):
    """Sets each group's sparsity_level to its initial level times sl_lambda(epoch) (epoch 0 at creation
    with the default last_epoch=-1).

    Args:
        sparsifier: the scheduled sparsifier.
        sl_lambda: a function epoch -> factor, or a list/tuple of them, one per sparsifier group.
        last_epoch: index of the last epoch. Default: -1.
        verbose: print each update. Default: False.

    Example::

        >>> scheduler = LambdaSL(sparsifier, sl_lambda=lambda epoch: min(1.0, epoch / 10))
        >>> for epoch in range(20):
        ...     train_one_epoch(model)
        ...     sparsifier.step()
        ...     scheduler.step()
    """

    def __init__(self, sparsifier, sl_lambda: Callable[[int], float] | list[Callable[[int], float]],
                 last_epoch: int = -1, verbose: bool = False) -> None:
        check_sparsifier(sparsifier)  # before its groups are read
        self.sparsifier = sparsifier
        if isinstance(sl_lambda, (list, tuple)):
            if len(sl_lambda) != len(sparsifier.groups):
                raise ValueError(f"Expected {len(sparsifier.groups)} sl_lambdas (one per group), got {len(sl_lambda)}")
            self.sl_lambdas = list(sl_lambda)
        else:
            self.sl_lambdas = [sl_lambda] * len(sparsifier.groups)
        super().__init__(sparsifier, last_epoch, verbose)

    def get_sl(self) -> list[float]:
        self._warn_unless_within_step()
        return [base * fn(self.last_epoch) for fn, base in zip(self.sl_lambdas, self.base_sl)]
