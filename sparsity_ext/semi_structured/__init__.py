"""Semi-structured (2:4) sparsity for torch's SparseSemiStructuredTensor.

- sparsity_ext.ops.sparsify_24_pack(data) -> (values, metadata): fused 2:4 prune + pack into the layout
  of torch's SparseSemiStructuredTensorCUTLASS (reference, C++ CPU, CUDA and Triton backends).
- to_sparse_semi_structured(weight): that packing as torch's own SparseSemiStructuredTensorCUTLASS.
- convert(model): after a 2:4 sparsifier's squash_mask(), swap 2:4-sparse nn.Linear weights for it.
- is_24_sparse(tensor): whether a 2-D tensor already has at most 2 nonzeros in every group of 4.

Shapes and dtypes follow torch's constraints: float16 / bfloat16 with rows a multiple of 32 and cols of
64, int8 with 16 and 128 (float32 is torch's 1:2 TF32 layout, not 2:4). csrc/common/semi_structured.h
documents the layout; reference.py is its pure-torch oracle.
"""
from ._layout import LAYOUTS, PACK_DTYPES

_CONVERT_NAMES = ("to_sparse_semi_structured", "convert", "is_24_sparse", "LINEAR_DTYPES")


def __getattr__(name: str):
    # _convert runs sparsity_ext.ops, whose dispatch imports this package's layout and reference: importing
    # _convert on first use keeps that chain free of a cycle.
    if name in _CONVERT_NAMES:
        from . import _convert
        return getattr(_convert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["to_sparse_semi_structured", "convert", "is_24_sparse", "PACK_DTYPES", "LINEAR_DTYPES", "LAYOUTS"]
