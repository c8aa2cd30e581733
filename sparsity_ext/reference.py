"""Pure-torch reference implementations: the oracle every backend is tested against, and the fallback.

They define the mask contract of docs/design.md ("Mask semantics") in plain torch, favouring clarity
over speed (full sorts are fine here). Inputs are already validated by sparsity_ext.ops: `data` is a
2-D floating tensor, arguments are in range.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 are scored in fp32; fp32 and fp64 in their own precision."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def element_norm(data: torch.Tensor, norm: int) -> torch.Tensor:
    """Per-element norm in the scoring dtype: 0 identity, 1 |x|, 2 x*x."""
    x = data.to(score_dtype(data.dtype))
    if norm == 0:
        return x.clone()
    if norm == 1:
        return x.abs()
    return x * x


def num_selected_blocks(sparsity_level: float, num_blocks: int) -> int:
    """How many blocks are selected: all for s >= 1, none for s <= 0, else round(s * n) clamped to n - 1.

    round() is Python's (half to even) on the double product, as torch.ao.pruning computes it.
    """
    if num_blocks == 0 or sparsity_level <= 0:
        return 0
    if sparsity_level >= 1:
        return num_blocks
    return max(0, min(num_blocks - 1, round(sparsity_level * num_blocks)))


def pooled_block_scores(norms: torch.Tensor, block_shape: tuple[int, int]) -> torch.Tensor:
    """Mean of each block of per-element norms over its valid elements, blocks in row-major order (flat)."""
    if norms.numel() == 0:  # no blocks (avg_pool2d rejects empty input)
        return norms.new_empty(0)
    return F.avg_pool2d(norms[None, None], kernel_size=block_shape, stride=block_shape, ceil_mode=True).flatten()


def ascending_order(values: torch.Tensor, dim: int = -1, last: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of a stable ascending sort along dim with every NaN after every number, whatever its sign
    bit (torch's CUDA sort can put a NaN with the sign bit set first), and the positions flagged in
    `last` (a bool mask, e.g. padding) after everything else."""
    nan = values.isnan()
    by_value = torch.sort(values.masked_fill(nan, float("inf")), dim=dim, stable=True).indices
    rank_class = nan.to(torch.uint8) + (2 * last.to(torch.uint8) if last is not None else 0)
    by_class = torch.sort(rank_class.gather(dim, by_value), dim=dim, stable=True).indices
    return by_value.gather(dim, by_class)


def _to_blocks(t: torch.Tensor, block_shape: tuple[int, int]) -> torch.Tensor:
    """(nbh*bh, nbw*bw) -> (nbh*nbw, bh*bw): one row per block, elements row-major within the block."""
    bh, bw = block_shape
    hp, wp = t.shape
    return t.reshape(hp // bh, bh, wp // bw, bw).permute(0, 2, 1, 3).reshape(-1, bh * bw)


def _from_blocks(t: torch.Tensor, padded_shape: tuple[int, int], block_shape: tuple[int, int]) -> torch.Tensor:
    bh, bw = block_shape
    hp, wp = padded_shape
    return t.reshape(hp // bh, wp // bw, bh, bw).permute(0, 2, 1, 3).reshape(hp, wp)


def block_norm_mask(data: torch.Tensor, sparsity_level: float, block_shape: tuple[int, int],
                    zeros_per_block: int, norm: int, packed: bool = False) -> torch.Tensor:
    h, w = data.shape
    bh, bw = block_shape
    nbh, nbw = -(-h // bh), -(-w // bw)
    num_blocks = nbh * nbw
    k = num_selected_blocks(sparsity_level, num_blocks)
    mask = torch.ones((h, w), dtype=torch.bool, device=data.device)
    if k == 0 or zeros_per_block == 0:
        return pack_mask(mask) if packed else mask

    norms = element_norm(data, norm)
    selected = torch.zeros(num_blocks, dtype=torch.bool, device=data.device)
    if k == num_blocks:
        selected[:] = True
    else:
        # Stable ascending sort: NaN last, ties by lower block index.
        order = ascending_order(pooled_block_scores(norms, block_shape))
        selected[order[:k]] = True

    hp, wp = nbh * bh, nbw * bw
    padded = torch.full((hp, wp), float("nan"), dtype=norms.dtype, device=data.device)
    padded[:h, :w] = norms
    valid = torch.zeros((hp, wp), dtype=torch.bool, device=data.device)
    valid[:h, :w] = True
    blocks, valid_blocks = _to_blocks(padded, block_shape), _to_blocks(valid, block_shape)
    # Rank the elements of each block: by norm (NaN last, ties by lower index), padding after all.
    order = ascending_order(blocks, dim=1, last=~valid_blocks)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(bh * bw, device=data.device).expand_as(order).contiguous())
    zeroed = (rank < zeros_per_block) & valid_blocks & selected[:, None]
    mask = _from_blocks(~zeroed, (hp, wp), block_shape)[:h, :w].contiguous()
    return pack_mask(mask) if packed else mask


def block_scores(data: torch.Tensor, block_shape: tuple[int, int], norm: int) -> torch.Tensor:
    """The score of every block of data: its mean element norm, row-major over blocks."""
    return pooled_block_scores(element_norm(data, norm), block_shape)


def blocks_at_threshold(scores: torch.Tensor, threshold: float, ties: int) -> torch.Tensor:
    """bool per block: score < threshold, or among the first `ties` (by index) equal to it; NaN ranks above
    every number and equals NaN."""
    if math.isnan(threshold):
        less, equal = ~scores.isnan(), scores.isnan()
    else:
        less, equal = scores < threshold, scores == threshold
    return less | (equal & (equal.cumsum(0) <= ties))


def expand_block_flags(flags: torch.Tensor, shape: tuple[int, int], block_shape: tuple[int, int]) -> torch.Tensor:
    """Per-block flags (row-major over the blocks tiling a matrix of `shape`) -> per-element flags."""
    (h, w), (bh, bw) = shape, block_shape
    nbh, nbw = -(-h // bh), -(-w // bw)
    grid = flags.view(nbh, 1, nbw, 1).expand(nbh, bh, nbw, bw)
    return grid.reshape(nbh * bh, nbw * bw)[:h, :w]


def block_norm_mask_select(data: torch.Tensor, scores: torch.Tensor, threshold: float, ties: int,
                           block_shape: tuple[int, int], zeros_per_block: int, norm: int,
                           packed: bool = False) -> torch.Tensor:
    selected = blocks_at_threshold(scores, threshold, ties)
    keep = block_norm_mask(data, 1.0, block_shape, zeros_per_block, norm)  # ranks inside every block
    keep |= ~expand_block_flags(selected, tuple(data.shape), block_shape)
    return pack_mask(keep) if packed else keep


def block_norm_mask_into_(data: torch.Tensor, mask: torch.Tensor, sparsity_level: float,
                          block_shape: tuple[int, int], zeros_per_block: int, norm: int) -> None:
    packed = mask.dtype == torch.uint8
    mask.copy_(block_norm_mask(data, sparsity_level, block_shape, zeros_per_block, norm, packed).view(mask.shape))


def block_norm_mask_update_(data: torch.Tensor, mask: torch.Tensor, sparsity_level: float,
                            block_shape: tuple[int, int], zeros_per_block: int, norm: int) -> None:
    mask.copy_(block_norm_mask(mask * data, sparsity_level, block_shape, zeros_per_block, norm))


def block_norm_mask_apply_(data: torch.Tensor, sparsity_level: float, block_shape: tuple[int, int],
                           zeros_per_block: int, norm: int, packed: bool = False) -> torch.Tensor:
    mask = block_norm_mask(data, sparsity_level, block_shape, zeros_per_block, norm)
    zero_dropped_(data, mask)
    return pack_mask(mask) if packed else mask


def nm_mask(data: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M is the block contract with s = 1, block (1, m), m - n zeros per block, ranked by |x|."""
    return block_norm_mask(data, 1.0, (1, m), m - n, 1)


def select_threshold(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    kth = values.index_select(0, ascending_order(values)[k - 1:k])[0] + 0.0  # + 0.0 turns -0.0 into +0.0
    # a tensor where, not a Python branch on the value: torch.compile traces it whole
    less = torch.where(kth.isnan(), (~values.isnan()).sum(), (values < kth).sum())
    return kth, (k - less).to(torch.int64)


def times_zero(data: torch.Tensor) -> torch.Tensor:
    """x * 0 for every element, as torch's `data * mask` computes it where the mask is 0: a zero with x's sign
    where x is finite (a zeroed negative weight is -0.0, as torch.ao.pruning leaves it), NaN where x is inf
    or NaN. float16/bfloat16 are multiplied in fp32 (as torch does) and narrowed by truncation: the sign,
    and for a NaN its quiet bit and top payload bits. torch's own narrowing of a NaN differs between its
    kernels (its CPU bfloat16 multiply writes 0xFFFF in its vector body and 0x7FC0 in its tail); truncation
    is what its CUDA kernels and the CPU's fp16 conversion instruction give."""
    if data.dtype not in _LOW_PRECISION:
        return data * 0
    product = (data.float() * 0).view(torch.int32)
    if data.dtype == torch.bfloat16:
        return (product >> 16).to(torch.int16).view(torch.bfloat16)
    sign = (product >> 16) & 0x8000
    nan = (product & 0x7FFFFFFF) > 0x7F800000
    narrowed = sign | torch.where(nan, 0x7C00 | ((product >> 13) & 0x3FF), 0)
    return narrowed.to(torch.int16).view(torch.float16)


def zero_dropped_(data: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """data = x * 0 (see times_zero) where keep (bool, data's shape) is False; kept elements keep their bytes.
    This is `data * mask` of torch.ao.pruning byte for byte, but for a kept signalling NaN (which x * 1
    quiets) and the NaN bytes times_zero describes."""
    return data.copy_(torch.where(keep, data, times_zero(data)))


def apply_mask_(data: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep = unpack_mask(mask, data.shape) if mask.dtype == torch.uint8 else mask
    return zero_dropped_(data, keep)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=mask.device, dtype=torch.int32))
    return (flat.reshape(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= s
    bits = (packed.to(torch.int32)[:, None] >> torch.arange(8, device=packed.device, dtype=torch.int32)) & 1
    return bits.reshape(-1)[:numel].to(torch.bool).reshape(tuple(shape))
