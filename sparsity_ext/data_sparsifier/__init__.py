"""Data sparsifiers: sparsify tensors, parameters and embedding tables held by the sparsifier itself
(mirror torch.ao.pruning._experimental.data_sparsifier). `quantization_utils` and, when lightning is
installed, `lightning.callbacks.data_sparsity` are submodules imported on demand."""
from ._chunked import block_norm_mask_chunked
from .base_data_sparsifier import BaseDataSparsifier, PackedFakeSparsity
from .data_norm_sparsifier import DataNormSparsifier

__all__ = ["BaseDataSparsifier", "DataNormSparsifier", "PackedFakeSparsity", "block_norm_mask_chunked"]
