"""Lightning callbacks for data sparsity: PostTrainingDataSparsity, TrainingAwareDataSparsity.

Mirrors torch.ao.pruning._experimental.data_sparsifier.lightning.callbacks.data_sparsity. Needs
`lightning` (lightning.pytorch) or `pytorch_lightning`; the behaviour is in _data_sparsity_utils.
"""
from __future__ import annotations

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError("sparsity_ext.data_sparsifier.lightning.callbacks.data_sparsity needs lightning: "
                          "`pip install lightning` (or pytorch_lightning)") from exc

from ._data_sparsity_utils import PostTrainingDataSparsityHooks, TrainingAwareDataSparsityHooks

__all__ = ["PostTrainingDataSparsity", "TrainingAwareDataSparsity"]


class PostTrainingDataSparsity(PostTrainingDataSparsityHooks, pl.callbacks.Callback):
    __doc__ = PostTrainingDataSparsityHooks.__doc__


class TrainingAwareDataSparsity(TrainingAwareDataSparsityHooks, pl.callbacks.Callback):
    __doc__ = TrainingAwareDataSparsityHooks.__doc__
