"""Activation sparsifier (mirrors torch.ao.pruning._experimental.activation_sparsifier)."""
from .activation_sparsifier import ActivationSparsifier, block_norm_mask_fn

__all__ = ["ActivationSparsifier", "block_norm_mask_fn"]
