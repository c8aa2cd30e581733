"""The Triton kernels of the sparsity_ext triton backend (launched from sparsity_ext.triton.ops).

Importing this module imports triton and decorates the kernels: triton decides at decoration time
whether they run compiled (GPU) or in its interpreter (TRITON_INTERPRET=1, CPU tensors).

The kernels call only triton builtins and the @triton.jit helpers below (no tl.sum, tl.cumsum, tl.zeros,
tl.cdiv: triton's standard library decorates those when triton itself is imported), so
TRITON_INTERPRET=1 works whenever it is set before this module is imported. Sums are
tl.reduce(x, axis, _sum_combine) with triton's own add combiner, which the interpreter recognises and
runs with numpy; they are not wrapped in a helper because each @triton.jit helper call costs the
interpreter about a millisecond (it re-patches triton.language on every call).

Index arithmetic is int64 wherever it addresses the data, so tensors past 2**31 elements work.
2-D tiles are launched on a 1-D grid (program id -> (tile row, tile column) by one scalar division)
because a grid's second axis is limited to 65535 programs.
"""
import os

import triton
import triton.language as tl
from triton.language.standard import _sum_combine
from triton.runtime.interpreter import InterpretedFunction

# Radix select over 32-bit keys: six digits of 6, 6, 5, 5, 5 and 5 bits, most significant first.
# Small digits keep tl.histogram cheap: triton 3.6 lowers it to warp ballots whose cost per key grows
# with the number of bins (2048 bins cost ~30 instructions per key, far more than reading the key).
# Three passes read every key (the histograms of the first two digits, then a compaction); the later
# ones only the few candidates left (see ops._Selection.run).
RADIX_DIGITS = ((26, 6), (20, 6), (15, 5), (10, 5), (5, 5), (0, 5))  # (shift, bits)
RADIX_BINS = 1 << 6

# Selection modes of _block_norm_mask_kernel.
SELECT_NONE, SELECT_ALL, SELECT_BY_KEY = 0, 1, 2


# ------------------------------------------------------------------------------------ helpers
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
def _times_zero(x):
    """x * 0, what torch's data * mask writes where the mask is 0 (see sparsity_ext.reference.times_zero):
    a zero with x's sign for finite x, NaN for inf and NaN; fp16/bf16 multiplied in fp32 and converted back."""
    return (x.to(tl.float32) * 0.0).to(x.dtype)


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
def _flush_histogram(hist_ptr, local, NBINS: tl.constexpr):
    """hist[d] += local[d]: one relaxed atomic per non-empty bin, once per program.

    Programs count in registers (tl.histogram, summed over every tile they process) and flush once at
    the end, so the global atomics are (programs x non-empty bins), not one per tile or per key.
    Lanes that must not count are binned at 0 and subtracted from local[0] by the caller
    (tl.histogram's mask argument is not in every triton 3.x).
    """
    tl.atomic_add(hist_ptr + tl.arange(0, NBINS), local.to(tl.int64), mask=local > 0, sem="relaxed")


@triton.jit
def _tile_2d(tile, num_cols, TILE_R: tl.constexpr, TILE_C: tl.constexpr):
    """(rows [TILE_R, 1], cols [1, TILE_C]) int64 indices of tile number `tile` (row-major tile order).

    Tile counts here and in the kernels are (n - 1) // T + 1 (n >= 1), never (n + T - 1) // T: triton
    passes sizes below 2**31 as int32, and n + T - 1 wraps for n within T of 2**31.
    """
    n_col_tiles = (num_cols - 1) // TILE_C + 1
    tile_r = tile // n_col_tiles
    tile_c = tile - tile_r * n_col_tiles
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
    The blocks are cut into TILE_R x TILE_C tiles, one thread per block; each program scores the tiles
    pid, pid + programs, ... (a persistent grid), so its histogram is flushed once.
    """
    num_tiles = ((nbh - 1) // TILE_R + 1) * ((nbw - 1) // TILE_C + 1)
    local = tl.full([NBINS], 0, dtype=tl.int32)
    outside = tl.full([TILE_R * TILE_C], 0, dtype=tl.int32)  # slots past the last block, binned at 0
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        bi, bj = _tile_2d(tile, nbw, TILE_R, TILE_C)
        in_range = (bi < nbh) & (bj < nbw)
        row0 = bi * BH
        col0 = bj * BW
        acc = tl.full([TILE_R, TILE_C], 0, dtype=tl.float32)
        if BH == 1 and BW == 4:
            # One [TILE_R, TILE_C, 4] load (vectorized on contiguous rows), split into the 4 columns.
            # Padding lanes load 0.0, and acc + 0.0 == acc here (acc starts at +0.0, never -0.0).
            cols = col0[:, :, None] + tl.arange(0, 4)[None, None, :]
            valid = in_range[:, :, None] & (cols < W)
            n = _element_norm(tl.load(x_ptr + row0[:, :, None] * stride_h + cols * stride_w, mask=valid,
                                      other=0.0), NORM)
            even, odd = tl.split(tl.reshape(n, [TILE_R, TILE_C, 2, 2]))  # [.., a, b] = column 2a + b
            n0, n2 = tl.split(even)
            n1, n3 = tl.split(odd)
            acc = (((acc + n0) + n1) + n2) + n3
        else:
            for r in range(BH):
                for c in range(BW):
                    valid = in_range & (row0 + r < H) & (col0 + c < W)
                    x = tl.load(x_ptr + (row0 + r) * stride_h + (col0 + c) * stride_w, mask=valid, other=0.0)
                    acc = tl.where(valid, acc + _element_norm(x, NORM), acc)
        count = tl.maximum(tl.minimum(H - row0, BH) * tl.minimum(W - col0, BW), 1)  # >= 1: tiles overhang
        key = _score_key(tl.math.div_rn(acc, count.to(tl.float32)))
        tl.store(keys_ptr + bi * nbw + bj, key.to(tl.int32, bitcast=True), mask=in_range)
        counted = tl.reshape(in_range, [TILE_R * TILE_C])
        digit = tl.reshape((key >> DIGIT_SHIFT).to(tl.int32), [TILE_R * TILE_C])
        local += tl.histogram(tl.where(counted, digit, 0), NBINS)
        outside += (~counted).to(tl.int32)
    outside_count = tl.reduce(outside, 0, _sum_combine)
    _flush_histogram(hist_ptr, local - tl.where(tl.arange(0, NBINS) == 0, outside_count, 0), NBINS)


@triton.jit
def _pick_digit(hist_ptr, picked_ptr, DIGIT_SHIFT: tl.constexpr, NBINS: tl.constexpr):
    """Choose the digit of the remaining-th smallest candidate: the next row of the pick table.

    picked = [prefix, remaining, ties] (the digits above, already chosen; remaining = the rank sought,
    1-based, among the candidates, i.e. the keys that share prefix's digits). With hist this digit's
    histogram over the candidates and cum(d) = sum_{e <= d} hist[e]:
        d* = #{d : cum(d) < remaining}      (the first digit whose cumulative count reaches it)
        next = [prefix | d* << DIGIT_SHIFT,  remaining - cum(d* - 1),  hist[d*]]
    is returned to every program and stored by program 0 as the row after picked. After the last
    digit, prefix is the k-th smallest key T, ties = #{b : key[b] == T}, and the k smallest keys are
    those < T plus the first `remaining` (lowest-indexed) keys equal to T.
    """
    bins = tl.arange(0, NBINS)
    hist = tl.load(hist_ptr + bins)
    remaining = tl.load(picked_ptr + 1)
    below = tl.associative_scan(hist, 0, _sum_combine) < remaining  # the bins before d*
    digit = tl.reduce(below.to(tl.int32), 0, _sum_combine)
    prefix = tl.load(picked_ptr) | (digit.to(tl.int64) << DIGIT_SHIFT)
    remaining -= tl.reduce(tl.where(below, hist, 0), 0, _sum_combine)
    ties = tl.reduce(tl.where(bins == digit, hist, 0), 0, _sum_combine)
    first = tl.program_id(0) == 0
    tl.store(picked_ptr + 3, prefix, mask=first)
    tl.store(picked_ptr + 4, remaining, mask=first)
    tl.store(picked_ptr + 5, ties, mask=first)
    return prefix, remaining, ties


@triton.jit
def _radix_histogram_kernel(src_ptr, cand_keys_ptr, cand_index_ptr, seg_counts_ptr, picked_ptr, prev_hist_ptr,
                            hist_ptr, num_keys, seg_len, PREFIX_SHIFT: tl.constexpr, PREV_NBINS: tl.constexpr,
                            DIGIT_SHIFT: tl.constexpr, NBINS: tl.constexpr, FIRST: tl.constexpr,
                            FROM_VALUES: tl.constexpr, HISTOGRAM: tl.constexpr, COMPACT: tl.constexpr,
                            TRACK_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of one radix digit over the keys that still are candidates, and/or their compaction.

    Unless PREFIX_SHIFT == 32 (the first digit: no prefix), the pass first picks the digit above this
    one (_pick_digit from prev_hist and the pick-table row picked), which gives p = prefix: the digits
    above this one, already chosen (lower bits 0).
    Program p owns the segment [s_p, s_p + seg_len) of the key indices (s_p = p * seg_len) and reads
      FIRST:  every key of its segment, from src (int32 keys; with FROM_VALUES raw values v, whose key
              is _score_key(fp32(v))), key i at src[i];
      else:   the c_p = seg_counts[p] candidates the previous pass kept, at cand_keys[s_p : s_p + c_p].
    The candidates are
        C = {keys read : key >> PREFIX_SHIFT == p >> PREFIX_SHIFT}      (every key read if PREFIX_SHIFT == 32)
        hist[d] += #{key in C : (key >> DIGIT_SHIFT) & (NBINS - 1) == d}        (with HISTOGRAM)
    COMPACT writes the keys of C, in the order read (index order), to cand_keys[s_p : s_p + |C|] (with
    TRACK_INDEX their key index i to cand_index alike) and |C| to seg_counts[p], so the next pass reads
    only them. It may compact in place (src or cand_keys being what it reads): a key read at position q
    is written at a position <= q, after a barrier that follows every load of the tile.
    """
    pid = tl.program_id(0)
    if PREFIX_SHIFT != 32:
        prefix = _pick_digit(prev_hist_ptr, picked_ptr, PREFIX_SHIFT, PREV_NBINS)[0].to(tl.uint32)
    seg_start = pid.to(tl.int64) * seg_len
    if FIRST:
        count = tl.minimum(num_keys - seg_start, seg_len).to(tl.int64)
    else:
        count = tl.load(seg_counts_ptr + pid)
    local = tl.full([NBINS], 0, dtype=tl.int32)
    others = tl.full([BLOCK], 0, dtype=tl.int32)  # keys read that are no candidates, binned at 0
    written = count * 0
    for start in range(0, count, BLOCK):
        lane = start + tl.arange(0, BLOCK)
        in_range = lane < count
        offs = seg_start + lane
        if FIRST:
            if FROM_VALUES:
                key = _score_key(tl.load(src_ptr + offs, mask=in_range, other=0.0).to(tl.float32))
            else:
                key = tl.load(src_ptr + offs, mask=in_range, other=0).to(tl.uint32, bitcast=True)
        else:
            key = tl.load(cand_keys_ptr + offs, mask=in_range, other=0).to(tl.uint32, bitcast=True)
        if PREFIX_SHIFT == 32:
            candidate = in_range
        else:
            candidate = in_range & ((key >> PREFIX_SHIFT) == (prefix >> PREFIX_SHIFT))
        if HISTOGRAM:
            digit = ((key >> DIGIT_SHIFT) & (NBINS - 1)).to(tl.int32)
            local += tl.histogram(tl.where(candidate, digit, 0), NBINS)
            others += (~candidate).to(tl.int32)
        if COMPACT:
            if TRACK_INDEX:
                if FIRST:
                    index = offs
                else:
                    index = tl.load(cand_index_ptr + offs, mask=candidate, other=0)
            tl.debug_barrier()  # every load of the tile precedes every store (in-place compaction)
            flag = candidate.to(tl.int32)
            slot = seg_start + written + (tl.associative_scan(flag, 0, _sum_combine) - flag)
            tl.store(cand_keys_ptr + slot, key.to(tl.int32, bitcast=True), mask=candidate)
            if TRACK_INDEX:
                tl.store(cand_index_ptr + slot, index.to(cand_index_ptr.dtype.element_ty), mask=candidate)
            written += tl.reduce(flag, 0, _sum_combine)
    if COMPACT:
        tl.store(seg_counts_ptr + pid, written)
    if HISTOGRAM:
        others_count = tl.reduce(others, 0, _sum_combine)
        _flush_histogram(hist_ptr, local - tl.where(tl.arange(0, NBINS) == 0, others_count, 0), NBINS)


@triton.jit
def _radix_pick_kernel(hist_ptr, picked_ptr, DIGIT_SHIFT: tl.constexpr, NBINS: tl.constexpr):
    """The last digit's pick (one program): the pick table's row after picked (_pick_digit)."""
    _pick_digit(hist_ptr, picked_ptr, DIGIT_SHIFT, NBINS)


@triton.jit
def _tie_count_kernel(cand_keys_ptr, seg_counts_ptr, picked_ptr, hist_ptr, seg_ties_ptr, seg_len,
                      DIGIT_SHIFT: tl.constexpr, NBINS: tl.constexpr, BLOCK: tl.constexpr):
    """The last digit's pick (as _radix_pick_kernel: the final row [T, remaining, ties] after picked),
    then seg_ties[p] = #{candidates of segment p (as the last compacting radix pass left them) == T}.

    Every key equal to T is among those candidates. Counted only when the k smallest take some but not
    all keys equal to T (remaining < ties); otherwise nothing is read and seg_ties[p] = 0.
    """
    pid = tl.program_id(0)
    threshold, remaining, ties = _pick_digit(hist_ptr, picked_ptr, DIGIT_SHIFT, NBINS)
    count = tl.load(seg_counts_ptr + pid, mask=remaining < ties, other=0)
    seg_start = pid.to(tl.int64) * seg_len
    found = count * 0
    for start in range(0, count, BLOCK):
        lane = start + tl.arange(0, BLOCK)
        key = tl.load(cand_keys_ptr + seg_start + lane, mask=lane < count, other=0).to(tl.uint32, bitcast=True)
        found += tl.reduce(((lane < count) & (key == threshold.to(tl.uint32))).to(tl.int32), 0, _sum_combine)
    tl.store(seg_ties_ptr + pid, found)


@triton.jit
def _tie_find_kernel(cand_keys_ptr, cand_index_ptr, seg_counts_ptr, seg_ties_ptr, final_ptr, last_ptr,
                     num_segments, seg_len, SEGMENTS: tl.constexpr, BLOCK: tl.constexpr):
    """last = L, the index of the last key the selection takes among those equal to T (one program).

    final = [T, remaining, ties] (the pick table's last row). When T's ties split (remaining < ties), L
    is the index of the remaining-th key equal to T in index order: segments are in index order and
    keep their candidates in index order, so the segment is found from the running sum of seg_ties and
    the key by a scan of that segment's candidates (their indices come from cand_index). Otherwise
    every key equal to T is taken: L stays as set by the caller, the last key index.
    The k smallest keys are then {b : key[b] < T, or key[b] == T and b <= L}.
    """
    threshold = tl.load(final_ptr).to(tl.uint32)
    remaining = tl.load(final_ptr + 1)
    split = remaining < tl.load(final_ptr + 2)
    segments = tl.arange(0, SEGMENTS)
    seg_ties = tl.load(seg_ties_ptr + segments, mask=segments < num_segments, other=0)
    before = tl.associative_scan(seg_ties, 0, _sum_combine) < remaining  # the segments before seg
    seg = tl.reduce(before.to(tl.int32), 0, _sum_combine)
    rank = remaining - tl.reduce(tl.where(before, seg_ties, 0), 0, _sum_combine)  # 1-based, among seg's ties
    count = tl.load(seg_counts_ptr + seg, mask=split, other=0)
    seg_start = seg.to(tl.int64) * seg_len
    last = tl.load(last_ptr)
    seen = count * 0
    for start in range(0, count, BLOCK):
        lane = start + tl.arange(0, BLOCK)
        key = tl.load(cand_keys_ptr + seg_start + lane, mask=lane < count, other=0).to(tl.uint32, bitcast=True)
        equal = (lane < count) & (key == threshold)
        hit = equal & (seen + tl.associative_scan(equal.to(tl.int32), 0, _sum_combine) == rank)
        index = tl.load(cand_index_ptr + seg_start + lane, mask=hit, other=0).to(tl.int64)
        last = tl.where(tl.reduce(hit.to(tl.int32), 0, _sum_combine) > 0,
                        tl.reduce(tl.where(hit, index, 0), 0, _sum_combine), last)
        seen += tl.reduce(equal.to(tl.int32), 0, _sum_combine)
    tl.store(last_ptr, last)


@triton.jit
def _block_norm_mask_kernel(x_ptr, out_ptr, keys_ptr, final_ptr, last_ptr,
                            H, W, stride_h, stride_w, nbw, zeros_per_block, tune_key,
                            BH: tl.constexpr, BW: tl.constexpr, NORM: tl.constexpr, SELECT: tl.constexpr,
                            RANKED: tl.constexpr, PACKED: tl.constexpr, APPLY: tl.constexpr,
                            TILE_R: tl.constexpr, TILE_BYTES: tl.constexpr):
    """Mask write: keep[r, c] for the element (r, c) of block b = (r // BH) * nbw + c // BW.

        selected(b) = SELECT_NONE: false;  SELECT_ALL: true;
                      SELECT_BY_KEY: key[b] < T  or  (key[b] == T and b <= L)
                      (T = final[0] from the radix select, L = last[0] from _tie_find_kernel)
        rank(r, c)  = #{valid (r', c') in block b : n(x[r', c']) < n(x[r, c]), or equal (NaN equal
                      to NaN, NaN above all) and (r', c') before (r, c) in row-major order}
        keep[r, c]  = not (selected(b) and (not RANKED or rank(r, c) < zeros_per_block))
    RANKED is false when zeros_per_block >= BH*BW: the whole valid part of a selected block goes.
    Output: bool bytes out[r * W + c], or with PACKED (needs W % 8 == 0) bit c % 8 of byte
    (r * W + c) / 8. APPLY also writes x[r, c] = x[r, c] * 0 (_times_zero) where keep is false (never with
    RANKED: other programs may still be reading the block's values to rank them).
    The tile is TILE_R rows x TILE_BYTES * 8 columns, held as [TILE_R, TILE_BYTES, 8].
    """
    tile_rows, byte_cols = _tile_2d(tl.program_id(0), (W - 1) // 8 + 1, TILE_R, TILE_BYTES)
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
        threshold = tl.load(final_ptr).to(tl.uint32)
        zeroed = in_range & ((key < threshold) | ((key == threshold) & (block <= tl.load(last_ptr))))
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
        x_at = x_ptr + rows * stride_h + cols * stride_w
        tl.store(x_at, _times_zero(tl.load(x_at, mask=zeroed)), mask=zeroed)
    keep = (in_range & ~zeroed).to(tl.int32)
    if PACKED:
        byte = tl.reduce(keep << bits, 2, _sum_combine).to(tl.uint8)
        tl.store(out_ptr + tile_rows * (W // 8) + byte_cols, byte, mask=(tile_rows < H) & (byte_cols * 8 < W))
    else:
        tl.store(out_ptr + rows * W + cols, keep != 0, mask=in_range)


@triton.jit
def _four_kept(k0, k1, k2, k3, zeros):
    """Keep flags of a group of four order keys: a member is dropped when its rank (the members before it: a
    smaller key, or an equal key and a lower index) is below `zeros`."""
    # b_ij = before(i, j) for i < j; member j > i is before i when b_ij is 0.
    b01 = (k0 <= k1).to(tl.int32)
    b02 = (k0 <= k2).to(tl.int32)
    b03 = (k0 <= k3).to(tl.int32)
    b12 = (k1 <= k2).to(tl.int32)
    b13 = (k1 <= k3).to(tl.int32)
    b23 = (k2 <= k3).to(tl.int32)
    return ((3 - b01 - b02 - b03) >= zeros, (b01 + 2 - b12 - b13) >= zeros, (b02 + b12 + 1 - b23) >= zeros,
            (b03 + b13 + b23) >= zeros)


@triton.jit
def _nm4_mask_kernel(x_ptr, out_ptr, H, W, stride_h, stride_w, zeros_per_block, NORM: tl.constexpr,
                     TILE_R: tl.constexpr, TILE_G: tl.constexpr):
    """Mask of (1, 4) blocks, every block selected, ranked: keep[r, c] for x (H x W, any strides).

    The 4 elements (r, 4g + i), i < 4, of block g are ranked by n(x) (as _block_norm_mask_kernel:
    NaN largest and equal to NaN, ties by lower i; columns past W do not count):
        before(i, j) = key_i < key_j, or key_i == key_j and i < j      (key = _score_key(n(x)))
        rank(i)      = #{valid j : before(j, i)}
        keep[r, 4g + i] = rank(i) >= zeros_per_block        (bool bytes, out[r * W + c])
    Padding lanes get the key 0xFFFFFFFF (NaN's): being last in index order, they are never before a
    real element. A tile is TILE_R rows x TILE_G blocks, loaded as [TILE_R, TILE_G, 4] (vector loads
    for contiguous rows) and split into the four members, so each of the 6 pairs is compared once
    (the generic kernel re-reads each block 4 times, once per member).
    """
    rows, groups = _tile_2d(tl.program_id(0), (W - 1) // 4 + 1, TILE_R, TILE_G)
    rows = rows[:, :, None]
    cols = groups[:, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    valid = (rows < H) & (cols < W)
    x = tl.load(x_ptr + rows * stride_h + cols * stride_w, mask=valid, other=0.0)
    key = tl.where(valid, _score_key(_element_norm(x, NORM)), 0xFFFFFFFF)
    even, odd = tl.split(tl.reshape(key, [TILE_R, TILE_G, 2, 2]))  # [.., a, b] = member 2a + b
    k0, k2 = tl.split(even)
    k1, k3 = tl.split(odd)
    keep0, keep1, keep2, keep3 = _four_kept(k0, k1, k2, k3, zeros_per_block)
    keep = tl.reshape(tl.join(tl.join(keep0, keep2), tl.join(keep1, keep3)), [TILE_R, TILE_G, 4])
    tl.store(out_ptr + rows * W + cols, keep, mask=valid)


# ------------------------------------------------------------------------------ mask format ops
@triton.jit
def _apply_mask_kernel(x_ptr, mask_ptr, H, W, stride_h, stride_w,
                       PACKED: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr):
    """x[r, c] = x[r, c] * 0 (_times_zero) where keep(r * W + c) is false, in place; x is H x W with any strides.

    keep(f) = mask[f] (bool bytes) or, with PACKED, bit f % 8 of mask[f / 8].
    """
    rows, cols = _tile_2d(tl.program_id(0), W, TILE_R, TILE_C)
    in_range = (rows < H) & (cols < W)
    flat = rows * W + cols
    if PACKED:
        keep = (tl.load(mask_ptr + flat // 8, mask=in_range, other=0).to(tl.int32) >> (flat % 8).to(tl.int32)) & 1
    else:
        keep = tl.load(mask_ptr + flat, mask=in_range, other=0).to(tl.int32)
    dropped = in_range & (keep == 0)
    x_at = x_ptr + rows * stride_h + cols * stride_w
    tl.store(x_at, _times_zero(tl.load(x_at, mask=dropped)), mask=dropped)


@triton.jit
def _pack_mask_kernel(mask_ptr, out_ptr, numel, num_bytes, BLOCK_BYTES: tl.constexpr):
    """out[j] = sum_{i < 8, 8j + i < numel} mask[8j + i] << i   (mask: bool bytes, flat)."""
    byte = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bits = tl.arange(0, 8)
    flat = byte[:, None] * 8 + bits[None, :]
    keep = tl.load(mask_ptr + flat, mask=flat < numel, other=0).to(tl.int32)
    byte_bits = tl.reduce((keep != 0).to(tl.int32) << bits[None, :], 1, _sum_combine)
    tl.store(out_ptr + byte, byte_bits.to(tl.uint8), mask=byte < num_bytes)


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
