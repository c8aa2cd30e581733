"""torch.ao.pruning._experimental's import paths, for code that swaps `torch.ao.pruning` for `sparsity_ext`.

`sparsity_ext._experimental.<package>[.<module>...]` is the module `sparsity_ext.<package>[.<module>...]`
itself (the same object, so classes are identical whichever path imported them), for the packages
activation_sparsifier, data_scheduler, data_sparsifier and pruner; e.g.
`from sparsity_ext._experimental.pruner.FPGM_pruner import FPGMPruner`. Modules are imported when first
asked for, as the real paths import them (the lightning callbacks still need lightning).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

__all__ = ["activation_sparsifier", "data_scheduler", "data_sparsifier", "pruner"]

_PACKAGE = "sparsity_ext"
# torch.ao.pruning's spelling of a module whose name sparsity_ext spells without the typo
_RENAMED = {"_data_sparstity_utils": "_data_sparsity_utils"}


def _real_name(alias: str) -> str | None:
    """The sparsity_ext module an alias under this package stands for, or None if it is no alias."""
    if not alias.startswith(__name__ + "."):
        return None
    parts = alias[len(__name__) + 1:].split(".")
    if parts[0] not in __all__:
        return None
    return ".".join([_PACKAGE] + [_RENAMED.get(part, part) for part in parts])


class _AliasLoader(importlib.abc.Loader):
    """Loads an alias as the already importable real module (imported on the way if need be)."""

    def __init__(self, real_name: str):
        self.real_name = real_name

    def create_module(self, spec):
        module = importlib.import_module(self.real_name)
        self.real_spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # The import system stamped the alias's spec on the real module; give it back its own.
        module.__spec__ = self.real_spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Answers imports of alias names before the path finder could load a second copy of a real file."""

    def find_spec(self, fullname, path=None, target=None):
        real_name = _real_name(fullname)
        if real_name is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(real_name))


if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
