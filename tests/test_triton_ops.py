"""The triton backend (sparsity_ext.triton) against sparsity_ext.reference, bit for bit.

On a machine without a GPU the kernels run in triton's interpreter: this module sets
TRITON_INTERPRET=1 for its own tests (triton reads it when sparsity_ext.triton.kernels is first
imported, which happens at the first triton call, not at `import sparsity_ext`), so plain
`pytest tests/` covers them; shapes are small because the interpreter is slow.
"""
import os

import pytest
import torch

import sparsity_ext
import sparsity_ext.triton as triton_backend
from sparsity_ext import _backend, ops, reference

from conftest import HAS_CUDA, cuda_only, tie_free
from test_ops_parity import assert_bytes_of_product, signed_special_data

DEVICE = "cuda" if HAS_CUDA else "cpu"
LOW_PRECISION = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

pytestmark = pytest.mark.skipif(not triton_backend.is_available(), reason="triton is not installed")


@pytest.fixture(autouse=True, scope="module")
def _triton_on_this_machine():
    """Interpret the kernels when there is no GPU, for this module only (the registry follows).
    On a GPU, launch the default configs (autotuning every shape of this module would compile
    hundreds of variants); test_gpu_autotuned_bit_exact turns autotuning back on."""
    saved = os.environ.get("TRITON_INTERPRET")
    if not HAS_CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    triton_backend.register()
    kernels = triton_modules()[0]
    assert HAS_CUDA or kernels.INTERPRETED, "sparsity_ext.triton.kernels was imported before TRITON_INTERPRET=1 was set"
    autotune, kernels.AUTOTUNE = kernels.AUTOTUNE, False
    yield
    kernels.AUTOTUNE = autotune
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved
    triton_backend.register()


def triton_modules():
    """(sparsity_ext.triton.kernels, sparsity_ext.triton.ops), imported only once the fixture set the mode."""
    from sparsity_ext.triton import kernels, ops as triton_ops
    return kernels, triton_ops


def on_triton(fn, *args, **kwargs):
    with sparsity_ext.use_backend("triton"):
        return fn(*args, **kwargs)


def randn(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype=dtype, device=DEVICE)


def assert_block_mask_matches(data, level, block, zeros, norm, packed=False):
    got = on_triton(ops.block_norm_mask, data, level, block, zeros, norm, packed=packed)
    want = reference.block_norm_mask(ops._as_2d(data), level, block, zeros, norm, packed=packed)
    want = want if packed else want.view(data.shape)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), f"level={level} block={block} zeros={zeros} norm={norm} packed={packed}"


# ------------------------------------------------------------------------------ block scores
def reference_keys(data, block, norm):
    """The score keys the kernels must produce, from the reference's block scores."""
    scores = reference.block_scores(ops._as_2d(data), block, norm)
    bits = (scores + 0.0).view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # + 0.0: -0.0 -> +0.0
    keys = torch.where(bits >= 2 ** 31, bits ^ 0xFFFFFFFF, bits | 2 ** 31)
    return torch.where(scores.isnan(), 0xFFFFFFFF, keys)


@pytest.mark.parametrize("block", [(3, 5), (4, 1), (1, 4), (2, 2)])
@pytest.mark.parametrize("norm", [0, 1, 2])
def test_block_scores_are_bit_exact(block, norm):
    # Wide-range fp32 data: any change of summation order, FMA contraction or inexact division shows.
    data = randn((11, 23), seed=1) * torch.exp(randn((11, 23), seed=2) * 3)
    kernels, triton_ops = triton_modules()
    keys, hist = triton_ops._score_keys(data, block, norm)
    want = reference_keys(data, block, norm)
    assert torch.equal(keys.to(torch.int64) & 0xFFFFFFFF, want.to(keys.device))
    shift, bits = kernels.RADIX_DIGITS[0]
    assert torch.equal(hist[0].cpu(), torch.bincount((want >> shift).cpu(), minlength=1 << bits))


def test_score_keys_order_like_floats_with_nan_last():
    values = torch.tensor([1.0, -1.0, 0.0, -0.0, float("nan"), float("inf"), -float("inf"), 2.5, -2.5, 1e-40,
                           -1e-40, -float("nan")], device=DEVICE)
    keys, _ = triton_modules()[1]._score_keys(values.view(1, -1), (1, 1), 0)
    keys = (keys.to(torch.int64) & 0xFFFFFFFF).cpu()
    order = torch.sort(values.cpu(), stable=True).indices
    assert bool((keys[order][1:] >= keys[order][:-1]).all())
    assert keys[2] == keys[3]  # -0.0 ties with +0.0
    assert keys[4] == keys[11] == 0xFFFFFFFF


# ----------------------------------------------------------------------------- block_norm_mask
LEVELS = (0.0, 0.3, 0.7, 1.0)


@pytest.mark.parametrize("shape,block", [((7, 13), (3, 5)), ((9, 6), (4, 1)), ((5, 18), (1, 4)), ((1, 19), (1, 4)),
                                         ((6, 8), (2, 2)), ((4, 4), (8, 8))])
@pytest.mark.parametrize("norm", [1, 2, 0])
def test_block_norm_mask_fp32(shape, block, norm):
    data = randn(shape, seed=3)
    size = block[0] * block[1]
    for level in LEVELS:
        for zeros in {size, max(1, size // 2)}:
            assert_block_mask_matches(data, level, block, zeros, norm)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("block", [(3, 5), (1, 4)])
def test_block_norm_mask_low_precision(dtype, block):
    data = randn((10, 17), dtype, seed=4)  # fp16/bf16 values tie often: the tie rules are exercised too
    size = block[0] * block[1]
    for level in (0.25, 0.5, 0.8):
        for zeros in (size, 2):
            for norm in (1, 2):
                assert_block_mask_matches(data, level, block, zeros, norm)


@pytest.mark.parametrize("packed", [False, True])
def test_block_norm_mask_ties_nan_inf_signed_zero(packed):
    data = torch.tensor([[0.0, -0.0, 1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 2.0],
                         [float("nan"), 1.0, 0.0, -0.0, 1.0, -1.0, float("inf"), 0.0, 0.0],
                         [1.0, -1.0, 0.0, 0.0, -0.0, float("nan"), 0.0, 3.0, -float("inf")],
                         [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]], device=DEVICE)
    for block in ((1, 3), (2, 2), (1, 1)):
        size = block[0] * block[1]
        for norm in (0, 1, 2):
            for level in (0.2, 0.5, 0.9):
                for zeros in {size, 1}:
                    assert_block_mask_matches(data, level, block, zeros, norm, packed=packed)


def test_block_norm_mask_needs_every_radix_digit():
    # Block means that agree in their top 22 key bits: the last digit pass decides, among many ties.
    base = 1.0 + torch.arange(24 * 16, dtype=torch.float64).remainder(37) * 2.0 ** -22
    data = base.reshape(24, 16).to(torch.float32).to(DEVICE)
    for level in (0.1, 0.5, 0.77):
        assert_block_mask_matches(data, level, (1, 2), 2, 1)
        assert_block_mask_matches(data, level, (1, 1), 1, 0, packed=True)


@pytest.mark.parametrize("shape", [(4, 10), (50, 60)])  # one and two segments of the radix and tie passes
def test_block_norm_mask_splits_ties_by_lower_index(shape):
    # Values 0..3 on (1, 1) blocks: every k falls inside a run of equal scores, or on its edge.
    data = (torch.arange(shape[0] * shape[1]) * 7919 % 4).reshape(shape).to(torch.float32).to(DEVICE)
    n = data.numel()
    zeros_count = int((data == 0).sum())
    for k in (1, zeros_count // 2, zeros_count, zeros_count + 1, n - 1):
        assert_block_mask_matches(data, k / n, (1, 1), 1, 1)
    assert_block_mask_matches(data, 0.5, (1, 2), 1, 1, packed=True)


@pytest.fixture
def small_radix_tiles(monkeypatch):
    """64-key tiles: each radix and tie pass runs 3 segments (the interpreter's program count) of
    several tiles each, so compaction in place carries candidates across tiles."""
    monkeypatch.setattr(triton_modules()[1], "_RADIX_BLOCK", 64)


def test_radix_select_over_segments_of_many_tiles(small_radix_tiles):
    # 1000 (1, 1) blocks with scores 0..3: the k-th block's ties split in the first, second or third segment.
    data = (torch.arange(25 * 40) * 7919 % 4).reshape(25, 40).to(torch.float32).to(DEVICE)
    n = data.numel()
    zeros_count = int((data == 0).sum())
    for k in (50, 100, 200, zeros_count, zeros_count + 5):  # the last two: all of T's ties, and T = 1
        assert_block_mask_matches(data, k / n, (1, 1), 1, 1)
    smooth = tie_free((30, 64), device=DEVICE, seed=20)
    assert_block_mask_matches(smooth, 0.8, (1, 4), 4, 1, packed=True)
    assert_block_mask_matches(smooth, 0.3, (1, 2), 1, 2)
    values = randn(1500, seed=21).round()  # ties
    values[[10, 700, 1400]] = float("nan")
    for k in (1, 1200, 1498, 1500):
        got_value, got_rank = on_triton(ops.select_threshold, values, k)
        want_value, want_rank = reference.select_threshold(values, k)
        assert torch.equal(got_value, want_value) or (got_value.isnan() and want_value.isnan()), k
        assert torch.equal(got_rank.cpu(), want_rank.cpu()), k


@pytest.mark.parametrize("view", ["transposed", "strided_columns", "one_dim", "one_dim_strided"])
def test_block_norm_mask_non_contiguous(view):
    base = randn((12, 14), seed=5)
    data = {"transposed": base.t(), "strided_columns": base[1:, ::2], "one_dim": base[3],
            "one_dim_strided": base[:, 5]}[view]
    assert not data.is_contiguous() or view == "one_dim"
    block = (1, 3) if data.dim() == 1 else (2, 3)
    for level in (0.4, 1.0):
        for zeros in (block[0] * block[1], 2):
            assert_block_mask_matches(data, level, block, zeros, 2)
            assert_block_mask_matches(data, level, block, zeros, 2, packed=True)


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0,)])
@pytest.mark.parametrize("packed", [False, True])
def test_block_norm_mask_empty(shape, packed):
    data = torch.empty(shape, device=DEVICE)
    assert_block_mask_matches(data, 0.5, (1, 4), 4, 2, packed=packed)
    got = on_triton(ops.block_norm_mask_apply_, data, 0.5, (1, 4), 4, 2, packed=packed)
    assert got.numel() == 0


@pytest.mark.parametrize("shape", [(6, 16), (5, 13)])  # packed bytes aligned to rows, and straddling rows
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_norm_mask_apply_(shape, packed, dtype):
    original = randn(shape, dtype, seed=6)
    for block, zeros in (((2, 4), 8), ((2, 4), 3), ((1, 4), 2)):  # fused whole-block zeroing, ranked zeroing
        for level in (0.0, 0.5, 1.0):
            got_data, want_data = original.clone(), original.clone()
            got = on_triton(ops.block_norm_mask_apply_, got_data, level, block, zeros, 2, packed=packed)
            want = reference.block_norm_mask_apply_(want_data, level, block, zeros, 2, packed=packed)
            assert torch.equal(got, want), (block, zeros, level)
            assert torch.equal(got_data, want_data), (block, zeros, level)


def test_block_norm_mask_apply_non_contiguous_data_in_place():
    base = randn((9, 20), seed=7)
    got_base, want_base = base.clone(), base.clone()
    got = on_triton(ops.block_norm_mask_apply_, got_base[:, 1::2], 0.5, (2, 2), 4, 1)
    want = reference.block_norm_mask_apply_(want_base[:, 1::2], 0.5, (2, 2), 4, 1)
    assert torch.equal(got, want)
    assert torch.equal(got_base, want_base)  # only the view's elements changed, as in the reference


def test_block_norm_mask_multi_program_grid():
    # Enough blocks for several programs of every pass (scores, radix digits, mask write).
    data = tie_free((40, 70), device=DEVICE, seed=8)
    for level, block, zeros in ((0.37, (1, 2), 2), (0.6, (3, 1), 1), (0.5, (1, 1), 1)):
        assert_block_mask_matches(data, level, block, zeros, 2)
        assert_block_mask_matches(data, level, block, zeros, 2, packed=True)


# -------------------------------------------------------------------------------------- nm_mask
@pytest.mark.parametrize("shape", [(3, 8), (2, 10), (1, 7), (2, 3, 8), (16,)])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (0, 4), (4, 4), (1, 3)])
def test_nm_mask(shape, n, m):
    data = randn(shape, seed=9)
    got = on_triton(ops.nm_mask, data, n, m)
    want = reference.nm_mask(data.reshape(-1, shape[-1]), n, m).view(shape)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nm_mask_dtypes_ties_and_non_contiguous(dtype):
    data = randn((6, 24), dtype, seed=10).round()  # integers: many |x| ties
    data[0, :4] = torch.tensor([float("nan"), 1.0, -1.0, 0.0])
    for view in (data, data[:, 2:18], data.t()):
        got = on_triton(ops.nm_mask, view, 2, 4)
        assert torch.equal(got, reference.nm_mask(view, 2, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_blocks_1x4_ranked_kernel(dtype):
    # nm_mask(_, n, 4) and block_norm_mask at level 1 on (1, 4) blocks use the 2:4 kernel: ties, NaN,
    # +-inf, signed zeros, partial last blocks (width 45), several programs, every norm, a transposed view.
    data = randn((37, 45), dtype, seed=22).mul(2).round()  # integers in about [-6, 6]: many ties
    data[0, :8] = torch.tensor([float("nan"), 1.0, -float("nan"), 0.0, -0.0, 0.0, float("inf"), -float("inf")])
    data[1, 40:] = float("nan")
    for view in (data, data.t()):
        for n in (1, 2, 3):
            got = on_triton(ops.nm_mask, view, n, 4)
            assert torch.equal(got, reference.nm_mask(view, n, 4)), (n, view.shape)
        for zeros in (1, 2, 3):
            for norm in (0, 1, 2):
                assert_block_mask_matches(view, 1.0, (1, 4), zeros, norm)


# ---------------------------------------------------------------------------- select_threshold
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_threshold(dtype):
    values = randn(50, dtype, seed=11).round()  # ties
    values[[3, 7]] = float("nan")
    values[[5, 9]] = -0.0
    for k in (1, 2, 17, 25, 48, 49, 50):
        got_value, got_rank = on_triton(ops.select_threshold, values, k)
        want_value, want_rank = reference.select_threshold(values, k)
        assert got_value.dtype == want_value.dtype and got_value.shape == want_value.shape == ()
        assert torch.equal(got_value, want_value) or (got_value.isnan() and want_value.isnan()), k
        assert torch.equal(got_rank.cpu(), want_rank.cpu()), k


# --------------------------------------------------------------------------- mask format ops
@pytest.mark.parametrize("shape", [(5, 11), (3, 8), (1,), (13,), (2, 3, 5), (0, 3)])
def test_pack_unpack_roundtrip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(12)) > 0.5
    mask = mask.to(DEVICE)
    packed = on_triton(ops.pack_mask, mask)
    assert torch.equal(packed, reference.pack_mask(mask))
    assert torch.equal(on_triton(ops.unpack_mask, packed, shape), mask)


def test_pack_non_contiguous_mask():
    mask = (torch.rand(9, 14, generator=torch.Generator().manual_seed(13)) > 0.3).to(DEVICE)
    for view in (mask.t(), mask[:, ::3]):
        assert torch.equal(on_triton(ops.pack_mask, view), reference.pack_mask(view))


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "one_dim", "three_dim", "permuted"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_mask_(layout, packed, dtype):
    base = randn((4, 6, 5), dtype, seed=14)
    data = {"contiguous": base[0], "transposed": base[0].t(), "one_dim": base[1, 2], "three_dim": base,
            "permuted": base.permute(2, 0, 1)}[layout]
    keep = (torch.rand(data.shape, generator=torch.Generator().manual_seed(15)) > 0.5).to(DEVICE)
    mask = reference.pack_mask(keep) if packed else keep
    got_base, want_base = base.clone(), base.clone()
    view_of = {"contiguous": lambda b: b[0], "transposed": lambda b: b[0].t(), "one_dim": lambda b: b[1, 2],
               "three_dim": lambda b: b, "permuted": lambda b: b.permute(2, 0, 1)}[layout]
    got_view = view_of(got_base)
    returned = on_triton(ops.apply_mask_, got_view, mask)
    reference.apply_mask_(view_of(want_base), mask)
    assert returned is got_view
    assert torch.equal(got_base, want_base)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zeroing_writes_the_bytes_of_data_times_mask(dtype):
    """apply_mask_ and block_norm_mask_apply_ (whole blocks, in the mask kernel; ranked, in a second pass)
    write x * 0: -0.0 for a dropped negative, NaN for a dropped inf or NaN, as torch.ao.pruning's mask * data."""
    data = signed_special_data((17, 40), dtype, DEVICE, seed=16)
    keep = (torch.rand(data.shape, generator=torch.Generator().manual_seed(17)) > 0.5).to(DEVICE)
    for mask in (keep, reference.pack_mask(keep)):
        got = data.clone()
        on_triton(ops.apply_mask_, got, mask)
        assert_bytes_of_product(got, data, keep, mask.dtype)
    for block, zeros in [((1, 4), 4), ((2, 2), 4), ((1, 4), 2)]:
        got = data.clone()
        mask = on_triton(ops.block_norm_mask_apply_, got, 0.6, block, zeros, 0, packed=True)
        assert_bytes_of_product(got, data, reference.unpack_mask(mask, data.shape), (block, zeros))


# ----------------------------------------------------------------------------- registry, torch.library
def test_backend_is_registered_for_this_machine():
    with sparsity_ext.use_backend("triton"):
        name, _ = _backend.resolve("block_norm_mask", torch.device(DEVICE), torch.float32)
    assert name == "triton"
    with sparsity_ext.use_backend("triton"), pytest.raises(RuntimeError, match="dtype"):
        _backend.resolve("block_norm_mask", torch.device(DEVICE), torch.float64)


def test_missing_triton_gives_install_hint(monkeypatch):
    monkeypatch.setattr(triton_backend, "_unavailable_reason", lambda: "triton is not installed: pip install triton")
    triton_backend.register()
    try:
        with sparsity_ext.use_backend("triton"), pytest.raises(RuntimeError, match="pip install triton"):
            ops.block_norm_mask(randn((2, 4)), 0.5, (1, 4))
        with sparsity_ext.use_backend("triton"), pytest.raises(RuntimeError, match="pip install triton"):
            ops.block_scores(randn((2, 4)), (1, 4))  # its composite is not available either
    finally:
        monkeypatch.undo()
        triton_backend.register()


def test_fake_impls_give_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    lib = torch.ops.sparsity_ext_triton
    with FakeTensorMode():
        data = torch.empty(5, 13, device=DEVICE)
        assert lib.block_norm_mask(data, 0.5, [1, 4], 4, 2).shape == (5, 13)
        assert lib.block_norm_mask_apply_(data, 0.5, [1, 4], 4, 2, True).shape == (9,)
        assert lib.nm_mask(data, 2, 4).dtype == torch.bool
        value, rank = lib.select_threshold(data.flatten(), 3)
        assert value.shape == rank.shape == () and rank.dtype == torch.int64
        assert lib.pack_mask(torch.empty(5, 13, dtype=torch.bool, device=DEVICE)).shape == (9,)
        assert lib.unpack_mask(torch.empty(9, dtype=torch.uint8, device=DEVICE), [5, 13]).shape == (5, 13)
        lib.apply_mask_(data, torch.empty(5, 13, dtype=torch.bool, device=DEVICE))


TRITON_OPS = ("nm_mask", "apply_mask_", "pack_mask", "unpack_mask")  # the others are custom_op (opaque)


@pytest.mark.parametrize("op,args", [
    ("block_norm_mask", lambda: (randn((5, 13)), 0.5, [2, 3], 3, 2, False)),
    ("block_norm_mask_apply_", lambda: (randn((5, 13)), 0.5, [1, 4], 4, 1, True)),
    ("select_threshold", lambda: (randn(20), 7)),
    ("nm_mask", lambda: (randn((3, 8)), 2, 4)),
    ("apply_mask_", lambda: (randn((3, 8)), torch.rand(3, 8, device=DEVICE) > 0.5)),
    ("pack_mask", lambda: (torch.rand(3, 9, device=DEVICE) > 0.5,)),
    ("unpack_mask", lambda: (torch.arange(4, dtype=torch.uint8, device=DEVICE), [3, 9])),
])
def test_opcheck(op, args):
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if not HAS_CUDA and op in TRITON_OPS:
        # AOT dispatch traces a triton_op's body with fake tensors, which the interpreter cannot run.
        checks = checks[:-1]
    torch.library.opcheck(getattr(torch.ops.sparsity_ext_triton, op).default, args(), test_utils=checks)


def test_bad_input_raises_before_any_kernel():
    data = randn((4, 8))
    before = data.clone()
    with sparsity_ext.use_backend("triton"):
        with pytest.raises(ValueError, match="mask shape"):
            ops.apply_mask_(data, torch.zeros(4, 7, dtype=torch.bool, device=DEVICE))
        with pytest.raises(ValueError, match="zeros_per_block"):
            ops.block_norm_mask_apply_(data, 0.5, (1, 4), 5)
        with pytest.raises(RuntimeError, match="dtype"):
            ops.block_norm_mask_apply_(data.double(), 0.5, (1, 4))
    assert torch.equal(data, before)


def test_compile_fullgraph_opaque_ops():
    # block_norm_mask(_apply_) and select_threshold are opaque to torch.compile (they run their own launches).
    data = randn((6, 12), seed=19)

    def masks(x):
        values = x.flatten()
        return (torch.ops.sparsity_ext_triton.block_norm_mask(x, 0.5, [2, 3], 6, 2, True),
                torch.ops.sparsity_ext_triton.select_threshold(values, 5))

    backend = "inductor" if HAS_CUDA else "aot_eager"
    got_mask, (got_value, got_rank) = torch.compile(masks, fullgraph=True, backend=backend)(data)
    assert torch.equal(got_mask, reference.block_norm_mask(data, 0.5, (2, 3), 6, 2, packed=True))
    want_value, want_rank = reference.select_threshold(data.flatten(), 5)
    assert torch.equal(got_value, want_value) and torch.equal(got_rank, want_rank)


@cuda_only
def test_compile_fullgraph_triton_ops_on_gpu():
    # nm_mask, pack/unpack and apply_mask_ are triton_ops: inductor sees and launches their kernels.
    data = randn((64, 96), seed=16)
    lib = torch.ops.sparsity_ext_triton

    def pipeline(x):
        keep = lib.nm_mask(x, 2, 4)
        packed = lib.pack_mask(keep)
        y = x.clone()
        lib.apply_mask_(y, packed)
        return keep, packed, lib.unpack_mask(packed, [64, 96]), y

    keep, packed, unpacked, pruned = torch.compile(pipeline, fullgraph=True)(data)
    want = reference.nm_mask(data, 2, 4)
    assert torch.equal(keep, want) and torch.equal(unpacked, want)
    assert torch.equal(packed, reference.pack_mask(want))
    assert torch.equal(pruned, data * want)


@cuda_only
def test_gpu_autotuned_bit_exact(monkeypatch):
    # Autotuned launch configs, several thousand blocks, fp32 data where FMA contraction would show.
    monkeypatch.setattr(triton_modules()[0], "AUTOTUNE", True)
    data = randn((513, 1030), seed=17) * torch.exp(randn((513, 1030), seed=18) * 2)
    for block in ((1, 4), (3, 5), (8, 1)):
        keys, _ = triton_modules()[1]._score_keys(data, block, 2)
        assert torch.equal(keys.to(torch.int64) & 0xFFFFFFFF, reference_keys(data, block, 2))
    for block, zeros in (((1, 4), 4), ((1, 4), 2), ((4, 4), 16), ((3, 5), 7)):
        for level in (0.3, 0.5, 0.9):
            for packed in (False, True):
                assert_block_mask_matches(data, level, block, zeros, 2, packed=packed)


@pytest.mark.parametrize("block,zeros,level", [((1, 4), 2, 0.5), ((2, 3), 6, 0.3), ((3, 5), 4, 0.8)])
def test_block_norm_mask_select_on_triton_equals_the_reference(block, zeros, level):
    """The triton backend's block_norm_mask_select (its level-1 block_norm_mask plus the threshold's blocks),
    with ties split at the threshold."""
    data = (torch.randint(-2, 3, (9, 17), generator=torch.Generator().manual_seed(3)) * 0.5).to(DEVICE)
    scores = reference.block_scores(data, block, 1)
    k = reference.num_selected_blocks(level, scores.numel())
    threshold, ties = reference.select_threshold(scores, k)
    with sparsity_ext.use_backend("triton"):
        got = ops.block_norm_mask_select(data, scores, threshold, ties, block, zeros, 1)
    assert torch.equal(got, reference.block_norm_mask(data, level, block, zeros, 1))


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_triton_runs_on_the_data_device_not_the_current_one():
    # Triton launches on the current device: the backend makes the data's device current for the call.
    data = randn((37, 64), seed=19).to("cuda:1")
    with torch.cuda.device(0), sparsity_ext.use_backend("triton"):
        mask = ops.block_norm_mask(data, 0.5, (1, 4), 4, 2)
        keep = ops.nm_mask(data, 2, 4)
        packed = ops.sparsify_24_pack(data.half())
        assert torch.cuda.current_device() == 0
    assert mask.device == data.device and torch.equal(mask.cpu(), reference.block_norm_mask(data.cpu(), 0.5, (1, 4), 4, 2))
    assert torch.equal(keep.cpu(), reference.nm_mask(data.cpu(), 2, 4))
    assert torch.equal(packed[0].cpu(), ops.sparsify_24_pack(data.half().cpu())[0])


def test_weight_norm_sparsifier_steps_with_the_triton_backend_pinned():
    # The triton backend has no block_norm_mask_update_: the class step takes the unfused path instead of raising.
    weight = randn((8, 16), seed=20)
    masks = []
    for backend in ("triton", "reference"):
        model = torch.nn.Sequential(torch.nn.Linear(16, 8, bias=False, device=DEVICE))
        model[0].weight.data.copy_(weight)
        sparsifier = sparsity_ext.WeightNormSparsifier(sparsity_level=0.5)
        sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
        with sparsity_ext.use_backend(backend):
            sparsifier.step()
        masks.append(model[0].parametrizations.weight[0].mask.clone())
    assert torch.equal(masks[0], masks[1]) and masks[0].sum() == 64


def test_accelerated_torch_ao_steps_with_the_triton_backend_pinned():
    # torch.ao's step, patched, with a backend that has no block_norm_mask_update_: same mask as torch.ao's own.
    from torch.ao.pruning import WeightNormSparsifier as AoWeightNormSparsifier
    weight = randn((8, 16), seed=21)
    masks = []
    for accelerated in (True, False):
        model = torch.nn.Sequential(torch.nn.Linear(16, 8, bias=False, device=DEVICE))
        model[0].weight.data.copy_(weight)
        sparsifier = AoWeightNormSparsifier(sparsity_level=0.5)
        sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
        if accelerated:
            with sparsity_ext.accelerate_torch_ao(), sparsity_ext.use_backend("triton"):
                sparsifier.step()
        else:
            sparsifier.step()
        masks.append(model[0].parametrizations.weight[0].mask.clone())
    assert torch.equal(masks[0], masks[1]) and masks[0].sum() == 64
