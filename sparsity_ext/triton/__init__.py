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
import importlib.util
import os

import torch

from .. import _backend, _composites

OP_NAMES = ("block_norm_mask", "block_norm_mask_apply_", "nm_mask", "select_threshold", "apply_mask_",
            "pack_mask", "unpack_mask", "sparsify_24_pack")


def _unavailable_reason() -> str | None:
    """Why the backend cannot run here, decided without importing triton (importing sparsity_ext stays fast;
    a triton that is installed but fails to import raises its own error at the first call)."""
    return None if importlib.util.find_spec("triton") is not None else "triton is not installed: pip install triton"


def is_available() -> bool:
    """Whether triton is installed here (the backend's kernels can be compiled or interpreted)."""
    return _unavailable_reason() is None


def interpreting() -> bool:
    """Whether TRITON_INTERPRET asks triton to interpret kernels (then CPU tensors are accepted)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def _on_device_of(data: torch.Tensor):
    """Triton launches on the current CUDA device and stream, wherever the tensors are: the data's
    device is made current for the call (what the CUDA extension's device guard does)."""
    return torch.cuda.device(data.device) if data.is_cuda else contextlib.nullcontext()


def _kernel(op: str):
    def run(data, *args):
        # imported on the first call: importing triton and decorating the kernels compiles nothing yet
        if op == "sparsify_24_pack":
            from .semi_structured import sparsify_24_pack as launch
        else:
            from .ops import BACKEND_FNS
            launch = BACKEND_FNS[op]
        with _on_device_of(data):
            return launch(data, *args)
    run.__name__ = f"triton_{op}"
    return run


def register() -> None:
    """(Re-)register the triton kernels, and the composites for the ops it has none for, with sparsity_ext's
    dispatch (again after TRITON_INTERPRET changes: CPU tensors run only in the interpreter)."""
    devices = ("cuda", "cpu") if interpreting() else ("cuda",)
    reason = _unavailable_reason()
    for op in OP_NAMES:
        _backend.register(op, "triton", _kernel(op), devices=devices, dtypes=_backend.TRITON_DTYPES[op],
                          available=reason is None, unavailable_reason=reason or "")
    _composites.register_for("triton", devices, reason is None, reason or "")


register()
