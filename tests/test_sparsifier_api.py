"""The BaseSparsifier / WeightNormSparsifier API against torch.ao.pruning: utils, prepare, step, squash_mask,
convert, state_dict (both directions with torch.ao.pruning), repr, pickling, subclassing, and bad input
that must leave the model untouched."""
import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn
from torch.ao import pruning as tao
from torch.ao.pruning.sparsifier import utils as tao_utils
from torch.nn.utils import parametrize

import sparsity_ext
from sparsity_ext.sparsifier import utils

from conftest import tie_free


class Nested(nn.Module):
    """Linear layers at several depths, and modules that are not nn.Linear."""

    def __init__(self, seed=0):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12))
        self.head = nn.Linear(12, 4)
        self.deep = nn.Sequential(nn.Sequential(nn.Linear(4, 8)), nn.Conv2d(2, 2, 1))
        with torch.no_grad():
            for i, linear in enumerate(m for m in self.modules() if isinstance(m, nn.Linear)):
                linear.weight.copy_(tie_free(linear.weight.shape, seed=seed * 10 + i))

    def forward(self, x):
        return self.deep[0](self.head(self.seq(x)))


LINEAR_FQNS = ["seq.0.weight", "seq.2.weight", "head.weight", "deep.0.0.weight"]


def first_row_sparsifier(base):
    """A minimal custom sparsifier on `base` (ours or torch.ao.pruning's BaseSparsifier): masks row 0 and
    counts its steps in the state."""

    class FirstRowSparsifier(base):
        def __init__(self, **defaults):
            super().__init__(defaults=defaults)

        def update_mask(self, module, tensor_name, **kwargs):
            getattr(module.parametrizations, tensor_name)[0].mask[0] = 0
            state = self.state[kwargs["tensor_fqn"]]
            state["step_count"] = state.get("step_count", 0) + 1

    return FirstRowSparsifier


FirstRowSparsifier = first_row_sparsifier(sparsity_ext.BaseSparsifier)


def mask_of(model, fqn):
    module_fqn, _, name = fqn.rpartition(".")
    return model.get_submodule(module_fqn).parametrizations[name][0].mask


def snapshot(model):
    """Everything a failed call must leave alone: tensors, parametrization classes and masks."""
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    params = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor_name, plist in module.parametrizations.items():
                params[f"{name}.{tensor_name}"] = [(type(p), getattr(p, "mask", torch.empty(0)).clone()) for p in plist]
    return tensors, params


def assert_same_snapshot(before, after):
    assert before[0].keys() == after[0].keys()
    for key in before[0]:
        assert torch.equal(before[0][key], after[0][key]), key
    assert before[1].keys() == after[1].keys()
    for key in before[1]:
        assert [t for t, _ in before[1][key]] == [t for t, _ in after[1][key]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(before[1][key], after[1][key])), key


def saved_and_loaded(state_dict):
    """state_dict after torch.save / torch.load, as a checkpoint would be."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# ------------------------------------------------------------------------------------------- utils
@pytest.mark.parametrize("path", ["", "seq", "seq.0", "seq.0.weight", "deep.0.0", "deep.1.bias", "missing",
                                  "seq.7", "seq.0.weight.missing"])
def test_fqn_to_module_and_arg_info_match_torch_ao(path):
    model = Nested()
    assert utils.fqn_to_module(model, path) is tao_utils.fqn_to_module(model, path)
    tensor_fqn = path or "weight"
    expected = tao_utils.get_arg_info_from_tensor_fqn(model, tensor_fqn)
    assert utils.get_arg_info_from_tensor_fqn(model, tensor_fqn) == expected


def test_fqn_lookups():
    model = Nested()
    assert utils.fqn_to_module(model, "") is model
    assert utils.fqn_to_module(model, "deep.0.0") is model.deep[0][0]
    assert utils.fqn_to_module(model, "head.weight") is model.head.weight
    assert utils.fqn_to_module(model, "head.nothing") is None
    assert utils.module_to_fqn(model, model) == ""
    assert utils.module_to_fqn(model, model.deep[0][0]) == "deep.0.0"
    assert utils.module_to_fqn(model, nn.Linear(1, 1)) is None
    for module in model.modules():
        assert utils.module_to_fqn(model, module) == tao_utils.module_to_fqn(model, module)
    assert sparsity_ext.get_arg_info_from_tensor_fqn(model, "seq.2.weight") == {
        "module_fqn": "seq.2", "module": model.seq[2], "tensor_name": "weight", "tensor_fqn": "seq.2.weight"}
    info = sparsity_ext.get_arg_info_from_tensor_fqn(model, "weight")
    assert info["module_fqn"] == "" and info["module"] is model and info["tensor_name"] == "weight"


def test_fake_sparsity_masks_and_keeps_its_mask_out_of_state_dicts():
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    fake = sparsity_ext.FakeSparsity(mask)
    assert fake.mask is mask
    assert torch.equal(fake(torch.full((2, 2), 3.0)), torch.tensor([[3.0, 0.0], [0.0, 3.0]]))
    assert fake.state_dict() == {}
    with pytest.raises(AssertionError, match="shape"):
        fake(torch.ones(2, 3))
    ours, theirs = nn.Linear(3, 2), nn.Linear(3, 2)
    parametrize.register_parametrization(ours, "weight", sparsity_ext.FakeSparsity(torch.ones(2, 3)))
    parametrize.register_parametrization(theirs, "weight", tao.FakeSparsity(torch.ones(2, 3)))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert not any("mask" in key for key in ours.state_dict())


class DenseTwin(nn.Module):
    """Stands in for a sparse module class: convert builds it with from_dense."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())

    @classmethod
    def from_dense(cls, mod):
        return cls(mod.weight)

    def forward(self, x):
        return x @ self.weight.t()


def test_module_contains_param_and_swap_module():
    linear = nn.Linear(3, 2)
    assert not utils.module_contains_param(linear, sparsity_ext.FakeSparsity)
    parametrize.register_parametrization(linear, "weight", sparsity_ext.FakeSparsity(torch.ones(2, 3)))
    assert utils.module_contains_param(linear, sparsity_ext.FakeSparsity)
    assert not utils.module_contains_param(linear, tao.FakeSparsity)
    calls = []
    linear.register_forward_pre_hook(lambda mod, args: calls.append("pre"))
    linear.register_forward_hook(lambda mod, args, out: calls.append("post"))
    swapped = utils.swap_module(linear, {nn.Linear: DenseTwin})
    assert isinstance(swapped, DenseTwin) and torch.equal(swapped.weight, linear.weight)
    swapped(torch.ones(1, 3))
    assert calls == ["pre", "post"]  # the hooks came along
    assert utils.swap_module(linear, {nn.Conv2d: DenseTwin}) is linear


# ----------------------------------------------------------------------------------------- prepare
def test_base_sparsifier_is_abstract_and_keeps_defaults():
    with pytest.raises(TypeError):
        sparsity_ext.BaseSparsifier()
    sparsifier = FirstRowSparsifier(foo=3)
    assert sparsifier.defaults == {"foo": 3}
    assert sparsifier.groups == [] and dict(sparsifier.state) == {} and sparsifier.enable_mask_update
    weight_norm = sparsity_ext.WeightNormSparsifier(sparsity_level=0.3, sparse_block_shape=(2, 3))
    assert weight_norm.defaults == tao.WeightNormSparsifier(sparsity_level=0.3, sparse_block_shape=(2, 3)).defaults
    assert weight_norm.defaults["zeros_per_block"] == 6


def test_prepare_without_config_takes_every_linear_in_torch_ao_order():
    ours, theirs = sparsity_ext.WeightNormSparsifier(), tao.WeightNormSparsifier()
    ours_model, theirs_model = Nested(), Nested()
    ours.prepare(ours_model, None)
    theirs.prepare(theirs_model, None)
    assert [g["tensor_fqn"] for g in ours.groups] == [g["tensor_fqn"] for g in theirs.groups]
    assert sorted(g["tensor_fqn"] for g in ours.groups) == sorted(LINEAR_FQNS)
    assert ours.config == theirs.config
    assert not parametrize.is_parametrized(ours_model.deep[1])  # a Conv2d is not a supported module


def test_prepare_merges_defaults_with_per_layer_overrides():
    model = Nested()
    sparsifier = sparsity_ext.WeightNormSparsifier(sparsity_level=0.5)
    sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight"},
                               {"tensor_fqn": "head.weight", "sparsity_level": 0.8, "zeros_per_block": 2}])
    first, second = sparsifier.groups
    assert first == {"sparsity_level": 0.5, "sparse_block_shape": (1, 4), "zeros_per_block": 4,
                     "tensor_fqn": "seq.0.weight", "module_fqn": "seq.0", "module": model.seq[0],
                     "tensor_name": "weight"}
    assert second["sparsity_level"] == 0.8 and second["zeros_per_block"] == 2 and second["module"] is model.head
    for group in sparsifier.groups:
        plist = group["module"].parametrizations["weight"]
        assert len(plist) == 1 and isinstance(plist[0], sparsity_ext.FakeSparsity)
        assert plist[0].mask.dtype == torch.float32 and bool(plist[0].mask.all())
        assert sparsifier.state[group["tensor_fqn"]]["mask"] is plist[0].mask
    assert not parametrize.is_parametrized(model.seq[2])
    assert sparsifier.model is model


def test_prepare_config_keys_must_agree_with_tensor_fqn():
    sparsifier = sparsity_ext.WeightNormSparsifier()
    model = Nested()
    sparsifier.prepare(model, [{"tensor_fqn": "head.weight", "tensor_name": "weight"},
                               {"tensor_fqn": "seq.0.weight", "module_fqn": "seq.0", "module": model.seq[0]}])
    assert [g["tensor_fqn"] for g in sparsifier.groups] == ["head.weight", "seq.0.weight"]
    fresh = Nested()
    before = snapshot(fresh)
    with pytest.raises(AssertionError, match="module_fqn"):
        sparsity_ext.WeightNormSparsifier().prepare(fresh, [{"tensor_fqn": "seq.0.weight", "module_fqn": "head"}])
    assert_same_snapshot(before, snapshot(fresh))


def test_prepare_uses_a_given_mask_and_parametrization():
    class Doubling(sparsity_ext.FakeSparsity):
        def forward(self, x):
            return 2 * super().forward(x)

    model = Nested()
    given = torch.zeros(12, 16)
    sparsifier = FirstRowSparsifier()
    sparsifier.prepare(model, [{"tensor_fqn": "seq.2.weight", "mask": given},
                               {"tensor_fqn": "head.weight", "parametrization": Doubling}])
    assert mask_of(model, "seq.2.weight") is given and not model.seq[2].weight.any()
    assert isinstance(model.head.parametrizations.weight[0], Doubling)
    assert torch.equal(model.head.weight, 2 * model.head.parametrizations.weight.original)


# ------------------------------------------------------------------------------------- step, masks
def test_step_updates_every_group_unless_mask_updates_are_disabled():
    model = Nested()
    sparsifier = FirstRowSparsifier()
    sparsifier.prepare(model, [{"tensor_fqn": fqn} for fqn in LINEAR_FQNS])
    sparsifier.enable_mask_update = False
    sparsifier.step()
    assert all(bool(mask_of(model, fqn).all()) for fqn in LINEAR_FQNS)
    sparsifier.enable_mask_update = True
    sparsifier.step()
    sparsifier.step()
    for fqn in LINEAR_FQNS:
        mask = mask_of(model, fqn)
        assert not mask[0].any() and bool(mask[1:].all())
        assert sparsifier.state[fqn]["step_count"] == 2


def test_weight_norm_step_keeps_the_mask_object_and_gives_it_torch_aos_dtype():
    model = Nested()
    sparsifier = sparsity_ext.WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight"}])
    mask = mask_of(model, "seq.0.weight")
    assert mask.dtype == torch.float32  # torch.ones_like(weight), as torch.ao.pruning's prepare
    sparsifier.step()
    assert mask_of(model, "seq.0.weight") is mask and sparsifier.state["seq.0.weight"]["mask"] is mask
    assert mask.dtype == torch.bool and mask.sum() == 16 * 8 - 16 * 2  # 16 of the 32 blocks lose 2 of 4
    pointer = mask.data_ptr()
    sparsifier.step()  # the mask has its dtype now: later steps write into it in place
    assert mask.data_ptr() == pointer and mask.dtype == torch.bool
    assert not mask.requires_grad


@pytest.mark.parametrize("level,clamped", [(1.5, 1.0), (-0.1, 0.0), (math.inf, 1.0)])
def test_weight_norm_levels_outside_0_1_are_accepted_and_clamped(level, clamped):
    masks = []
    for value in (level, clamped):
        model = Nested()
        sparsifier = sparsity_ext.WeightNormSparsifier(sparse_block_shape=(1, 4), zeros_per_block=2)
        sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight", "sparsity_level": value}])
        sparsifier.step()
        masks.append(mask_of(model, "seq.0.weight"))
    assert masks[0].dtype == masks[1].dtype and torch.equal(masks[0], masks[1])


def test_weight_norm_rejects_a_non_float_tensor_at_prepare_naming_it():
    model = Nested()
    model.head.weight = nn.Parameter(torch.arange(48).reshape(4, 12), requires_grad=False)
    before = snapshot(model)
    sparsifier = sparsity_ext.WeightNormSparsifier()
    with pytest.raises(TypeError, match=r"head\.weight.*torch\.int64.*torch\.float32"):
        sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "head.weight"}])
    assert_same_snapshot(before, snapshot(model))


def test_squash_mask_folds_masks_and_keeps_requested_params():
    model = Nested()
    sparsifier = sparsity_ext.WeightNormSparsifier(sparsity_level=0.5)
    sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight", "foo": 1, "bar": 2},
                               {"tensor_fqn": "head.weight", "foo": 3, "bar": 4, "baz": 5}])
    sparsifier.step()
    originals = {fqn: model.get_parameter(fqn.replace("weight", "parametrizations.weight.original"))
                 for fqn in ("seq.0.weight", "head.weight")}
    expected = {fqn: mask_of(model, fqn) * original for fqn, original in originals.items()}
    sparsifier.squash_mask(params_to_keep=("foo",), params_to_keep_per_layer={"head": ("baz", "sparsity_level")})
    for fqn, weight in expected.items():
        module = model.get_submodule(fqn.rpartition(".")[0])
        assert not parametrize.is_parametrized(module)
        assert isinstance(module.weight, nn.Parameter) and torch.equal(module.weight, weight)
    assert model.seq[0].sparse_params == {"foo": 1}
    assert model.head.sparse_params == {"foo": 3, "baz": 5, "sparsity_level": 0.5}


def test_squash_mask_without_params_to_keep_adds_nothing():
    model = Nested()
    sparsifier = FirstRowSparsifier()
    sparsifier.prepare(model, [{"tensor_fqn": "head.weight"}])
    sparsifier.step()
    sparsifier.squash_mask()
    assert not hasattr(model.head, "sparse_params") and not model.head.weight[0].any()


def test_squash_mask_with_a_missing_key_changes_nothing():
    model = Nested()
    sparsifier = FirstRowSparsifier()
    sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "head.weight", "foo": 1}])
    before = snapshot(model)
    with pytest.raises(KeyError):
        sparsifier.squash_mask(params_to_keep=("foo",))
    assert_same_snapshot(before, snapshot(model))


def test_convert_swaps_parametrized_modules_in_the_mapping():
    model = Nested()
    sparsifier = sparsity_ext.WeightNormSparsifier()
    sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "deep.0.0.weight"}])
    sparsifier.step()
    with pytest.raises(NotImplementedError):
        sparsifier.convert(model)
    converted = sparsifier.convert(model, mapping={nn.Linear: DenseTwin})
    assert converted is not model and parametrize.is_parametrized(model.seq[0])  # not in place: a copy
    assert isinstance(converted.seq[0], DenseTwin) and isinstance(converted.deep[0][0], DenseTwin)
    assert type(converted.seq[2]) is nn.Linear and type(converted.head) is nn.Linear  # not parametrized
    assert torch.equal(converted.seq[0].weight, model.seq[0].weight)
    in_place = sparsifier.convert(model, mapping={nn.Linear: DenseTwin}, inplace=True)
    assert in_place is model and isinstance(model.deep[0][0], DenseTwin)


# ----------------------------------------------------------------------------------------- state_dict
def test_state_dict_layout_and_round_trip():
    model = Nested()
    sparsifier = FirstRowSparsifier(test=3)
    sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "head.weight", "test": 4}])
    with torch.no_grad():
        mask_of(model, "seq.0.weight").copy_(torch.arange(16 * 8).reshape(16, 8) % 3 > 0)
    for _ in range(3):
        sparsifier.step()
    state_dict = sparsifier.state_dict()
    assert state_dict.keys() == {"state", "groups"}
    assert state_dict["state"]["seq.0.weight"]["step_count"] == 3
    assert state_dict["state"]["seq.0.weight"]["mask"] is mask_of(model, "seq.0.weight")
    assert state_dict["groups"] == [{"test": 3, "tensor_fqn": "seq.0.weight"}, {"test": 4, "tensor_fqn": "head.weight"}]

    other_model = Nested(seed=1)
    other = FirstRowSparsifier()
    other.prepare(other_model, None)
    assert not torch.equal(mask_of(other_model, "seq.0.weight"), mask_of(model, "seq.0.weight"))
    other.load_state_dict(saved_and_loaded(state_dict))
    assert len(other.groups) == 2
    for ours, theirs in zip(sparsifier.groups, other.groups):
        assert ours.keys() == theirs.keys()
        assert all(ours[k] == theirs[k] for k in ours if k != "module")
        assert theirs["module"] is other_model.get_submodule(theirs["module_fqn"])
    for fqn in ("seq.0.weight", "head.weight"):
        assert torch.equal(mask_of(other_model, fqn), mask_of(model, fqn))
        assert other.state[fqn]["mask"] is mask_of(other_model, fqn)  # the loaded sparsifier's state holds its buffers
        assert other.state[fqn]["step_count"] == 3
    reloaded = other.state_dict()
    assert torch.equal(reloaded["state"]["head.weight"]["mask"], state_dict["state"]["head.weight"]["mask"])


def test_load_state_dict_adopts_the_given_masks_and_leaves_its_input_alone():
    source_model = Nested()
    source = sparsity_ext.WeightNormSparsifier(sparsity_level=0.7)
    source.prepare(source_model, [{"tensor_fqn": "seq.0.weight"}])
    source.step()
    state_dict = source.state_dict()
    kept = copy.deepcopy(state_dict)
    for _ in range(2):  # loading the same dict twice works: torch.ao.pruning pops the masks out of it
        model = Nested(seed=2)
        sparsifier = sparsity_ext.WeightNormSparsifier()
        sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight"}])
        sparsifier.load_state_dict(state_dict)
        # as torch.ao.pruning: the state dict's own mask tensor is the parametrization's and the state's
        assert mask_of(model, "seq.0.weight") is state_dict["state"]["seq.0.weight"]["mask"]
        assert sparsifier.state["seq.0.weight"]["mask"] is mask_of(source_model, "seq.0.weight")
        assert source.state == sparsifier.state
        assert sparsifier.groups[0]["sparsity_level"] == 0.7
    assert torch.equal(state_dict["state"]["seq.0.weight"]["mask"], kept["state"]["seq.0.weight"]["mask"])
    assert state_dict["groups"] == kept["groups"]


def test_load_state_dict_moves_a_half_precision_tensors_float_mask_to_its_dtype():
    model = Nested().to(torch.bfloat16)
    sparsifier = FirstRowSparsifier()
    sparsifier.prepare(model, [{"tensor_fqn": "head.weight"}])
    saved = sparsifier.state_dict()
    saved["state"]["head.weight"]["mask"] = torch.zeros(model.head.weight.shape)  # float32, as torch.ao saves it
    sparsifier.load_state_dict(saved)
    assert mask_of(model, "head.weight").dtype == torch.bfloat16
    assert model.head.weight.dtype == torch.bfloat16 and not model.head.weight.any()


def test_load_state_dict_parametrizes_tensors_that_were_not_prepared():
    source_model = Nested()
    source = FirstRowSparsifier()
    source.prepare(source_model, [{"tensor_fqn": "seq.2.weight"}])
    source.step()
    model = Nested()
    sparsifier = FirstRowSparsifier()
    sparsifier.prepare(model, [{"tensor_fqn": "head.weight"}])
    sparsifier.load_state_dict(source.state_dict())
    assert isinstance(model.seq[2].parametrizations.weight[0], sparsity_ext.FakeSparsity)
    assert not mask_of(model, "seq.2.weight")[0].any()
    assert [g["tensor_fqn"] for g in sparsifier.groups] == ["seq.2.weight"]


def _weight_norm_pair(config, **kwargs):
    """(our model, our sparsifier, torch.ao's model, torch.ao's sparsifier), prepared the same way."""
    out = []
    for cls in (sparsity_ext.WeightNormSparsifier, tao.WeightNormSparsifier):
        model = Nested()
        sparsifier = cls(**kwargs)
        sparsifier.prepare(model, copy.deepcopy(config))
        out += [model, sparsifier]
    return out


CROSS_CONFIG = [{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "head.weight", "sparsity_level": 0.25},
                {"tensor_fqn": "seq.2.weight", "sparse_block_shape": (2, 4), "zeros_per_block": 3}]


@pytest.mark.parametrize("direction", ["torch.ao->sparsity_ext", "sparsity_ext->torch.ao"])
def test_state_dicts_cross_load_with_torch_ao(direction):
    ours_model, ours, theirs_model, theirs = _weight_norm_pair(CROSS_CONFIG, sparsity_level=0.6)
    if direction.startswith("torch"):
        saver, saver_model, loader, loader_model = theirs, theirs_model, ours, ours_model
    else:
        saver, saver_model, loader, loader_model = ours, ours_model, theirs, theirs_model
    saver.step()
    state_dict = saved_and_loaded(saver.state_dict())
    loader.load_state_dict(state_dict)
    assert [{k: v for k, v in g.items() if k != "module"} for g in loader.groups] == \
        [{k: v for k, v in g.items() if k != "module"} for g in saver.groups]
    for group in CROSS_CONFIG:
        fqn = group["tensor_fqn"]
        assert torch.equal(mask_of(loader_model, fqn).bool(), mask_of(saver_model, fqn).bool())
    for sparsifier in (ours, theirs):  # both go on from the loaded state to the same masks
        sparsifier.groups[0]["sparsity_level"] = 0.75
        sparsifier.step()
    for group in CROSS_CONFIG:
        fqn = group["tensor_fqn"]
        assert torch.equal(mask_of(ours_model, fqn).bool(), mask_of(theirs_model, fqn).bool())


def test_custom_sparsifier_state_cross_loads_with_torch_ao():
    """A subclass's own state entries (here step_count) travel with the masks, both ways."""
    for saver_base, loader_base in ((tao.BaseSparsifier, sparsity_ext.BaseSparsifier),
                                    (sparsity_ext.BaseSparsifier, tao.BaseSparsifier)):
        saver_model, loader_model = Nested(), Nested(seed=1)
        saver, loader = first_row_sparsifier(saver_base)(level=1), first_row_sparsifier(loader_base)()
        saver.prepare(saver_model, [{"tensor_fqn": "head.weight"}, {"tensor_fqn": "seq.2.weight", "level": 2}])
        # both tensors prepared: torch.ao.pruning cannot load a mask for a tensor that has no parametrization
        loader.prepare(loader_model, [{"tensor_fqn": "seq.2.weight"}, {"tensor_fqn": "head.weight"}])
        for _ in range(2):
            saver.step()
        loader.load_state_dict(saved_and_loaded(saver.state_dict()))
        assert [g["level"] for g in loader.groups] == [1, 2]
        for fqn in ("head.weight", "seq.2.weight"):
            assert loader.state[fqn]["step_count"] == 2
            assert torch.equal(mask_of(loader_model, fqn), mask_of(saver_model, fqn))
        loader.step()
        assert loader.state["seq.2.weight"]["step_count"] == 3


def test_state_dict_layout_equals_torch_ao():
    ours_model, ours, theirs_model, theirs = _weight_norm_pair(CROSS_CONFIG, sparsity_level=0.6)
    ours.step()
    theirs.step()
    ours_dict, theirs_dict = ours.state_dict(), theirs.state_dict()
    assert ours_dict["groups"] == theirs_dict["groups"]
    assert ours_dict["state"].keys() == theirs_dict["state"].keys()
    for fqn, entry in ours_dict["state"].items():
        assert entry.keys() == theirs_dict["state"][fqn].keys() == {"mask"}
        assert torch.equal(entry["mask"].bool(), theirs_dict["state"][fqn]["mask"].bool())


# ----------------------------------------------------------------------------- repr, pickling, subclasses
def test_repr_matches_torch_ao():
    ours_model, ours, theirs_model, theirs = _weight_norm_pair(CROSS_CONFIG, sparsity_level=0.6)
    assert repr(ours) == repr(theirs)
    assert repr(sparsity_ext.WeightNormSparsifier()) == repr(tao.WeightNormSparsifier()) == "WeightNormSparsifier ()"
    assert "Group 2" in repr(ours) and "zeros_per_block: 3" in repr(ours)


def test_pickled_and_deep_copied_sparsifiers_step_like_the_original():
    """__getstate__ / __setstate__ (defaults, state, groups; plus norm_fn): an unprepared sparsifier pickles and
    then prepares and steps as the original; a prepared one deep-copies (torch.ao.pruning's copy cannot step)
    with the links between its groups, state and modules intact. Prepared models do not pickle at all:
    torch refuses to pickle parametrized modules, for torch.ao.pruning as for us."""
    original = sparsity_ext.WeightNormSparsifier(sparsity_level=0.5, norm=1)
    assert set(original.__getstate__()) == {"defaults", "state", "groups", "norm_fn"}
    unpickled = pickle.loads(pickle.dumps(original))
    assert unpickled.defaults == original.defaults and unpickled.enable_mask_update
    models = [Nested(), Nested()]
    for sparsifier, model in zip((original, unpickled), models):
        sparsifier.prepare(model, copy.deepcopy(CROSS_CONFIG))
        sparsifier.step()
    with pytest.raises(RuntimeError, match="parametrized modules"):
        pickle.dumps(original)

    clone = copy.deepcopy(original)
    clone_module = clone.groups[0]["module"]
    assert clone_module is not models[0].seq[0]
    assert clone.state["seq.0.weight"]["mask"] is clone_module.parametrizations.weight[0].mask
    for group in (*original.groups, *unpickled.groups, *clone.groups):
        group["sparsity_level"] = 0.8
    for sparsifier in (original, unpickled, clone):
        sparsifier.step()
    for groups in (unpickled.groups, clone.groups):
        for ours, theirs in zip(original.groups, groups):
            assert torch.equal(ours["module"].parametrizations.weight[0].mask,
                               theirs["module"].parametrizations.weight[0].mask)
    original.squash_mask()
    squashed = pickle.loads(pickle.dumps(original))  # plain modules pickle again
    assert torch.equal(squashed.groups[0]["module"].weight, original.groups[0]["module"].weight)


def test_subclass_can_override_prepare_hook_and_use_state():
    class RecordingSparsifier(FirstRowSparsifier):
        def _prepare(self, *args, **kwargs):
            super()._prepare(*args, **kwargs)
            self.prepared_fqns = [g["tensor_fqn"] for g in self.groups]

    model = Nested()
    sparsifier = RecordingSparsifier()
    sparsifier.prepare(model, [{"tensor_fqn": "head.weight"}])
    sparsifier.step()
    assert sparsifier.prepared_fqns == ["head.weight"] and sparsifier.state["head.weight"]["step_count"] == 1


def test_subclass_of_weight_norm_can_call_its_mask_helpers():
    """torch.ao.pruning's WeightNormSparsifier exposes norm_fn, _make_tensor_mask and _make_block_mask; a
    subclass that uses them gets the same results (on full blocks, where torch.ao's are well-shaped)."""
    data = tie_free((8, 12), seed=4).abs()
    ours, theirs = sparsity_ext.WeightNormSparsifier(norm=1), tao.WeightNormSparsifier(norm=1)
    assert torch.equal(ours.norm_fn(-data), data)
    tensor_masks = [s._make_tensor_mask(data=data, input_shape=data.shape, sparsity_level=0.5,
                                        sparse_block_shape=(2, 3)) for s in (ours, theirs)]
    block_masks = [s._make_block_mask(data=data, sparse_block_shape=(2, 3), zeros_per_block=2) for s in (ours, theirs)]
    for ours_mask, theirs_mask in (tensor_masks, block_masks):
        assert ours_mask.dtype == theirs_mask.dtype and torch.equal(ours_mask, theirs_mask)

    class HalfStrength(sparsity_ext.WeightNormSparsifier):
        def update_mask(self, module, tensor_name, sparsity_level, sparse_block_shape, zeros_per_block, **kwargs):
            super().update_mask(module, tensor_name, sparsity_level / 2, sparse_block_shape, zeros_per_block)

    model = Nested()
    sparsifier = HalfStrength(sparsity_level=0.5)
    sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight"}])
    sparsifier.step()
    assert mask_of(model, "seq.0.weight").mean() == 0.75


# ----------------------------------------------------------------------------------------- bad input
BAD_CONFIGS = [
    ({"tensor_fqn": "seq.9.weight"}, ValueError, "no submodule"),
    ({"tensor_fqn": "seq.0.missing"}, ValueError, "no tensor"),
    ({"tensor_fqn": "seq.0.in_features"}, ValueError, "no tensor"),
    ({"tensor_fqn": "seq.0.weight.x"}, ValueError, "no submodule"),
    ({"tensor_fqn": "head.weight", "zeros_per_block": 5}, ValueError, "zeros_per_block"),
    ({"tensor_fqn": "head.weight", "zeros_per_block": -1}, ValueError, "zeros_per_block"),
    ({"tensor_fqn": "head.weight", "sparsity_level": math.nan}, ValueError, "sparsity_level"),
    ({"tensor_fqn": "head.weight", "sparse_block_shape": (0, 4)}, ValueError, "block_shape"),
    ({"tensor_fqn": "head.weight", "sparse_block_shape": (4,)}, ValueError, "block_shape"),
    ({"tensor_fqn": "head.weight", "mask": torch.ones(3, 3)}, ValueError, "mask shape"),
    ({"tensor_fqn": "head.weight", "mask": torch.ones(4, 12, dtype=torch.float64)}, ValueError, "dtype"),
    ({"sparsity_level": 0.5}, AssertionError, "tensor_fqn"),
]


@pytest.mark.parametrize("bad,error,message", BAD_CONFIGS, ids=[str(i) for i in range(len(BAD_CONFIGS))])
def test_prepare_rejects_bad_config_before_touching_the_model(bad, error, message):
    model = Nested()
    before = snapshot(model)
    sparsifier = sparsity_ext.WeightNormSparsifier()
    with pytest.raises(error, match=message):
        sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight"}, bad])
    assert_same_snapshot(before, snapshot(model))
    assert sparsifier.groups == [] and dict(sparsifier.state) == {}


def test_prepare_rejects_non_dict_entries_and_unknown_norms():
    model = Nested()
    before = snapshot(model)
    with pytest.raises(AssertionError, match="dict"):
        sparsity_ext.WeightNormSparsifier().prepare(model, [{"tensor_fqn": "head.weight"}, model.seq[0]])
    assert_same_snapshot(before, snapshot(model))
    with pytest.raises(NotImplementedError):
        sparsity_ext.WeightNormSparsifier(norm=3)


@pytest.mark.parametrize("bad_level", [math.nan, "0.5"])
def test_step_with_a_bad_group_changes_no_mask(bad_level):
    model = Nested()
    sparsifier = sparsity_ext.WeightNormSparsifier(sparsity_level=0.5)
    sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "head.weight"}])
    sparsifier.step()
    before = snapshot(model)
    sparsifier.groups[0]["sparsity_level"] = 0.9
    sparsifier.groups[1]["sparsity_level"] = bad_level
    with pytest.raises((ValueError, TypeError), match="sparsity_level"):
        sparsifier.step()
    assert_same_snapshot(before, snapshot(model))


def test_step_with_a_wrongly_shaped_mask_changes_no_mask():
    model = Nested()
    sparsifier = sparsity_ext.WeightNormSparsifier(sparsity_level=0.5)
    sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "head.weight"}])
    model.head.parametrizations.weight[0].mask = torch.ones(3, 3)
    before = snapshot(model)
    with pytest.raises(ValueError, match="mask"):
        sparsifier.step()
    assert_same_snapshot(before, snapshot(model))


def test_callable_norm_of_the_wrong_shape_changes_no_mask():
    model = Nested()
    sparsifier = sparsity_ext.WeightNormSparsifier(norm=lambda t: t.sum(dim=0))
    sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight"}])
    before = snapshot(model)
    with pytest.raises(ValueError, match="norm_fn"):
        sparsifier.step()
    assert_same_snapshot(before, snapshot(model))


def test_load_state_dict_rejects_bad_entries_before_changing_anything():
    source_model = Nested()
    source = sparsity_ext.WeightNormSparsifier()
    source.prepare(source_model, [{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "head.weight"}])
    source.step()
    good = source.state_dict()

    model = Nested(seed=3)
    sparsifier = sparsity_ext.WeightNormSparsifier(sparsity_level=0.2)
    with pytest.raises(RuntimeError, match="prepare"):
        sparsifier.load_state_dict(good)
    sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "head.weight"}])
    sparsifier.step()
    before, groups = snapshot(model), copy.copy(sparsifier.groups)

    wrong_shape = copy.deepcopy(good)
    wrong_shape["state"]["head.weight"]["mask"] = torch.ones(5, 5)
    with pytest.raises(ValueError, match="shape"):
        sparsifier.load_state_dict(wrong_shape)
    unknown = copy.deepcopy(good)
    unknown["state"]["seq.5.weight"] = {"mask": torch.ones(2, 2)}
    with pytest.raises(RuntimeError, match="seq.5.weight"):
        sparsifier.load_state_dict(unknown)
    assert_same_snapshot(before, snapshot(model))
    assert sparsifier.groups == groups

    sparsifier.load_state_dict(unknown, strict=False)  # skips what the model lacks
    assert sorted(sparsifier.state) == ["head.weight", "seq.0.weight"]
    assert torch.equal(mask_of(model, "head.weight"), mask_of(source_model, "head.weight"))
