"""BaseScheduler: changes the sparsifier groups' sparsity_level over steps (epochs).

Mirrors torch.ao.pruning.BaseScheduler: same arguments, attributes (sparsifier, base_sl, last_epoch,
_step_count, verbose, _get_sl_called_within_step, _last_sl), methods and warnings, so schedulers
written against torch.ao.pruning subclass it unchanged.
"""
from __future__ import annotations

import functools
import warnings
import weakref

from ..sparsifier.base_sparsifier import BaseSparsifier

__all__ = ["BaseScheduler"]


def check_sparsifier(sparsifier) -> None:
    """TypeError unless `sparsifier` is a BaseSparsifier: this package's, or torch.ao.pruning's when torch
    ships it (our schedulers may drive torch.ao.pruning sparsifiers; torch.ao.pruning is never required)."""
    classes: tuple[type, ...] = (BaseSparsifier,)
    try:
        from torch.ao.pruning import BaseSparsifier as TorchBaseSparsifier
        classes += (TorchBaseSparsifier,)
    except ImportError:
        pass
    if not isinstance(sparsifier, classes):
        raise TypeError(f"{type(sparsifier).__name__} is not an instance of sparsity_ext.BaseSparsifier "
                        "(or torch.ao.pruning.BaseSparsifier)")


def _count_calls(method):
    """Wraps a bound `sparsifier.step` so each call increments sparsifier._step_count; wrapping twice is a no-op.

    The wrapper holds the sparsifier weakly, so the sparsifier (which stores the wrapper) has no reference cycle.
    """
    if getattr(method, "_with_counter", False):
        return method
    owner_ref = weakref.ref(method.__self__)
    func = method.__func__

    @functools.wraps(func)
    def step_counting_calls(*args, **kwargs):
        owner = owner_ref()
        owner._step_count += 1
        return func(owner, *args, **kwargs)

    step_counting_calls._with_counter = True
    return step_counting_calls


class _SlComputation:
    """Context in which get_sl() is being called by step() (get_sl warns when called directly)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def __enter__(self):
        self.scheduler._get_sl_called_within_step = True
        return self

    def __exit__(self, *exc):
        self.scheduler._get_sl_called_within_step = False


class BaseScheduler:
    """Base class of sparsity-level schedulers; subclasses implement get_sl().

    Args:
        sparsifier: the sparsifier whose groups' `sparsity_level` is scheduled (this package's or
            torch.ao.pruning's).
        last_epoch: index of the last epoch (-1: start from scratch).
        verbose: print each change of a group's sparsity level.
    The constructor records each group's sparsity_level as base_sl, wraps sparsifier.step to count its
    calls, and takes a first step (epoch 0).
    """

    def __init__(self, sparsifier, last_epoch: int = -1, verbose: bool = False):
        check_sparsifier(sparsifier)
        self.sparsifier = sparsifier
        self.base_sl = [group["sparsity_level"] for group in sparsifier.groups]
        self.last_epoch = last_epoch
        # Counting sparsifier.step calls lets step() warn when the scheduler steps first.
        self.sparsifier.step = _count_calls(self.sparsifier.step)
        self.sparsifier._step_count = 0
        self._step_count: int = 0
        self.verbose = verbose
        self._get_sl_called_within_step: bool = False
        self.step()

    def state_dict(self) -> dict:
        """Every attribute except the sparsifier."""
        return {key: value for key, value in self.__dict__.items() if key != "sparsifier"}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores the attributes saved by state_dict()."""
        self.__dict__.update(state_dict)

    def get_last_sl(self) -> list:
        """The sparsity levels set by the last step."""
        return self._last_sl

    def get_sl(self) -> list:
        """The sparsity level of each group at epoch self.last_epoch; called by step(), use get_last_sl()."""
        self._warn_unless_within_step()
        raise NotImplementedError

    def _warn_unless_within_step(self) -> None:
        """get_sl() warns when called directly: its result is only meaningful inside step()."""
        if not self._get_sl_called_within_step:
            warnings.warn("To get the last sparsity level computed by the scheduler, call get_last_sl(); "
                          "get_sl() is meant to be called by step()", stacklevel=3)

    def print_sl(self, is_verbose: bool, group: int, sl: float, epoch: int | None = None) -> None:
        """Prints a group's new sparsity level when is_verbose."""
        if not is_verbose:
            return
        if epoch is None:
            print(f"Adjusting sparsity level of group {group} to {sl:.4e}.")
        else:
            print(f"Epoch {epoch:5d}: adjusting sparsity level of group {group} to {sl:.4e}.")

    def __repr__(self) -> str:
        return f"{self.__class__.__name__} (\nSparsifier {self.sparsifier}\n    base_sl: {self.base_sl}\n)"

    def step(self, epoch: int | None = None) -> None:
        """Advances last_epoch, sets each group's sparsity_level to get_sl() and re-enables mask updates.

        Warns (on the second call) when sparsifier.step was replaced after this scheduler was created, or
        has not been called yet: call sparsifier.step() before scheduler.step().
        """
        if self._step_count == 1:
            if not hasattr(self.sparsifier.step, "_with_counter"):
                warnings.warn("Seems like `sparsifier.step()` was replaced after the scheduler was created, so "
                              "its calls are not counted; call sparsifier.step() before scheduler.step().",
                              UserWarning, stacklevel=2)
            elif self.sparsifier._step_count < 1:
                warnings.warn("Detected call of `scheduler.step()` before `sparsifier.step()`: in each "
                              "iteration, call sparsifier.step() first.", UserWarning, stacklevel=2)
        self._step_count += 1
        with _SlComputation(self):
            self.last_epoch += 1
            levels = self.get_sl()
        for i, (group, level) in enumerate(zip(self.sparsifier.groups, levels)):
            group["sparsity_level"] = level
            self.print_sl(self.verbose, i, level, epoch)
        self._last_sl = [group["sparsity_level"] for group in self.sparsifier.groups]
        self.sparsifier.enable_mask_update = True

    def _make_sure_a_list(self, var) -> list:
        """`var` as a list with one entry per sparsifier group (a scalar is repeated)."""
        n = len(self.sparsifier.groups)
        if not isinstance(var, (list, tuple)):
            return [var] * n
        if len(var) != n:
            raise ValueError(f"Expected variable of length {n}, but got {len(var)}")
        return list(var)
