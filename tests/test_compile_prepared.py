"""torch.compile of models prepared by sparsity_ext's WeightNormSparsifier.

The FakeSparsity parametrization's forward is `mask * weight`: dynamo traces it (torch 2.13 refuses to
trace torch.ao.pruning's own FakeSparsity.forward, which sits in torch's skip list, so a model prepared
by torch.ao.pruning does not compile with fullgraph=True), and inductor lowers it to one generated
elementwise kernel per masked weight. The masks are graph inputs, updated in place by step(), so a
compiled model follows every mask change without recompiling (a step that changes a mask's dtype, as
torch.ao.pruning's rules do when zeros_per_block moves across the block size, recompiles once).
"""
import operator
import re

import pytest
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code

import sparsity_ext
from conftest import TOLERANCES, tie_free

FP32 = TOLERANCES[torch.float32]


SPARSIFIED = (0, 3, 5)  # indices of the sparsified layers in prepared_model's Sequential


def prepared_model(sparsifier_args=None, bool_masks=False):
    """A small conv + linear model, prepared by sparsity_ext's WeightNormSparsifier and stepped once (with
    bool_masks, the config hands prepare bool masks), and an input batch."""
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(),
                          nn.Linear(32, 12))
    with torch.no_grad():
        for i, parameter in enumerate(model.parameters()):
            parameter.copy_(tie_free(tuple(parameter.shape), seed=i) * 0.5)
    sparsifier = sparsity_ext.WeightNormSparsifier(**(sparsifier_args or {"sparsity_level": 0.5}))
    config = [{"tensor_fqn": f"{i}.weight"} for i in SPARSIFIED]
    if bool_masks:
        for entry, i in zip(config, SPARSIFIED):
            entry["mask"] = torch.ones(model[i].weight.shape, dtype=torch.bool)
    sparsifier.prepare(model, config)
    sparsifier.step()
    return model, sparsifier, tie_free((5, 4, 6, 6), seed=99)


def restep(sparsifier, **changes):
    """Changes every group's arguments, then steps: new values in the same mask buffers."""
    for group in sparsifier.groups:
        group.update(changes)
    sparsifier.step()


CONFIGS = {
    "blocks": ({"sparsity_level": 0.5, "sparse_block_shape": (2, 4)}, False),
    "2:4": ({"sparsity_level": 1.0, "sparse_block_shape": (1, 4), "zeros_per_block": 2}, False),
    "bool-masks": ({"sparsity_level": 0.4}, True),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fullgraph_equals_eager_before_and_after_step(name):
    args, bool_masks = CONFIGS[name]
    model, sparsifier, x = prepared_model(args, bool_masks)
    # torch.ao.pruning's dtypes after a step: bool within blocks (2:4), else float32 (a given bool mask too)
    expected_dtype = torch.bool if args.get("zeros_per_block", 4) < 4 else torch.float32
    assert all(model[i].parametrizations.weight[0].mask.dtype == expected_dtype for i in SPARSIFIED)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)  # raises on any graph break

    before = compiled(x)
    torch.testing.assert_close(before, model(x), **FP32)
    restep(sparsifier, sparsity_level=0.8)
    after = compiled(x)
    torch.testing.assert_close(after, model(x), **FP32)
    assert not torch.allclose(after, before)  # the compiled model saw the new masks
    assert counter.frame_count == 1  # and needed no recompile for them


def test_explain_finds_one_graph_and_no_breaks():
    model, _, x = prepared_model()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_count == 1
    assert explanation.graph_break_count == 0


def test_masked_weight_is_one_elementwise_multiply():
    """In the traced aten graph each masked weight is one mul of two graph inputs (mask and weight, same
    shape) that nothing else reads; no other op multiplies."""
    model, _, x = prepared_model()
    graphs = []

    def keep_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    with torch.no_grad():
        torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=keep_graph))(x)
    multiplies = [node for node in graphs[0].graph.nodes if node.target in (torch.ops.aten.mul.Tensor, operator.mul)]
    assert sorted(tuple(node.meta["val"].shape) for node in multiplies) == \
        sorted(tuple(model[i].weight.shape) for i in SPARSIFIED)
    for node in multiplies:
        assert all(arg.op == "placeholder" and list(arg.users) == [node] for arg in node.args)
        assert [arg.meta["val"].shape for arg in node.args] == [node.meta["val"].shape] * 2


def test_inductor_fuses_mask_and_matches_eager():
    model, sparsifier, x = prepared_model({"sparsity_level": 1.0, "sparse_block_shape": (1, 4), "zeros_per_block": 2})
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, x)
        torch.testing.assert_close(out, model(x), **FP32)
        # the mask multiply is lowered into generated kernels, not left to an aten fallback call
        assert not re.search(r"aten\.mul\.\w+\(", "\n".join(codes))
        restep(sparsifier, sparsity_level=0.5)  # 2:4 in half of the (1, 4) blocks
        after = compiled(x)
        torch.testing.assert_close(after, model(x), **FP32)
        assert not torch.allclose(after, out)
    assert counter.frame_count == 1
