"""Triton kernel of sparsify_24_pack (fused 2:4 prune + pack into torch's semi-structured CUTLASS layout),
registered as the torch.library op sparsity_ext_triton::sparsify_24_pack. Bit-equal to
sparsity_ext.semi_structured.reference and to the CPU / CUDA kernels (csrc/common/semi_structured.h
documents the layout). Inputs are validated by sparsity_ext.ops.sparsify_24_pack.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from triton.language.standard import _sum_combine

from ..semi_structured._layout import PAIR_NIBBLES, meta_layout, packed_shapes
from .kernels import _element_norm, _four_kept, _score_key
from .ops import NAMESPACE, _check_device, _launchable

_TILE_R = 16  # rows per program: divides every legal row count (multiples of 16 or 32)
_TILE_M = 16  # metadata elements per program row: 256 fp16/bf16 or 512 int8 columns
# A kernel may read a global only as a constexpr (the interpreter reads any global; the compiler does not).
_PAIR_NIBBLES = tl.constexpr(PAIR_NIBBLES)


@triton.jit
def _sparsify_24_pack_kernel(x_ptr, values_ptr, meta_ptr, H, W, stride_h,
                             GROUPS_PER_META: tl.constexpr, META_BITS: tl.constexpr,
                             TILE_R: tl.constexpr, TILE_M: tl.constexpr):
    """2:4 prune + pack of x (H x W, unit column stride) into values (H x W/2) and reordered metadata.

    Group g of row r = x[r, 4g + i], i < 4, ranked like nm_mask(x, 2, 4):
        key_i = _score_key(|x_i|) (fp32, NaN largest);  before(i, j) = key_i < key_j or (== and i < j)
        keep_i = #{j : before(j, i)} >= 2
    nonzero pattern p = sum_i [keep_i and x_i != 0] << i (x_i != 0: key_i != key(0.0));
    nibble = (PAIR_NIBBLES >> 4p) & 15
        idx0 = nibble & 3, idx1 = nibble >> 2  (the nonzeros, padded with positions 2, then 3)
        values[r, 2g + s] = keep_{idx_s} ? x_{idx_s} : 0
    metadata element (r, c) = sum_{j < GROUPS_PER_META} nibble(r, c * GROUPS_PER_META + j) << 4j, stored
    at the CUTLASS position: with band = 32 (16-bit metadata) or 16 (32-bit),
        r' = r - r % band + (r % 8) * (band / 8) + (r % band) / 8,
        (r', c) off the diagonal of its 2 x 2 tile -> swapped with the tile's other off-diagonal entry,
        offset = (c' / 2) * 2H + 2r' + c' % 2.
    A program is TILE_R rows x TILE_M metadata elements (TILE_M * GROUPS_PER_META groups).
    """
    BAND: tl.constexpr = 32 if META_BITS == 16 else 16
    TILE_G: tl.constexpr = TILE_M * GROUPS_PER_META
    meta_cols = W // (4 * GROUPS_PER_META)
    meta_tiles = (meta_cols + TILE_M - 1) // TILE_M
    tile_r = tl.program_id(0) // meta_tiles
    tile_m = (tl.program_id(0) - tile_r * meta_tiles).to(tl.int64)
    rows = tile_r.to(tl.int64) * TILE_R + tl.arange(0, TILE_R)[:, None]  # [TILE_R, 1]
    metas = tile_m * TILE_M + tl.arange(0, TILE_M)[None, :]  # [1, TILE_M]
    group_ids = tile_m * TILE_G + tl.arange(0, TILE_G)[None, :]  # [1, TILE_G]: the tile's elements' groups
    row_ok = rows < H
    group_ok = row_ok & (group_ids < W // 4)
    cols = group_ids[:, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    x = tl.load(x_ptr + rows[:, :, None] * stride_h + cols, mask=group_ok[:, :, None], other=0)
    key = _score_key(_element_norm(x, 1))
    even_k, odd_k = tl.split(tl.reshape(key, [TILE_R, TILE_G, 2, 2]))  # [.., a, b] = member 2a + b
    k0, k2 = tl.split(even_k)
    k1, k3 = tl.split(odd_k)
    even_x, odd_x = tl.split(tl.reshape(x, [TILE_R, TILE_G, 2, 2]))
    x0, x2 = tl.split(even_x)
    x1, x3 = tl.split(odd_x)
    keep0, keep1, keep2, keep3 = _four_kept(k0, k1, k2, k3, 2)  # 2:4: the two smallest are dropped
    zero = tl.full(x0.shape, 0, x0.dtype)
    m0 = tl.where(keep0, x0, zero)
    m1 = tl.where(keep1, x1, zero)
    m2 = tl.where(keep2, x2, zero)
    m3 = tl.where(keep3, x3, zero)
    # kept and nonzero: +-0 has the key of +0.0 (a compare of the keys, not of x: triton's interpreter
    # compares bf16 by its bits, so -0.0 != 0 there)
    ZERO_KEY: tl.constexpr = 0x80000000
    pattern = ((keep0 & (k0 != ZERO_KEY)).to(tl.int64) | ((keep1 & (k1 != ZERO_KEY)).to(tl.int64) << 1)
               | ((keep2 & (k2 != ZERO_KEY)).to(tl.int64) << 2) | ((keep3 & (k3 != ZERO_KEY)).to(tl.int64) << 3))
    nibble = ((tl.full(pattern.shape, _PAIR_NIBBLES, tl.int64) >> (4 * pattern)) & 15).to(tl.int32)
    idx0 = nibble & 3  # in {0, 1, 2}
    idx1 = nibble >> 2  # in {1, 2, 3}
    v0 = tl.where(idx0 == 0, m0, tl.where(idx0 == 1, m1, m2))
    v1 = tl.where(idx1 == 1, m1, tl.where(idx1 == 2, m2, m3))
    value_cols = group_ids[:, :, None] * 2 + tl.arange(0, 2)[None, None, :]
    tl.store(values_ptr + rows[:, :, None] * (W // 2) + value_cols, tl.join(v0, v1), mask=group_ok[:, :, None])

    shifts = 4 * tl.arange(0, GROUPS_PER_META)
    parts = tl.reshape(nibble.to(tl.uint32), [TILE_R, TILE_M, GROUPS_PER_META]) << shifts[None, None, :].to(tl.uint32)
    element = tl.reduce(parts, 2, _sum_combine)  # disjoint bits: the sum is the bitwise or
    r = rows - rows % BAND + (rows % 8) * (BAND // 8) + (rows % BAND) // 8
    swap = (r & 1) ^ (metas & 1)
    step = swap * (2 * (swap & metas & 1) - 1)
    r = r + step
    c = metas - step
    offset = (c >> 1) * (2 * H) + r * 2 + (c & 1)
    if META_BITS == 16:
        stored = element.to(tl.uint16).to(tl.int16, bitcast=True)
    else:
        stored = element.to(tl.int32, bitcast=True)
    tl.store(meta_ptr + offset, stored, mask=row_ok & (metas < meta_cols))


@triton_op(f"{NAMESPACE}::sparsify_24_pack", mutates_args=())
def sparsify_24_pack(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 prune + pack of 2-D fp16 / bf16 / int8 data (shape already checked) -> (values, metadata)."""
    _check_device(data, "sparsify_24_pack")
    if data.stride(1) != 1:
        data = data.contiguous()
    rows, cols = data.shape
    meta_dtype, groups_per_meta = meta_layout(data.dtype)
    values_shape, meta_shape = packed_shapes(rows, cols, data.dtype)
    values = data.new_empty(values_shape)
    meta = data.new_empty(meta_shape, dtype=meta_dtype)
    tiles = triton.cdiv(rows, _TILE_R) * triton.cdiv(meta_shape[1], _TILE_M)
    _launchable(_sparsify_24_pack_kernel)[(tiles,)](
        data, values, meta, rows, cols, data.stride(0),
        GROUPS_PER_META=groups_per_meta, META_BITS=8 * meta_dtype.itemsize, TILE_R=_TILE_R, TILE_M=_TILE_M)
    return values, meta


@sparsify_24_pack.register_fake
def _(data):
    meta_dtype, _ = meta_layout(data.dtype)
    values_shape, meta_shape = packed_shapes(data.shape[0], data.shape[1], data.dtype)
    return data.new_empty(values_shape), data.new_empty(meta_shape, dtype=meta_dtype)
