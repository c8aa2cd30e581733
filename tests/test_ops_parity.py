"""Compiled kernels (C++ CPU, CUDA) against the pure-torch reference: masks, zeroed data, thresholds.

Every comparison is exact (torch.equal, or equal bit patterns for data that may hold NaN). The reference
itself is checked against torch.ao.pruning elsewhere; here each backend must reproduce it bit for bit,
ties, NaN, -0.0, partial blocks and strided inputs included.
"""
import random

import pytest
import torch

import sparsity_ext
from sparsity_ext import ops, reference
from conftest import HAS_CUDA, backend_available, cuda_only, tie_free

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (backend, device) pairs that run here; the CUDA ones only where a GPU and the CUDA kernels are.
BACKENDS = [pytest.param(name, device, id=f"{name}-{device}",
                         marks=[cuda_only] if device == "cuda" else [])
            for name, device in (("cpu", "cpu"), ("cuda", "cuda"))]
ALL_BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu")] + BACKENDS


def _require(backend: str, device: str) -> None:
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if not backend_available(backend, device):
        pytest.skip(f"backend {backend!r} is not built for {device}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns of a float tensor (so NaN payloads and the sign of zero compare exactly)."""
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def _data(shape, dtype, device, seed, kind):
    """Seeded test data. kind: 'tie_free', or 'ties' (few distinct values, with -0.0, +-inf and NaN)."""
    if kind == "tie_free":
        return tie_free(shape, dtype, device, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=g).to(torch.float32) * 0.5
    flat = x.view(-1)
    if flat.numel():
        u = torch.rand(flat.numel(), generator=g)
        flat[u < 0.10] = -0.0
        flat[(u >= 0.10) & (u < 0.14)] = float("nan")
        flat[(u >= 0.14) & (u < 0.16)] = float("inf")
        flat[(u >= 0.16) & (u < 0.18)] = -float("inf")
    return x.to(dtype=dtype, device=device)


# Layouts the kernels must read: contiguous, a column slice (row stride > cols), a transpose (copied).
def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return x
    if layout == "column_slice":
        wide = torch.zeros(x.shape[0], x.shape[1] + 5, dtype=x.dtype, device=x.device)
        wide[:, 2:2 + x.shape[1]] = x
        return wide[:, 2:2 + x.shape[1]]
    return x.t().contiguous().t()  # transposed storage


SHAPES = [(1, 1), (1, 37), (7, 13), (33, 65), (64, 128), (40, 96), (0, 8), (5, 0)]
BLOCKS = [(1, 1), (1, 4), (1, 8), (2, 2), (3, 5), (4, 4), (1, 33), (8, 8), (40, 3)]
LEVELS = [0.0, 0.3, 0.5, 0.8, 1.0]


def _configs(seed: int, count: int):
    """A seeded sample of (block_shape, zeros_per_block, sparsity_level, norm, packed)."""
    rng = random.Random(seed)
    all_configs = []
    for block in BLOCKS:
        size = block[0] * block[1]
        for zeros in sorted({0, 1, size // 2, max(size - 1, 0), size}):
            for level in LEVELS:
                for norm in (0, 1, 2):
                    all_configs.append((block, zeros, level, norm, rng.random() < 0.5))
    return rng.sample(all_configs, count)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["ties", "tie_free"])
def test_block_norm_mask_matches_reference(backend, device, dtype, shape, kind):
    _require(backend, device)
    data = _data(shape, dtype, device, seed=shape[0] * 1000 + shape[1] + (kind == "ties"), kind=kind)
    for block, zeros, level, norm, packed in _configs(seed=len(shape) + shape[0] * 7 + shape[1], count=80):
        expected = reference.block_norm_mask(data, level, block, zeros, norm, packed)
        with sparsity_ext.use_backend(backend):
            got = ops.block_norm_mask(data, level, block, zeros, norm, packed)
        assert got.dtype == expected.dtype and torch.equal(got, expected), (block, zeros, level, norm, packed)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_16_bit_value_scores_exactly(backend, device, dtype):
    """Each of the 65,536 bit patterns (subnormals, infinities, NaNs included) as a (1, 1) block: its score
    is the value itself in fp32 (the kernels convert 16-bit floats by hand), its L1/L2 norms as torch's."""
    _require(backend, device)
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).reshape(256, 256).to(device)
    for norm in (0, 1, 2):
        expected = reference.block_scores(x, (1, 1), norm)
        with sparsity_ext.use_backend(backend):
            got = ops.block_scores(x, (1, 1), norm)
        same = (got == expected) | (got.isnan() & expected.isnan())
        assert bool(same.all()), norm


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "column_slice"])
def test_block_scores_match_reference(backend, device, dtype, shape, layout):
    _require(backend, device)
    data = _layout(_data(shape, dtype, device, seed=shape[0] * 31 + shape[1], kind="ties"), layout)
    wide = _layout(torch.randn(shape, dtype=torch.float32, device=device) * torch.exp(
        torch.randn(shape, device=device) * 3), layout).to(dtype)  # wide range: summation order shows
    for x in (data, wide):
        for block in BLOCKS:
            for norm in (0, 1, 2):
                expected = reference.block_scores(x, block, norm)
                with sparsity_ext.use_backend(backend):
                    got = ops.block_scores(x, block, norm)
                # equal as values (the sign of a zero and NaN payloads do not rank, see order keys)
                same = (got == expected) | (got.isnan() & expected.isnan())
                assert got.dtype == torch.float32 and bool(same.all()), (block, norm)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [s for s in SHAPES if 0 not in s], ids=str)
@pytest.mark.parametrize("kind", ["ties", "tie_free"])
def test_block_norm_mask_select_splits_block_norm_mask(backend, device, dtype, shape, kind):
    """scores -> select_threshold -> block_norm_mask_select is block_norm_mask, also when the rows are cut in
    two at a block-row boundary and the second part gets the ties the first did not take."""
    _require(backend, device)
    data = _data(shape, dtype, device, seed=shape[0] * 1000 + shape[1] + 7, kind=kind)
    for block, zeros, level, norm, packed in _configs(seed=shape[0] * 3 + shape[1], count=40):
        num_blocks = -(-shape[0] // block[0]) * -(-shape[1] // block[1])
        k = reference.num_selected_blocks(level, num_blocks)
        if k == 0:
            continue
        expected = reference.block_norm_mask(data, level, block, zeros, norm)
        with sparsity_ext.use_backend(backend):
            scores = ops.block_scores(data, block, norm)
            threshold, ties = ops.select_threshold(scores, k)
            got = ops.block_norm_mask_select(data, scores, threshold, ties, block, zeros, norm, packed=packed)
            assert torch.equal(got, reference.pack_mask(expected) if packed else expected), (block, zeros, level)
            cut = (shape[0] // 2) // block[0] * block[0]
            first_blocks = cut // block[0] * -(-shape[1] // block[1])
            top, bottom = scores[:first_blocks], scores[first_blocks:]
            value = threshold.item()
            taken = int((top.isnan() if value != value else top == value).sum())
            parts = [ops.block_norm_mask_select(data[:cut], top, value, min(int(ties), taken), block, zeros, norm),
                     ops.block_norm_mask_select(data[cut:], bottom, value, max(0, int(ties) - taken), block, zeros,
                                                norm)]
        assert torch.equal(torch.cat(parts), expected), (block, zeros, level, norm)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 37), (7, 13), (33, 65), (36_000, 64)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided_mask"])
def test_block_norm_mask_into_writes_block_norm_mask(backend, device, dtype, shape, layout):
    """The given mask (bool, or packed bits) ends up equal to block_norm_mask's, whatever it held; the packed
    mask is the kernel's own output buffer, a strided bool mask is written through a contiguous copy."""
    _require(backend, device)
    data = _data(shape, dtype, device, seed=shape[0] + 3 * shape[1], kind="tie_free" if shape[0] > 1000 else "ties")
    configs = _configs(seed=shape[1], count=12) if shape[0] < 1000 else \
        [((1, 4), 4, 0.8, 1, True), ((1, 4), 2, 0.5, 2, False), ((1, 8), 8, 0.3, 1, False)]
    for block, zeros, level, norm, packed in configs:
        expected = reference.block_norm_mask(data, level, block, zeros, norm, packed)
        if packed:
            mask = torch.zeros(expected.shape, dtype=torch.uint8, device=device)
        elif layout == "strided_mask":
            mask = torch.zeros((shape[1], shape[0]), dtype=torch.bool, device=device).t()
        else:
            mask = torch.ones(shape, dtype=torch.bool, device=device)
        with sparsity_ext.use_backend(backend):
            returned = ops.block_norm_mask_into_(data, mask, level, block, zeros, norm)
        assert returned is mask and torch.equal(mask, expected), (block, zeros, level, norm, packed)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_dtype", ["bool", "float32", "data"])
@pytest.mark.parametrize("shape", [(1, 37), (7, 13), (33, 65), (300, 41)], ids=str)
def test_block_norm_mask_update_scores_the_masked_data(backend, device, dtype, mask_dtype, shape):
    """The mask is rewritten to block_norm_mask(mask * data): scored as torch's product (in its promoted dtype),
    ties from masked-out blocks included, over tiles of rows (300 x 41 spans several)."""
    _require(backend, device)
    data = _data(shape, dtype, device, seed=shape[0] + 5 * shape[1], kind="ties")
    g = torch.Generator().manual_seed(shape[0])
    keep = (torch.rand(shape, generator=g) < 0.8).to(device)
    mask_type = {"bool": torch.bool, "float32": torch.float32, "data": dtype}[mask_dtype]
    for block, zeros, level, norm, _ in _configs(seed=shape[0] * 5 + shape[1], count=30):
        expected = keep.to(mask_type)
        reference.block_norm_mask_update_(data, expected, level, block, zeros, norm)
        got = keep.to(mask_type)
        with sparsity_ext.use_backend(backend):
            ops.block_norm_mask_update_(data, got, level, block, zeros, norm)
        assert got.dtype == mask_type and torch.equal(got, expected), (block, zeros, level, norm)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "column_slice", "transposed"])
@pytest.mark.parametrize("shape", [(7, 13), (33, 64), (64, 96)], ids=str)
def test_block_norm_mask_apply_matches_reference(backend, device, dtype, layout, shape):
    _require(backend, device)
    base = _data(shape, dtype, device, seed=3, kind="ties")
    for block, zeros, level, norm, packed in _configs(seed=11, count=30):
        expected_data = base.clone()
        expected = reference.block_norm_mask_apply_(expected_data, level, block, zeros, norm, packed)
        data = _layout(base.clone(), layout)
        with sparsity_ext.use_backend(backend):
            got = ops.block_norm_mask_apply_(data, level, block, zeros, norm, packed)
            unchanged = ops.block_norm_mask(_layout(base.clone(), layout), level, block, zeros, norm, packed)
        config = (block, zeros, level, norm, packed)
        assert torch.equal(got, expected), config
        assert torch.equal(unchanged, expected), config
        assert torch.equal(_bits(data.contiguous()), _bits(expected_data)), config


_INT_VIEWS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
              torch.bfloat16: torch.int16}


def assert_bytes_of_product(got: torch.Tensor, data: torch.Tensor, keep: torch.Tensor, config=None) -> None:
    """got (data zeroed in place) holds the bytes of torch's data * keep: -0.0 where a negative was dropped, NaN
    where an inf or NaN was. bfloat16 NaNs compare as NaN only: torch's own bf16 multiply writes 0xFFFF in its
    CPU vector body and 0x7FC0 in its tail (reference.times_zero)."""
    product = data * keep
    assert product.dtype == got.dtype
    got_bits, product_bits = got.contiguous().view(_INT_VIEWS[got.dtype]), product.view(_INT_VIEWS[got.dtype])
    if got.dtype == torch.bfloat16:
        assert torch.equal(got.isnan(), product.isnan()), config
        both = ~product.isnan()
        assert torch.equal(got_bits[both], product_bits[both]), config
    else:
        assert torch.equal(got_bits, product_bits), config
    if got.dtype != torch.bfloat16:  # the case torch.ao.pruning users see: a zeroed negative weight is -0.0
        negative_dropped = (data < 0) & ~keep
        assert bool((got[negative_dropped].view(_INT_VIEWS[got.dtype]) < 0).all()), config


def signed_special_data(shape, dtype, device, seed):
    """Negatives, +-0.0, +-inf and NaN among random values, for the zeroing tests."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    u = torch.rand(shape, generator=g)
    x[u < 0.05] = float("nan")
    x[(u >= 0.05) & (u < 0.10)] = float("inf")
    x[(u >= 0.10) & (u < 0.15)] = -float("inf")
    x[(u >= 0.15) & (u < 0.20)] = -0.0
    return x.to(dtype=dtype, device=device)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("shape", [(1, 5), (7, 13), (33, 64), (129, 67)], ids=str)
def test_apply_mask_writes_the_bytes_of_data_times_mask(backend, device, dtype, shape):
    _require(backend, device)
    if not backend_available(backend, device, "apply_mask_", dtype):
        pytest.skip(f"backend {backend!r} does not take {dtype} for apply_mask_")
    data = signed_special_data(shape, dtype, device, seed=shape[0])
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(5)).to(device) < 0.5
    for mask in (keep, ops.pack_mask(keep)):
        got = data.clone()
        with sparsity_ext.use_backend(backend):
            ops.apply_mask_(got, mask)
        assert_bytes_of_product(got, data, keep, (mask.dtype,))
    # a misaligned, strided view: the kernels' fallback paths
    wide = torch.zeros(shape[0], shape[1] + 1, dtype=dtype, device=device)
    wide[:, 1:] = data
    with sparsity_ext.use_backend(backend):
        ops.apply_mask_(wide[:, 1:], keep)
    assert_bytes_of_product(wide[:, 1:], data, keep, "strided")


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "column_slice"])
def test_block_norm_mask_apply_writes_the_bytes_of_data_times_mask(backend, device, dtype, layout):
    _require(backend, device)
    data = signed_special_data((33, 64), dtype, device, seed=7)
    # norm 0 ranks raw values, so negatives (and -inf) are the ones dropped; whole blocks and ranked elements
    for block, zeros, level, norm in [((1, 4), 4, 0.5, 0), ((2, 2), 4, 0.8, 1), ((1, 4), 2, 1.0, 0),
                                      ((1, 8), 3, 0.6, 0), ((3, 5), 7, 0.5, 2)]:
        for packed in (False, True):
            got = _layout(data.clone(), layout)
            with sparsity_ext.use_backend(backend):
                mask = ops.block_norm_mask_apply_(got, level, block, zeros, norm, packed)
            keep = ops.unpack_mask(mask, data.shape) if packed else mask
            assert_bytes_of_product(got, data, keep, (block, zeros, level, norm, packed))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("shape,block", [((1, 10_000), (1, 6)), ((300, 301), (1, 6)), ((257, 1030), (1, 4)),
                                         ((2, 40_000), (1, 31))], ids=str)
def test_apply_ranks_blocks_that_straddle_work_boundaries(backend, device, packed, shape, block):
    """Blocks cut by a task / tile / thread boundary are ranked on the original data, zeroed after."""
    _require(backend, device)
    # norm 0 ranks raw values: a zeroed element would rank differently from its original value
    base = _data(shape, torch.float32, device, seed=9, kind="tie_free")
    for level, zeros, norm in [(1.0, block[1] // 2, 0), (0.6, 1, 0), (1.0, block[1] - 1, 1)]:
        expected_data = base.clone()
        expected = reference.block_norm_mask_apply_(expected_data, level, block, zeros, norm, packed)
        data = base.clone()
        with sparsity_ext.use_backend(backend):
            got = ops.block_norm_mask_apply_(data, level, block, zeros, norm, packed)
        assert torch.equal(got, expected), (level, zeros, norm)
        assert torch.equal(data, expected_data), (level, zeros, norm)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37,), (3, 30), (64, 128), (2, 3, 16), (1, 256), (0, 4)], ids=str)
def test_nm_mask_matches_reference(backend, device, dtype, shape):
    _require(backend, device)
    data = _data(shape, dtype, device, seed=5, kind="ties")
    rows = data.reshape(-1, shape[-1])
    for n, m in [(2, 4), (1, 4), (4, 8), (0, 4), (4, 4), (3, 5), (2, 64), (1, 1)]:
        expected = reference.nm_mask(rows, n, m).view(shape)
        with sparsity_ext.use_backend(backend):
            got = ops.nm_mask(data, n, m)
        assert torch.equal(got, expected), (n, m)


def _brute_force_tie_rank(values: torch.Tensor, kth: torch.Tensor, k: int) -> int:
    if kth.isnan():
        return k - int((~values.isnan()).sum())
    return k - int((values < kth).sum())


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,kind", [(1, "ties"), (17, "ties"), (1000, "ties"), (1000, "tie_free"),
                                    (100_003, "ties")])
def test_select_threshold(backend, device, dtype, n, kind):
    _require(backend, device)
    values = _data((n,), dtype, device, seed=n, kind=kind)
    for k in sorted(k for k in {1, 2, n // 3 + 1, n // 2, n - 1, n} if 1 <= k <= n):
        with sparsity_ext.use_backend(backend):
            value, tie_rank = ops.select_threshold(values, k)
        expected_value, expected_rank = reference.select_threshold(values, k)
        kth = torch.kthvalue(values.float().cpu(), k).values.to(dtype)
        assert value.dtype == dtype and value.shape == () and tie_rank.dtype == torch.int64
        if kth.isnan():
            assert value.isnan(), k
        else:
            assert value.cpu() == kth, k
            assert torch.equal(_bits(value.cpu()), _bits(expected_value.cpu())), k  # -0.0 reported as +0.0
        assert int(tie_rank) == int(expected_rank) == _brute_force_tie_rank(values.cpu(), value.cpu(), k), k


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 11), (64, 33), (0,), (2, 0, 3)], ids=str)
def test_mask_format_ops(backend, device, shape):
    _require(backend, device)
    g = torch.Generator().manual_seed(7)
    mask = (torch.rand(shape, generator=g) < 0.6).to(device)
    data = torch.randn(shape, generator=g).to(device)
    with sparsity_ext.use_backend(backend):
        packed = ops.pack_mask(mask)
        unpacked = ops.unpack_mask(packed, shape)
        zeroed_bool = ops.apply_mask_(data.clone(), mask)
        zeroed_packed = ops.apply_mask_(data.clone(), packed)
    assert torch.equal(packed, reference.pack_mask(mask))
    assert torch.equal(unpacked, mask)
    expected = reference.apply_mask_(data.clone(), mask)
    assert torch.equal(zeroed_bool, expected) and torch.equal(zeroed_packed, expected)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape,block,fill", [((1000, 400), (1, 4), 1.0), ((1, 100_003), (1, 8), -2.0),
                                              ((300, 300), (3, 3), float("nan"))], ids=str)
@pytest.mark.parametrize("level", [0.25, 0.5, 0.999])
def test_ties_at_the_threshold_go_to_lower_block_indices(backend, device, shape, block, fill, level):
    """Every block scores the same: the k selected blocks are the first k, across many chunks/tiles."""
    _require(backend, device)
    data = torch.full(shape, fill, device=device)
    data[-1, -1] = 5.0  # one larger block at the end
    with sparsity_ext.use_backend(backend):
        got = ops.block_norm_mask(data, level, block, block[0] * block[1], 2)
        got_partial = ops.block_norm_mask(data, level, block, 1, 1, packed=True)
    assert torch.equal(got, reference.block_norm_mask(data, level, block, block[0] * block[1], 2))
    assert torch.equal(got_partial, reference.block_norm_mask(data, level, block, 1, 1, packed=True))


# Tables of >= 2^18 one-row blocks of 4 or 8 columns (each table below, for both widths) take the CPU
# kernel's one-pass band selection (a sampled band around the threshold, its blocks ranked after the pass);
# where the band misses the threshold or overflows with ties ("zero_rows"), the keyed pipeline runs instead.
# Both must give the reference's mask.
BAND_TABLES = {
    "tie_free": lambda: tie_free((36_000, 64), torch.float32, "cpu", 11),
    # rows in increasing norm: the sampled runs see a skewed table
    "sorted_rows": lambda: (lambda x: x[x.abs().sum(1).argsort()])(tie_free((36_000, 64), torch.float32, "cpu", 12)),
    # half the rows zero: a run of ties ending at the threshold (level 0.5), straddling it (higher levels) or
    # below it (lower levels)
    "zero_rows": lambda: tie_free((36_000, 64), torch.float32, "cpu", 13).index_fill_(0, torch.arange(0, 36_000, 2), 0.0),
    # a weight already masked at 50 %, as a sparsifier's next step scores it: half the blocks zero
    "masked_blocks": lambda: (lambda x: x * reference.block_norm_mask(x, 0.5, (1, 4), 4, 2))(
        tie_free((36_000, 64), torch.float32, "cpu", 17)),
    "row_stride": lambda: _layout(tie_free((24_000, 96), torch.float32, "cpu", 14), "column_slice"),
    "bf16": lambda: tie_free((36_000, 72), torch.bfloat16, "cpu", 15),
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("table", sorted(BAND_TABLES))
@pytest.mark.parametrize("block,zeros,level,norm,packed", [
    ((1, 4), 4, 0.8, 1, True), ((1, 4), 4, 0.5, 2, False), ((1, 4), 2, 0.5, 1, True), ((1, 8), 8, 0.3, 2, True),
    ((1, 8), 5, 0.9, 1, False), ((1, 4), 4, 0.001, 1, False), ((1, 4), 4, 0.999, 2, True)], ids=str)
def test_large_one_row_blocks_match_reference(backend, device, table, block, zeros, level, norm, packed):
    _require(backend, device)
    data = BAND_TABLES[table]().to(device)
    with sparsity_ext.use_backend(backend):
        got = ops.block_norm_mask(data, level, block, zeros, norm, packed)
    assert torch.equal(got, reference.block_norm_mask(data, level, block, zeros, norm, packed))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
def test_large_apply_matches_reference(backend, device, packed):
    _require(backend, device)
    data = tie_free((20_000, 64), torch.float32, device, 16)
    expected = data.clone()
    expected_mask = reference.block_norm_mask_apply_(expected, 0.7, (1, 4), 3, 1, packed)
    with sparsity_ext.use_backend(backend):
        mask = ops.block_norm_mask_apply_(data, 0.7, (1, 4), 3, 1, packed)
    assert torch.equal(mask, expected_mask) and torch.equal(data, expected)


def _tie_run_above_half():
    """Half the rows small, then 40 % of the rows one constant (a run of tied blocks just above the 50 % threshold,
    too long for a band to record), then large rows."""
    small = tie_free((1024, 1024), torch.float32, "cpu", 23) * 0.25
    large = tie_free((204, 1024), torch.float32, "cpu", 24).abs() + 2.0
    return torch.cat([small, torch.full((820, 1024), 0.5), large])


# block_norm_mask_update_ on tables past the band threshold (2^18 blocks), over two steps: the first
# scores the data (all-ones mask), the second a weight whose dropped blocks are zero and tie.
UPDATE_TABLES = {
    "tie_free": lambda: tie_free((2048, 1024), torch.float32, "cpu", 21),
    "bf16": lambda: tie_free((2048, 1024), torch.bfloat16, "cpu", 22),
    "tie_run_above_half": _tie_run_above_half,
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("table", sorted(UPDATE_TABLES))
@pytest.mark.parametrize("mask_dtype", ["bool", "float32", "data"])
@pytest.mark.parametrize("block,zeros,level", [((1, 4), 4, 0.5), ((1, 8), 8, 0.8), ((1, 4), 2, 1.0)], ids=str)
def test_large_update_steps_match_reference(backend, device, table, mask_dtype, block, zeros, level):
    _require(backend, device)
    data = UPDATE_TABLES[table]().to(device)
    mask_type = {"bool": torch.bool, "float32": torch.float32, "data": data.dtype}[mask_dtype]
    expected = torch.ones(data.shape, dtype=mask_type, device=device)
    got = expected.clone()
    for step in range(2):
        reference.block_norm_mask_update_(data, expected, level, block, zeros, 2)
        with sparsity_ext.use_backend(backend):
            ops.block_norm_mask_update_(data, got, level, block, zeros, 2)
        assert torch.equal(got, expected), step


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ten_million_elements(backend, device):
    """One 10^7+ element case per kernel path: DataNorm-like (1, 4) whole blocks, 2:4, and the threshold."""
    _require(backend, device)
    data = torch.randn(2500, 4096, generator=torch.Generator().manual_seed(0)).to(device)
    with sparsity_ext.use_backend(backend):
        got = ops.block_norm_mask(data, 0.8, (1, 4), 4, 1, packed=True)
        got_nm = ops.nm_mask(data, 2, 4)
        value, tie_rank = ops.select_threshold(data.view(-1), 5_000_000)
    assert torch.equal(got, reference.block_norm_mask(data, 0.8, (1, 4), 4, 1, packed=True))
    assert torch.equal(got_nm, reference.nm_mask(data, 2, 4))
    assert value.cpu() == torch.kthvalue(data.view(-1).cpu(), 5_000_000).values
    assert int(tie_rank) == _brute_force_tie_rank(data.view(-1).cpu(), value.cpu(), 5_000_000)


# --------------------------------------------------------------------------------- bad input
# The C++ ops check their arguments themselves (callers may bypass sparsity_ext.ops), before any
# kernel runs, naming the op and the argument.
BAD_CALLS = [
    ("block_norm_mask", lambda x: (x.double(), 0.5, [1, 4], 4, 1, False), "data must be float32"),
    ("block_norm_mask", lambda x: (x.view(-1), 0.5, [1, 4], 4, 1, False), "data must be 2-D"),
    ("block_norm_mask", lambda x: (x, 0.5, [0, 4], 4, 1, False), "block_shape"),
    ("block_norm_mask", lambda x: (x, 0.5, [1, 4, 1], 4, 1, False), "block_shape"),
    ("block_norm_mask", lambda x: (x, 0.5, [1, 4], 5, 1, False), "zeros_per_block"),
    ("block_norm_mask", lambda x: (x, 0.5, [1, 4], -1, 1, False), "zeros_per_block"),
    ("block_norm_mask", lambda x: (x, 0.5, [1, 4], 4, 3, False), "norm"),
    ("block_norm_mask", lambda x: (x, 1.5, [1, 4], 4, 1, False), "sparsity_level"),
    ("block_norm_mask_apply_", lambda x: (x, -0.1, [1, 4], 4, 1, False), "sparsity_level"),
    ("block_norm_mask_apply_", lambda x: (x.int(), 0.5, [1, 4], 4, 1, False), "data must be float32"),
    ("nm_mask", lambda x: (x, 5, 4), "nm_mask"),
    ("nm_mask", lambda x: (x, 1, 0), "nm_mask"),
    ("block_scores", lambda x: (x.view(-1), [1, 4], 1), "data must be 2-D"),
    ("block_scores", lambda x: (x, [1, 0], 1), "block_shape"),
    ("block_norm_mask_select", lambda x: (x, torch.zeros(15, device=x.device), 0.5, 1, [1, 4], 4, 1, False),
     "one value per block"),
    ("block_norm_mask_select", lambda x: (x, torch.zeros(16, device=x.device).double(), 0.5, 1, [1, 4], 4, 1, False),
     "scores must be a 1-D float32"),
    ("block_norm_mask_select", lambda x: (x, torch.zeros(16, device=x.device), 0.5, -1, [1, 4], 4, 1, False),
     "ties must be"),
    ("block_norm_mask_update_", lambda x: (x, torch.ones(8, 4, device=x.device), 0.5, [1, 4], 4, 1), "mask shape"),
    ("block_norm_mask_update_", lambda x: (x, torch.ones(8, 8, dtype=torch.int8, device=x.device), 0.5, [1, 4], 4, 1),
     "mask must be bool, float32"),
    ("block_norm_mask_update_", lambda x: (x, torch.ones(8, 8, device=x.device), 1.5, [1, 4], 4, 1), "sparsity_level"),
    ("block_norm_mask_into_", lambda x: (x, torch.ones(8, 4, dtype=torch.bool, device=x.device), 0.5, [1, 4], 4, 1),
     "mask shape"),
    ("block_norm_mask_into_", lambda x: (x, torch.ones(9, dtype=torch.uint8, device=x.device), 0.5, [1, 4], 4, 1),
     "must be 1-D with 8 bytes"),
    ("block_norm_mask_into_", lambda x: (x, torch.ones(8, 8, device=x.device), 0.5, [1, 4], 4, 1),
     "mask must be bool or packed"),
    ("block_norm_mask_into_", lambda x: (x, torch.ones(8, 8, dtype=torch.bool, device=x.device).t(), 0.5, [1, 4], 4,
                                         1), "contiguous"),
    ("block_norm_mask_into_", lambda x: (x, torch.ones(8, dtype=torch.uint8, device=x.device), 1.5, [1, 4], 4, 1),
     "sparsity_level"),
    ("select_threshold", lambda x: (x.view(-1), 0), "k must be in"),
    ("select_threshold", lambda x: (x.view(-1), x.numel() + 1), "k must be in"),
    ("select_threshold", lambda x: (x, 1), "values must be 1-D"),
    ("apply_mask_", lambda x: (x, torch.ones(3, 3, dtype=torch.bool, device=x.device)), "mask shape"),
    ("apply_mask_", lambda x: (x, torch.ones(8, 8, dtype=torch.int32, device=x.device)), "mask must be bool"),
    ("pack_mask", lambda x: (x,), "mask must be bool"),
    ("unpack_mask", lambda x: (torch.zeros(3, dtype=torch.uint8, device=x.device), [8, 8]), "needs"),
]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
@pytest.mark.parametrize("op,make_args,message", BAD_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CALLS)])
def test_kernels_reject_bad_arguments(device, op, make_args, message):
    backend = "cpu" if device == "cpu" else "cuda"
    _require(backend, device)
    x = torch.randn(8, 8, device=device)
    before = x.clone()
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.sparsity_ext, op)(*make_args(x))
    assert torch.equal(x, before)


@cuda_only
def test_cuda_kernels_reject_a_mask_on_another_device():
    _require("cuda", "cuda")
    data = torch.randn(8, 8, device="cuda")
    before = data.clone()
    with pytest.raises(RuntimeError, match="same CUDA device"):
        torch.ops.sparsity_ext.apply_mask_(data, torch.ones(8, 8, dtype=torch.bool))
    assert torch.equal(data, before)
