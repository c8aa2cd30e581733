"""WeightNormSparsifier: zero the blocks of a weight with the smallest mean norm, or the smallest elements
within them (e.g. 2:4). Mirrors torch.ao.pruning.WeightNormSparsifier; the mask comes from
sparsity_ext.ops.block_norm_mask, so it runs on whichever backend is in force (see use_backend)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch.nn.utils import parametrize

from .. import checks, ops
from .base_sparsifier import BaseSparsifier, checked_shape, clamped_level, mask_of
from .utils import FakeSparsity

__all__ = ["WeightNormSparsifier"]


def _l1_norm(t: torch.Tensor) -> torch.Tensor:
    return t.abs()


def _l2_norm(t: torch.Tensor) -> torch.Tensor:
    return t * t


def _check_args(sparsity_level, sparse_block_shape, zeros_per_block, where: str) -> tuple[float, tuple[int, int], int]:
    """Validated (sparsity_level clamped to [0, 1], sparse_block_shape, zeros_per_block); ValueError/TypeError
    otherwise."""
    level = clamped_level(sparsity_level, where)
    block = checks.check_block_shape(sparse_block_shape, where)
    zeros = checks.check_int("zeros_per_block", zeros_per_block, where, 0, block[0] * block[1])
    return level, block, zeros


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """The 2-D layout a weight's blocks tile: 1-D and 2-D tensors as they are; a conv weight
    (Cout, Cin, *kernel) as (Cout, prod(kernel) * Cin), input channels fastest.

    That is the order of the reduction dimension of a channels-last (NHWC) implicit-GEMM convolution,
    the layout 2:4 sparse tensor cores run convolutions in: a (1, 4) block (2:4 with zeros_per_block=2)
    then holds 4 consecutive input channels of one kernel tap, as cuSPARSELt and NVIDIA's ASP expect.
    (A plain reshape(Cout, -1) would put kernel taps fastest, and groups would straddle taps and channels.)
    """
    if t.dim() <= 2:
        return t
    return t.movedim(1, -1).reshape(t.shape[0], -1)


def from_matrix(matrix: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of as_matrix: the (Cout, prod(kernel) * Cin) layout back to `shape` (a view when possible)."""
    if len(shape) <= 2:
        return matrix.view(shape)
    return matrix.view(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


def mask_dtype_after_step(weight_dtype: torch.dtype, zeros_per_block: int, block_size: int) -> torch.dtype:
    """The dtype torch.ao.pruning's step gives a mask it computes: bool when zeros_per_block is smaller than
    the block (its logical_or), else the default float dtype; fp16/bf16 weights keep their own dtype there
    (a float32 mask would turn the weight float32, and the layer's half-precision forward would fail)."""
    if zeros_per_block < block_size:
        return torch.bool
    return weight_dtype if weight_dtype in (torch.float16, torch.bfloat16) else torch.get_default_dtype()


def _store(mask: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> None:
    """Writes `keep` into the live mask as `dtype`: in place when the mask has it, else by rebinding its
    .data (the object, shared with the state and the parametrization, stays), as torch.ao.pruning does."""
    if mask.dtype == dtype:
        mask.copy_(keep)
    else:
        mask.data = keep.to(dtype)


def _float_mask(keep: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`keep` as a default-dtype float mask, as torch.ao.pruning's mask helpers return it; rebound into
    `mask` (its .data) when one is given, as they do."""
    result = keep.to(torch.get_default_dtype())
    if mask is None:
        return result
    mask.data = result
    return mask


class WeightNormSparsifier(BaseSparsifier):
    """Masks the blocks of each weight with the smallest mean norm (sparsity_level of them); within each
    masked block, zeros_per_block elements of smallest norm (all of them by default).

    The weight scored is the current masked weight (mask * original), as in torch.ao.pruning, so
    masked elements stay masked; ops.block_norm_mask_update_ scores it (the compiled CPU kernel without
    materializing it).

    Mask hooks: torch.ao.pruning builds the mask from `_make_tensor_mask` (whole blocks) and
    `_make_block_mask` (elements within blocks). A subclass that overrides either is honoured: its mask
    is built through the hooks, composed as torch.ao.pruning composes them. Otherwise the hooks are not
    called and one fused op computes the same mask. accelerate_torch_ao() follows the same policy.

    The mask is sparsity_ext.ops.block_norm_mask (docs/design.md, "Mask semantics"): blocks tile the weight from the top-left, edge blocks are partial and scored by the
    mean over their valid elements; fp16/bf16 weights are scored in fp32.

    Args:
        sparsity_level: fraction of blocks masked; values outside [0, 1] are clamped, as torch.ao.pruning
            does (so a scheduler such as LambdaSL may overshoot 1).
        sparse_block_shape: (block rows, block cols) in the weight's 2-D layout: for nn.Linear rows are
            output and cols input features; 4-D conv weights use the layout of `as_matrix`.
        zeros_per_block: elements zeroed in each masked block (default: the whole block); (1, 4) with
            zeros_per_block=2 and sparsity_level=1 is 2:4.
        norm: 1 (|w|), 2 (w*w, default) or a callable mapping the weight to per-element scores (the
            scores then rank as they are).
    All four are defaults; each config entry given to `prepare` may override them for its tensor.

    The mask's dtype after a step is torch.ao.pruning's: unchanged where everything is kept or zeroed,
    bool when zeros_per_block is smaller than the block, else the default float dtype.

    Differences from torch.ao.pruning (README, "Differences from torch.ao.pruning"): where it crashes
    or returns a mask of the wrong shape, this class follows the mask contract instead: partial edge
    blocks with zeros_per_block < block size, sparsity_level 1 with partial blocks, blocks taller than
    the weight, 1-D weights (one row), and conv weights. fp16/bf16 weights are scored in fp32 and their
    float masks keep the weight's dtype. Weights of other dtypes (e.g. int64, which torch.ao.pruning's
    step turns float32 so that squash_mask then fails) raise TypeError at prepare(). zeros_per_block
    outside [0, block size] raises before any mask changes.
    """

    def __init__(self, sparsity_level: float = 0.5, sparse_block_shape: tuple[int, int] = (1, 4),
                 zeros_per_block: int | None = None, norm: Callable | int | None = None):
        if zeros_per_block is None:
            zeros_per_block = math.prod(sparse_block_shape)
        if norm is None:
            norm = 2
        if callable(norm):
            self.norm_fn = norm
        elif norm == 1:
            self.norm_fn = _l1_norm
        elif norm == 2:
            self.norm_fn = _l2_norm
        else:
            raise NotImplementedError(f"L-{norm} is not yet implemented; norm must be 1, 2 or a callable")
        super().__init__(defaults={"sparsity_level": sparsity_level, "sparse_block_shape": sparse_block_shape,
                                   "zeros_per_block": zeros_per_block})

    def __getstate__(self):
        # norm_fn is pickled too, so an unpickled sparsifier can step (a custom norm must be picklable).
        return {**super().__getstate__(), "norm_fn": self.norm_fn}

    def _validate_group(self, group) -> None:
        where = f"{type(self).__name__} ({group['tensor_fqn']})"
        _check_args(group["sparsity_level"], group["sparse_block_shape"], group["zeros_per_block"], where)
        if len(checked_shape(group["module"], group["tensor_name"], where)) == 0:
            raise ValueError(f"{where}: cannot sparsify a 0-d tensor")
        module, tensor_name = group["module"], group["tensor_name"]
        tensor = (module.parametrizations[tensor_name].original if parametrize.is_parametrized(module, tensor_name)
                  else getattr(module, tensor_name))
        if tensor.dtype not in checks.FLOAT_DTYPES:
            raise TypeError(f"{where}: the tensor is {tensor.dtype}; WeightNormSparsifier takes "
                            f"{[str(d) for d in checks.FLOAT_DTYPES]}")

    def _scores_and_norm(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(data, norm code) to hand to ops: the weight with a built-in norm, else norm_fn(weight) ranked as is."""
        if self.norm_fn is _l1_norm:
            return weight, 1
        if self.norm_fn is _l2_norm:
            return weight, 2
        scores = self.norm_fn(weight)
        if not isinstance(scores, torch.Tensor) or scores.shape != weight.shape:
            raise ValueError(f"{type(self).__name__}: norm_fn must return a tensor of the weight's shape "
                             f"{tuple(weight.shape)}, got {getattr(scores, 'shape', type(scores).__name__)}")
        return scores, 0

    def update_mask(self, module, tensor_name, sparsity_level, sparse_block_shape, zeros_per_block, **kwargs):
        """Computes the mask of module.<tensor_name> and writes it into its mask (the object stays; its dtype
        becomes torch.ao.pruning's, see mask_dtype_after_step)."""
        where = type(self).__name__
        level, block, zeros = _check_args(sparsity_level, sparse_block_shape, zeros_per_block, where)
        mask = mask_of(module, tensor_name, where)
        with torch.no_grad():
            if level == 0 or zeros == 0:
                mask.fill_(1)
                return
            if level == 1 and zeros == block[0] * block[1]:
                mask.fill_(0)
                return
            weight_dtype = module.parametrizations[tensor_name].original.dtype
            dtype = mask_dtype_after_step(weight_dtype, zeros, block[0] * block[1])
            if hooks_overridden(self, WeightNormSparsifier, MASK_HOOKS):
                keep = self._mask_from_hooks(getattr(module, tensor_name), level, block, zeros)
                _store(mask, keep, keep.dtype if keep.dtype == torch.bool else dtype)
                return
            original = fused_update_operand(module, tensor_name, FakeSparsity, (dtype,))
            if original is not None and mask.dtype == dtype and self.norm_fn in (_l1_norm, _l2_norm):
                ops.block_norm_mask_update_(original, mask, level, block, zeros, 1 if self.norm_fn is _l1_norm else 2)
                return
            weight = getattr(module, tensor_name)
            if weight.dim() == 0:
                raise ValueError(f"{where}: cannot sparsify a 0-d tensor")
            data, norm = self._scores_and_norm(weight)
            keep = ops.block_norm_mask(as_matrix(data), level, block, zeros, norm)
            _store(mask, from_matrix(keep, weight.shape), dtype)

    def _mask_from_hooks(self, weight: torch.Tensor, level: float, block: tuple[int, int], zeros: int):
        """The mask as torch.ao.pruning composes it from the two hooks: the tensor-level mask of whole blocks,
        or'ed with the block-level mask when zeros_per_block is smaller than the block."""
        scores = self.norm_fn(weight)
        keep = self._make_tensor_mask(data=scores, input_shape=scores.shape, sparsity_level=level,
                                      sparse_block_shape=block)
        if zeros != block[0] * block[1]:
            keep = torch.logical_or(keep, self._make_block_mask(data=scores, sparse_block_shape=block,
                                                                zeros_per_block=zeros))
        return keep

    def _make_tensor_mask(self, data, input_shape, sparsity_level, sparse_block_shape, mask=None):
        """Float mask (1 keep, 0 drop) that drops the sparsity_level fraction of whole blocks of `data`
        (already a norm) with the smallest mean. A mask hook: see the class docstring."""
        return _float_mask(ops.block_norm_mask(data, sparsity_level, sparse_block_shape, None, 0), mask)

    def _make_block_mask(self, data, sparse_block_shape, zeros_per_block, mask=None):
        """Float mask that drops the zeros_per_block smallest elements of every block of `data` (already a
        norm). A mask hook: see the class docstring."""
        return _float_mask(ops.block_norm_mask(data, 1.0, sparse_block_shape, zeros_per_block, 0), mask)


# torch.ao.pruning's WeightNormSparsifier builds its mask from these; a subclass may override them.
MASK_HOOKS = ("_make_tensor_mask", "_make_block_mask")


def hooks_overridden(obj, owner: type, names: Sequence[str]) -> bool:
    """Whether obj's class overrides any of owner's methods `names` (the mask hooks policy: an override is
    honoured, by building the mask through the hooks as torch.ao.pruning does, instead of the fused kernels)."""
    cls = type(obj)
    return any(getattr(cls, name, None) is not owner.__dict__[name] for name in names)


def fused_update_operand(module, tensor_name: str, fake_sparsity_type: type,
                         mask_dtypes: Sequence[torch.dtype]) -> torch.Tensor | None:
    """The original tensor when ops.block_norm_mask_update_ can compute module.<tensor_name>'s new mask from it:
    the weight is exactly mask * original (one parametrization, of fake_sparsity_type), 1-D or 2-D (the
    op's layouts), and the mask's dtype is one of mask_dtypes or the original's. Else None (the caller scores
    the parametrized weight)."""
    parametrizations = module.parametrizations[tensor_name]
    original = parametrizations.original
    if (len(parametrizations) != 1 or type(parametrizations[0]) is not fake_sparsity_type
            or original.dim() not in (1, 2)
            or parametrizations[0].mask.dtype not in (*mask_dtypes, original.dtype)):
        return None
    return original.detach()
