"""Named composites: an op built from other ops of the same backend, registered for each backend that has
no kernel of its own for it (the CUDA and Triton backends, today, for the four ops below).

A backend calls `register_for(backend, ...)` after registering its kernels; every composite whose op the
backend lacks, and whose ingredients it has, becomes that backend's implementation of the op, under its
name (sparsity_ext.info() shows it). The composites call the ingredients of their own backend directly,
so a pinned backend stays pinned. This module sits below sparsity_ext.ops: it takes validated arguments.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from . import _backend, reference

__all__ = ["COMPOSITES", "register_for", "mask_of_selected_blocks"]

Run = Callable[..., object]  # run(op, *args): the op's implementation on one backend


def _keep_of_selected_blocks(run: Run, data: torch.Tensor, selected: torch.Tensor | None, block_shape,
                             zeros_per_block: int, norm: int) -> torch.Tensor:
    rows, width = data.shape
    if zeros_per_block == block_shape[0] * block_shape[1]:
        keep = torch.zeros((rows, width), dtype=torch.bool, device=data.device)
    else:  # every block selected: the zeros_per_block smallest elements of each one dropped
        keep = run("block_norm_mask", data, 1.0, block_shape, zeros_per_block, norm, False)
    if selected is not None:
        keep |= ~reference.expand_block_flags(selected, (rows, width), tuple(block_shape))
    return keep


def mask_of_selected_blocks(data: torch.Tensor, selected: torch.Tensor | None, block_shape, zeros_per_block: int,
                            norm: int) -> torch.Tensor:
    """bool keep flags of 2-D data given which of its blocks are selected (row-major over its blocks; None:
    all): the zeros_per_block smallest elements of each selected block are dropped, ranked by block_norm_mask
    at level 1 on the backend in force (the whole block when zeros_per_block is its size)."""
    return _keep_of_selected_blocks(lambda op, *args: _backend.call(op, args[0], *args), data, selected,
                                    block_shape, zeros_per_block, norm)


def _select_by_level_one_mask(run: Run):
    def block_norm_mask_select(data, scores, threshold, ties, block_shape, zeros_per_block, norm, packed=False):
        selected = reference.blocks_at_threshold(scores, threshold, ties)
        keep = _keep_of_selected_blocks(run, data, selected, block_shape, zeros_per_block, norm)
        return run("pack_mask", keep) if packed else keep
    return block_norm_mask_select


def _into_by_copy(run: Run):
    def block_norm_mask_into_(data, mask, sparsity_level, block_shape, zeros_per_block, norm):
        packed = mask.dtype == torch.uint8
        mask.copy_(run("block_norm_mask", data, sparsity_level, block_shape, zeros_per_block, norm, packed)
                   .view(mask.shape))
    return block_norm_mask_into_


def _update_by_product(run: Run):
    def block_norm_mask_update_(data, mask, sparsity_level, block_shape, zeros_per_block, norm):
        # the masked weight is materialized, as the parametrization's forward would
        mask.copy_(run("block_norm_mask", mask * data, sparsity_level, block_shape, zeros_per_block, norm, False))
    return block_norm_mask_update_


def _scores_by_pooling(run: Run):
    return reference.block_scores  # avg_pool2d over the element norms: torch's own kernels on any device


@dataclasses.dataclass(frozen=True)
class Composite:
    op: str
    description: str
    needs: tuple[str, ...]            # ops of the same backend it calls
    build: Callable[[Run], Callable]  # run -> the implementation


COMPOSITES = (
    Composite("block_norm_mask_select", "block_norm_mask at level 1, blocks above the threshold kept",
              ("block_norm_mask", "pack_mask"), _select_by_level_one_mask),
    Composite("block_norm_mask_into_", "block_norm_mask, copied into the mask", ("block_norm_mask",), _into_by_copy),
    Composite("block_norm_mask_update_", "block_norm_mask of mask * data, copied into the mask",
              ("block_norm_mask",), _update_by_product),
    Composite("block_scores", "avg_pool2d of the element norms (torch ops)", (), _scores_by_pooling),
)


def register_for(backend: str, devices: tuple[str, ...], available: bool, unavailable_reason: str = "") -> None:
    """Give `backend` each composite whose op it has no kernel for and whose ingredients it has; call it after
    registering the backend's kernels (again whenever they are re-registered), with the backend's availability."""
    def run(op, *args):
        return _backend.implementation(op, backend).fn(*args)

    for composite in COMPOSITES:
        own = _backend.implementation(composite.op, backend)
        if own is not None and own.composite is None:
            continue  # the backend has a kernel (built or not) for it
        if any(_backend.implementation(op, backend) is None for op in composite.needs):
            continue
        _backend.register(composite.op, backend, composite.build(run), devices=devices,
                          dtypes=_backend.KERNEL_DTYPES[composite.op], available=available,
                          unavailable_reason=unavailable_reason, composite=composite.description)
