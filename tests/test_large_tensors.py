"""Tensors past 2**31 elements (int64 indexing) on every compiled backend: a bf16 table of 16,777,300 x 128
(2,147,494,400 elements, 4 GiB) whose only low-norm blocks are its last rows, so a wrapped 32-bit index
shows up as a mask in the wrong place.

Opt-in (about 12 GiB of memory and a minute on a CPU): SPARSITY_EXT_LARGE_TESTS=1. scripts/gpu_run.sh sets it.
"""
import os

import pytest
import torch

import sparsity_ext
from sparsity_ext import ops, reference
from sparsity_ext.data_sparsifier import DataNormSparsifier

from conftest import HAS_CUDA, backend_available

ROWS, COLS, LOW_ROWS = 16_777_300, 128, 100

pytestmark = pytest.mark.skipif(os.environ.get("SPARSITY_EXT_LARGE_TESTS") != "1",
                                reason="opt-in: SPARSITY_EXT_LARGE_TESTS=1 (12 GiB of memory)")

CASES = [("cpu", "cpu")] + ([("cuda", "cuda"), ("cuda", "triton")] if HAS_CUDA else [])


@pytest.fixture(scope="module")
def tables():
    """{device: the table}; built once per device (4 GiB each)."""
    built = {}

    def table(device):
        if device not in built:
            data = torch.ones(ROWS, COLS, dtype=torch.bfloat16, device=device)
            data[-LOW_ROWS:] = 0.5
            built[device] = data
        return built[device]
    return table


def _level() -> float:
    """The level that selects exactly the blocks of the last LOW_ROWS rows ((1, 4) blocks)."""
    num_blocks, k = ROWS * COLS // 4, LOW_ROWS * COLS // 4
    level = k / num_blocks
    assert reference.num_selected_blocks(level, num_blocks) == k
    return level


def _assert_drops_last_rows(keep: torch.Tensor) -> None:
    assert keep.shape == (ROWS, COLS) and keep.numel() > 2**31
    assert not keep[-LOW_ROWS:].any() and keep[:-LOW_ROWS].all()


@pytest.mark.parametrize("device,backend", CASES)
def test_masks_past_2_31_elements(tables, device, backend):
    if not backend_available(backend, device):
        pytest.skip(f"backend {backend} is not available for {device}")
    data, level = tables(device), _level()
    with sparsity_ext.use_backend(backend):
        _assert_drops_last_rows(ops.block_norm_mask(data, level, (1, 4), 4, 1))
        _assert_drops_last_rows(ops.unpack_mask(ops.block_norm_mask(data, level, (1, 4), 4, 1, packed=True),
                                                data.shape))
        if backend_available(backend, device, "block_norm_mask_update_", torch.bfloat16):  # the cpu backend's (GPUs have none)
            keep = torch.ones(data.shape, dtype=torch.bool, device=device)
            ops.block_norm_mask_update_(data, keep, level, (1, 4), 4, 1)
            _assert_drops_last_rows(keep)
            del keep
        sparsifier = DataNormSparsifier(sparsity_level=level, mask_dtype="packed")
        sparsifier.add_data("table", data)
        sparsifier.step()
        _assert_drops_last_rows(sparsifier.get_mask("table", as_bool=True))
        del sparsifier
        pruned = data.clone()
        ops.block_norm_mask_apply_(pruned, level, (1, 4), 4, 1)
        assert (pruned[-LOW_ROWS:] == 0).all() and (pruned[:-LOW_ROWS] == 1).all()
