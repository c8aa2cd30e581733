"""torch.library contract of the compiled ops: opcheck (schema, fake impls, autograd registration,
AOT dispatch) for every op on the CPU kernels, and torch.compile(fullgraph=True) over all of them."""
import pytest
import torch

from conftest import backend_available

pytestmark = pytest.mark.skipif(not backend_available("cpu", "cpu"), reason="the C++ CPU kernels are not built")


def _sample_calls():
    """(op, args) for every op, on small CPU tensors that exercise each kernel path."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(6, 20, generator=g)
    half = torch.randn(5, 16, generator=g).to(torch.float16)
    mask = torch.rand(6, 20, generator=g) < 0.5
    packed = torch.ops.sparsity_ext.pack_mask(mask)
    return [
        ("block_norm_mask", (data, 0.5, [1, 4], 4, 2, False)),
        ("block_norm_mask", (data, 0.4, [2, 3], 2, 1, True)),
        ("block_norm_mask", (half, 1.0, [1, 8], 4, 0, False)),
        ("block_norm_mask_apply_", (data.clone(), 0.5, [1, 4], 2, 1, False)),
        ("block_norm_mask_apply_", (half.clone(), 0.3, [3, 3], 9, 2, True)),
        ("block_norm_mask_update_", (data, torch.ones(6, 20), 0.5, [1, 4], 4, 2)),
        ("block_norm_mask_update_", (half, mask[:5, :16].clone(), 0.4, [2, 3], 2, 1)),
        ("block_norm_mask_into_", (data, torch.zeros(6, 20, dtype=torch.bool), 0.5, [1, 4], 2, 2)),
        ("block_norm_mask_into_", (half, torch.zeros(10, dtype=torch.uint8), 0.4, [2, 3], 6, 1)),
        ("block_scores", (data, [1, 4], 2)),
        ("block_scores", (half, [2, 3], 1)),
        ("block_norm_mask_select", (data, torch.ops.sparsity_ext.block_scores(data, [1, 4], 2), 0.5, 3, [1, 4], 2, 2,
                                    False)),
        ("block_norm_mask_select", (half, torch.ops.sparsity_ext.block_scores(half, [2, 3], 1), 1.0, 0, [2, 3], 6, 1,
                                    True)),
        ("nm_mask", (data, 2, 4)),
        ("select_threshold", (data.view(-1), 17)),
        ("apply_mask_", (data.clone(), mask)),
        ("apply_mask_", (data.clone(), packed)),
        ("pack_mask", (mask,)),
        ("unpack_mask", (packed, [6, 20])),
    ]


@pytest.mark.parametrize("op,args", _sample_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.sparsity_ext, op).default, args)


def test_torch_compile_fullgraph_calls_every_op():
    g = torch.Generator().manual_seed(1)
    data = torch.randn(8, 32, generator=g)

    def pipeline(x):
        ops = torch.ops.sparsity_ext
        mask = ops.block_norm_mask(x, 0.5, [1, 4], 4, 2, False)
        packed = ops.pack_mask(mask)
        unpacked = ops.unpack_mask(packed, [8, 32])
        nm = ops.nm_mask(x, 2, 4)
        value, tie_rank = ops.select_threshold(x.reshape(-1), 100)
        y = x.clone()
        ops.apply_mask_(y, nm)
        z = x.clone()
        z_mask = ops.block_norm_mask_apply_(z, 0.25, [2, 2], 4, 1, True)
        scores = ops.block_scores(x, [1, 4], 2)
        selected = ops.block_norm_mask_select(x, scores, 0.5, 2, [1, 4], 2, 2, False)
        updated = torch.ones_like(x)
        ops.block_norm_mask_update_(x, updated, 0.5, [1, 4], 4, 2)
        written = torch.zeros(32, dtype=torch.uint8)
        ops.block_norm_mask_into_(x, written, 0.5, [1, 4], 4, 2)
        return mask, packed, unpacked, nm, value, tie_rank, y, z, z_mask, scores, selected, updated, written

    eager = pipeline(data)
    torch._dynamo.reset()
    compiled = torch.compile(pipeline, fullgraph=True, backend="aot_eager")(data)
    assert len(compiled) == len(eager)
    for got, expected in zip(compiled, eager):
        assert got.dtype == expected.dtype and torch.equal(got, expected)
