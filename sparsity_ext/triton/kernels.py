"""The Triton kernels of the sparsity_ext triton backend (launched from sparsity_ext.triton.ops).

Importing this module imports triton and decorates the kernels: triton decides at decoration time
whether they run compiled (GPU) or in its interpreter (TRITON_INTERPRET=1, CPU tensors).

The kernels call only triton builtins and the @triton.jit helpers below (no tl.sum, tl.cumsum, tl.zeros,
tl.cdiv: triton's standard library decorates those when triton itself is imported), so
TRITON_INTERPRET=1 works whenever it is set before this module is imported.

Index arithmetic is int64 wherever it addresses the data, so tensors past 2**31 elements work.
2-D tiles are launched on a 1-D grid (program id -> (tile row, tile column) by one scalar division)
because a grid's second axis is limited to 65535 programs.
"""
import os

import triton
import triton.language as tl
from triton.language.standard import _sum_combine
from triton.runtime.interpreter import InterpretedFunction

# Radix select over 32-bit keys: digits of 11, 11 and 10 bits, most significant first.
# The first digit's histogram is built by _block_scores_kernel; the other two by _radix_histogram_kernel.
RADIX_DIGITS = ((21, 11), (10, 11), (0, 10))  # (shift, bits)
RADIX_BINS = 1 << 11

# Selection modes of _block_norm_mask_kernel.
SELECT_NONE, SELECT_ALL, SELECT_BY_KEY = 0, 1, 2


# ------------------------------------------------------------------------------------ helpers
@triton.jit
def _sum(x, axis: tl.constexpr):
    """tl.sum of x along axis (x int32/int64), as tl.reduce with triton's own add combiner, which the
    interpreter recognises and runs with numpy (a combiner of ours would run element by element)."""
    return tl.reduce(x, axis, _sum_combine)


@triton.jit
def _element_norm(x, NORM: tl.constexpr):
    """n(x) in fp32: NORM 0 -> x, 1 -> |x|, 2 -> x*x (one IEEE multiply)."""
    x = x.to(tl.float32)
    v = x
    if NORM == 1:
        v = tl.abs(x)
    if NORM == 2:
        v = x * x
    return v


@triton.jit
def _score_key(score):
    """uint32 key whose unsigned order is the float order of the fp32 score, NaN largest.

    key(s) = bits(s) ^ 0x80000000 for s >= +0 (sign bit set: above every negative),
             ~bits(s)              for s <  0 (larger magnitude -> smaller key),
             0xFFFFFFFF            for any NaN;  -0.0 is first made +0.0 so that it ties with +0.0.
    """
    bits = score.to(tl.uint32, bitcast=True)
    bits = tl.where(bits == 0x80000000, 0, bits)
    key = bits ^ tl.where((bits >> 31) != 0, 0xFFFFFFFF, 0x80000000)
    return tl.where(score != score, 0xFFFFFFFF, key)


@triton.jit
def _add_histogram(hist_ptr, digit, counted, NBINS: tl.constexpr):
    """hist[d] += #{lanes i : counted[i] and digit[i] == d} for d in [0, NBINS); digit in [0, NBINS).

    The counts of one program are built in registers (tl.histogram), then added with one relaxed
    atomic per non-empty bin. Uncounted lanes are binned at 0 and subtracted (tl.histogram's mask
    argument is not in every triton 3.x).
    """
    local = tl.histogram(tl.where(counted, digit, 0), NBINS)
    bins = tl.arange(0, NBINS)
    local = local - tl.where(bins == 0, _sum((~counted).to(tl.int32), 0), 0)
    tl.atomic_add(hist_ptr + bins, local.to(tl.int64), mask=local > 0, sem="relaxed")


@triton.jit
def _tile_2d(num_cols, TILE_R: tl.constexpr, TILE_C: tl.constexpr):
    """(rows [TILE_R, 1], cols [1, TILE_C]) int64 indices of this program's tile (row-major tile order)."""
    pid = tl.program_id(0)
    n_col_tiles = (num_cols + TILE_C - 1) // TILE_C
    tile_r = pid // n_col_tiles
    tile_c = pid - tile_r * n_col_tiles
    rows = tile_r.to(tl.int64) * TILE_R + tl.arange(0, TILE_R)
    cols = tile_c.to(tl.int64) * TILE_C + tl.arange(0, TILE_C)
    return rows[:, None], cols[None, :]


# ------------------------------------------------------------------------- block_norm_mask passes
@triton.jit
def _block_scores_kernel(x_ptr, keys_ptr, hist_ptr, H, W, stride_h, stride_w, nbh, nbw, tune_key,
                         BH: tl.constexpr, BW: tl.constexpr, NORM: tl.constexpr, DIGIT_SHIFT: tl.constexpr,
                         NBINS: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr):
    """Block scores as radix keys, and the histogram of the keys' first radix digit.

    For block (i, j) of the BH x BW tiling of the H x W tensor x (blocks in row-major order,
    b = i * nbw + j), with V(i, j) its valid elements (inside x) in row-major order:
        score(i, j) = fl( fl(sum_{(r, c) in V(i, j)} n(x[r, c])) / |V(i, j)| )
    where the sum is accumulated in fp32 one element at a time in that order (so it rounds exactly
    like the reference's avg_pool2d; launch with enable_fp_fusion=False so x*x + acc is never
    contracted into an FMA) and the division is IEEE round-to-nearest (div_rn).
        keys[b] = _score_key(score(i, j))            (stored as int32 bits)
        hist[d] += #{b : keys[b] >> DIGIT_SHIFT == d}
    Each program scores a TILE_R x TILE_C tile of blocks, one thread per block.
    """
    bi, bj = _tile_2d(nbw, TILE_R, TILE_C)
    in_range = (bi < nbh) & (bj < nbw)
    row0 = bi * BH
    col0 = bj * BW
    acc = tl.full([TILE_R, TILE_C], 0, dtype=tl.float32)
    for r in range(BH):
        for c in range(BW):
            valid = in_range & (row0 + r < H) & (col0 + c < W)
            x = tl.load(x_ptr + (row0 + r) * stride_h + (col0 + c) * stride_w, mask=valid, other=0.0)
            acc = tl.where(valid, acc + _element_norm(x, NORM), acc)
    count = tl.maximum(tl.minimum(H - row0, BH) * tl.minimum(W - col0, BW), 1)  # >= 1: tiles overhang
    key = _score_key(tl.math.div_rn(acc, count.to(tl.float32)))
    tl.store(keys_ptr + bi * nbw + bj, key.to(tl.int32, bitcast=True), mask=in_range)
    digit = (key >> DIGIT_SHIFT).to(tl.int32)
    _add_histogram(hist_ptr, tl.reshape(digit, [TILE_R * TILE_C]), tl.reshape(in_range, [TILE_R * TILE_C]), NBINS)


@triton.jit
def _radix_histogram_kernel(src_ptr, count_ptr, prefix_ptr, hist_ptr, dst_ptr, dst_count_ptr,
                            PREFIX_SHIFT: tl.constexpr, DIGIT_SHIFT: tl.constexpr, NBINS: tl.constexpr,
                            COMPACT: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of one radix digit over the keys that still are candidates.

    src[0 : count] holds the keys to look at (count is read from count_ptr, on the device). With
    p = prefix (the digits above this one, already chosen; lower bits 0), the candidates are
        C = {i < count : src[i] >> PREFIX_SHIFT == p >> PREFIX_SHIFT}
        hist[d] += #{i in C : (src[i] >> DIGIT_SHIFT) & (NBINS - 1) == d}
    With COMPACT, the keys of C are also appended to dst (in no particular order; dst_count counts
    them), so that the next digit's pass reads only them instead of every key.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < tl.load(count_ptr)
    key = tl.load(src_ptr + offs, mask=in_range, other=0).to(tl.uint32, bitcast=True)
    prefix = tl.load(prefix_ptr).to(tl.uint32, bitcast=True)
    candidate = in_range & ((key >> PREFIX_SHIFT) == (prefix >> PREFIX_SHIFT))
    digit = ((key >> DIGIT_SHIFT) & (NBINS - 1)).to(tl.int32)
    _add_histogram(hist_ptr, digit, candidate, NBINS)
    if COMPACT:
        flag = candidate.to(tl.int32)
        found = _sum(flag, 0)
        start = tl.atomic_add(dst_count_ptr, found.to(dst_count_ptr.dtype.element_ty), mask=found > 0, sem="relaxed")
        slot = start + tl.associative_scan(flag, 0, _sum_combine) - flag
        tl.store(dst_ptr + slot, key.to(tl.int32, bitcast=True), mask=candidate)


@triton.jit
def _radix_pick_kernel(hist_ptr, prefix_ptr, state_ptr, DIGIT_SHIFT: tl.constexpr, NBINS: tl.constexpr):
    """Choose the digit of the remaining-th smallest candidate (one program).

    state = [remaining, ties]. With cum(d) = sum_{e <= d} hist[e] and m = remaining (1-based rank
    among the candidates):
        d* = #{d : cum(d) < m}          (the first digit whose cumulative count reaches m)
        prefix    |= d* << DIGIT_SHIFT
        remaining -= cum(d* - 1)        (rank among the candidates that also share digit d*)
        ties       = hist[d*]           (how many candidates share digit d*)
    After the last digit, prefix is the k-th smallest key T, ties = #{b : key[b] == T}, and the
    k smallest keys are those < T plus the first `remaining` (lowest-indexed) keys equal to T.
    """
    bins = tl.arange(0, NBINS)
    hist = tl.load(hist_ptr + bins)
    remaining = tl.load(state_ptr)
    digit = _sum((tl.associative_scan(hist, 0, _sum_combine) < remaining).to(tl.int32), 0)
    below = _sum(tl.where(bins < digit, hist, 0), 0)
    prefix = tl.load(prefix_ptr).to(tl.uint32, bitcast=True) | (digit.to(tl.uint32) << DIGIT_SHIFT)
    tl.store(prefix_ptr, prefix.to(tl.int32, bitcast=True))
    tl.store(state_ptr, remaining - below)
    tl.store(state_ptr + 1, _sum(tl.where(bins == digit, hist, 0), 0))


@triton.jit
def _tie_count_kernel(keys_ptr, threshold_ptr, state_ptr, chunk_counts_ptr, num_keys, BLOCK: tl.constexpr):
    """chunk_counts[p] = #{b in [p * BLOCK, (p + 1) * BLOCK) : keys[b] == T}.

    Only needed when the k smallest take some but not all keys equal to T (state: remaining <
    ties); otherwise the loads are masked off and the pass costs no memory traffic.
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # All keys when T's ties split, none otherwise.
    active = offs < tl.where(tl.load(state_ptr) < tl.load(state_ptr + 1), num_keys, 0)
    equal = active & (tl.load(keys_ptr + offs, mask=active, other=0) == tl.load(threshold_ptr))
    tl.store(chunk_counts_ptr + pid, _sum(equal.to(tl.int32), 0))


@triton.jit
def _tie_rank_kernel(keys_ptr, threshold_ptr, state_ptr, chunk_offsets_ptr, tie_rank_ptr, num_keys,
                     BLOCK: tl.constexpr):
    """tie_rank[b] = #{b' <= b : keys[b'] == T} for every b with keys[b] == T (other entries untouched);
    chunk_offsets[p] = #{b < p * BLOCK : keys[b] == T}. Like _tie_count_kernel, only when T's ties split.
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # All keys when T's ties split, none otherwise.
    active = offs < tl.where(tl.load(state_ptr) < tl.load(state_ptr + 1), num_keys, 0)
    equal = active & (tl.load(keys_ptr + offs, mask=active, other=0) == tl.load(threshold_ptr))
    rank = tl.associative_scan(equal.to(tl.int32), 0, _sum_combine) + tl.load(chunk_offsets_ptr + pid)
    tl.store(tie_rank_ptr + offs, rank.to(tie_rank_ptr.dtype.element_ty), mask=equal)


@triton.jit
def _block_norm_mask_kernel(x_ptr, out_ptr, keys_ptr, tie_rank_ptr, threshold_ptr, state_ptr,
                            H, W, stride_h, stride_w, nbw, zeros_per_block, tune_key,
                            BH: tl.constexpr, BW: tl.constexpr, NORM: tl.constexpr, SELECT: tl.constexpr,
                            RANKED: tl.constexpr, PACKED: tl.constexpr, APPLY: tl.constexpr,
                            TILE_R: tl.constexpr, TILE_BYTES: tl.constexpr):
    """Mask write: keep[r, c] for the element (r, c) of block b = (r // BH) * nbw + c // BW.

        selected(b) = SELECT_NONE: false;  SELECT_ALL: true;
                      SELECT_BY_KEY: key[b] < T  or  (key[b] == T and (remaining == ties
                                     or tie_rank[b] <= remaining))
                      (T, state = [remaining, ties] from the radix select, tie_rank from _tie_rank_kernel)
        rank(r, c)  = #{valid (r', c') in block b : n(x[r', c']) < n(x[r, c]), or equal (NaN equal
                      to NaN, NaN above all) and (r', c') before (r, c) in row-major order}
        keep[r, c]  = not (selected(b) and (not RANKED or rank(r, c) < zeros_per_block))
    RANKED is false when zeros_per_block >= BH*BW: the whole valid part of a selected block goes.
    Output: bool bytes out[r * W + c], or with PACKED (needs W % 8 == 0) bit c % 8 of byte
    (r * W + c) / 8. APPLY also writes x[r, c] = 0 where keep is false (never with RANKED: other
    programs may still be reading the block's values to rank them).
    The tile is TILE_R rows x TILE_BYTES * 8 columns, held as [TILE_R, TILE_BYTES, 8].
    """
    tile_rows, byte_cols = _tile_2d((W + 7) // 8, TILE_R, TILE_BYTES)
    rows = tile_rows[:, :, None]
    bits = tl.arange(0, 8)[None, None, :]
    cols = byte_cols[:, :, None] * 8 + bits
    in_range = (rows < H) & (cols < W)
    if SELECT == 0:
        zeroed = tl.full([TILE_R, TILE_BYTES, 8], 0, dtype=tl.int1)
    elif SELECT == 1:
        zeroed = in_range
    else:
        block = (rows // BH) * nbw + cols // BW
        key = tl.load(keys_ptr + block, mask=in_range, other=0).to(tl.uint32, bitcast=True)
        threshold = tl.load(threshold_ptr).to(tl.uint32, bitcast=True)
        # remaining broadcast to the tile first (the interpreter mishandles scalar bool & tensor).
        remaining = tl.full([TILE_R, TILE_BYTES, 8], 0, dtype=tl.int64) + tl.load(state_ptr)
        split = remaining < tl.load(state_ptr + 1)
        tie_rank = tl.load(tie_rank_ptr + block, mask=in_range & (key == threshold) & split, other=0)
        zeroed = in_range & ((key < threshold) | ((key == threshold) & (~split | (tie_rank <= remaining))))
    if RANKED:
        v = _element_norm(tl.load(x_ptr + rows * stride_h + cols * stride_w, mask=zeroed, other=0.0), NORM)
        row0 = (rows // BH) * BH
        col0 = (cols // BW) * BW
        own = (rows - row0) * BW + (cols - col0)
        rank = tl.full([TILE_R, TILE_BYTES, 8], 0, dtype=tl.int32)
        for r in range(BH):
            for c in range(BW):
                valid = zeroed & (row0 + r < H) & (col0 + c < W)
                other = _element_norm(tl.load(x_ptr + (row0 + r) * stride_h + (col0 + c) * stride_w,
                                              mask=valid, other=0.0), NORM)
                smaller = (other < v) | ((v != v) & (other == other))
                equal = (other == v) | ((v != v) & (other != other))
                rank += (valid & (smaller | (equal & (r * BW + c < own)))).to(tl.int32)
        zeroed = zeroed & (rank < zeros_per_block)
    if APPLY:
        x_ty = x_ptr.dtype.element_ty
        tl.store(x_ptr + rows * stride_h + cols * stride_w, tl.full([TILE_R, TILE_BYTES, 8], 0, dtype=x_ty),
                 mask=zeroed)
    keep = (in_range & ~zeroed).to(tl.int32)
    if PACKED:
        byte = _sum(keep << bits, 2).to(tl.uint8)
        tl.store(out_ptr + tile_rows * (W // 8) + byte_cols, byte, mask=(tile_rows < H) & (byte_cols * 8 < W))
    else:
        tl.store(out_ptr + rows * W + cols, keep != 0, mask=in_range)


# ------------------------------------------------------------------------------ mask format ops
@triton.jit
def _apply_mask_kernel(x_ptr, mask_ptr, H, W, stride_h, stride_w,
                       PACKED: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr):
    """x[r, c] = 0 where keep(r * W + c) is false, in place; x is H x W with any strides.

    keep(f) = mask[f] (bool bytes) or, with PACKED, bit f % 8 of mask[f / 8].
    """
    rows, cols = _tile_2d(W, TILE_R, TILE_C)
    in_range = (rows < H) & (cols < W)
    flat = rows * W + cols
    if PACKED:
        keep = (tl.load(mask_ptr + flat // 8, mask=in_range, other=0).to(tl.int32) >> (flat % 8).to(tl.int32)) & 1
    else:
        keep = tl.load(mask_ptr + flat, mask=in_range, other=0).to(tl.int32)
    x_ty = x_ptr.dtype.element_ty
    tl.store(x_ptr + rows * stride_h + cols * stride_w, tl.full([TILE_R, TILE_C], 0, dtype=x_ty),
             mask=in_range & (keep == 0))


@triton.jit
def _pack_mask_kernel(mask_ptr, out_ptr, numel, num_bytes, BLOCK_BYTES: tl.constexpr):
    """out[j] = sum_{i < 8, 8j + i < numel} mask[8j + i] << i   (mask: bool bytes, flat)."""
    byte = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bits = tl.arange(0, 8)
    flat = byte[:, None] * 8 + bits[None, :]
    keep = tl.load(mask_ptr + flat, mask=flat < numel, other=0).to(tl.int32)
    tl.store(out_ptr + byte, _sum((keep != 0).to(tl.int32) << bits[None, :], 1).to(tl.uint8), mask=byte < num_bytes)


@triton.jit
def _unpack_mask_kernel(packed_ptr, out_ptr, numel, BLOCK_BYTES: tl.constexpr):
    """out[f] = (packed[f / 8] >> (f % 8)) & 1 for f < numel   (out: bool bytes, flat)."""
    byte = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bits = tl.arange(0, 8)
    flat = byte[:, None] * 8 + bits[None, :]
    packed = tl.load(packed_ptr + byte, mask=byte * 8 < numel, other=0).to(tl.int32)
    tl.store(out_ptr + flat, ((packed[:, None] >> bits[None, :]) & 1) != 0, mask=flat < numel)


INTERPRETED = isinstance(_block_scores_kernel, InterpretedFunction)


# --------------------------------------------------------------------------------- autotuning
# The two passes that touch every element are autotuned on the GPU. Their `tune_key` argument is a
# bucket of the shape (see ops._tune_key), so a config found for one shape serves every shape of the
# same bucket, dtype, block shape and mode. The interpreter, and the GPU with AUTOTUNE off
# (SPARSITY_EXT_TRITON_AUTOTUNE=0 at import, or set the attribute), launch the DEFAULT config.
SCORES_CONFIGS = [triton.Config({"TILE_R": r, "TILE_C": c}, num_warps=w)
                  for r, c, w in ((1, 256, 4), (1, 1024, 8), (4, 128, 4), (16, 32, 4), (64, 8, 4), (128, 4, 4))]
MASK_CONFIGS = [triton.Config({"TILE_R": r, "TILE_BYTES": b}, num_warps=w)
                for r, b, w in ((1, 128, 4), (2, 256, 8), (4, 32, 4), (8, 16, 4), (32, 4, 4), (64, 1, 2))]
SCORES_DEFAULT = triton.Config({"TILE_R": 8, "TILE_C": 64}, num_warps=4)
MASK_DEFAULT = triton.Config({"TILE_R": 8, "TILE_BYTES": 16}, num_warps=4)
AUTOTUNE = not INTERPRETED and os.environ.get("SPARSITY_EXT_TRITON_AUTOTUNE", "1") != "0"

_block_scores_autotuned = triton.autotune(SCORES_CONFIGS, key=["tune_key", "BH", "BW", "NORM"],
                                          reset_to_zero=["hist_ptr"])(_block_scores_kernel)
# Re-running the mask write while tuning is harmless: with APPLY it zeroes the same elements again.
_block_norm_mask_autotuned = triton.autotune(MASK_CONFIGS, key=["tune_key", "BH", "BW", "SELECT", "RANKED",
                                                                "PACKED", "APPLY"])(_block_norm_mask_kernel)


def _fixed(config):
    return {**config.kwargs, "num_warps": config.num_warps}


def block_scores():
    """(kernel, launch kwargs) for the scoring pass: the autotuner, or the default config."""
    return (_block_scores_autotuned, {}) if AUTOTUNE else (_block_scores_kernel, _fixed(SCORES_DEFAULT))


def block_norm_mask():
    """(kernel, launch kwargs) for the mask-write pass: the autotuner, or the default config."""
    return (_block_norm_mask_autotuned, {}) if AUTOTUNE else (_block_norm_mask_kernel, _fixed(MASK_DEFAULT))
