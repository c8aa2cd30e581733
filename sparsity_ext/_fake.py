"""Fake (shape-only) implementations of every op: registered as the compiled ops' fakes, so torch.compile and
torch.export trace them, and run by the dispatch (sparsity_ext._backend.resolve) for meta tensors, whether or
not the extension is built. In-place ops do nothing there, as torch's own ops on meta tensors."""
import math
from typing import Callable

import torch

FAKES: dict[str, Callable] = {}  # op name -> its fake implementation (the compiled op's signature)


def _fake(op: str):
    def record(fn: Callable) -> Callable:
        FAKES[op] = fn
        return fn
    return record


def register_with_torch() -> None:
    """Register every fake as torch.ops.sparsity_ext.<op>'s (needs the compiled extension's op schemas)."""
    for op, fn in FAKES.items():
        torch.library.register_fake(f"sparsity_ext::{op}")(fn)


def mask_like(data: torch.Tensor, packed: bool) -> torch.Tensor:
    """An uninitialised mask of data: bool of its shape, or packed bits (ceil(numel / 8) bytes)."""
    if packed:
        return data.new_empty(((data.numel() + 7) // 8,), dtype=torch.uint8)
    return data.new_empty(data.shape, dtype=torch.bool)


@_fake("block_norm_mask")
def _block_norm_mask_fake(data, sparsity_level, block_shape, zeros_per_block, norm, packed=False):
    return mask_like(data, packed)


@_fake("block_norm_mask_apply_")
def _block_norm_mask_apply_fake(data, sparsity_level, block_shape, zeros_per_block, norm, packed=False):
    return mask_like(data, packed)


@_fake("block_scores")
def _block_scores_fake(data, block_shape, norm):
    num_blocks = -(-data.shape[0] // block_shape[0]) * -(-data.shape[1] // block_shape[1])
    return data.new_empty((num_blocks,), dtype=torch.float32)


@_fake("block_norm_mask_select")
def _block_norm_mask_select_fake(data, scores, threshold, ties, block_shape, zeros_per_block, norm, packed=False):
    return mask_like(data, packed)


@_fake("block_norm_mask_into_")
def _block_norm_mask_into_fake(data, mask, sparsity_level, block_shape, zeros_per_block, norm):
    return None


@_fake("block_norm_mask_update_")
def _block_norm_mask_update_fake(data, mask, sparsity_level, block_shape, zeros_per_block, norm):
    return None


@_fake("nm_mask")
def _nm_mask_fake(data, n, m):
    return mask_like(data, False)


@_fake("select_threshold")
def _select_threshold_fake(values, k):
    return values.new_empty(()), values.new_empty((), dtype=torch.int64)


@_fake("apply_mask_")
def _apply_mask_fake(data, mask):
    return None


@_fake("pack_mask")
def _pack_mask_fake(mask):
    return mask_like(mask, True)


@_fake("unpack_mask")
def _unpack_mask_fake(packed, shape):
    assert packed.numel() == (math.prod(shape) + 7) // 8
    return packed.new_empty(shape, dtype=torch.bool)


@_fake("sparsify_24_pack")
def _sparsify_24_pack_fake(data):
    # values (rows, cols/2); metadata: one int16 per 16 columns, or for int8 data one int32 per 32
    rows, cols = data.shape
    meta_dtype, cols_per_meta = (torch.int32, 32) if data.dtype == torch.int8 else (torch.int16, 16)
    return data.new_empty((rows, cols // 2)), data.new_empty((rows, cols // cols_per_meta), dtype=meta_dtype)
