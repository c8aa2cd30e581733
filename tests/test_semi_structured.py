"""sparsify_24_pack and sparsity_ext.semi_structured: packed values and metadata equal torch's own
conversion (torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass) of the
2:4-masked input, for every backend, dtype and legal shape; bad input; torch's subclass; convert()."""
import pytest
import torch
from torch import nn
from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUTLASS
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

import sparsity_ext
from sparsity_ext import _backend, ops, reference, semi_structured
from conftest import (HAS_CUDA, HAS_TRITON, TOLERANCES, TRITON_INTERPRET, backend_available, cuda_only,
                      requires_triton)

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of SparseSemiStructuredTensor:UserWarning")

# (dtype, shape): the minimum legal shapes, and larger ones with several bands of rows / metadata columns
CASES = [
    (torch.float16, (32, 64)), (torch.float16, (96, 320)),
    (torch.bfloat16, (32, 64)), (torch.bfloat16, (64, 192)),
    (torch.int8, (16, 128)), (torch.int8, (48, 256)),
]
CPU_BACKENDS = [
    pytest.param("reference"),
    pytest.param("cpu", marks=pytest.mark.skipif(not backend_available("cpu", "cpu"),
                                                 reason="the C++ CPU kernels are not built")),
    # CPU tensors reach the triton backend only in triton's interpreter
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON or not TRITON_INTERPRET,
                                                    reason="needs triton and TRITON_INTERPRET=1")),
]
# torch's CUTLASS 2:4 matmul kernels are built for compute capability 8.x only
cutlass_matmul_gpu = pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] != 8,
                                        reason="torch's CUTLASS semi-structured matmul needs a compute capability 8.x GPU")


def _data(shape, dtype, seed=0, device="cpu"):
    """Random data with zeros, -0.0 and NaN (floats), or the full int8 range; many ties in bf16 / int8."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8).to(device)
    x = torch.randn(shape, generator=g).to(dtype)
    x[torch.rand(shape, generator=g) < 0.25] = 0.0
    x[torch.rand(shape, generator=g) < 0.05] = -0.0
    x[torch.rand(shape, generator=g) < 0.02] = float("nan")
    return x.to(device)


def _awkward(shape, dtype, seed=0):
    """Groups drawn from a tiny alphabet: all-zero groups, ties, +-0, +-inf and NaN in every position."""
    g = torch.Generator().manual_seed(seed)
    alphabet = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, float("inf"), float("-inf"), float("nan")])
    if dtype == torch.int8:
        alphabet = torch.tensor([0, 0, 1, -1, 2, 127, -128, -127])
    return alphabet[torch.randint(0, len(alphabet), shape, generator=g)].to(dtype)


def _torch_pack(x):
    """torch's conversion of x zeroed where sparsity_ext's 2:4 mask (nm_mask(x, 2, 4)) is False."""
    keep = reference.nm_mask(x.to(torch.float32), 2, 4)
    return sparse_semi_structured_from_dense_cutlass(x.masked_fill(~keep, 0))


def _assert_same_values(got, expected):
    """Equal bit for bit (so -0.0 != +0.0), except that any NaN equals any NaN (torch's gather may
    canonicalize a NaN's payload)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    nan = got.isnan() if got.is_floating_point() else torch.zeros_like(got, dtype=torch.bool)
    assert torch.equal(nan, expected.isnan() if expected.is_floating_point() else nan)
    bits = {1: torch.int8, 2: torch.int16}[got.element_size()]
    assert torch.equal(got.view(bits)[~nan], expected.view(bits)[~nan])


def _check_against_torch(x, backend):
    with sparsity_ext.use_backend(backend):
        values, meta = ops.sparsify_24_pack(x)
    expected_values, expected_meta = _torch_pack(x.cpu())
    _assert_same_values(values.cpu(), expected_values)
    assert meta.dtype == expected_meta.dtype and torch.equal(meta.cpu(), expected_meta)


# ------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype,shape", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_pack_equals_torch_conversion(backend, dtype, shape):
    _check_against_torch(_data(shape, dtype, seed=shape[0]), backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", semi_structured.PACK_DTYPES, ids=str)
def test_pack_awkward_groups_equal_torch_conversion(backend, dtype):
    shape = (32, 128)
    _check_against_torch(_awkward(shape, dtype), backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pack_reads_strided_rows_and_transposed_input(backend):
    wide = _data((64, 256), torch.float16, seed=3)
    _check_against_torch(wide[:32, 64:192], backend)  # row stride 256, unit column stride
    _check_against_torch(_data((128, 32), torch.bfloat16, seed=4).t(), backend)  # column stride != 1


def test_every_reachable_nonzero_pattern_matches_torch():
    # each group of 4 holds one of the 11 patterns with at most 2 nonzeros: the metadata nibble table
    patterns = [p for p in range(16) if bin(p).count("1") <= 2]
    groups = torch.tensor([[float((p >> i) & 1) * (i + 1) for i in range(4)] for p in patterns])
    row = groups.repeat(2, 1)[:16].reshape(-1)  # 16 groups = one fp16 metadata element... x 4 elements
    x = row.repeat(32, 1).to(torch.float16)
    with sparsity_ext.use_backend("reference"):
        values, meta = ops.sparsify_24_pack(x)
    expected_values, expected_meta = sparse_semi_structured_from_dense_cutlass(x)
    assert torch.equal(values, expected_values) and torch.equal(meta, expected_meta)


def test_auto_backend_is_the_cpu_kernel_when_built():
    name, _ = _backend.resolve("sparsify_24_pack", torch.device("cpu"), torch.float16)
    assert name == ("cpu" if backend_available("cpu", "cpu") else "reference")


def test_input_not_modified():
    x = _data((32, 64), torch.float16)
    before = x.clone()
    ops.sparsify_24_pack(x)
    assert torch.equal(x.view(torch.int16), before.view(torch.int16))


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("data,error,match", [
    ([[1.0] * 64] * 32, TypeError, "torch.Tensor"),
    (torch.zeros(32, 64), TypeError, "1:2"),  # float32: torch's layout is 1:2 (TF32)
    (torch.zeros(32, 64, dtype=torch.float64), TypeError, "float16, bfloat16 or int8"),
    (torch.zeros(32, 64, dtype=torch.int32), TypeError, "float16, bfloat16 or int8"),
    (torch.zeros(64, dtype=torch.float16), ValueError, "2-D"),
    (torch.zeros(2, 32, 64, dtype=torch.float16), ValueError, "2-D"),
    (torch.zeros(16, 64, dtype=torch.float16), ValueError, "multiple of 32"),
    (torch.zeros(48, 64, dtype=torch.float16), ValueError, "multiple of 32"),
    (torch.zeros(32, 32, dtype=torch.float16), ValueError, "multiple of 64"),
    (torch.zeros(32, 96, dtype=torch.bfloat16), ValueError, "multiple of 64"),
    (torch.zeros(0, 64, dtype=torch.float16), ValueError, "positive multiple"),
    (torch.zeros(8, 128, dtype=torch.int8), ValueError, "multiple of 16"),
    (torch.zeros(16, 64, dtype=torch.int8), ValueError, "multiple of 128"),
], ids=lambda v: "" if not isinstance(v, torch.Tensor) else f"{v.dtype}-{tuple(v.shape)}")
def test_bad_input_raises_before_any_kernel(monkeypatch, data, error, match):
    def no_kernel(*args):
        raise AssertionError("a backend was resolved for invalid input")
    monkeypatch.setattr(_backend, "resolve", no_kernel)
    with pytest.raises(error, match=match):
        ops.sparsify_24_pack(data)


@pytest.mark.skipif(not backend_available("cpu", "cpu"), reason="the C++ CPU kernels are not built")
def test_compiled_op_checks_its_arguments():
    with pytest.raises(RuntimeError, match="multiple of 64"):
        torch.ops.sparsity_ext.sparsify_24_pack(torch.zeros(32, 32, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="float16, bfloat16 or int8"):
        torch.ops.sparsity_ext.sparsify_24_pack(torch.zeros(32, 64))


# ------------------------------------------------------------------------ torch.library contract
@pytest.mark.skipif(not backend_available("cpu", "cpu"), reason="the C++ CPU kernels are not built")
@pytest.mark.parametrize("dtype,shape", [(torch.float16, (32, 64)), (torch.int8, (16, 128))], ids=str)
def test_opcheck(dtype, shape):
    data = _data(shape, dtype)
    if data.is_floating_point():
        data = data.nan_to_num(0.0)  # opcheck compares outputs with assert_close, where NaN != NaN
    torch.library.opcheck(torch.ops.sparsity_ext.sparsify_24_pack.default, (data,))


@pytest.mark.skipif(not backend_available("cpu", "cpu"), reason="the C++ CPU kernels are not built")
def test_torch_compile_fullgraph():
    x = _data((32, 128), torch.bfloat16, seed=7)

    def pack(t):
        values, meta = torch.ops.sparsity_ext.sparsify_24_pack(t * 2)
        return values, meta.view(torch.int16)

    torch._dynamo.reset()
    got = torch.compile(pack, fullgraph=True, backend="aot_eager")(x)
    expected = pack(x)
    _assert_same_values(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


# ------------------------------------------------------------------- torch's subclass on the CPU
def test_to_sparse_semi_structured_on_cpu_is_torchs_subclass():
    w = _data((64, 128), torch.float16, seed=11).nan_to_num(0.0)
    sparse = semi_structured.to_sparse_semi_structured(w)
    assert isinstance(sparse, SparseSemiStructuredTensorCUTLASS)
    assert sparse.shape == w.shape and sparse.dtype == w.dtype and sparse.device == w.device
    values, meta = ops.sparsify_24_pack(w)
    assert torch.equal(sparse.packed, values) and torch.equal(sparse.meta, meta)
    pruned = w.masked_fill(~ops.nm_mask(w, 2, 4), 0)
    assert torch.equal(sparse.to_dense(), pruned)  # torch's own unpacking, CPU-capable
    # torch has no CPU kernel for the semi-structured matmul (documented in to_sparse_semi_structured)
    with pytest.raises(NotImplementedError):
        torch.mm(sparse, torch.ones(128, 8, dtype=torch.float16))


def test_is_24_sparse():
    w = _data((32, 64), torch.float16, seed=5).nan_to_num(1.0)
    assert not semi_structured.is_24_sparse(w)
    assert semi_structured.is_24_sparse(w.masked_fill(~ops.nm_mask(w, 2, 4), 0))
    assert not semi_structured.is_24_sparse(torch.zeros(4, 6))


# ------------------------------------------------------------------------------------- convert
def _sparsified_model(dtype=torch.float16, device="cpu"):
    """Linear(128 -> 64) -> ReLU -> Linear(64 -> 32) -> ReLU -> Linear(32 -> 10), the first two 2:4-sparse
    through WeightNormSparsifier + squash_mask, the head left dense."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    sparsifier = sparsity_ext.WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, config=[{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    sparsifier.squash_mask()
    return model.to(dtype=dtype, device=device)


def _weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_unchanged(model, before):
    after = _weights(model)
    assert after.keys() == before.keys()
    assert all(type(p) is nn.Parameter and not isinstance(p.data, SparseSemiStructuredTensor)
               for p in model.parameters())
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_convert_reports_every_unconvertible_layer_and_changes_nothing():
    model = _sparsified_model()
    before = _weights(model)
    with pytest.raises(ValueError) as info:
        semi_structured.convert(model)  # every Linear: the dense head is neither 2:4 nor of a legal shape
    message = str(info.value)
    assert "4: has weight shape (10, 32)" in message and "nothing was changed" in message
    if not HAS_CUDA:
        assert "0: is on cpu" in message and "2: is on cpu" in message
    _assert_unchanged(model, before)


@pytest.mark.parametrize("fqns,match", [
    (["0"], "on cpu; torch has no cpu kernels"),
    (["1"], "is a ReLU, not an nn.Linear"),
    (["missing"], "no module named"),
], ids=["cpu-device", "not-linear", "unknown"])
def test_convert_errors(fqns, match):
    model = _sparsified_model()
    before = _weights(model)
    if HAS_CUDA and fqns == ["0"]:
        pytest.skip("the CPU-device error is for CPU models")
    with pytest.raises(ValueError, match=match):
        semi_structured.convert(model, fqns)
    _assert_unchanged(model, before)


def test_convert_rejects_dense_fp32_and_parametrized_layers():
    dense = nn.Sequential(nn.Linear(128, 64)).half()
    with pytest.raises(ValueError, match="not 2:4-sparse"):
        semi_structured.convert(dense)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        semi_structured.convert(_sparsified_model(dtype=torch.float32), ["0"])
    model = nn.Sequential(nn.Linear(128, 64))
    sparsifier = sparsity_ext.WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, config=[{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    with pytest.raises(ValueError, match="squash_mask"):
        semi_structured.convert(model.half())


# ------------------------------------------------------------------------------- CUDA (H100)
GPU_BACKENDS = ["reference", "cuda", pytest.param("triton", marks=requires_triton)]
# sums of a few hundred products, accumulated differently by CUTLASS and cuBLAS, rounded to the output dtype
_MATMUL_TOLERANCES = {torch.float16: dict(rtol=1e-3, atol=1e-2), torch.bfloat16: TOLERANCES[torch.bfloat16]}


@cuda_only
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,shape", CASES + [(torch.float16, (1024, 2048)), (torch.int8, (512, 1024))],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_cuda_pack_equals_torch_conversion(backend, dtype, shape):
    if not backend_available(backend, "cuda"):
        pytest.skip(f"backend {backend} is not available for CUDA tensors here")
    _check_against_torch(_data(shape, dtype, seed=shape[1], device="cuda"), backend)


@cuda_only
@pytest.mark.parametrize("dtype,shape", CASES + [(torch.bfloat16, (2048, 1024))],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_cuda_equals_torch_to_sparse_semi_structured(monkeypatch, dtype, shape):
    monkeypatch.setattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", True)  # torch's default is cuSPARSELt
    w = _data(shape, dtype, seed=1, device="cuda")
    if w.is_floating_point():
        w = w.nan_to_num(0.0)
    ours = semi_structured.to_sparse_semi_structured(w)
    pruned = w.masked_fill(~reference.nm_mask(w.float(), 2, 4), 0)
    theirs = torch.sparse.to_sparse_semi_structured(pruned)
    assert type(ours) is type(theirs) and ours.shape == theirs.shape and ours.dtype == theirs.dtype
    _assert_same_values(ours.packed, theirs.packed)
    assert torch.equal(ours.meta, theirs.meta)
    assert torch.equal(ours.to_dense(), theirs.to_dense())


@cutlass_matmul_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_sparse_matmul_matches_dense_pruned(dtype):
    w = _data((256, 512), dtype, seed=2, device="cuda").nan_to_num(0.0)
    x = torch.randn(512, 64, device="cuda", dtype=dtype)
    pruned = w.masked_fill(~ops.nm_mask(w, 2, 4), 0)
    got = torch.mm(semi_structured.to_sparse_semi_structured(w), x)
    torch.testing.assert_close(got, pruned @ x, **_MATMUL_TOLERANCES[dtype])


@cuda_only
def test_cuda_convert_forward_matches_dense_masked_forward():
    model = _sparsified_model(torch.float16, "cuda").eval()
    x = torch.randn(32, 128, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        expected = model(x)
        semi_structured.convert(model, ["0", "2"])  # the dense 10 x 32 head stays as it is
        # ours (CUTLASS layout) where torch's CUTLASS matmul runs, torch's cuSPARSELt subclass elsewhere
        expected_type = (SparseSemiStructuredTensorCUTLASS if torch.cuda.get_device_capability()[0] == 8
                         else torch.sparse.SparseSemiStructuredTensorCUSPARSELT)
        assert type(model[0].weight.data) is expected_type and type(model[2].weight.data) is expected_type
        assert not isinstance(model[4].weight.data, SparseSemiStructuredTensor)
        got = model(x)
        semi_structured.convert(model, ["0", "2"])  # already converted: left alone
    torch.testing.assert_close(got, expected, **_MATMUL_TOLERANCES[torch.float16])
