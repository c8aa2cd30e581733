"""to_sparse_semi_structured and convert: torch's SparseSemiStructuredTensor built from sparsify_24_pack."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.sparse import (SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT,
                          SparseSemiStructuredTensorCUTLASS)

from .. import ops
from ._layout import LAYOUTS

# Linear weights convert() accepts: int8 packs too (to_sparse_semi_structured), but an nn.Linear with int8
# weights has no forward.
LINEAR_DTYPES = (torch.float16, torch.bfloat16)


def to_sparse_semi_structured(weight: torch.Tensor) -> SparseSemiStructuredTensorCUTLASS:
    """2:4-prune `weight` and pack it as torch's SparseSemiStructuredTensorCUTLASS.

    The 2 largest |x| of every 4 consecutive elements of a row are kept (nm_mask(weight, 2, 4)); the
    values and metadata come from sparsity_ext.ops.sparsify_24_pack. On CUDA the result equals
    torch.sparse.to_sparse_semi_structured(pruned weight) with SparseSemiStructuredTensor._FORCE_CUTLASS
    set (torch's default subclass is the cuSPARSELt one, whose packed format is opaque). Unlike torch's
    function, the input need not be 2:4-sparse already: pruning is part of the step.

    GPUs: torch's CUTLASS matmul kernels for this subclass are built for compute capability 8.x (A100,
    RTX 30xx/40xx) only; elsewhere (e.g. an H100) its matmul raises, and convert() uses torch's cuSPARSELt
    subclass instead.

    CPU tensors: torch constructs the subclass on the CPU (values(), indices(), to_dense() work) but has no
    CPU kernel for its matmul (aten::_sparse_semi_structured_mm is CUDA-only), so torch.mm / F.linear on
    it raise torch's NotImplementedError. Use it on the CPU to inspect or check the packing; compute on CUDA.

    Args:
        weight: 2-D float16, bfloat16 or int8 tensor; rows a positive multiple of 32 and cols of 64
            (int8: 16 and 128). Not modified.
    Returns:
        the SparseSemiStructuredTensorCUTLASS of weight's shape (requires_grad as weight's).
    """
    values, meta = ops.sparsify_24_pack(weight.detach() if isinstance(weight, torch.Tensor) else weight)
    return SparseSemiStructuredTensorCUTLASS(weight.shape, packed=values, meta=meta, packed_t=None, meta_t=None,
                                             compressed_swizzled_bitmask=None, requires_grad=weight.requires_grad)


def is_24_sparse(tensor: torch.Tensor) -> bool:
    """Whether every 4 consecutive elements of each row of a 2-D tensor hold at most 2 nonzeros."""
    if tensor.dim() != 2 or tensor.shape[1] % 4:
        return False
    return bool(((tensor.reshape(tensor.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def _why_not_convertible(module: nn.Module) -> str | None:
    """None when module is an nn.Linear whose weight convert() can swap; else the reason it cannot."""
    if not isinstance(module, nn.Linear):
        return f"is a {type(module).__name__}, not an nn.Linear"
    if parametrize.is_parametrized(module, "weight"):
        return "still has a weight parametrization (call the sparsifier's squash_mask() first)"
    weight = module.weight
    if weight.dtype not in LINEAR_DTYPES:
        return (f"has {weight.dtype} weights; semi-structured Linear layers need float16 or bfloat16 "
                f"(convert the model with .half() or .to(torch.bfloat16) first)")
    row_multiple, col_multiple = LAYOUTS[weight.dtype][2]
    out_features, in_features = weight.shape
    if out_features % row_multiple or in_features % col_multiple:
        return (f"has weight shape {tuple(weight.shape)}; torch's semi-structured layout needs out_features a "
                f"multiple of {row_multiple} and in_features a multiple of {col_multiple}")
    if not is_24_sparse(weight):
        return ("is not 2:4-sparse (some 4 consecutive weights of a row hold more than 2 nonzeros); sparsify it "
                "first, e.g. WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), "
                "zeros_per_block=2), step() and squash_mask()")
    if not weight.is_cuda:
        return (f"is on {weight.device}; torch has no {weight.device.type} kernels for semi-structured matmul "
                f"(move the model to CUDA first)")
    major, minor = torch.cuda.get_device_capability(weight.device)
    if major < 8:
        return f"is on a GPU of compute capability {major}.{minor}; semi-structured matmul needs 8.0 or newer"
    if major != 8 and not torch.backends.cusparselt.is_available():
        return (f"is on a GPU of compute capability {major}.{minor}: torch's CUTLASS 2:4 matmul runs on 8.x only, "
                f"and this torch build has no cuSPARSELt")
    return None


def _inference_weight(weight: torch.Tensor) -> SparseSemiStructuredTensor:
    """The semi-structured weight convert() swaps in for a 2:4-sparse CUDA weight: ours (fused prune + pack,
    CUTLASS layout) where torch's CUTLASS matmul runs (compute capability 8.x), else torch's cuSPARSELt
    subclass (its compression of the weight, which is already 2:4-sparse)."""
    if torch.cuda.get_device_capability(weight.device)[0] == 8:
        return to_sparse_semi_structured(weight)
    return SparseSemiStructuredTensorCUSPARSELT.from_dense(weight)


def convert(model: nn.Module, fqns: Iterable[str] | None = None) -> nn.Module:
    """Swap the weights of 2:4-sparse nn.Linear layers for torch's semi-structured tensor, for inference.

    The step after a 2:4 sparsifier's squash_mask() (the counterpart of torch.ao's convert step): each
    chosen layer's weight becomes nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False),
    so its forward runs torch's sparse (CUTLASS) matmul; on GPUs other than compute capability 8.x (where
    torch's CUTLASS 2:4 kernels do not run, e.g. the H100) torch's cuSPARSELt subclass of the weight instead.
    Every chosen layer is checked first; if any cannot be converted, a ValueError lists each one with the
    reason (not a Linear, a parametrization left, dtype, shape, not 2:4-sparse, not on CUDA, a GPU neither
    kernel runs on) and the model is left unchanged. Layers already holding a semi-structured weight are
    left as they are, as are all modules not chosen.

    Args:
        model: the module whose layers to convert, in place.
        fqns: names (as in model.named_modules()) of the layers to convert; default: every nn.Linear.
    Returns:
        model.
    """
    named = dict(model.named_modules())
    if fqns is None:
        chosen = [name for name, module in named.items() if isinstance(module, nn.Linear)]
    else:
        chosen = [fqns] if isinstance(fqns, str) else list(fqns)
        unknown = [name for name in chosen if name not in named]
        if unknown:
            raise ValueError(f"convert: no module named {unknown} in the model")
    chosen = [name for name in chosen
              if not isinstance(getattr(named[name], "weight", None), SparseSemiStructuredTensor)]
    problems = [(name, _why_not_convertible(named[name])) for name in chosen]
    problems = [f"  {name or '<model>'}: {reason}" for name, reason in problems if reason is not None]
    if problems:
        raise ValueError("convert: cannot convert these layers to semi-structured (2:4) sparse weights "
                         "(nothing was changed):\n" + "\n".join(problems))
    for name in chosen:
        module = named[name]
        module.weight = nn.Parameter(_inference_weight(module.weight.detach()), requires_grad=False)
    return model
