"""What the lightning callbacks do, free of lightning (so it imports, and is tested, without it).

data_sparsity.py combines these hook classes with lightning's Callback.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

from torch import nn

from ...base_data_sparsifier import SUPPORTED_TYPES

logger: logging.Logger = logging.getLogger(__name__)


def _get_valid_name(name: str) -> str:
    """A parameter's fqn as a data name: '.' is not allowed in the sparsifier's container names."""
    return name.replace(".", "_")


def _attach_model_to_data_sparsifier(module: nn.Module, data_sparsifier, config: dict | None = None) -> None:
    """add_data(valid name, parameter, **config[valid name]) for every parameter of `module`."""
    config = config or {}
    for name, parameter in module.named_parameters():
        if type(parameter) in SUPPORTED_TYPES:
            valid_name = _get_valid_name(name)
            data_sparsifier.add_data(name=valid_name, data=parameter, **config.get(valid_name, {}))


def _log_sparsified_level(model: nn.Module, data_sparsifier) -> None:
    """Logs (INFO) the fraction of masked elements of each parameter of `model`."""
    for name, parameter in model.named_parameters():
        if type(parameter) not in SUPPORTED_TYPES:
            continue
        keep = data_sparsifier.get_mask(name=_get_valid_name(name), as_bool=True)
        logger.info("Sparsity in layer %s = %.2f%%", name, 100.0 * (1.0 - keep.float().mean().item()))


class PostTrainingDataSparsityHooks:
    """Sparsifies a copy of the trained model when fit ends (the trained model is not modified).

    Args:
        data_sparsifier_class: a BaseDataSparsifier subclass, built when fit ends.
        data_sparsifier_args: its constructor arguments (without data_list).
    After fit, `sparsified` is the sparsified (eval-mode) copy of pl_module.model and
    `data_sparsifier` the sparsifier that did it (step, then squash_mask).
    """

    def __init__(self, data_sparsifier_class, data_sparsifier_args: dict[str, Any]):
        super().__init__()
        self.data_sparsifier_class = data_sparsifier_class
        self.data_sparsifier_args = data_sparsifier_args
        self.data_sparsifier: Any = None
        self.sparsified: nn.Module | None = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self.sparsified = copy.deepcopy(pl_module.model).eval()
        self.data_sparsifier = self.data_sparsifier_class(**self.data_sparsifier_args)
        _attach_model_to_data_sparsifier(self.sparsified, self.data_sparsifier)
        self.data_sparsifier.step()
        self.data_sparsifier.squash_mask()
        _log_sparsified_level(self.sparsified, self.data_sparsifier)


class TrainingAwareDataSparsityHooks:
    """Sparsifies a copy of the model at the end of every training epoch, with a data scheduler
    varying the sparsifier's arguments across epochs (the trained model is not modified).

    Args:
        data_sparsifier_class, data_sparsifier_args: the sparsifier, built when training starts.
        data_scheduler_class, data_scheduler_args: the scheduler, built when training starts with
            data_sparsifier=<that sparsifier> added to data_scheduler_args.
    Hooks: on_train_start builds both and attaches a copy of pl_module.model; on_train_epoch_start
    restores the sparsifier's state saved at the end of the previous epoch; on_train_epoch_end attaches a
    fresh copy (keeping each tensor's config), steps sparsifier and scheduler, and saves the state;
    on_train_end squashes the masks into `sparsified`.
    """

    def __init__(self, data_sparsifier_class, data_sparsifier_args: dict[str, Any],
                 data_scheduler_class, data_scheduler_args: dict[str, Any]):
        super().__init__()
        self.data_sparsifier_class = data_sparsifier_class
        self.data_sparsifier_args = data_sparsifier_args
        self.data_scheduler_class = data_scheduler_class
        self.data_scheduler_args = data_scheduler_args
        self.data_sparsifier: Any = None
        self.data_scheduler: Any = None
        self.sparsified: nn.Module | None = None
        self.data_sparsifier_state_dict: Any = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.data_sparsifier = self.data_sparsifier_class(**self.data_sparsifier_args)
        self.sparsified = copy.deepcopy(pl_module.model)
        _attach_model_to_data_sparsifier(self.sparsified, self.data_sparsifier)  # gives the scheduler its base values
        scheduler_args = copy.deepcopy(self.data_scheduler_args)
        scheduler_args["data_sparsifier"] = self.data_sparsifier
        self.data_scheduler = self.data_scheduler_class(**scheduler_args)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.data_sparsifier_state_dict is not None:  # None during the first epoch
            self.data_sparsifier.load_state_dict(self.data_sparsifier_state_dict)

    def __create_config_based_on_state(self, pl_module) -> dict[str, dict]:
        """{valid name: current config} once a state was saved, so re-attaching keeps scheduled values."""
        if self.data_sparsifier_state_dict is None:
            return {}
        return {_get_valid_name(name): self.data_sparsifier.data_groups[_get_valid_name(name)]
                for name, _ in pl_module.model.named_parameters()}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.sparsified = copy.deepcopy(pl_module.model)
        config = self.__create_config_based_on_state(pl_module)
        _attach_model_to_data_sparsifier(self.sparsified, self.data_sparsifier, config=config)
        self.data_sparsifier.step()
        self.data_scheduler.step()
        self.data_sparsifier_state_dict = self.data_sparsifier.state_dict()

    def on_train_end(self, trainer, pl_module) -> None:
        self.data_sparsifier.squash_mask()
