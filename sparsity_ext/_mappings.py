"""Module mappings for torch.ao.quantization's convert of sparsified models (torch.ao.pruning._mappings).

sparsity_ext has no quantized sparse modules of its own: these map nn.Linear to torch's
(torch.ao.nn.sparse), so a model sparsified with sparsity_ext converts as one sparsified with
torch.ao.pruning does.
"""
from __future__ import annotations

__all__ = ["get_static_sparse_quantized_mapping", "get_dynamic_sparse_quantized_mapping"]


def get_static_sparse_quantized_mapping() -> dict[type, type]:
    """{nn.Linear: torch.ao.nn.sparse.quantized.Linear}, a fresh dict each call."""
    import torch.ao.nn.sparse  # imported when asked for, as it pulls in the quantized modules

    return {torch.nn.Linear: torch.ao.nn.sparse.quantized.Linear}


def get_dynamic_sparse_quantized_mapping() -> dict[type, type]:
    """{nn.Linear: torch.ao.nn.sparse.quantized.dynamic.Linear}, a fresh dict each call."""
    import torch.ao.nn.sparse

    return {torch.nn.Linear: torch.ao.nn.sparse.quantized.dynamic.Linear}
