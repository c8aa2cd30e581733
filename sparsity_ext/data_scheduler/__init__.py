"""Schedulers of a data sparsifier's arguments (mirror torch.ao.pruning._experimental.data_scheduler)."""
from .base_data_scheduler import BaseDataScheduler

__all__ = ["BaseDataScheduler"]
