"""The CUDA kernels and their host flow, run on the CPU under an emulation of the CUDA execution model
(tests/cuda_emulation), against the reference. This checks their logic on machines without a GPU:
block-wide scans, warp collectives, the radix select state machine, tie splitting across tiles, chunk
ownership of packed bytes, vector paths. It does not check timing or the hardware memory model; the
cuda-marked tests of test_ops_parity.py run the real kernels on a GPU."""
import os
import random

import pytest
import torch

from sparsity_ext import reference
from test_ops_parity import _bits, _data, _layout, assert_bytes_of_product, signed_special_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def emulated():
    from torch.utils import cpp_extension
    build_dir = os.path.join(ROOT, "build", "cuda_emulation")
    os.makedirs(build_dir, exist_ok=True)
    return cpp_extension.load(
        name="sparsity_ext_cuda_emulation",
        sources=[os.path.join(ROOT, "tests", "cuda_emulation", "emulated_ops.cpp")],
        # the emulation's cuda_runtime.h and cuda/launch.h come before csrc's
        extra_include_paths=[os.path.join(ROOT, "tests", "cuda_emulation"), os.path.join(ROOT, "csrc")],
        extra_cflags=["-std=c++20", "-O1", "-ffp-contract=off"],
        build_directory=build_dir,
    )


BLOCKS = [(1, 1), (1, 4), (1, 8), (2, 2), (3, 5), (4, 4), (1, 33), (8, 8), (40, 3), (1, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 37), (7, 13), (33, 65), (64, 128), (3, 256), (0, 8)], ids=str)
def test_emulated_block_masks_match_reference(emulated, dtype, shape):
    rng = random.Random(shape[0] * 1000 + shape[1])
    for kind in ("ties", "tie_free"):
        data = _data(shape, dtype, "cpu", seed=shape[0] + shape[1], kind=kind)
        for _ in range(8):
            block = rng.choice(BLOCKS)
            size = block[0] * block[1]
            zeros = rng.choice(sorted({0, 1, size // 2, max(size - 1, 0), size}))
            level, norm = rng.choice([0.0, 0.3, 0.5, 0.8, 1.0]), rng.choice([0, 1, 2])
            packed, apply = rng.random() < 0.5, rng.random() < 0.5
            layout = rng.choice(["contiguous", "column_slice", "transposed"]) if data.numel() else "contiguous"
            expected_data = data.clone()
            if apply:
                expected = reference.block_norm_mask_apply_(expected_data, level, block, zeros, norm, packed)
            else:
                expected = reference.block_norm_mask(data, level, block, zeros, norm, packed)
            x = _layout(data.clone(), layout)
            got = emulated.block_mask(x, level, list(block), zeros, norm, packed, apply, rng.choice([1, 3]))
            config = (kind, block, zeros, level, norm, packed, apply, layout)
            assert torch.equal(got, expected), config
            assert torch.equal(_bits(x.contiguous()), _bits(expected_data)), config


@pytest.mark.parametrize("shape,block,fill", [((1, 20_000), (1, 1), -2.0), ((300, 300), (3, 3), float("nan"))],
                         ids=str)
def test_emulated_ties_split_across_tiles(emulated, shape, block, fill):
    data = torch.full(shape, fill)
    data[-1, -1] = 5.0
    for level in (0.5, 0.999):
        for zeros in (block[0] * block[1], 1):
            got = emulated.block_mask(data, level, list(block), zeros, 2, True, False, 3)
            assert torch.equal(got, reference.block_norm_mask(data, level, block, zeros, 2, True)), (level, zeros)


def test_emulated_apply_ranks_straddling_blocks_before_zeroing(emulated):
    data = _data((1, 3000), torch.float32, "cpu", seed=4, kind="tie_free")
    for packed in (False, True):
        expected_data = data.clone()
        expected = reference.block_norm_mask_apply_(expected_data, 1.0, (1, 6), 3, 0, packed)
        x = data.clone()
        assert torch.equal(emulated.block_mask(x, 1.0, [1, 6], 3, 0, packed, True, 3), expected)
        assert torch.equal(x, expected_data)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_emulated_apply_zeroing_pass_of_one_row_blocks(emulated, dtype):
    """One-row ranked blocks that miss the vector path ((1,4)/(1,8) with cols % 32 != 0 or misaligned rows,
    any other width) are zeroed by a second pass over the finished mask: bool and packed, strided rows."""
    data = _data((9, 70), dtype, "cpu", seed=21, kind="ties")
    cases = [((1, 4), 1, "contiguous"), ((1, 4), 2, "transposed"), ((1, 8), 3, "column_slice"),
             ((1, 3), 1, "column_slice"), ((1, 16), 7, "transposed"), ((1, 32), 16, "contiguous")]
    for i, (block, zeros, layout) in enumerate(cases):
        for packed in (False, True):
            level, norm = (0.5, 1.0)[i % 2], i % 3
            expected_data = data.clone()
            expected = reference.block_norm_mask_apply_(expected_data, level, block, zeros, norm, packed)
            x = _layout(data.clone(), layout)
            got = emulated.block_mask(x, level, list(block), zeros, norm, packed, True, 1 + i % 3)
            config = (block, zeros, layout, packed)
            assert torch.equal(got, expected), config
            assert torch.equal(_bits(x.contiguous()), _bits(expected_data)), config


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_emulated_whole_block_masks_by_warp_spans(emulated, dtype):
    """Whole blocks (zeros_per_block == block size) go through whole_block_mask_kernel: a warp per 1024 flat
    elements, a lane per element, mask words by ballot. Widths that are not multiples of 32, rows shorter than
    a 32-element step (several row ends per step), blocks taller than one row and wider than 32, strided rows,
    a partial last span and word, and more spans than warps (3 CTAs x 8 warps take several turns)."""
    cases = [((260, 100), (1, 4), "contiguous", 0.8), ((97, 13), (3, 5), "column_slice", 0.5),
             ((40, 70), (2, 33), "transposed", 0.3), ((1, 30001), (1, 8), "contiguous", 0.999),
             ((500, 7), (4, 1), "column_slice", 1.0)]
    for i, (shape, block, layout, level) in enumerate(cases):
        data = _data(shape, dtype, "cpu", seed=30 + i, kind="ties")
        for packed in (False, True):
            for apply in (False, True):
                zeros, norm = block[0] * block[1], i % 3
                expected_data = data.clone()
                if apply:
                    expected = reference.block_norm_mask_apply_(expected_data, level, block, zeros, norm, packed)
                else:
                    expected = reference.block_norm_mask(data, level, block, zeros, norm, packed)
                x = _layout(data.clone(), layout)
                got = emulated.block_mask(x, level, list(block), zeros, norm, packed, apply, 3)
                config = (shape, block, layout, packed, apply)
                assert torch.equal(got, expected), config
                # NaN bytes compared as NaN only: the reference's fp32 multiply (torch's CPU kernel) gives
                # another NaN payload in its tail loop than in its vector body
                nan = expected_data.isnan()
                assert torch.equal(x.isnan(), nan), config
                assert torch.equal(_bits(x.contiguous())[~nan], _bits(expected_data)[~nan]), config


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_emulated_select_threshold(emulated, dtype):
    for n, kind in [(1, "ties"), (17, "ties"), (1000, "ties"), (3001, "tie_free")]:
        values = _data((n,), dtype, "cpu", seed=n, kind=kind)
        for k in sorted(k for k in {1, n // 3 + 1, n} if 1 <= k <= n):
            value, tie_rank = emulated.select_threshold(values, k)
            expected_value, expected_rank = reference.select_threshold(values, k)
            assert value.dtype == dtype and int(tie_rank) == int(expected_rank), (n, k)
            assert (value.isnan() and expected_value.isnan()) or torch.equal(_bits(value), _bits(expected_value)), (n, k)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 11), (64, 33), (100, 77)], ids=str)
def test_emulated_mask_format_ops(emulated, shape):
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(shape, generator=g) < 0.6
    packed = emulated.pack_mask(mask)
    assert torch.equal(packed, reference.pack_mask(mask))
    assert torch.equal(emulated.unpack_mask(packed, mask.numel()).view(shape), mask)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        data = torch.randn(shape, generator=g).to(dtype)
        expected = reference.apply_mask_(data.clone(), mask)
        with_bool, with_bits = data.clone(), data.clone()
        emulated.apply_mask_(with_bool, mask)
        emulated.apply_mask_(with_bits, packed)
        assert torch.equal(with_bool, expected) and torch.equal(with_bits, expected), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_emulated_zeroing_writes_the_bytes_of_data_times_mask(emulated, dtype):
    """apply_mask_'s group kernel (aligned, 8 elements per thread) and element kernel (misaligned), and
    block_norm_mask_apply_'s in-kernel and second-pass zeroing, write x * 0: -0.0 for negatives, NaN for inf."""
    numel = 8 * 300 + 5
    source = signed_special_data((numel + 1,), dtype, "cpu", seed=3)
    keep = torch.rand(numel, generator=torch.Generator().manual_seed(4)) < 0.5
    for offset in (0, 1):  # data_ptr aligned to 16 bytes, then one element past it
        data = source[offset:offset + numel]
        for mask in (keep, emulated.pack_mask(keep)):
            got = source.clone()[offset:offset + numel]
            emulated.apply_mask_(got, mask)
            assert_bytes_of_product(got, data, keep, (offset, mask.dtype))
    if dtype == torch.float64:
        return
    matrix = signed_special_data((9, 64), dtype, "cpu", seed=8)
    for block, zeros, norm in [((1, 4), 4, 0), ((2, 3), 6, 1), ((1, 4), 2, 0), ((1, 6), 3, 0), ((3, 5), 4, 2)]:
        for packed in (False, True):
            got = matrix.clone()
            mask = emulated.block_mask(got, 0.6, list(block), zeros, norm, packed, True, 3)
            kept = emulated.unpack_mask(mask, matrix.numel()).view(matrix.shape) if packed else mask
            assert_bytes_of_product(got, matrix, kept, (block, zeros, packed))
