"""Launchers of the triton kernels, registered as torch.library ops in the namespace sparsity_ext_triton.

Inputs are validated by sparsity_ext.ops (the public surface); these launchers check only what is
specific to triton (the device) and allocate outputs. block_norm_mask and block_norm_mask_apply_
are torch.library.custom_op: their scoring kernel must be launched with enable_fp_fusion=False for
bit-exact scores, a launch option that torch.compile's tracing of a triton_op would not carry;
select_threshold too (the same radix select). The other ops are torch.library.triton_op (compile
sees their kernels).
Every op has a fake (shape-only) implementation.

Bool masks reach the kernels as bool tensors (triton loads and stores a bool pointer's elements as
bytes): a bool -> uint8 .view() in a triton_op body would be an aten.view.dtype that inductor
cannot lower.
"""
from __future__ import annotations

import functools

import torch
import triton
from torch.library import custom_op, triton_op, wrap_triton

from .. import reference
from .._fake import mask_like
from . import kernels

NAMESPACE = "sparsity_ext_triton"
# Keeps x*x + acc two roundings (no FMA) in the scoring kernel; the interpreter never fuses.
_EXACT = {} if kernels.INTERPRETED else {"enable_fp_fusion": False}
_PACK_BLOCK_BYTES = 512
_RADIX_BLOCK = 2048  # keys per tile of the radix and tie passes
_PROGRAMS_PER_SM = 8
_FIRST_COMPACTING_DIGIT = 2  # see _Selection.run


def _launchable(kernel):
    """The kernel as a triton_op body must call it: via wrap_triton, except for the interpreter's
    kernels (which torch 2.11's wrap_triton rejects and which are launched directly anyway)."""
    return kernel if kernels.INTERPRETED else wrap_triton(kernel)


def _direct(kernel):
    """How a custom_op body launches: the kernel itself (torch never traces into it)."""
    return kernel


def _check_device(t: torch.Tensor, op: str) -> None:
    if t.device.type == "cpu" and not kernels.INTERPRETED:
        raise RuntimeError(f"{op}: the triton backend runs CPU tensors only in triton's interpreter; set "
                           f"TRITON_INTERPRET=1 before sparsity_ext.triton.kernels is first imported")


def _tune_key(h: int, w: int) -> int:
    """Autotuning bucket of an h x w problem: (bit length of h, bit length of w)."""
    return (h.bit_length() << 8) | w.bit_length()


def _as_rows(t: torch.Tensor) -> torch.Tensor | None:
    """A 2-D (rows, last dim) view of t, or None when t's strides allow no such view."""
    if t.dim() <= 1:
        return t.view(1, -1)
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


# ----------------------------------------------------------------------------- radix select
@functools.lru_cache(maxsize=None)
def _max_programs(device: torch.device) -> int:
    """Programs of the persistent passes (scores, radix, ties): enough to fill the GPU's SMs with
    loads in flight; 3 in the interpreter (several segments, each over several tiles in the tests)."""
    if kernels.INTERPRETED or device.type != "cuda":
        return 3
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _score_keys(x: torch.Tensor, block_shape: tuple[int, int], norm: int):
    """(keys, histograms): one int32 key per block (kernels._score_key), and hist[0] filled with the
    histogram of the keys' first radix digit (the rows of the later digits are zero)."""
    h, w = x.shape
    bh, bw = block_shape
    nbh, nbw = triton.cdiv(h, bh), triton.cdiv(w, bw)
    keys = torch.empty(nbh * nbw, dtype=torch.int32, device=x.device)
    hist = torch.zeros(len(kernels.RADIX_DIGITS), kernels.RADIX_BINS, dtype=torch.int64, device=x.device)
    shift, bits = kernels.RADIX_DIGITS[0]
    kernel, config = kernels.block_scores()
    programs = _max_programs(x.device)
    kernel[lambda meta: (min(triton.cdiv(nbh, meta["TILE_R"]) * triton.cdiv(nbw, meta["TILE_C"]), programs),)](
        x, keys, hist[0], h, w, x.stride(0), x.stride(1), nbh, nbw, _tune_key(nbh, nbw),
        BH=bh, BW=bw, NORM=norm, DIGIT_SHIFT=shift, NBINS=1 << bits, **config, **_EXACT)
    return keys, hist


class _Selection:
    """The radix select's device state for k of the n keys of `source` (int32 keys, or raw values).

    Key indices are cut into `segments` segments of seg_len (a multiple of _RADIX_BLOCK); one program
    per segment in every radix pass. picks is the pick table: row r = [prefix, remaining, ties] once
    the digits above digit r are chosen (kernels._pick_digit), row 0 = [0, k, k]; each pass picks the
    digit above its own from the previous histogram, so no launch is spent on picking. After run():
    final = the last row [T, remaining, ties] (T: the k-th smallest key), and the candidate buffers
    hold the keys that share T's top 27 bits, per segment, in index order; after find_last_tie(),
    last = [L] (kernels._tie_find_kernel).
    """

    def __init__(self, source: torch.Tensor, k: int, from_values: bool, track_index: bool):
        n = source.numel()
        device = source.device
        self.source, self.n, self.from_values, self.track_index = source, n, from_values, track_index
        self.segments = min(triton.cdiv(n, _RADIX_BLOCK), _max_programs(device))
        self.seg_len = triton.cdiv(triton.cdiv(n, self.segments), _RADIX_BLOCK) * _RADIX_BLOCK
        self.segments = triton.cdiv(n, self.seg_len)
        self.cand_keys = torch.empty(n, dtype=torch.int32, device=device)
        index_dtype = torch.int32 if n < 2 ** 31 else torch.int64
        # Without ties to break (select_threshold), no indices are kept: cand_keys stands in, never written.
        self.cand_index = torch.empty(n, dtype=index_dtype, device=device) if track_index else self.cand_keys
        self.seg_counts = torch.empty(self.segments, dtype=torch.int64, device=device)
        self.picks = torch.zeros(len(kernels.RADIX_DIGITS) + 1, 3, dtype=torch.int64, device=device)
        self.picks[0, 1:] = k  # fills: no host-to-device copy
        self.final = self.picks[-1]
        self.last = torch.full((1,), n - 1, dtype=torch.int64, device=device)

    def radix_pass(self, hist, digit: int, first: bool, histogram: bool, compact: bool) -> None:
        shift, bits = kernels.RADIX_DIGITS[digit]
        prev_shift, prev_bits = kernels.RADIX_DIGITS[digit - 1] if digit > 0 else (32, bits)
        kernels._radix_histogram_kernel[(self.segments,)](
            self.source, self.cand_keys, self.cand_index, self.seg_counts, self.picks[max(digit - 1, 0)],
            hist[max(digit - 1, 0)], hist[digit], self.n, self.seg_len, PREFIX_SHIFT=prev_shift,
            PREV_NBINS=1 << prev_bits, DIGIT_SHIFT=shift, NBINS=1 << bits, FIRST=first,
            FROM_VALUES=first and self.from_values, HISTOGRAM=histogram, COMPACT=compact,
            TRACK_INDEX=self.track_index, BLOCK=_RADIX_BLOCK)

    def run(self, hist: torch.Tensor) -> None:
        """Every digit pass; hist[0] must already hold the first digit's histogram unless from_values.
        The last digit is picked by find_last_tie() or pick_last().

        The passes of the first two digits read every key; then one more pass over every key only
        compacts those that share the first two digits (12 bits: sign, exponent and 3 mantissa bits,
        typically a few percent of the keys; one digit would keep nearly all, as most scores share an
        exponent range), and the passes of the later digits read only those, compacting in place.
        The compacting pass builds no histogram (the costly part of a pass over every key): the
        next digit's histogram is taken over the compacted keys."""
        self.hist = hist
        last = len(kernels.RADIX_DIGITS) - 1
        for digit in range(len(kernels.RADIX_DIGITS)):
            if digit == _FIRST_COMPACTING_DIGIT:
                self.radix_pass(hist, digit, first=True, histogram=False, compact=True)
            if digit > 0 or self.from_values:
                self.radix_pass(hist, digit, first=digit < _FIRST_COMPACTING_DIGIT, histogram=True,
                                compact=_FIRST_COMPACTING_DIGIT < digit < last)

    def pick_last(self) -> None:
        """final = the last row of the pick table."""
        shift, bits = kernels.RADIX_DIGITS[-1]
        kernels._radix_pick_kernel[(1,)](self.hist[-1], self.picks[-2], DIGIT_SHIFT=shift, NBINS=1 << bits)

    def find_last_tie(self) -> None:
        """final, as pick_last(), and last = [L] (kernels._tie_find_kernel): two passes over the
        candidates left, which read nothing unless the k smallest take only part of the keys equal to T."""
        shift, bits = kernels.RADIX_DIGITS[-1]
        seg_ties = torch.empty(self.segments, dtype=torch.int64, device=self.source.device)
        kernels._tie_count_kernel[(self.segments,)](self.cand_keys, self.seg_counts, self.picks[-2], self.hist[-1],
                                                    seg_ties, self.seg_len, DIGIT_SHIFT=shift, NBINS=1 << bits,
                                                    BLOCK=_RADIX_BLOCK)
        kernels._tie_find_kernel[(1,)](self.cand_keys, self.cand_index, self.seg_counts, seg_ties, self.final,
                                       self.last, self.segments, self.seg_len,
                                       SEGMENTS=max(16, triton.next_power_of_2(self.segments)), BLOCK=_RADIX_BLOCK)


# --------------------------------------------------------------------------------- mask write
def _write_mask(x, out, selection, block_shape, zeros_per_block, norm, select, packed, apply, launch):
    """One launch of the mask-write pass writing `out` (bool (h, w) or packed bytes) for x (h, w):
    kernels.block_norm_mask(), or kernels._nm4_mask_kernel for ranked (1, 4) blocks all selected."""
    h, w = x.shape
    bh, bw = block_shape
    if select == kernels.SELECT_ALL and block_shape == (1, 4) and zeros_per_block < 4 and not packed and not apply:
        # 2:4 masks and their kin: each block's 6 pairs compared once (kernels._nm4_mask_kernel).
        tile_g = min(64, triton.next_power_of_2(triton.cdiv(w, 4)))
        tile_r = min(triton.next_power_of_2(h), max(1, 256 // tile_g))
        launch(kernels._nm4_mask_kernel)[(triton.cdiv(h, tile_r) * triton.cdiv(triton.cdiv(w, 4), tile_g),)](
            x, out, h, w, x.stride(0), x.stride(1), zeros_per_block, NORM=norm, TILE_R=tile_r, TILE_G=tile_g)
        return
    keys, final, last = selection if selection is not None else (x, x, x)
    kernel, config = kernels.block_norm_mask()
    launch(kernel)[
        lambda meta: (triton.cdiv(h, meta["TILE_R"]) * triton.cdiv(triton.cdiv(w, 8), meta["TILE_BYTES"]),)](
        x, out, keys, final, last, h, w, x.stride(0), x.stride(1),
        triton.cdiv(w, bw), zeros_per_block, _tune_key(h, w), BH=bh, BW=bw, NORM=norm, SELECT=select,
        RANKED=zeros_per_block < bh * bw, PACKED=packed, APPLY=apply, **config)


def _block_norm_mask(data, sparsity_level, block_shape, zeros_per_block, norm, packed, apply, op):
    _check_device(data, op)
    h, w = data.shape
    bh, bw = block_shape
    num_blocks = triton.cdiv(h, bh) * triton.cdiv(w, bw)
    k = reference.num_selected_blocks(sparsity_level, num_blocks)
    out = mask_like(data, packed)
    if data.numel() == 0:
        return out
    selection = None
    if k == 0 or zeros_per_block == 0:
        select = kernels.SELECT_NONE
    elif k == num_blocks:
        select = kernels.SELECT_ALL
    else:
        select = kernels.SELECT_BY_KEY
        keys, hist = _score_keys(data, block_shape, norm)
        radix = _Selection(keys, k, from_values=False, track_index=True)
        radix.run(hist)
        radix.find_last_tie()
        selection = (keys, radix.final, radix.last)
    ranked = zeros_per_block < bh * bw
    # Packed bytes are written directly when no byte straddles two rows; else a bool mask is packed after.
    target = out if not packed or w % 8 == 0 else torch.empty((h, w), dtype=torch.bool, device=data.device)
    _write_mask(data, target, selection, block_shape, zeros_per_block, norm, select,
                packed=target is out and packed, apply=apply and not ranked, launch=_direct)
    if target is not out:
        _pack(target, out, launch=_direct)
    if apply and ranked and select != kernels.SELECT_NONE:
        # Ranking reads the block's values, so zeroing waits for the whole mask (a second pass).
        _apply(data, target, launch=_direct)
    return out


@custom_op(f"{NAMESPACE}::block_norm_mask", mutates_args=())
def block_norm_mask(data: torch.Tensor, sparsity_level: float, block_shape: list[int], zeros_per_block: int,
                    norm: int, packed: bool = False) -> torch.Tensor:
    """sparsity_ext.ops.block_norm_mask on 2-D data (fp32/fp16/bf16)."""
    return _block_norm_mask(data, sparsity_level, tuple(block_shape), zeros_per_block, norm, packed, False,
                            "block_norm_mask")


@custom_op(f"{NAMESPACE}::block_norm_mask_apply_", mutates_args=("data",))
def block_norm_mask_apply_(data: torch.Tensor, sparsity_level: float, block_shape: list[int], zeros_per_block: int,
                           norm: int, packed: bool = False) -> torch.Tensor:
    """block_norm_mask, zeroing data in place where the mask is False (fused into the mask write
    when whole blocks are zeroed)."""
    return _block_norm_mask(data, sparsity_level, tuple(block_shape), zeros_per_block, norm, packed, True,
                            "block_norm_mask_apply_")


@block_norm_mask.register_fake
def _(data, sparsity_level, block_shape, zeros_per_block, norm, packed=False):
    return mask_like(data, packed)


@block_norm_mask_apply_.register_fake
def _(data, sparsity_level, block_shape, zeros_per_block, norm, packed=False):
    return mask_like(data, packed)


@custom_op(f"{NAMESPACE}::select_threshold", mutates_args=())
def select_threshold(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsity_ext.ops.select_threshold: the radix select of block_norm_mask on the raw values."""
    _check_device(values, "select_threshold")
    # The radix passes read the values themselves (keys computed on the fly, never stored).
    radix = _Selection(values.contiguous(), k, from_values=True, track_index=False)
    radix.run(torch.zeros(len(kernels.RADIX_DIGITS), kernels.RADIX_BINS, dtype=torch.int64, device=values.device))
    radix.pick_last()
    # Invert kernels._score_key (0xFFFFFFFF becomes the NaN 0x7FFFFFFF).
    key = radix.final[:1]
    bits = torch.where(key >= 2 ** 31, key - 2 ** 31, 0xFFFFFFFF - key)
    bits = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32)
    return bits.view(torch.float32).to(values.dtype).reshape(()), radix.final[1].clone()


@select_threshold.register_fake
def _(values, k):
    return values.new_empty(()), values.new_empty((), dtype=torch.int64)


# ------------------------------------------------------------------------------- triton_op ops
@triton_op(f"{NAMESPACE}::nm_mask", mutates_args=())
def nm_mask(data: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask of 2-D data: blocks (1, m), all selected, m - n zeros each, ranked by |x|."""
    _check_device(data, "nm_mask")
    out = torch.empty(data.shape, dtype=torch.bool, device=data.device)
    if data.numel() > 0:
        select = kernels.SELECT_ALL if n < m else kernels.SELECT_NONE
        _write_mask(data, out, None, (1, m), m - n, 1, select, packed=False, apply=False, launch=_launchable)
    return out


def _apply(x: torch.Tensor, mask: torch.Tensor, launch) -> None:
    """Zero the 2-D x in place where mask (bool of x's shape, contiguous, or packed bytes) is False."""
    h, w = x.shape
    tile_c = min(512, triton.next_power_of_2(w))
    tile_r = min(triton.next_power_of_2(h), max(1, 2048 // tile_c))
    launch(kernels._apply_mask_kernel)[(triton.cdiv(h, tile_r) * triton.cdiv(w, tile_c),)](
        x, mask, h, w, x.stride(0), x.stride(1),
        PACKED=mask.dtype == torch.uint8, TILE_R=tile_r, TILE_C=tile_c)


@triton_op(f"{NAMESPACE}::apply_mask_", mutates_args=("data",))
def apply_mask_(data: torch.Tensor, mask: torch.Tensor) -> None:
    """data[i] = 0 where mask[i] is False (mask: bool of data's shape, or packed bits), in place."""
    _check_device(data, "apply_mask_")
    if data.numel() == 0:
        return
    mask = mask.contiguous()
    rows = _as_rows(data)
    if rows is not None:
        _apply(rows, mask, launch=_launchable)
        return
    # No 2-D view of data exists (e.g. a permuted N-D tensor): zero a contiguous copy, copy it back.
    dense = data.contiguous()
    _apply(dense.view(-1, dense.shape[-1]), mask, launch=_launchable)
    data.copy_(dense)


def _pack(mask: torch.Tensor, out: torch.Tensor, launch) -> None:
    num_bytes = out.numel()
    launch(kernels._pack_mask_kernel)[(triton.cdiv(num_bytes, _PACK_BLOCK_BYTES),)](
        mask, out, mask.numel(), num_bytes, BLOCK_BYTES=_PACK_BLOCK_BYTES)


@triton_op(f"{NAMESPACE}::pack_mask", mutates_args=())
def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool mask (any shape) -> uint8[ceil(numel / 8)], bit i of byte j = element 8j + i (row-major)."""
    _check_device(mask, "pack_mask")
    out = mask_like(mask, packed=True)
    if out.numel() > 0:
        _pack(mask.contiguous(), out, launch=_launchable)
    return out


@triton_op(f"{NAMESPACE}::unpack_mask", mutates_args=())
def unpack_mask(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Inverse of pack_mask: uint8 bits -> bool mask of `shape`."""
    _check_device(packed, "unpack_mask")
    out = torch.empty(shape, dtype=torch.bool, device=packed.device)
    if out.numel() > 0:
        launch = _launchable(kernels._unpack_mask_kernel)
        launch[(triton.cdiv(packed.numel(), _PACK_BLOCK_BYTES),)](
            packed, out, out.numel(), BLOCK_BYTES=_PACK_BLOCK_BYTES)
    return out


@nm_mask.register_fake
def _(data, n, m):
    return mask_like(data, packed=False)


@apply_mask_.register_fake
def _(data, mask):
    return None


@pack_mask.register_fake
def _(mask):
    return mask_like(mask, packed=True)


@unpack_mask.register_fake
def _(packed, shape):
    return packed.new_empty(shape, dtype=torch.bool)


# The functions sparsity_ext._backend calls, with sparsity_ext.ops' argument conventions.
def _apply_mask_backend(data: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    apply_mask_(data, mask)
    return data


BACKEND_FNS = {
    "block_norm_mask": lambda data, level, block_shape, zeros, norm, packed=False:
        block_norm_mask(data, level, list(block_shape), zeros, norm, packed),
    "block_norm_mask_apply_": lambda data, level, block_shape, zeros, norm, packed=False:
        block_norm_mask_apply_(data, level, list(block_shape), zeros, norm, packed),
    "nm_mask": nm_mask,
    "select_threshold": select_threshold,
    "apply_mask_": _apply_mask_backend,
    "pack_mask": pack_mask,
    "unpack_mask": lambda packed, shape: unpack_mask(packed, list(shape)),
}
