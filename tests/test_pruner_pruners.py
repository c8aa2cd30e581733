"""SaliencyPruner, LSTMSaliencyPruner and FPGMPruner: worked examples, parity with torch.ao.pruning's
pruners on seeded models (masks, pruned shapes and outputs), validation, the GPU path."""
import copy

import pytest
import torch
from torch import nn
from torch.ao.pruning._experimental import pruner as torch_pruner
from torch.nn.utils import parametrize

import pruner_models as zoo
from conftest import TOLERANCES, cuda_only, tie_free
from sparsity_ext.pruner import FPGM_pruner, FPGMPruner, LSTMSaliencyPruner, SaliencyPruner

TOL = TOLERANCES[torch.float32]


def run(pruner, model, config, x, steps=1):
    """prepare, `steps` steps; returns (masks, masked output, pruned model, pruned output)."""
    pruner.prepare(model, config)
    for _ in range(steps):
        pruner.step()
    masks = [pruner.state[c["tensor_fqn"]]["mask"].clone() for c in config]
    masked = model(x)
    pruned = pruner.prune()
    return masks, masked, pruned, pruned(x)


def assert_same_run(ours, theirs):
    for a, b in zip(ours[0], theirs[0]):
        assert torch.equal(a, b)
    for a, b in zip(ours[1:], theirs[1:]):
        if isinstance(a, nn.Module):
            assert {n: p.shape for n, p in a.named_parameters()} == {n: p.shape for n, p in b.named_parameters()}
        else:
            torch.testing.assert_close(a, b, **TOL)


def with_tie_free_weights(model, seed=0):
    """Distinct |weights|, so row norms and distances rank without ties (torch.topk's tie order is unspecified)."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(tie_free(tuple(p.shape), seed=seed + i) * 0.5)
    return model


# ---------------------------------------------------------------------------------- SaliencyPruner
def test_saliency_pruner_prunes_the_rows_of_smallest_l1_norm():
    model = zoo.LinearChain()
    with torch.no_grad():
        model.linear1.weight.copy_(torch.arange(1.0, 5.0)[:, None].expand(4, 4))
    pruner = SaliencyPruner({})
    pruner.prepare(model, [{"tensor_fqn": "linear1.weight", "sparsity_level": 0.5}])
    pruner.step()
    assert pruner.state["linear1.weight"]["mask"].tolist() == [False, False, True, True]
    pruned = pruner.prune()
    torch.testing.assert_close(pruned.linear1.weight, torch.tensor([[3.0] * 4, [4.0] * 4]))
    assert pruned.linear2.in_features == 2


@pytest.mark.parametrize("model_cls,layers,shape", [
    (zoo.LinearActivationChain, ["seq.0", "seq.2", "seq.4", "linear1", "linear2"], (16, 7)),
    (zoo.ConvPoolChain, ["seq.0", "seq.3", "conv1", "conv2", "conv3"], (2, 1, 64, 64)),
    (zoo.ConvPoolFlattenChain, ["seq.0", "conv1", "conv2"], (2, 1, 16, 16)),
])
@pytest.mark.parametrize("steps", [1, 2])
def test_saliency_pruner_matches_torch_ao(model_cls, layers, shape, steps):
    model = with_tie_free_weights(model_cls().eval())
    x = torch.randn(shape)
    config = [{"tensor_fqn": f"{layer}.weight", "sparsity_level": 0.4} for layer in layers]
    ours = run(SaliencyPruner({}), copy.deepcopy(model), config, x, steps)
    theirs = run(torch_pruner.SaliencyPruner({}), copy.deepcopy(model), config, x, steps)
    assert_same_run(ours, theirs)
    torch.testing.assert_close(ours[3], ours[1], **TOL)  # the pruned model is the masked one
    assert int((~ours[0][0]).sum()) == int(len(ours[0][0]) * 0.4)


def test_saliency_pruner_masks_only_grow_and_ties_go_to_the_lower_row():
    model = nn.Sequential(nn.Linear(3, 6, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0] * 3, [1.0] * 3, [1.0] * 3, [3.0] * 3, [1.0] * 3, [5.0] * 3]))
    pruner = SaliencyPruner({"sparsity_level": 0.5})
    pruner.prepare(model, None)
    pruner.step()
    assert pruner.state["0.weight"]["mask"].tolist() == [True, False, False, True, False, True]
    pruner.step()  # the pruned rows now score 0 and are picked again: nothing more is pruned
    assert pruner.state["0.weight"]["mask"].tolist() == [True, False, False, True, False, True]
    pruner.groups[0]["sparsity_level"] = 0.84  # int(6 * 0.84) = 5 rows
    pruner.step()
    assert pruner.state["0.weight"]["mask"].tolist() == [False, False, False, False, False, True]


@pytest.mark.parametrize("config,error,message", [
    ([{"tensor_fqn": "0.bias"}], ValueError, "at least 2 dims"),
    ([{"tensor_fqn": "0.weight", "sparsity_level": 1.5}], ValueError, r"sparsity_level must be in \[0.0, 1.0\]"),
    ([{"tensor_fqn": "0.weight", "sparsity_level": None}], TypeError, "must be a number"),
])
def test_saliency_pruner_rejects_bad_groups_before_touching_the_model(config, error, message):
    model = nn.Sequential(nn.Linear(3, 6))
    with pytest.raises(error, match=message):
        SaliencyPruner({"sparsity_level": 0.5}).prepare(model, config)
    assert not parametrize.is_parametrized(model[0]) and model[0].bias is not None


# ----------------------------------------------------------------------------- LSTMSaliencyPruner
def test_lstm_saliency_pruner_prunes_each_gate_separately():
    model = zoo.LSTMLinear(2, 2, 2)
    weights = torch.tensor([[1.0, 1], [2, 2], [2, 2], [1, 1], [-1, -1], [-2, -2], [-2, -2], [-1, -1]])
    with torch.no_grad():
        model.lstm.weight_ih_l0.copy_(weights)
        model.lstm.weight_hh_l0.copy_(weights)
        model.lstm.bias_ih_l0.copy_(weights[:, 0])
        model.lstm.bias_hh_l0.copy_(weights[:, 0])
    theirs = copy.deepcopy(model)
    config = [{"tensor_fqn": "lstm.weight_ih_l0"}, {"tensor_fqn": "lstm.weight_hh_l0"}]
    x = torch.ones(3, 1, 2)
    ours = run(LSTMSaliencyPruner({"sparsity_level": 0.5}), model, config, x)
    expected = [False, True, True, False, False, True, True, False]  # the smaller row of each gate goes
    assert ours[0][0].tolist() == expected and ours[0][1].tolist() == expected
    torch.testing.assert_close(model.lstm.weight_ih_l0, torch.tensor([[2.0, 2], [2, 2], [-2, -2], [-2, -2]]))
    assert model.lstm.weight_hh_l0.shape == (4, 1) and model.lstm.hidden_size == 1 and model.linear.in_features == 1
    assert_same_run(ours, run(torch_pruner.LSTMSaliencyPruner({"sparsity_level": 0.5}), theirs, config, x))


@pytest.mark.parametrize("model_cls", [zoo.LSTMLinear, zoo.LSTMLayerNormLinear])
@pytest.mark.parametrize("num_layers,level", [(1, 0.5), (2, 0.25), (3, 0.75)])
def test_lstm_saliency_pruner_matches_torch_ao(model_cls, num_layers, level):
    model = with_tie_free_weights(model_cls(8, 8, 6, num_layers).eval())
    x = torch.randn(5, 3, 8)
    config = [{"tensor_fqn": f"lstm.weight_{kind}_l{i}"} for i in range(num_layers) for kind in ("ih", "hh")]
    ours = run(LSTMSaliencyPruner({"sparsity_level": level}), copy.deepcopy(model), config, x)
    theirs = run(torch_pruner.LSTMSaliencyPruner({"sparsity_level": level}), copy.deepcopy(model), config, x)
    assert_same_run(ours, theirs)
    assert ours[2].lstm.hidden_size == 8 - int(8 * level)


def test_lstm_saliency_pruner_splits_any_weight_in_quarters_like_torch_ao():
    model = with_tie_free_weights(nn.Sequential(nn.Linear(4, 10)))
    config = [{"tensor_fqn": "0.weight"}]
    ours, theirs = LSTMSaliencyPruner({"sparsity_level": 0.5}), torch_pruner.LSTMSaliencyPruner({"sparsity_level": 0.5})
    ours.prepare(copy.deepcopy(model), config)
    theirs.prepare(copy.deepcopy(model), config)
    ours.step()
    theirs.step()
    assert torch.equal(ours.state["0.weight"]["mask"], theirs.state["0.weight"]["mask"])
    assert int((~ours.state["0.weight"]["mask"]).sum()) == 5  # five parts of 2 rows, one row each


# ------------------------------------------------------------------------------------- FPGMPruner
class ThreeFilters(nn.Module):
    """conv1's filters are all 3.0, all 2.0 and all 0.1; conv2's 6.0, 7.0, 0.4 and 0.5."""

    def __init__(self):
        super().__init__()
        self.conv2d1 = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.conv2d2 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv2d1.weight.copy_(torch.tensor([3.0, 2.0, 0.1])[:, None, None, None].expand(3, 1, 3, 3))
            self.conv2d2.weight.copy_(torch.tensor([6.0, 7.0, 0.4, 0.5])[:, None, None, None].expand(4, 3, 3, 3))

    def forward(self, x):
        return self.conv2d2(self.conv2d1(x))


def test_fpgm_distance_is_the_sum_of_distances_to_every_filter():
    filters = ThreeFilters().conv2d1.weight
    # pairwise L2 distances: |3-2|*3 = 3, |3-0.1|*3 = 8.7, |2-0.1|*3 = 5.7 (9 elements each)
    # the built-in distances have the weight's dtype, as torch.ao.pruning's
    l2_sums, l1_sums = FPGMPruner()._compute_distance(filters), FPGMPruner(dist=1)._compute_distance(filters)
    torch.testing.assert_close(l2_sums, torch.tensor([11.7, 8.7, 14.4]))
    torch.testing.assert_close(l1_sums, torch.tensor([35.1, 26.1, 43.2]))
    chebyshev = FPGMPruner(dist=lambda x: torch.cdist(x, x, p=float("inf")))
    torch.testing.assert_close(chebyshev._compute_distance(filters), torch.tensor([3.9, 2.9, 4.8]))


@pytest.mark.parametrize("dist", [None, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fpgm_distance_dtype_is_torch_aos(dist, dtype):
    filters = tie_free((5, 2, 3, 3), seed=4).to(dtype)
    ours = FPGMPruner(dist=dist)._compute_distance(filters)
    theirs = torch_pruner.FPGMPruner(dist=dist)._compute_distance(filters)
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fpgm_distance_of_half_precision_weights_is_float32(dtype):
    # torch.ao.pruning's cdist rejects these dtypes on the CPU; they are scored in float32
    filters = tie_free((5, 2, 3, 3), seed=4).to(dtype)
    distance = FPGMPruner()._compute_distance(filters)
    assert distance.dtype == torch.float32
    torch.testing.assert_close(distance, FPGMPruner()._compute_distance(filters.float()))


def test_fpgm_prunes_the_filter_nearest_the_others_not_the_smallest():
    model = ThreeFilters()
    x = torch.ones(1, 1, 32, 32)
    pruner = FPGMPruner(0.3)
    masks, _, pruned, y = run(pruner, model, [{"tensor_fqn": "conv2d1.weight"}], x)
    assert masks[0].tolist() == [True, False, True]  # the 2.0 filter goes, the 0.1 one stays
    assert y.shape == (1, 4, 32, 32) and pruned.conv2d2.weight.shape == (4, 2, 3, 3)
    torch.testing.assert_close(pruned.conv2d1.weight, torch.tensor([3.0, 0.1])[:, None, None, None].expand(2, 1, 3, 3))

    model = ThreeFilters()
    config = [{"tensor_fqn": "conv2d1.weight"}, {"tensor_fqn": "conv2d2.weight", "sparsity_level": 0.5}]
    masks, _, pruned, y = run(FPGMPruner(0.3), model, config, x)
    # distance sums: 6.0 and 0.5 tie lowest (62.87), then 0.4 (63.91), 7.0 (73.27)
    assert masks[1].tolist() == [False, True, True, False] and y.shape == (1, 2, 32, 32)
    assert pruned.conv2d2.weight.shape == (2, 2, 3, 3)


@pytest.mark.parametrize("dist", [None, 1])
@pytest.mark.parametrize("level", [0.3, 0.5])
def test_fpgm_matches_torch_ao(dist, level):
    model = with_tie_free_weights(zoo.ConvActivationChain().eval())
    x = torch.randn(2, 1, 16, 16)
    config = [{"tensor_fqn": f"{layer}.weight"} for layer in ("seq.0", "seq.2", "seq.4", "conv1")]
    ours = run(FPGMPruner(level, dist), copy.deepcopy(model), config, x)
    theirs = run(torch_pruner.FPGMPruner(level, dist), copy.deepcopy(model), config, x)
    assert_same_run(ours, theirs)
    torch.testing.assert_close(ours[3], ours[1], **TOL)


def test_fpgm_sparsity_level_extremes():
    model = ThreeFilters()
    pruner = FPGMPruner(0.5)
    pruner.prepare(model, [{"tensor_fqn": "conv2d2.weight"}])
    pruner.step()
    mask = pruner.state["conv2d2.weight"]["mask"]
    assert int(mask.sum()) == 2
    pruner.groups[0]["sparsity_level"] = 1.0
    pruner.step()
    assert not mask.any()
    pruner.groups[0]["sparsity_level"] = 0.0
    pruner.step()
    assert mask.all() and pruner.state["conv2d2.weight"]["mask"] is mask


def test_fpgm_blocked_distances_of_a_large_layer_equal_the_direct_ones(monkeypatch):
    weight = tie_free((300, 4, 3, 3), seed=3)
    direct = FPGMPruner()._compute_distance(weight)
    monkeypatch.setattr(FPGM_pruner, "_MAX_DISTANCES_AT_ONCE", 300 * 64)  # blocks of 64 rows
    blocked = FPGMPruner()._compute_distance(weight)
    torch.testing.assert_close(blocked, direct, rtol=1e-5, atol=1e-4)
    assert torch.equal(torch.argsort(blocked)[:100], torch.argsort(direct)[:100])


def test_fpgm_rejects_unknown_distances_and_levels():
    with pytest.raises(NotImplementedError, match="dist must be 1, 2 or a callable"):
        FPGMPruner(0.5, dist=3)
    model = ThreeFilters()
    with pytest.raises(TypeError, match="sparsity_level must be a number"):
        FPGMPruner("half").prepare(model, [{"tensor_fqn": "conv2d1.weight"}])
    assert not parametrize.is_parametrized(model.conv2d1)


@cuda_only
@pytest.mark.parametrize("make_pruner", [lambda: FPGMPruner(0.4), lambda: SaliencyPruner({"sparsity_level": 0.4})])
def test_pruner_scores_on_cuda_match_cpu(make_pruner):
    model = nn.Sequential(nn.Conv2d(16, 512, 3), nn.ReLU(), nn.Conv2d(512, 8, 3))
    with torch.no_grad():
        model[0].weight.copy_(tie_free((512, 16, 3, 3), seed=5))
    masks = []
    for device in ("cpu", "cuda"):
        pruner = make_pruner()
        pruner.prepare(copy.deepcopy(model).to(device), [{"tensor_fqn": "0.weight"}])
        pruner.step()
        masks.append(pruner.state["0.weight"]["mask"].cpu())
    assert torch.equal(masks[0], masks[1])


# --------------------------------------------------------------------------------- load_state_dict
STATE_DICT_CASES = {
    "saliency": (lambda: SaliencyPruner({"sparsity_level": 0.5}), lambda: zoo.LinearBiasChain(),
                 ["seq.0.weight", "seq.2.weight"], (3, 7)),
    "fpgm": (lambda: FPGMPruner(0.5), lambda: zoo.ConvActivationChain().eval(),
             ["seq.0.weight", "seq.2.weight", "conv1.weight"], (2, 1, 16, 16)),
    "lstm-saliency": (lambda: LSTMSaliencyPruner({"sparsity_level": 0.5}), lambda: zoo.LSTMLinear(8, 8, 6, 2).eval(),
                      [f"lstm.weight_{kind}_l{i}" for i in range(2) for kind in ("ih", "hh")], (5, 3, 8)),
}


def _stepped(case, fqns=None):
    """(pruner, model) of the case on a fresh model (the same weights every call): prepared on the case's
    tensors and stepped once, or, when `fqns` is given, prepared on those and not stepped (all rows kept)."""
    make_pruner, make_model, case_fqns, _ = STATE_DICT_CASES[case]
    torch.manual_seed(0)
    model = with_tie_free_weights(make_model())
    pruner = make_pruner()
    pruner.prepare(model, [{"tensor_fqn": fqn} for fqn in (fqns or case_fqns)])
    if fqns is None:
        pruner.step()
    return pruner, model


@pytest.mark.parametrize("case", sorted(STATE_DICT_CASES))
def test_pruner_loads_its_own_state_dict(case):
    """A fresh pruner prepared on an identical model takes the row masks (torch.ao.pruning's pruners stack a
    second, weight-shaped mask instead): same masks, same masked output, same pruned model."""
    fqns, x_shape = STATE_DICT_CASES[case][2], STATE_DICT_CASES[case][3]
    x = torch.randn(x_shape)
    saved, saved_model = _stepped(case)
    loaded, loaded_model = _stepped(case, fqns=fqns)
    loaded.load_state_dict(saved.state_dict())
    assert loaded.state == saved.state  # the saved mask tensors themselves, as torch.ao.pruning's load keeps them
    for fqn in fqns:
        module_fqn, _, tensor_name = fqn.rpartition(".")
        parametrizations = loaded_model.get_submodule(module_fqn).parametrizations[tensor_name]
        assert len(parametrizations) == 1 and parametrizations[0].mask is loaded.state[fqn]["mask"]
        assert torch.equal(loaded.state[fqn]["mask"], saved.state[fqn]["mask"])
        assert not loaded.state[fqn]["mask"].all()
    torch.testing.assert_close(loaded_model(x), saved_model(x), **TOL)
    loaded_pruned, saved_pruned = loaded.prune(), saved.prune()
    assert ({n: p.shape for n, p in loaded_pruned.named_parameters()}
            == {n: p.shape for n, p in saved_pruned.named_parameters()})
    torch.testing.assert_close(loaded_pruned(x), saved_pruned(x), **TOL)


def test_pruner_state_dict_loads_into_tensors_it_did_not_prepare():
    x = torch.randn(3, 7)
    saved, saved_model = _stepped("saliency")
    loaded, loaded_model = _stepped("saliency", fqns=["seq.0.weight"])  # seq.2 not prepared
    loaded.load_state_dict(saved.state_dict())
    assert torch.equal(loaded.state["seq.2.weight"]["mask"], saved.state["seq.2.weight"]["mask"])
    torch.testing.assert_close(loaded_model(x), saved_model(x), **TOL)
    torch.testing.assert_close(loaded.prune()(x), saved.prune()(x), **TOL)


@pytest.mark.parametrize("bad_mask", [torch.ones(5, dtype=torch.bool), torch.ones(8, 4, dtype=torch.bool),
                                      torch.ones(8), "not a tensor"])
def test_pruner_load_state_dict_rejects_a_bad_row_mask_before_changing_anything(bad_mask):
    saved, _ = _stepped("saliency")
    loaded, model = _stepped("saliency", fqns=STATE_DICT_CASES["saliency"][2])
    state_dict = saved.state_dict()
    state_dict["state"] = {**state_dict["state"], "seq.2.weight": {"mask": bad_mask}}
    masks = {fqn: (s["mask"], s["mask"].clone()) for fqn, s in loaded.state.items()}
    groups = loaded.groups
    with pytest.raises((ValueError, TypeError), match="seq.2.weight"):
        loaded.load_state_dict(state_dict)
    assert loaded.groups is groups
    for fqn, (buffer, before) in masks.items():
        assert loaded.state[fqn]["mask"] is buffer and torch.equal(buffer, before)
    assert len(model.seq[0].parametrizations.weight) == 1
