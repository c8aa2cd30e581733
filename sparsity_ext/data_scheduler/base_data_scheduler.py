"""BaseDataScheduler: varies one argument of a data sparsifier's configs (e.g. sparsity_level) over time.

Mirrors torch.ao.pruning._experimental.data_scheduler.BaseDataScheduler: same constructor, the
`get_schedule_param()` hook, step / state_dict / load_state_dict / get_last_param, the attributes
(base_param, last_epoch, _step_count, _last_param, _get_sp_called_within_step) and the order-of-steps
warnings (the sparsifier's step is wrapped to count its calls).
"""
from __future__ import annotations

import abc
import contextlib
import warnings
import weakref
from functools import wraps
from typing import Any

from ..data_sparsifier import BaseDataSparsifier

__all__ = ["BaseDataScheduler"]


def _counting_step(step):
    """Wraps a sparsifier's bound step() so that each call increments the sparsifier's _step_count.

    The wrapper holds the sparsifier weakly (no reference cycle) and is marked `_with_counter`, so
    wrapping twice (two schedulers on one sparsifier) keeps a single counter.
    """
    if getattr(step, "_with_counter", False):
        return step
    sparsifier_ref = weakref.ref(step.__self__)
    unbound = step.__func__

    @wraps(unbound)
    def wrapper(*args, **kwargs):
        sparsifier = sparsifier_ref()
        sparsifier._step_count += 1
        return unbound(sparsifier, *args, **kwargs)

    wrapper._with_counter = True
    return wrapper


class BaseDataScheduler(abc.ABC):
    """Base class of the data schedulers: subclasses implement `get_schedule_param()`.

    Args:
        data_sparsifier: the BaseDataSparsifier whose configs are scheduled.
        schedule_param: the config key that is varied (e.g. "sparsity_level").
        last_epoch: the index of the last epoch, to resume a schedule (-1: start).
        verbose: print each value set.
    Construction records base_param ({name: the config's current value}) and takes a first step.
    Call data_sparsifier.step() before each scheduler.step() (a UserWarning says when the order is wrong).
    """

    def __init__(self, data_sparsifier, schedule_param: str, last_epoch: int = -1, verbose: bool = False):
        if not isinstance(data_sparsifier, BaseDataSparsifier):
            raise TypeError(f"{type(data_sparsifier).__name__} is not an instance of "
                            f"sparsity_ext.data_sparsifier.BaseDataSparsifier")
        self.data_sparsifier = data_sparsifier
        self.schedule_param = schedule_param
        self.base_param = {name: config.get(schedule_param, None)
                           for name, config in self.data_sparsifier.data_groups.items()}
        self.last_epoch = last_epoch

        self.data_sparsifier.step = _counting_step(self.data_sparsifier.step)
        self.data_sparsifier._step_count = 0
        self._step_count: int = 0
        self.verbose = verbose
        self._get_sp_called_within_step: bool = False  # True while step() calls get_schedule_param()
        self.step()

    @abc.abstractmethod
    def get_schedule_param(self) -> dict[str, Any]:
        """{name: new value of schedule_param}; step() writes each into data_sparsifier.data_groups[name].

        Example, halving sparsity_level at every step::

            def get_schedule_param(self):
                return {name: config["sparsity_level"] * 0.5
                        for name, config in self.data_sparsifier.data_groups.items()}
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__} (\nData Sparsifier {self.data_sparsifier}\n"
                f"    {self.schedule_param}: {self.base_param}\n)")

    def state_dict(self) -> dict[str, Any]:
        """Every attribute but data_sparsifier (save the sparsifier's own state_dict separately)."""
        return {key: value for key, value in self.__dict__.items() if key != "data_sparsifier"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the attributes saved by state_dict() (restore the sparsifier's state first)."""
        self.__dict__.update(state_dict)

    def get_last_param(self) -> dict[str, Any]:
        """{name: value of schedule_param} after the last step."""
        return self._last_param

    @contextlib.contextmanager
    def _inside_step(self):
        self._get_sp_called_within_step = True
        try:
            yield
        finally:
            self._get_sp_called_within_step = False

    def step(self) -> None:
        """Advances last_epoch, writes get_schedule_param() into the sparsifier's configs and enables
        its mask update."""
        if self._step_count == 1:  # the first call after construction: check the order of steps
            if not hasattr(self.data_sparsifier.step, "_with_counter"):
                warnings.warn("data_sparsifier.step() was replaced after the scheduler was built; make sure "
                              "to call data_sparsifier.step() before scheduler.step().", UserWarning, stacklevel=2)
            elif self.data_sparsifier._step_count < 1:
                warnings.warn("scheduler.step() was called before data_sparsifier.step(); call "
                              "data_sparsifier.step() first.", UserWarning, stacklevel=2)
        self._step_count += 1

        with self._inside_step():
            self.last_epoch += 1
            new_params = self.get_schedule_param()
        for name, value in new_params.items():
            self.data_sparsifier.data_groups[name][self.schedule_param] = value
            if self.verbose:
                print(f"Adjusting {self.schedule_param} for group {name} to {value}")
        self._last_param = {name: config.get(self.schedule_param, None)
                            for name, config in self.data_sparsifier.data_groups.items()}
        self.data_sparsifier.enable_mask_update = True
