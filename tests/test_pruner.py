"""BaseStructuredSparsifier: prepare / step / prune on the chains torch.ao.pruning supports (parity with
torch.ao.pruning on the same seeded models and masks), bias propagation, the chains sparsity_ext adds,
and bad input (a clear error, the model untouched)."""
import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.pruning._experimental.pruner import BaseStructuredSparsifier as TorchBase
from torch.nn.utils import parametrize

import pruner_models as zoo
from conftest import TOLERANCES, cuda_only
from sparsity_ext.pruner import BaseStructuredSparsifier, BiasHook, FakeStructuredSparsity, SaliencyPruner
from sparsity_ext.pruner import match_utils, prune_functions
from sparsity_ext.pruner.base_structured_sparsifier import _get_default_structured_pruning_patterns

TOL = TOLERANCES[torch.float32]
OursRowPruner, TorchRowPruner = zoo.row_pruner(BaseStructuredSparsifier), zoo.row_pruner(TorchBase)


def config_of(layers, prune_bias=True):
    return [{"tensor_fqn": f"{layer}.weight", "prune_bias": prune_bias} for layer in layers]


def prepared(pruner_cls, model, config, x):
    """prepare + step, then the masked model's output."""
    pruner = pruner_cls({})
    pruner.prepare(model, config)
    pruner.step()
    return pruner, model(x)


def param_shapes(module):
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def snapshot(model):
    """Everything prune() may change: tensors (by value), their shapes, parametrizations, hooks."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {name: parametrize.is_parametrized(m) for name, m in model.named_modules()},
            {name: len(m._forward_hooks) for name, m in model.named_modules()})


def assert_unchanged(model, before):
    after = snapshot(model)
    assert before[1] == after[1] and before[2] == after[2]
    assert before[0].keys() == after[0].keys()
    for key, value in before[0].items():
        assert torch.equal(value, after[0][key]), key


# Chains of torch.ao.pruning's prune(): model, the layers pruned, input shape. The last layer of each list
# feeds the model's output (its pruned rows leave the output).
ZOO = {
    "linear": (zoo.LinearChain, ["seq.0", "seq.1", "seq.2", "linear1", "linear2"], (16, 7)),
    "linear_bias": (zoo.LinearBiasChain, ["seq.0", "seq.1", "seq.2", "seq.3", "seq.4"], (16, 7)),
    "linear_activation": (zoo.LinearActivationChain, ["seq.0", "seq.2", "seq.4", "linear1", "linear2", "linear3"],
                          (16, 7)),
    "conv": (zoo.ConvChain, ["seq.0", "seq.1", "conv1", "conv2"], (2, 1, 16, 16)),
    "conv_bias": (zoo.ConvBiasChain, ["seq.0", "seq.1", "seq.2", "conv1", "conv2"], (2, 1, 16, 16)),
    "conv_activation": (zoo.ConvActivationChain, ["seq.0", "seq.2", "seq.4", "conv1", "conv2"], (2, 1, 16, 16)),
    "conv_padding": (zoo.ConvPaddingChain, ["seq.0", "seq.2", "seq.4", "seq.6", "seq.8", "conv1", "conv2"],
                     (2, 1, 16, 16)),
    "conv_pool": (zoo.ConvPoolChain, ["seq.0", "seq.3", "conv1", "conv2", "conv3", "conv4"], (2, 1, 64, 64)),
    "conv_pool_flatten": (zoo.ConvPoolFlattenChain, ["seq.0", "seq.3", "conv1", "conv2", "fc"], (2, 1, 16, 16)),
    "conv_pool_flatten_functional": (zoo.ConvPoolFlattenFunctionalChain, ["conv1", "conv2", "fc"], (2, 1, 16, 16)),
}


def kept_outputs(y, last_layer_pruned):
    """The masked model's outputs that survive pruning of the last layer (every_third_row drops 1, 4, ...)."""
    if not last_layer_pruned:
        return y
    keep = torch.ones(y.shape[1], dtype=torch.bool)
    keep[1::3] = False
    return y[:, keep]


# ------------------------------------------------------------------------------- prepare, step
@pytest.mark.parametrize("model_cls,layers", [(zoo.LinearChain, ["seq.0", "linear1"]),
                                              (zoo.ConvBiasChain, ["seq.0", "seq.2", "conv1"])])
def test_prepare_attaches_row_masks_and_bias_hooks(model_cls, layers):
    model = model_cls()
    biases = {layer: model.get_submodule(layer).bias for layer in layers}
    pruner = OursRowPruner({})
    pruner.prepare(model, config_of(layers))
    for group, layer in zip(pruner.groups, layers):
        module = model.get_submodule(layer)
        assert group["module"] is module and group["tensor_fqn"] == f"{layer}.weight"
        p = module.parametrizations.weight[0]
        assert type(p) is FakeStructuredSparsity
        assert p.mask.dtype == torch.bool and p.mask.shape == (module.weight.shape[0],) and p.mask.all()
        assert pruner.state[f"{layer}.weight"]["mask"] is p.mask  # state holds the live mask
        assert p.state_dict() == {}  # the mask is saved by the pruner, not by the module
        assert sum(isinstance(h, BiasHook) for h in module._forward_hooks.values()) == 1
        if biases[layer] is None:
            assert module.bias is None and not hasattr(module, "_bias")
        else:  # the bias moves to `_bias`, re-added by the hook
            assert module.bias is None and torch.equal(module._bias, biases[layer]) and module.prune_bias is True


def test_prepare_without_config_lists_linear_conv_and_lstm_weights():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4))
            self.conv = nn.Conv2d(1, 2, 3)
            self.lstm = nn.LSTM(4, 4, num_layers=2)
            self.norm = nn.LayerNorm(4)

    pruner = OursRowPruner({})
    model = Mixed()
    pruner.prepare(model, None)
    fqns = sorted(g["tensor_fqn"] for g in pruner.groups)
    assert fqns == sorted(["seq.0.weight", "seq.2.weight", "conv.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0",
                           "lstm.weight_ih_l1", "lstm.weight_hh_l1"])
    assert all(parametrize.is_parametrized(g["module"], g["tensor_name"]) for g in pruner.groups)


def test_step_updates_the_masks_in_place_and_respects_enable_mask_update():
    model = zoo.ConvChain()
    pruner = OursRowPruner({})
    pruner.prepare(model, config_of(["seq.0", "conv1"]))
    pruner.enable_mask_update = False
    pruner.step()
    assert all(pruner.state[g["tensor_fqn"]]["mask"].all() for g in pruner.groups)
    pruner.enable_mask_update = True
    pruner.step()
    for group in pruner.groups:
        mask = group["module"].parametrizations.weight[0].mask
        assert int(mask.count_nonzero()) == mask.numel() - len(range(1, mask.numel(), 3))
        weight = group["module"].weight  # the parametrized (masked) weight
        assert not weight[1].any() and weight[0].any()


def test_fake_structured_sparsity_masks_rows_of_any_rank():
    mask = torch.tensor([True, False, True])
    p = FakeStructuredSparsity(mask)
    w = torch.randn(3, 2, 2, 2)
    assert torch.equal(p(w), w * mask[:, None, None, None])
    with pytest.raises(AssertionError, match="rows"):
        p(torch.randn(4, 2))


@pytest.mark.parametrize("prune_bias", [True, False])
def test_bias_hook_adds_the_original_bias_and_zeroes_pruned_rows_with_prune_bias(prune_bias):
    torch.manual_seed(0)
    linear = nn.Linear(4, 6)
    reference = copy.deepcopy(linear)
    model = nn.Sequential(linear)
    pruner = OursRowPruner({})
    pruner.prepare(model, [{"tensor_fqn": "0.weight", "prune_bias": prune_bias}])
    pruner.step()
    x = torch.randn(5, 3, 4)  # a 3-D input: the bias broadcasts along the last dim
    keep = pruner.state["0.weight"]["mask"]
    expected = F.linear(x, reference.weight * keep[:, None], reference.bias * (keep if prune_bias else 1))
    torch.testing.assert_close(model(x), expected, **TOL)
    assert bool((linear._bias[~keep] == 0).all()) == prune_bias


def test_bias_hook_on_unbatched_conv_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3))
    pruner, _ = prepared(OursRowPruner, model, config_of(["0"]), torch.randn(1, 2, 8, 8))
    x = torch.randn(2, 8, 8)
    torch.testing.assert_close(model(x), model(x[None])[0], **TOL)


def test_prune_before_prepare_raises():
    with pytest.raises(RuntimeError, match="call prepare"):
        OursRowPruner({}).prune()


def test_bias_hook_lets_the_bias_train():
    model = nn.Sequential(nn.Linear(4, 6))
    pruner = OursRowPruner({})
    pruner.prepare(model, [{"tensor_fqn": "0.weight", "prune_bias": False}])
    model(torch.randn(2, 4)).sum().backward()
    assert model[0]._bias.grad is not None and torch.equal(model[0]._bias.grad, torch.full((6,), 2.0))


# ------------------------------------------------------------------------- prune: torch.ao parity
@pytest.mark.parametrize("prune_bias", [True, False])
@pytest.mark.parametrize("case", list(ZOO))
def test_prune_matches_torch_ao_and_the_masked_model(case, prune_bias):
    model_cls, layers, shape = ZOO[case]
    # With prune_bias=False torch.ao.pruning mishandles the bias of a pruned layer that feeds the
    # output (see test_final_layer_bias_survives_prune), so its parity runs leave that layer out.
    layers = layers if prune_bias else layers[:-1]
    torch.manual_seed(0)
    model = model_cls().eval()
    x = torch.randn(shape)
    theirs, ours = copy.deepcopy(model), copy.deepcopy(model)
    torch_pruner, torch_masked = prepared(TorchRowPruner, theirs, config_of(layers, prune_bias), x)
    pruner, masked = prepared(OursRowPruner, ours, config_of(layers, prune_bias), x)
    for layer in layers:
        assert torch.equal(pruner.state[f"{layer}.weight"]["mask"], torch_pruner.state[f"{layer}.weight"]["mask"])
    torch.testing.assert_close(masked, torch_masked, **TOL)

    pruned, torch_pruned = pruner.prune(), torch_pruner.prune()
    assert pruner.traced is pruned
    assert param_shapes(pruned) == param_shapes(torch_pruned)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    y = pruned(x)
    torch.testing.assert_close(y, torch_pruned(x), **TOL)
    torch.testing.assert_close(y, kept_outputs(masked, prune_bias), **TOL)  # same function as the masked model
    for group in pruner.groups:  # no parametrization, mask or BiasHook left
        module = group["module"]
        assert not hasattr(module, "parametrizations") and not hasattr(module, "_bias")
        assert not any(isinstance(h, BiasHook) for h in module._forward_hooks.values())
    assert ours(x).shape == y.shape  # the original model object is pruned too (shared modules)


def test_prune_removes_rows_and_shrinks_the_next_layer():
    model = zoo.LinearBiasChain()
    pruner = OursRowPruner({})
    pruner.prepare(model, config_of(["seq.0", "seq.2"]))
    pruner.step()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pruner.prune()
    keep5 = torch.tensor([True, False, True, True, False])
    keep3 = torch.tensor([True, False, True])
    assert model.seq[0].out_features == 3 and model.seq[1].in_features == 3
    torch.testing.assert_close(model.seq[0].weight, original["seq.0.parametrizations.weight.original"][keep5])
    torch.testing.assert_close(model.seq[0].bias, original["seq.0._bias"][keep5])
    torch.testing.assert_close(model.seq[1].weight, original["seq.1.weight"][:, keep5])
    assert model.seq[2].weight.shape == (2, 6) and model.seq[3].weight.shape == (3, 2)
    torch.testing.assert_close(model.seq[3].weight, original["seq.3.weight"][:, keep3])


class TwoLinear(nn.Module):
    """fc1 -> activation (a module, a function or None) -> fc2."""

    def __init__(self, activation, bias1=True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5, bias=bias1), nn.Linear(5, 4)
        self.act = activation if isinstance(activation, nn.Module) else None
        self.fn = None if isinstance(activation, nn.Module) else activation

    def forward(self, x):
        x = self.fc1(x)
        if self.act is not None:
            x = self.act(x)
        if self.fn is not None:
            x = self.fn(x)
        return self.fc2(x)


@pytest.mark.parametrize("activation", [None, nn.ReLU(), torch.tanh, F.relu, nn.GELU()])
def test_bias_propagation_linear(activation):
    """prune_bias=False: a pruned row keeps outputting act(bias); that constant is folded into the next bias."""
    torch.manual_seed(0)
    model = TwoLinear(activation)
    x = torch.randn(8, 6)
    pruner, masked = prepared(OursRowPruner, model, config_of(["fc1"], prune_bias=False), x)
    b1 = model.fc1._bias.detach().clone()
    w2, b2 = model.fc2.weight.detach().clone(), model.fc2.bias.detach().clone()
    pruner.prune()
    pruned_rows = torch.tensor([False, True, False, False, True])
    constant = b1[pruned_rows] if activation is None else activation(b1[pruned_rows])
    torch.testing.assert_close(model.fc2.bias, b2 + w2[:, pruned_rows] @ constant, **TOL)
    torch.testing.assert_close(model(x), masked, **TOL)


def test_bias_propagation_conv_and_padding():
    """Conv -> conv: the pruned channels' act(bias) folds into the next conv's bias, summed over its kernel.
    When the next conv pads, the channels are kept instead: a constant map padded with zeros is not
    constant, so it cannot become a bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Conv2d(4, 3, 3, padding=1))
    x = torch.randn(2, 2, 12, 12)
    pruner, masked = prepared(OursRowPruner, model, config_of(["0", "2"], prune_bias=False), x)
    b0, b2 = model[0]._bias.detach().clone(), model[2]._bias.detach().clone()
    w2 = model[2].parametrizations.weight.original.detach().clone()
    pruner.prune()
    pruned0 = torch.tensor([False, True, False, False, True, False])
    assert model[0].weight.shape == (4, 2, 3, 3) and model[2].in_channels == 4
    folded = b2 + torch.einsum("opij,p->o", w2[:, pruned0], torch.relu(b0[pruned0]))
    kept2 = torch.tensor([True, False, True, True])
    assert model[2].weight.shape == (4, 4, 3, 3) and not model[2].weight[1].any()  # all 4 channels kept
    torch.testing.assert_close(model[2].bias[kept2], folded[kept2], **TOL)
    torch.testing.assert_close(model[2].bias[1], b2[1], **TOL)  # the kept pruned channel outputs its bias
    torch.testing.assert_close(model(x), masked, **TOL)


# --------------------------------------------------------------------- LSTM chains (torch.ao parity)
@pytest.mark.parametrize("model_cls", [zoo.LSTMLinear, zoo.LSTMLayerNormLinear])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_prune_lstm_matches_torch_ao(model_cls, num_layers):
    torch.manual_seed(0)
    model = model_cls(8, 8, 6, num_layers).eval()
    x = torch.randn(5, 3, 8)
    config = [{"tensor_fqn": f"lstm.weight_{kind}_l{i}"} for i in range(num_layers) for kind in ("ih", "hh")]
    theirs, ours = copy.deepcopy(model), copy.deepcopy(model)
    torch_pruner, torch_masked = prepared(TorchRowPruner, theirs, config, x)
    pruner, masked = prepared(OursRowPruner, ours, config, x)
    torch.testing.assert_close(masked, torch_masked, **TOL)
    pruned, torch_pruned = pruner.prune(), torch_pruner.prune()
    assert param_shapes(pruned) == param_shapes(torch_pruned)
    assert ours.lstm.hidden_size == 4 and ours.linear.in_features == 4
    assert ours.lstm.weight_hh_l0.shape == (16, 4) and ours.lstm.weight_ih_l0.shape == (16, 8)
    if num_layers > 1:
        assert ours.lstm.weight_ih_l1.shape == (16, 4)
    if model_cls is zoo.LSTMLayerNormLinear:
        assert ours.norm.normalized_shape == (4,) and ours.norm.weight.shape == (4,)
    # Masking LSTM rows is not removing hidden units, so the pruned LSTM is compared with torch.ao's.
    torch.testing.assert_close(pruned(x), torch_pruned(x), **TOL)


# ---------------------------------------------------------------- chains and fixes beyond torch.ao
@pytest.mark.parametrize("train", [False, True])
def test_batch_norm_chains_prune_to_the_masked_function(train):
    torch.manual_seed(0)
    model = zoo.randomize_batch_norms(zoo.ConvBatchNormChain()).train(train)
    x = torch.randn(4, 3, 16, 16)
    pruner = SaliencyPruner({"sparsity_level": 0.3})
    pruner.prepare(model, [{"tensor_fqn": f"conv{i}.weight"} for i in range(1, 6)])
    pruner.step()
    masked = model(x)
    pruned = pruner.prune()
    # conv1 -> bn1 -> conv2 and conv3 -> bn3 -> relu -> pool -> conv4 are pruned, the BatchNorms with them;
    # conv2 and conv4 feed padded convs through a BatchNorm, so they keep their channels.
    assert model.conv1.out_channels == 6 and model.bn1.num_features == 6 and model.bn1.running_mean.shape == (6,)
    assert model.conv2.in_channels == 6 and model.conv2.out_channels == 10 and model.bn2.num_features == 10
    assert model.conv3.out_channels == 9 and model.bn3.weight.shape == (9,) and model.conv4.in_channels == 9
    assert model.conv4.out_channels == 9 and model.conv5.out_channels == 7 and model.fc.in_features == 28
    torch.testing.assert_close(pruned(x), masked, **TOL)


def test_batch_norm_to_output():
    torch.manual_seed(0)
    model = zoo.randomize_batch_norms(nn.Sequential(nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6))).eval()
    x = torch.randn(2, 2, 8, 8)
    pruner = OursRowPruner({})
    pruner.prepare(model, config_of(["0"]))
    pruner.step()
    masked = model(x)
    pruner.prune()
    assert model[1].num_features == 4
    torch.testing.assert_close(model(x), kept_outputs(masked, True), **TOL)


@pytest.mark.parametrize("activation", [torch.sigmoid, nn.Sigmoid(), nn.Softplus()])
def test_activation_of_zero_is_folded_without_a_bias(activation):
    """f(0) != 0: a pruned channel without bias still outputs f(0); torch.ao.pruning drops it."""
    torch.manual_seed(0)
    model = TwoLinear(activation, bias1=False)
    x = torch.randn(8, 6)
    theirs = copy.deepcopy(model)
    pruner, masked = prepared(OursRowPruner, model, config_of(["fc1"]), x)
    pruner.prune()
    torch.testing.assert_close(model(x), masked, **TOL)
    if not isinstance(activation, nn.Module):  # torch.sigmoid is not one of torch.ao's activations
        return
    torch_pruner, torch_masked = prepared(TorchRowPruner, theirs, config_of(["fc1"]), x)
    torch_pruner.prune()
    assert not torch.allclose(theirs(x), torch_masked, **TOL)


def test_functional_activation_arguments_are_kept():
    class LeakyChain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 4)

        def forward(self, x):
            return self.fc2(F.leaky_relu(self.fc1(x), 0.3))

    torch.manual_seed(0)
    model = LeakyChain()
    with torch.no_grad():
        model.fc1.bias.fill_(-1.0)  # negative: the slope matters
    x = torch.randn(8, 6)
    pruner = OursRowPruner({})
    pruner.prepare(model, config_of(["fc1"], prune_bias=False))
    pruner.step()
    masked = model(x)
    pruner.prune()
    torch.testing.assert_close(model(x), masked, **TOL)


def test_final_layer_bias_survives_prune():
    """prune_bias=False on the last layer: torch.ao.pruning drops its bias (or crashes when a bias was
    propagated into it); here it is kept and the pruned model equals the masked one."""
    torch.manual_seed(0)
    model, layers, shape = zoo.LinearBiasChain(), ["seq.2", "seq.3", "seq.4"], (16, 7)
    x = torch.randn(shape)
    pruner, masked = prepared(OursRowPruner, model, config_of(layers, prune_bias=False), x)
    pruner.prune()
    keep = torch.ones(10, dtype=torch.bool)
    keep[1::3] = False
    torch.testing.assert_close(model(x), masked[:, keep], **TOL)


def test_mixed_prune_bias_keeps_the_propagated_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(8, 6)
    config = [{"tensor_fqn": "0.weight", "prune_bias": False}, {"tensor_fqn": "2.weight", "prune_bias": True}]
    theirs = copy.deepcopy(model)
    pruner, masked = prepared(OursRowPruner, model, config, x)
    pruner.prune()
    torch.testing.assert_close(model(x), masked, **TOL)
    torch_pruner, torch_masked = prepared(TorchRowPruner, theirs, config, x)
    torch_pruner.prune()
    assert not torch.allclose(theirs(x), torch_masked, **TOL)  # torch.ao loses layer 0's folded bias


def test_flatten_chain_without_bias():
    """torch.ao.pruning crashes here with prune_bias=False (it propagates a missing bias)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, bias=False), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 3))
    x = torch.randn(2, 2, 8, 8)
    theirs = copy.deepcopy(model)
    pruner, masked = prepared(OursRowPruner, model, config_of(["0"], prune_bias=False), x)
    pruner.prune()
    assert model[3].in_features == 16
    torch.testing.assert_close(model(x), masked, **TOL)
    torch_pruner, _ = prepared(TorchRowPruner, theirs, config_of(["0"], prune_bias=False), x)
    with pytest.raises(TypeError):
        torch_pruner.prune()


def test_average_pool_with_zero_padding_keeps_channels():
    """avg_pool2d(padding=1) counts the zero padding: a constant channel is not constant after it, so a
    channel with a bias cannot be folded and is kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.AvgPool2d(2, 2, padding=1), nn.Conv2d(6, 4, 3))
    x = torch.randn(2, 2, 12, 12)
    pruner, masked = prepared(OursRowPruner, model, config_of(["0"], prune_bias=False), x)
    pruner.prune()
    assert model[0].out_channels == 6 and model[3].in_channels == 6
    torch.testing.assert_close(model(x), masked, **TOL)


def test_returned_intermediate_output_is_allowed():
    class ReturnsHidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 4)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(h), h

    model = ReturnsHidden()
    pruner, (y, h) = prepared(OursRowPruner, model, config_of(["fc1"]), torch.randn(3, 6))
    pruned = pruner.prune()
    y2, h2 = pruned(torch.zeros(3, 6))
    assert h2.shape == (3, 3) and y2.shape == (3, 4)


def test_custom_patterns_and_match_utils():
    calls = []

    def prune_linear_layer_norm(linear, norm):
        calls.append((linear, norm))
        prune_functions.prune_linear(linear)
        keep = torch.tensor([True, False, True, True, False])
        norm.normalized_shape = (3,)
        norm.weight, norm.bias = nn.Parameter(norm.weight[keep]), nn.Parameter(norm.bias[keep])

    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5))
    pruner = OursRowPruner({}, patterns={(nn.Linear, nn.LayerNorm, "output"): prune_linear_layer_norm})
    pruner.prepare(model, config_of(["0"]))
    pruner.step()
    pruned = pruner.prune()
    assert calls == [(model[0], model[1])] and pruned(torch.randn(2, 6)).shape == (2, 3)

    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)))
    modules = dict(traced.named_modules())
    first = next(n for n in traced.graph.nodes if n.op == "call_module")
    matched = match_utils.apply_match(modules, (nn.Linear, match_utils.MatchAllNode, nn.Linear, "output"), first, [])
    assert [n.target for n in matched] == ["0", "1", "2", "output"]
    assert match_utils.apply_match(modules, (nn.Linear, nn.Linear), first, []) is None
    assert match_utils.apply_match(modules, nn.Linear, first, []) == [first]


def test_default_patterns_include_torch_aos():
    from torch.ao.pruning._experimental.pruner.base_structured_sparsifier import (
        _get_default_structured_pruning_patterns as torch_patterns)
    ours = _get_default_structured_pruning_patterns()
    for pattern, fn in torch_patterns().items():
        assert pattern in ours and ours[pattern].__name__ == fn.__name__
    assert ours[(nn.LSTM, operator.getitem, nn.Linear)] is prune_functions.prune_lstm_output_linear


# -------------------------------------------------------------------------------------- bad input
def residual_model():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 5), nn.Linear(5, 5)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(h) + h

    return Residual()


def shared_layer_model():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 5), nn.Linear(5, 5)

        def forward(self, x):
            return self.fc2(self.fc1(self.fc1(x)))

    return Shared()


def unsupported_chain_model():
    return nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))


def grouped_conv_model():
    return nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2))


def partial_lstm():
    return zoo.LSTMLinear(4, 4, 4, num_layers=2), ["lstm.weight_ih_l0", "lstm.weight_hh_l0"]


@pytest.mark.parametrize("make,fqns,message", [
    (unsupported_chain_model, ["0.weight", "2.weight"], "no supported pattern starts at .*'0'.*LayerNorm"),
    (residual_model, ["fc1.weight"], "also feeds add"),
    (shared_layer_model, ["fc1.weight"], "called 2 times"),
    (grouped_conv_model, ["0.weight"], "grouped convolutions"),
    (lambda: partial_lstm()[0], partial_lstm()[1], "weight_ih and weight_hh must be pruned together"),
])
def test_prune_rejects_what_it_cannot_convert_and_leaves_the_model_untouched(make, fqns, message):
    torch.manual_seed(0)
    model = make()
    pruner = OursRowPruner({})
    pruner.prepare(model, [{"tensor_fqn": fqn} for fqn in fqns])
    pruner.step()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        pruner.prune()
    assert_unchanged(model, before)


def test_prune_rejects_lstm_gates_keeping_different_unit_counts():
    model = zoo.LSTMLinear(4, 4, 4)

    class Uneven(BaseStructuredSparsifier):
        def update_mask(self, module, tensor_name, **kwargs):
            module.parametrizations[tensor_name][0].mask[0] = False  # only the input gate loses a unit

    pruner = Uneven({})
    pruner.prepare(model, [{"tensor_fqn": "lstm.weight_ih_l0"}, {"tensor_fqn": "lstm.weight_hh_l0"}])
    pruner.step()
    before = snapshot(model)
    with pytest.raises(ValueError, match="same number of hidden units"):
        pruner.prune()
    assert_unchanged(model, before)


@pytest.mark.parametrize("config,error,message", [
    ([{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "seq.0.weight"}], ValueError, "more than once"),
    ([{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "nope.weight"}], ValueError, "no submodule 'nope'"),
    ([{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "seq.1.weight", "prune_bias": "yes"}], TypeError, "prune_bias"),
    ([{"tensor_fqn": "seq.0.weight", "mask": torch.ones(5)}], ValueError, "1-D bool"),
    ([{"tensor_fqn": "seq.0.weight", "mask": torch.ones(4, dtype=torch.bool)}], ValueError, "one entry per row"),
])
def test_prepare_rejects_bad_config_and_leaves_the_model_untouched(config, error, message):
    model = zoo.LinearBiasChain()
    before = snapshot(model)
    pruner = OursRowPruner({})
    with pytest.raises(error, match=message):
        pruner.prepare(model, config)
    assert_unchanged(model, before)
    assert pruner.groups == [] and len(pruner.state) == 0


def test_prepare_twice_rejects_the_same_tensor_and_accepts_new_ones():
    model = zoo.LinearChain()
    pruner = OursRowPruner({})
    pruner.prepare(model, config_of(["seq.0"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="more than once"):
        pruner.prepare(model, config_of(["seq.0"]))
    assert_unchanged(model, before)
    assert len(pruner.groups) == 1
    pruner.prepare(model, config_of(["linear1"]))
    assert len(pruner.groups) == 2 and len(model.seq[0].parametrizations.weight) == 1
    assert parametrize.is_parametrized(model.linear1)


def test_given_row_mask_is_used():
    model = zoo.LinearChain()
    mask = torch.tensor([True, True, False, True, False])
    pruner = OursRowPruner({})
    pruner.prepare(model, [{"tensor_fqn": "seq.0.weight", "mask": mask}])
    assert pruner.state["seq.0.weight"]["mask"] is mask and pruner.groups[0]["mask"] is mask
    pruner.prune()
    assert model.seq[0].out_features == 3


@cuda_only
def test_prune_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = zoo.randomize_batch_norms(zoo.ConvBatchNormChain()).eval()
    x = torch.randn(2, 3, 16, 16)
    results = []
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        pruner = SaliencyPruner({"sparsity_level": 0.3})
        pruner.prepare(m, [{"tensor_fqn": f"conv{i}.weight"} for i in range(1, 6)])
        pruner.step()
        masked = m(x.to(device))
        pruned = pruner.prune()
        results.append((masked.cpu(), pruned(x.to(device)).cpu(), param_shapes(pruned)))
    assert results[0][2] == results[1][2]
    torch.testing.assert_close(results[1][1], results[1][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-4)
