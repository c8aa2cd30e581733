"""NearlyDiagonalSparsifier: band masks against torch.ao.pruning and the |i - j| <= nearliness // 2 rule,
squashing, state_dict, and bad input."""
import pytest
import torch
from torch import nn
from torch.ao import pruning as tao

import sparsity_ext

from test_sparsifier_api import assert_same_snapshot, snapshot


def _band(rows, cols, nearliness):
    """The expected mask, element by element."""
    return torch.tensor([[float(abs(i - j) <= nearliness // 2) for j in range(cols)] for i in range(rows)])


def _prepared(cls, shapes, nearliness):
    model = nn.Sequential(*(nn.Linear(cols, rows) for rows, cols in shapes))
    sparsifier = cls(nearliness=nearliness)
    sparsifier.prepare(model, None)
    return model, sparsifier


@pytest.mark.parametrize("nearliness", [1, 3, 5, 7])
@pytest.mark.parametrize("shape", [(8, 8), (5, 9), (10, 4)])
def test_band_masks_equal_torch_ao(shape, nearliness):
    ours_model, ours = _prepared(sparsity_ext.NearlyDiagonalSparsifier, [shape], nearliness)
    theirs_model, theirs = _prepared(tao.NearlyDiagonalSparsifier, [shape], nearliness)
    original = ours_model[0].weight.detach().clone()
    ours.step()
    theirs.step()
    mask = ours_model[0].parametrizations.weight[0].mask
    assert mask.dtype == torch.float32
    assert torch.equal(mask, _band(*shape, nearliness))
    assert torch.equal(mask, theirs_model[0].parametrizations.weight[0].mask)
    ours.squash_mask()
    theirs.squash_mask()
    assert torch.equal(ours_model[0].weight, original * _band(*shape, nearliness))


def test_main_diagonal_and_squash():
    model, sparsifier = _prepared(sparsity_ext.NearlyDiagonalSparsifier, [(6, 6), (4, 6)], 1)
    originals = [layer.weight.detach().clone() for layer in model]
    buffer = model[0].parametrizations.weight[0].mask
    sparsifier.step()
    assert model[0].parametrizations.weight[0].mask is buffer and torch.equal(buffer, torch.eye(6))
    sparsifier.squash_mask()
    assert torch.equal(model[0].weight, originals[0] * torch.eye(6))
    assert torch.equal(model[1].weight, originals[1] * torch.eye(4, 6))


@pytest.mark.parametrize("nearliness", [0, -3])
def test_non_positive_nearliness_masks_everything(nearliness):
    """As in torch.ao.pruning: no diagonal is kept."""
    model, sparsifier = _prepared(sparsity_ext.NearlyDiagonalSparsifier, [(5, 5)], nearliness)
    sparsifier.step()
    assert not model[0].parametrizations.weight[0].mask.any()


def test_per_layer_nearliness_and_state_dict_round_trip():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    sparsifier = sparsity_ext.NearlyDiagonalSparsifier(nearliness=1)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "1.weight", "nearliness": 5}])
    sparsifier.step()
    assert torch.equal(model[1].parametrizations.weight[0].mask, _band(6, 6, 5))
    state_dict = sparsifier.state_dict()
    assert state_dict["groups"] == [{"nearliness": 1, "tensor_fqn": "0.weight"},
                                    {"nearliness": 5, "tensor_fqn": "1.weight"}]
    other_model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    other = tao.NearlyDiagonalSparsifier()
    other.prepare(other_model, None)
    other.load_state_dict(state_dict)
    for ours, theirs in zip(model, other_model):
        assert torch.equal(ours.parametrizations.weight[0].mask, theirs.parametrizations.weight[0].mask)


@pytest.mark.parametrize("nearliness,shape,error,message", [
    (2, (6, 6), ValueError, "odd"),
    (4, (6, 6), ValueError, "odd"),
    (7, (3, 8), ValueError, "larger than the dimensions"),
    (13, (6, 6), ValueError, "larger than the dimensions"),
    (1.0, (6, 6), TypeError, "int"),
])
def test_bad_nearliness_is_accepted_at_prepare_and_raises_at_step_before_touching_the_model(
        nearliness, shape, error, message):
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(shape[1], shape[0]))
    sparsifier = sparsity_ext.NearlyDiagonalSparsifier(nearliness=1)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "1.weight", "nearliness": nearliness}])
    before = snapshot(model)
    with pytest.raises(error, match=message):
        sparsifier.step()
    assert_same_snapshot(before, snapshot(model))  # the legal first group's mask was not written either

    sparsifier = sparsity_ext.NearlyDiagonalSparsifier(nearliness=1)  # the same, set after a good step
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(shape[1], shape[0]))
    sparsifier.prepare(model, None)
    sparsifier.step()
    before = snapshot(model)
    sparsifier.groups[0]["nearliness"] = 3
    sparsifier.groups[1]["nearliness"] = nearliness
    with pytest.raises(error, match=message):
        sparsifier.step()
    assert_same_snapshot(before, snapshot(model))


def test_torch_ao_accepts_the_same_nearliness_at_prepare_and_raises_at_step():
    for nearliness, shape in ((2, (6, 6)), (7, (3, 8))):
        model, sparsifier = _prepared(tao.NearlyDiagonalSparsifier, [shape], nearliness)
        with pytest.raises(ValueError):
            sparsifier.step()


@pytest.mark.parametrize("lib", [sparsity_ext, tao], ids=["sparsity_ext", "torch.ao"])
def test_non_2d_weights_are_accepted_at_prepare_and_raise_at_step(lib):
    conv = nn.Sequential(nn.Conv2d(4, 4, 3))
    sparsifier = lib.NearlyDiagonalSparsifier(nearliness=1)
    sparsifier.prepare(conv, [{"tensor_fqn": "0.weight"}])
    with pytest.raises(ValueError):
        sparsifier.step()


@pytest.mark.parametrize("lib", [sparsity_ext, tao], ids=["sparsity_ext", "torch.ao"])
def test_nearliness_zero_masks_a_non_2d_weight(lib):
    conv = nn.Sequential(nn.Conv2d(4, 4, 3))
    sparsifier = lib.NearlyDiagonalSparsifier(nearliness=0)
    sparsifier.prepare(conv, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    assert not conv[0].weight.any()


def test_meta_model_gives_torch_ao_mask_shape():
    def mask_after_step(lib):
        model = nn.Linear(10, 8, device="meta")
        sparsifier = lib.NearlyDiagonalSparsifier(nearliness=3)
        sparsifier.prepare(model, [{"tensor_fqn": "weight"}])
        sparsifier.step()
        return model.parametrizations.weight[0].mask

    ours, theirs = mask_after_step(sparsity_ext), mask_after_step(tao)
    assert ours.device.type == "meta" and (ours.shape, ours.dtype) == (theirs.shape, theirs.dtype)
