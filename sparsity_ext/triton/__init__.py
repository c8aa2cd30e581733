"""Triton backend of sparsity_ext: block_norm_mask(_apply_), select_threshold, nm_mask, apply_mask_,
pack_mask and unpack_mask as Triton kernels, equal bit for bit to sparsity_ext.reference.

Use it with `with sparsity_ext.use_backend("triton"): sparsity_ext.ops.block_norm_mask(x_cuda, ...)`
(or SPARSITY_EXT_BACKEND=triton); "auto" picks it for CUDA tensors when the CUDA extension is not
built. triton is optional: importing this package does not import it; the kernels
(sparsity_ext.triton.kernels) and their torch.library ops (sparsity_ext.triton.ops, namespace
sparsity_ext_triton) are imported on the first call. CPU tensors run only in triton's interpreter:
TRITON_INTERPRET=1 must be set before that first call (triton reads it when the kernels are
decorated; triton itself may already be imported), and `register()` called again if it was set
after importing sparsity_ext.

Reading the kernels (kernels.py; each kernel's docstring states its math):
  block_norm_mask = _block_scores_kernel  one pass over x: fp32 block sums in row-major order, one
                                          int32 "score key" per block (unsigned order = float order,
                                          NaN largest), plus the histogram of the keys' top 6 bits
                  + _radix_histogram_kernel / _radix_pick_kernel  five more digit passes (6, 5, 5, 5, 5
                                          bits; small digits keep tl.histogram cheap): the next two
                                          read every key, the second of them also compacts the keys
                                          sharing the top 12 bits, per segment and in index order,
                                          with their indices; the last three read only those. The
                                          passes are persistent (one program per segment of keys,
                                          one histogram flush per program); the k-th smallest key T
                                          and the count of T-ties to take stay on the device (no
                                          host sync)
                  + _tie_count_kernel / _tie_find_kernel  only when the k smallest take part of the
                                          blocks whose key equals T: the index L of the last one
                                          taken (lower index first), from the compacted candidates
                  + _block_norm_mask_kernel  one pass writing the bool or packed mask (key < T, or
                                          key == T and index <= L), ranking the elements of selected
                                          blocks when zeros_per_block < block size, zeroing x in the
                                          same pass for block_norm_mask_apply_ when whole blocks go
                                          (else a second _apply_mask_kernel pass);
                                          _nm4_mask_kernel instead for ranked (1, 4) blocks all
                                          selected (2:4 masks).
  nm_mask is that mask-write pass alone (every (1, m) block selected, m - n zeros, |x|);
  apply_mask_, pack_mask, unpack_mask are one elementwise pass each; select_threshold is the radix
  select above on the raw values (its first passes read the values, no keys are stored).
Exactness: the scoring pass is launched with enable_fp_fusion=False (else x*x + acc becomes an FMA
and scores differ from the reference in the last bit); that is why the scoring ops are
torch.library.custom_op (opaque to torch.compile) and the rest triton_op (see ops.py).
Tuning: _block_scores_kernel and _block_norm_mask_kernel are autotuned over the tile shapes in
kernels.SCORES_CONFIGS / kernels.MASK_CONFIGS, keyed by (bit lengths of the shape, dtype, block
shape, mode), so each bucket is tuned once per process; TRITON_PRINT_AUTOTUNING=1 prints the choice.
Add configs there for unusual shapes (very wide rows, tall blocks). SPARSITY_EXT_TRITON_AUTOTUNE=0
(or kernels.AUTOTUNE = False) launches kernels.SCORES_DEFAULT / MASK_DEFAULT instead, as the
interpreter always does. The radix and tie passes use 2048-key tiles (ops._RADIX_BLOCK) and 8
programs per SM (ops._PROGRAMS_PER_SM).
Without a GPU: the tests run the kernels in triton's interpreter, which accepts code the compiler
rejects; `python scripts/check_triton_compile.py` (part of `bash run test`) compiles every variant the
ops launch, and every autotune config, for sm_90 and prints registers per kernel.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from .. import _backend
from ..semi_structured._layout import PACK_DTYPES

OP_NAMES = ("block_norm_mask", "block_norm_mask_apply_", "nm_mask", "select_threshold", "apply_mask_",
            "pack_mask", "unpack_mask")
# Ops on float data run on these dtypes; pack/unpack take the bool/uint8 masks their wrappers validate.
_DATA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DATA_OPS = ("block_norm_mask", "block_norm_mask_apply_", "nm_mask", "select_threshold", "apply_mask_")


@functools.lru_cache(maxsize=None)
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "triton":
            return "triton is not installed: pip install triton"
        return f"triton failed to import ({exc})"
    return None


def is_available() -> bool:
    """Whether triton imports here (the backend's kernels can be compiled or interpreted)."""
    return _import_error() is None


def interpreting() -> bool:
    """Whether TRITON_INTERPRET asks triton to interpret kernels (then CPU tensors are accepted)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def _on_device_of(data: torch.Tensor):
    """Triton launches on the current CUDA device and stream, wherever the tensors are: the data's
    device is made current for the call (what the CUDA extension's device guard does)."""
    return torch.cuda.device(data.device) if data.is_cuda else contextlib.nullcontext()


def _dispatch(op: str):
    def run(data, *args):
        from . import ops  # imports triton and compiles nothing yet; kernels compile on first launch
        with _on_device_of(data):
            return ops.BACKEND_FNS[op](data, *args)
    run.__name__ = f"triton_{op}"
    return run


def _sparsify_24_pack(data):
    from . import semi_structured  # imports triton; the kernel compiles on its first launch
    with _on_device_of(data):
        return semi_structured.sparsify_24_pack(data)


def _select_on_level_one_mask(*args):
    from ..ops import select_on_level_one_mask  # ops imports this package at its end
    return select_on_level_one_mask(*args)


def _mask_into_from_block_norm_mask(*args):
    from ..ops import mask_into_from_block_norm_mask
    return mask_into_from_block_norm_mask(*args)


def register() -> None:
    """(Re-)register the triton implementations with sparsity_ext's backend registry."""
    devices = ("cuda", "cpu") if interpreting() else ("cuda",)
    for op in OP_NAMES:
        _backend.register(op, "triton", _dispatch(op), devices=devices,
                          dtypes=_DATA_DTYPES if op in _FLOAT_DATA_OPS else None,
                          available=is_available, unavailable_reason=lambda: _import_error() or "")
    # block_norm_mask_select: the triton block_norm_mask at level 1, and the threshold's blocks (see ops)
    _backend.register("block_norm_mask_select", "triton", _select_on_level_one_mask, devices=devices,
                      dtypes=_DATA_DTYPES, available=is_available, unavailable_reason=lambda: _import_error() or "")
    # block_norm_mask_into_: the triton block_norm_mask, copied into the given mask
    _backend.register("block_norm_mask_into_", "triton", _mask_into_from_block_norm_mask, devices=devices,
                      dtypes=_DATA_DTYPES, available=is_available, unavailable_reason=lambda: _import_error() or "")
    # sparsify_24_pack (sparsity_ext.semi_structured): its kernel is triton/semi_structured.py
    _backend.register("sparsify_24_pack", "triton", _sparsify_24_pack, devices=devices, dtypes=PACK_DTYPES,
                      available=is_available, unavailable_reason=lambda: _import_error() or "")


register()
