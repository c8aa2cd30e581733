"""ActivationSparsifier: registration, the aggregating and sparsifying hooks, step, squash_mask,
state_dict, the default block-norm mask_fn, parity with torch.ao.pruning's ActivationSparsifier, and
bad input (a clear error, nothing changed)."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.pruning._experimental.activation_sparsifier.activation_sparsifier import (
    ActivationSparsifier as TorchActivationSparsifier)

from conftest import TOLERANCES, cuda_only, tie_free
from sparsity_ext import ops
from sparsity_ext.activation_sparsifier import ActivationSparsifier, block_norm_mask_fn

TOL = TOLERANCES[torch.float32]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.identity1 = nn.Identity()
        self.pool = nn.MaxPool2d(2, 2)
        self.identity2 = nn.Identity()
        self.linear1 = nn.Linear(8 * 12 * 12, 32)
        self.linear2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(self.identity1(self.conv2(self.conv1(x))))
        x = F.relu(self.identity2(x.reshape(x.shape[0], -1)))
        return self.linear2(self.linear1(x))


# Module-level functions, so state_dicts pickle.
def add(aggregate, x):
    return aggregate + x


def mean_over_batch(aggregate):
    return aggregate.mean(dim=0)


def keep_batch(aggregate):
    return aggregate


def norm_mask(data, sparsity_level):
    """Element-wise norm mask: zero the round(sparsity_level * numel) entries of smallest |x|."""
    scores = data.abs().flatten()
    mask = torch.ones_like(scores)
    mask[torch.argsort(scores)[:round(sparsity_level * scores.numel())]] = 0
    return mask.reshape(data.shape)


DEFAULTS = {"aggregate_fn": add, "reduce_fn": mean_over_batch}
# (register_layer arguments, per-layer sparse_config) for the four layers the tests register.
LAYERS = [
    ({"layer": "conv1", "mask_fn": norm_mask}, {"sparsity_level": 0.3}),
    ({"layer": "linear1", "features": [0, 10, 234], "feature_dim": 1, "mask_fn": norm_mask}, {"sparsity_level": 0.1}),
    ({"layer": "identity1"}, {"sparsity_level": 0.3}),  # the default mask_fn
    ({"layer": "identity2", "features": [0, 10, 20], "feature_dim": 1, "reduce_fn": keep_batch},
     {"sparsity_level": 0.5}),
]
WITH_NORM_MASK = [(dict(args, mask_fn=norm_mask), config) for args, config in LAYERS]
WITH_DEFAULT_MASK = [({k: v for k, v in args.items() if k != "mask_fn"}, config) for args, config in LAYERS]


def make(cls=ActivationSparsifier, model=None, layers=LAYERS):
    """A sparsifier of `cls` on `model` (a fresh seeded Net by default) with `layers` registered."""
    if model is None:
        torch.manual_seed(0)
        model = Net()
    sparsifier = cls(model, **DEFAULTS, sparsity_level=0.5)
    for args, sparse_config in layers:
        args = dict(args, layer=model.get_submodule(args["layer"]))
        sparsifier.register_layer(**args, **sparse_config)
    return sparsifier


def batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 1, 28, 28, generator=g) for _ in range(n)]


def without_hooks(model):
    """A copy of the model without the sparsifier's hooks (a plain deepcopy would keep them, still
    feeding the original sparsifier)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        module._forward_pre_hooks.clear()
    return model


def layer_inputs(model, name, data):
    """The inputs `name` receives over the batches in `data`."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    for x in data:
        model(x)
    handle.remove()
    return seen


def feature_columns(x, features, dim):
    return [torch.index_select(x, dim, torch.tensor([f])) for f in features]


def assert_masks_equal(a, b):
    assert type(a) is type(b)
    for m, n in zip(a, b) if isinstance(a, list) else [(a, b)]:
        assert torch.equal(m, n)


# ---------------------------------------------------------------------------------- registration
def test_constructor_records_defaults():
    model = Net()
    sparsifier = ActivationSparsifier(model, **DEFAULTS, sparsity_level=0.5)
    assert sparsifier.model is model
    assert dict(sparsifier.defaults) == {"sparse_config": {"sparsity_level": 0.5}, "aggregate_fn": add,
                                         "reduce_fn": mean_over_batch, "mask_fn": None, "features": None,
                                         "feature_dim": None}
    assert len(sparsifier.data_groups) == 0 and len(sparsifier.state) == 0


def test_register_layer_merges_defaults_and_attaches_the_aggregate_hook():
    sparsifier = make()
    model = sparsifier.model
    assert list(sparsifier.data_groups) == [args["layer"] for args, _ in LAYERS]
    for args, sparse_config in LAYERS:
        name = args["layer"]
        config = sparsifier.data_groups[name]
        assert config["sparse_config"] == {"sparsity_level": 0.5, **sparse_config}
        assert config["layer"] is model.get_submodule(name)
        assert config["aggregate_fn"] is add and config["reduce_fn"] is args.get("reduce_fn", mean_over_batch)
        assert config["mask_fn"] is args.get("mask_fn", block_norm_mask_fn)
        assert config["features"] == args.get("features") and config["feature_dim"] == args.get("feature_dim")
        assert config["hook_state"] == "aggregate" and config["hook"].id in config["layer"]._forward_pre_hooks
        assert sparsifier.state[name] == {"mask": None}
        with pytest.raises(ValueError, match="run the model forward"):
            sparsifier.get_mask(name)
    assert sparsifier.defaults["mask_fn"] is None  # the default mask_fn is filled in per layer only


def test_register_layer_twice_warns_and_replaces_the_first_registration_as_torch_ao():
    sparsifier = make()
    layer = sparsifier.model.conv1
    old_hook = sparsifier.data_groups["conv1"]["hook"]
    with pytest.warns(UserWarning, match="already registered"):
        sparsifier.register_layer(layer, mask_fn=norm_mask, sparsity_level=0.9)
    assert sparsifier.data_groups["conv1"]["sparse_config"]["sparsity_level"] == 0.9
    assert sparsifier.data_groups["conv1"]["hook"] is not old_hook
    assert len(layer._forward_pre_hooks) == 1
    theirs = make(TorchActivationSparsifier, model=without_hooks(sparsifier.model), layers=WITH_NORM_MASK)
    with pytest.warns(UserWarning):
        theirs.register_layer(theirs.model.conv1, mask_fn=norm_mask, sparsity_level=0.9)
    assert len(theirs.model.conv1._forward_pre_hooks) == 1


def test_bad_re_registration_raises_and_keeps_the_first_registration():
    sparsifier = make()
    layer = sparsifier.model.conv1
    old_hook = sparsifier.data_groups["conv1"]["hook"]
    with pytest.raises(ValueError):
        sparsifier.register_layer(layer, mask_fn=norm_mask, features=[0])  # features without feature_dim
    assert sparsifier.data_groups["conv1"]["hook"] is old_hook
    assert list(layer._forward_pre_hooks) == [old_hook.id]


def test_unregister_layer_detaches_everything():
    sparsifier = make()
    layer = sparsifier.model.conv1
    sparsifier.unregister_layer("conv1")
    assert "conv1" not in sparsifier.data_groups and "conv1" not in sparsifier.state
    assert len(layer._forward_pre_hooks) == 0
    sparsifier.model(batches(1)[0])
    assert "conv1" not in sparsifier.data_groups
    with pytest.raises(ValueError, match="no layer named 'conv1' is registered"):
        sparsifier.unregister_layer("conv1")


# ------------------------------------------------------------------------------ hooks and step
def test_aggregate_hook_folds_each_input_into_the_aggregate():
    sparsifier = make()
    data = batches()
    inputs = {name: layer_inputs(without_hooks(sparsifier.model), name, data) for name in ("conv1", "linear1")}
    for x in data:
        sparsifier.model(x)
    torch.testing.assert_close(sparsifier.data_groups["conv1"]["data"], sum(inputs["conv1"]), **TOL)
    assert torch.equal(sparsifier.get_mask("conv1"), torch.ones(4, 1, 28, 28))
    features = [0, 10, 234]
    expected = [sum(cols) for cols in zip(*(feature_columns(x, features, 1) for x in inputs["linear1"]))]
    for got, want in zip(sparsifier.data_groups["linear1"]["data"], expected):
        torch.testing.assert_close(got, want, **TOL)
    assert [m.shape for m in sparsifier.get_mask(layer=sparsifier.model.linear1)] == [(4, 1)] * 3
    assert not sparsifier.data_groups["conv1"]["data"].requires_grad  # no autograd graph kept across forwards


def test_step_computes_masks_from_the_reduced_aggregate():
    sparsifier = make()
    data = batches()
    inputs = layer_inputs(without_hooks(sparsifier.model), "identity1", data)
    for x in data:
        sparsifier.model(x)
    aggregate = sparsifier.data_groups["identity1"]["data"]
    sparsifier.step()
    expected = block_norm_mask_fn(mean_over_batch(aggregate), sparsity_level=0.3)
    assert torch.equal(sparsifier.get_mask("identity1"), expected)
    assert torch.equal(expected, norm_mask(mean_over_batch(sum(inputs)), 0.3))
    assert all("data" not in config for config in sparsifier.data_groups.values())
    conv_mask = sparsifier.get_mask("conv1")
    assert conv_mask.shape == (1, 28, 28) and int((conv_mask == 0).sum()) == round(0.3 * 28 * 28)
    for feature_mask in sparsifier.get_mask("identity2"):  # reduce_fn keeps the batch: one mask entry per row
        assert feature_mask.shape == (4, 1) and int((feature_mask == 0).sum()) == 2


def test_first_forward_after_step_resets_the_mask_to_ones_as_torch_ao():
    ours = make(layers=WITH_NORM_MASK)
    theirs = make(TorchActivationSparsifier, model=without_hooks(ours.model), layers=WITH_NORM_MASK)
    for sparsifier in (ours, theirs):
        for x in batches():
            sparsifier.model(x)
        sparsifier.step()
        assert not bool(sparsifier.get_mask("conv1").all())  # the stepped mask drops something
        sparsifier.model(batches(1, seed=7)[0])  # starts a new aggregate, and a new all-ones mask
    for name in ours.data_groups:
        assert_masks_equal(ours.get_mask(name), theirs.get_mask(name))
    assert bool(ours.get_mask("conv1").all())


@pytest.mark.parametrize("use_default_mask_fn", [False, True])
def test_matches_torch_ao(use_default_mask_fn):
    """Same model, data and mask function: the same masks, and after squash_mask the same outputs. Our
    default mask_fn gives the masks of torch.ao's sparsifier run with the element-wise norm mask."""
    ours = make(layers=WITH_DEFAULT_MASK if use_default_mask_fn else WITH_NORM_MASK)
    theirs = make(TorchActivationSparsifier, model=without_hooks(ours.model), layers=WITH_NORM_MASK)
    for sparsifier in (ours, theirs):
        for x in batches():
            sparsifier.model(x)
        sparsifier.step()
    for name in ours.data_groups:
        assert_masks_equal(ours.get_mask(name), theirs.get_mask(name))
    ours.squash_mask()
    theirs.squash_mask()
    x = batches(1, seed=9)[0]
    torch.testing.assert_close(ours.model(x.clone()), theirs.model(x.clone()), **TOL)


def test_squash_mask_masks_the_inputs():
    sparsifier = stage(make(), "step")
    sparsifier.squash_mask()
    model = sparsifier.model
    for config in sparsifier.data_groups.values():
        assert config["hook_state"] == "sparsify" and config["hook"].id in config["layer"]._forward_pre_hooks
    given, out = {}, {}
    for name in ("identity1", "identity2"):  # record each identity's input before the sparsify hook, and its output
        layer = model.get_submodule(name)
        layer.register_forward_pre_hook(lambda m, args, name=name: given.__setitem__(name, args[0].clone()),
                                        prepend=True)
        layer.register_forward_hook(lambda m, args, output, name=name: out.__setitem__(name, output.clone()))
    with torch.no_grad():
        model(batches(1, seed=5)[0])
    torch.testing.assert_close(out["identity1"], given["identity1"] * sparsifier.get_mask("identity1"), **TOL)
    expected = given["identity2"].clone()
    for feature, feature_mask in zip([0, 10, 20], sparsifier.get_mask("identity2")):
        expected[:, [feature]] = given["identity2"][:, [feature]] * feature_mask
    torch.testing.assert_close(out["identity2"], expected, **TOL)
    assert (out["identity2"] != given["identity2"]).any() and (out["identity1"] != given["identity1"]).any()


def test_sparsify_hook_leaves_the_callers_tensor_and_extra_inputs_alone():
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    model = nn.Module()
    model.add = TwoInputs()
    sparsifier = ActivationSparsifier(model, **DEFAULTS)
    sparsifier.register_layer(model.add, features=[0, 2], feature_dim=1, sparsity_level=1.0)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    model.add(x, y)
    sparsifier.step()
    sparsifier.squash_mask()
    x_before = x.clone()
    out = model.add(x, y)
    assert torch.equal(x, x_before)  # not modified in place
    expected = x.clone()
    expected[:, [0, 2]] = 0
    torch.testing.assert_close(out, expected + y, **TOL)


def test_squash_mask_without_sparsify_hook_detaches_all_hooks():
    sparsifier = make()
    for x in batches(1):
        sparsifier.model(x)
    sparsifier.step()
    sparsifier.squash_mask(attach_sparsify_hook=False)
    for config in sparsifier.data_groups.values():
        assert config["hook_state"] == "None" and "hook" not in config
        assert len(config["layer"]._forward_pre_hooks) == 0
    sparsifier.unregister_layer("conv1")  # works without a hook


# ----------------------------------------------------------------------------------- state_dict
def stage(sparsifier, name):
    """Brings a fresh sparsifier to one of the workflow's stages."""
    if name in ("forward", "step", "squash"):
        for x in batches():
            sparsifier.model(x)
    if name in ("step", "squash"):
        sparsifier.step()
    if name == "squash":
        sparsifier.squash_mask()
    return sparsifier


@pytest.mark.parametrize("stage_name", ["registered", "forward", "step", "squash"])
def test_state_dict_round_trip(stage_name):
    sparsifier = stage(make(), stage_name)
    state_dict = sparsifier.state_dict()
    for state in state_dict["state"].values():
        masks = state["mask"] if isinstance(state["mask"], list) else [state["mask"]]
        assert all(m is None or m.is_sparse for m in masks)
    for config in state_dict["data_groups"].values():
        assert "hook" not in config and "layer" not in config
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    loaded_dict = torch.load(buffer, weights_only=False)

    torch.manual_seed(0)
    restored = ActivationSparsifier(Net())
    assert restored.defaults != sparsifier.defaults
    restored.load_state_dict(loaded_dict)
    assert restored.defaults == sparsifier.defaults
    assert list(restored.data_groups) == list(sparsifier.data_groups)
    for name, config in sparsifier.data_groups.items():
        mine = {k: v for k, v in restored.data_groups[name].items() if k not in ("hook", "layer", "data")}
        assert mine == {k: v for k, v in config.items() if k not in ("hook", "layer", "data")}
        assert restored.data_groups[name]["layer"] is restored.model.get_submodule(name)
        assert ("hook" in restored.data_groups[name]) == (config["hook_state"] != "None")
        if sparsifier.state[name]["mask"] is None:
            assert restored.state[name]["mask"] is None
        else:
            assert_masks_equal(restored.get_mask(name), sparsifier.get_mask(name))

    # The restored sparsifier carries on: it computes the same outputs, and steps to the same masks.
    x = batches(1, seed=11)[0]
    torch.testing.assert_close(restored.model(x), sparsifier.model(x), **TOL)
    if stage_name != "squash":
        sparsifier.step()
        restored.step()
        for name in sparsifier.data_groups:
            assert_masks_equal(restored.get_mask(name), sparsifier.get_mask(name))


def test_loads_a_torch_ao_state_dict():
    theirs = stage(make(TorchActivationSparsifier, layers=WITH_NORM_MASK), "step")
    ours = make(model=without_hooks(theirs.model))
    ours.load_state_dict(theirs.state_dict())
    for name in theirs.data_groups:
        assert_masks_equal(ours.get_mask(name), theirs.get_mask(name))
    assert all(len(config["layer"]._forward_pre_hooks) == 1 for config in ours.data_groups.values())


def test_load_state_dict_replaces_this_sparsifiers_hooks():
    sparsifier = make()
    state_dict = stage(make(), "step").state_dict()
    sparsifier.load_state_dict(state_dict)
    for config in sparsifier.data_groups.values():
        assert len(config["layer"]._forward_pre_hooks) == 1


# ------------------------------------------------------------------------------------ bad input
def snapshot(sparsifier):
    return ({name: {k: v for k, v in config.items() if k != "data"} for name, config in sparsifier.data_groups.items()},
            {name: copy.deepcopy(state) for name, state in sparsifier.state.items()},
            {name: dict(m._forward_pre_hooks) for name, m in sparsifier.model.named_modules()})


def assert_unchanged(sparsifier, before):
    after = snapshot(sparsifier)
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1].keys() == before[1].keys()
    for name, state in before[1].items():
        if state["mask"] is None:
            assert after[1][name]["mask"] is None
        else:
            assert_masks_equal(after[1][name]["mask"], state["mask"])


@pytest.mark.parametrize("call,error,message", [
    (lambda s: s.register_layer(nn.Linear(2, 2)), ValueError, "not a submodule of the model"),
    (lambda s: s.register_layer("conv1"), TypeError, "must be an nn.Module"),
    (lambda s: s.register_layer(s.model.linear2, features=[0, 1]), ValueError, "without feature_dim"),
    (lambda s: s.register_layer(s.model.linear2, features=3, feature_dim=1), TypeError, "list of indices"),
    (lambda s: s.register_layer(s.model.linear2, reduce_fn="mean"), TypeError, "reduce_fn must be callable"),
    (lambda s: s.register_layer(s.model.linear2, sparsity_level=1.5), ValueError, "sparsity_level"),
    (lambda s: s.register_layer(s.model.linear2, sparse_block_shape=(0, 4)), ValueError, "block_shape"),
    (lambda s: s.register_layer(s.model.linear2, zeros_per_block=3, sparse_block_shape=(1, 2)), ValueError,
     "zeros_per_block"),
    (lambda s: s.register_layer(s.model.linear2, level=0.5), TypeError, "unexpected keyword"),
    (lambda s: s.unregister_layer("linear2"), ValueError, "no layer named 'linear2'"),
    (lambda s: s.get_mask("linear2"), ValueError, "no layer named 'linear2'"),
    (lambda s: s.get_mask(), ValueError, "give the layer's name or the layer"),
    (lambda s: s.step(), RuntimeError, "no activations were aggregated"),
    (lambda s: s.squash_mask(), ValueError, "have no mask yet"),
    (lambda s: s.load_state_dict({"state": {}, "defaults": {}, "data_groups": {"nope": {"hook_state": "aggregate"}}}),
     ValueError, "no layer 'nope'"),
])
def test_bad_input_raises_and_changes_nothing(call, error, message):
    sparsifier = make()
    before = snapshot(sparsifier)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is (re-)registered on the way
        with pytest.raises(error, match=message):
            call(sparsifier)
    assert_unchanged(sparsifier, before)


def test_step_after_squash_raises_and_keeps_the_masks():
    sparsifier = stage(make(), "squash")
    before = snapshot(sparsifier)
    with pytest.raises(RuntimeError, match="no activations were aggregated"):
        sparsifier.step()
    assert_unchanged(sparsifier, before)


def test_repr_lists_layers_and_plain_settings():
    text = repr(make())
    assert text.startswith("ActivationSparsifier (") and text.endswith(")")
    assert text.count("Data Group") == 4 and "name: linear1" in text and "features: [0, 10, 234]" in text
    assert "hook_state: aggregate" in text and "sparse_config: {'sparsity_level': 0.3}" in text
    assert "mask_fn" not in text and "aggregate_fn" not in text and "hook:" not in text


# ------------------------------------------------------------------------- the default mask_fn
@pytest.mark.parametrize("shape", [(37,), (6, 9), (3, 5, 7)])
@pytest.mark.parametrize("level", [0.0, 0.25, 0.5, 0.9])
def test_block_norm_mask_fn_is_the_elementwise_norm_mask_by_default(shape, level):
    data = tie_free(shape, seed=len(shape))
    mask = block_norm_mask_fn(data, sparsity_level=level)
    assert mask.dtype == data.dtype and mask.shape == data.shape
    assert torch.equal(mask, norm_mask(data, level))


def test_block_norm_mask_fn_blocks_go_through_ops():
    data = tie_free((3, 8, 12), seed=4)
    mask = block_norm_mask_fn(data, sparsity_level=0.5, sparse_block_shape=(2, 4), zeros_per_block=2, norm="L2")
    expected = ops.block_norm_mask(data.reshape(24, 12), 0.5, (2, 4), 2, "L2").reshape(data.shape)
    assert torch.equal(mask, expected.to(data.dtype))
    half = block_norm_mask_fn(data.half(), sparsity_level=0.5)
    assert half.dtype == torch.float16 and half.shape == data.shape


@cuda_only
def test_sparsifies_on_cuda_like_on_cpu():
    cpu = stage(make(), "step")
    gpu = make(model=without_hooks(cpu.model).cuda())
    for x in batches():
        gpu.model(x.cuda())
    gpu.step()
    for name in cpu.data_groups:
        masks = gpu.get_mask(name)
        masks = [m.cpu() for m in masks] if isinstance(masks, list) else masks.cpu()
        assert_masks_equal(masks, cpu.get_mask(name))


def wrong_shape_mask(data, sparsity_level):
    return torch.ones(data.shape[-1] + 1)


@pytest.mark.parametrize("features", [None, [0, 5]])
def test_mask_fn_result_that_does_not_fit_the_input_raises_at_step(features):
    torch.manual_seed(0)
    model = Net()
    sparsifier = ActivationSparsifier(model, **DEFAULTS, sparsity_level=0.5)
    sparsifier.register_layer(model.linear2, mask_fn=wrong_shape_mask, features=features,
                              feature_dim=None if features is None else 1)
    model(batches(1)[0])
    before = [m.clone() for m in (sparsifier.get_mask("linear2") if features else [sparsifier.get_mask("linear2")])]
    with pytest.raises(ValueError, match=r"mask_fn of 'linear2' returned a mask of shape .* does not broadcast"):
        sparsifier.step()
    after = sparsifier.get_mask("linear2") if features else [sparsifier.get_mask("linear2")]
    assert all(torch.equal(b, a) for b, a in zip(before, after))


def test_torch_ao_takes_the_same_mask_and_fails_only_at_a_forward_after_squash_mask():
    torch.manual_seed(0)
    model = Net()
    sparsifier = TorchActivationSparsifier(model, **DEFAULTS, sparsity_level=0.5)
    sparsifier.register_layer(model.linear2, mask_fn=wrong_shape_mask)
    model(batches(1)[0])
    sparsifier.step()
    sparsifier.squash_mask()
    with pytest.raises(RuntimeError):
        model(batches(1)[0])


def test_a_mask_that_broadcasts_to_the_input_is_accepted():
    # mean_over_batch drops the batch dim: a (32,) mask multiplies every (4, 32) input row
    torch.manual_seed(0)
    model = Net()
    sparsifier = ActivationSparsifier(model, **DEFAULTS, sparsity_level=0.5)
    sparsifier.register_layer(model.linear2, mask_fn=norm_mask)
    x = batches(1)[0]
    model(x)
    sparsifier.step()
    assert sparsifier.get_mask("linear2").shape == (32,)
    sparsifier.squash_mask()
    assert model(x).shape == (4, 10)
