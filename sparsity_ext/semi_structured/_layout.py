"""The semi-structured (2:4) layout of torch's SparseSemiStructuredTensorCUTLASS: which inputs it
takes, the shapes and dtypes of its packed values and metadata, and the argument checks that every
sparsify_24_pack backend relies on (they raise before any kernel runs).

csrc/common/semi_structured.h documents the layout itself; reference.py is its pure-torch oracle.
"""
from __future__ import annotations

import torch

# Value dtype -> (metadata dtype, groups of 4 per metadata element, (row multiple, column multiple)).
# The multiples are torch's SparseSemiStructuredTensorCUTLASS._DTYPE_SHAPE_CONSTRAINTS (sparse_min_rows,
# sparse_min_cols): the shapes torch.sparse.to_sparse_semi_structured accepts and CUTLASS's kernels need.
# torch's own conversion needs the same row multiple and an even number of metadata columns (it fails
# with an index error otherwise).
LAYOUTS = {
    torch.float16: (torch.int16, 4, (32, 64)),
    torch.bfloat16: (torch.int16, 4, (32, 64)),
    torch.int8: (torch.int32, 8, (16, 128)),
}
PACK_DTYPES = tuple(LAYOUTS)

# Nibble idx0 | idx1 << 2 of each 4-bit nonzero pattern p, at bits [4p, 4p + 4) (same constant as
# kPairNibbles in csrc/common/semi_structured.h: the nonzero positions, padded with 2, then 3).
PAIR_NIBBLES = 0x498E4DCE498E498E


def meta_layout(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    """(metadata dtype, groups of 4 per metadata element) for values of `dtype`."""
    meta_dtype, groups, _ = LAYOUTS[dtype]
    return meta_dtype, groups


def packed_shapes(rows: int, cols: int, dtype: torch.dtype) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of (values, metadata) for a rows x cols input of `dtype`."""
    _, groups = meta_layout(dtype)
    return (rows, cols // 2), (rows, cols // (4 * groups))


def check_dense(data, op: str) -> None:
    """Raise TypeError / ValueError unless `data` is a 2-D tensor that the 2:4 layout can hold."""
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"{op}: data must be a torch.Tensor, got {type(data).__name__}")
    if data.dtype not in LAYOUTS:
        hint = (" (torch's float32 semi-structured layout is 1:2 sparsity for TF32, not 2:4; convert to "
                "float16 or bfloat16)" if data.dtype == torch.float32 else "")
        raise TypeError(f"{op}: data must be float16, bfloat16 or int8, got {data.dtype}{hint}")
    if data.dim() != 2:
        raise ValueError(f"{op}: data must be 2-D (rows, cols), got shape {tuple(data.shape)}")
    row_multiple, col_multiple = LAYOUTS[data.dtype][2]
    rows, cols = data.shape
    if rows < row_multiple or rows % row_multiple or cols < col_multiple or cols % col_multiple:
        raise ValueError(f"{op}: a {data.dtype} tensor needs rows a positive multiple of {row_multiple} and "
                         f"cols a positive multiple of {col_multiple} (torch's semi-structured constraints), "
                         f"got shape {tuple(data.shape)}")
    if data.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: data must be on the CPU or a CUDA device, got {data.device}")
