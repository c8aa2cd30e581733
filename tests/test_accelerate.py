"""sparsity_ext.accelerate_torch_ao: torch.ao.pruning's own sparsifier classes give the same masks, mask
objects, dtypes, weights and state_dicts with and without the patch; the patch covers existing instances,
is idempotent and undone by restore_torch_ao; every configuration the kernels would not answer exactly
as torch.ao.pruning does runs torch.ao.pruning's original method."""
import warnings

import pytest
import torch
from torch import nn
from torch.ao import pruning as ao
from torch.ao.pruning._experimental.data_scheduler import BaseDataScheduler
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier

import sparsity_ext
from sparsity_ext import accelerate
from conftest import tie_free

PATCHED_CLASSES = (ao.WeightNormSparsifier, DataNormSparsifier, ao.NearlyDiagonalSparsifier)
ORIGINAL_METHODS = {cls: cls.__dict__["update_mask"] for cls in PATCHED_CLASSES}


@pytest.fixture(autouse=True)
def _unpatched_after_each_test():
    sparsity_ext.restore_torch_ao()
    yield
    sparsity_ext.restore_torch_ao()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls the accelerated methods make into sparsity_ext's mask kernels."""
    calls = {"weight_norm": 0, "data_norm": 0, "weight_norm_in_place": 0}

    def spy(key, fn, *also):
        def counted(*args, **kwargs):
            for name in (key, *also):
                calls[name] += 1
            return fn(*args, **kwargs)
        return counted

    monkeypatch.setattr(accelerate.ops, "block_norm_mask", spy("weight_norm", accelerate.ops.block_norm_mask))
    monkeypatch.setattr(accelerate.ops, "block_norm_mask_update_",
                        spy("weight_norm", accelerate.ops.block_norm_mask_update_, "weight_norm_in_place"))
    monkeypatch.setattr(accelerate, "block_norm_mask_chunked",
                        spy("data_norm", accelerate.block_norm_mask_chunked))
    return calls


def both_ways(run):
    """run() unpatched, then under accelerate_torch_ao()."""
    expected = run()
    with sparsity_ext.accelerate_torch_ao():
        got = run()
    return expected, got


def assert_same_snapshots(expected, got):
    """Lists of (name, tensor) pairs: same names, dtypes, devices, shapes and values (exactly)."""
    assert [name for name, _ in got] == [name for name, _ in expected]
    for (name, want), (_, have) in zip(expected, got):
        assert have.dtype == want.dtype, name
        assert have.device == want.device, name
        assert have.shape == want.shape, name
        assert torch.equal(have, want), name


# ------------------------------------------------------------------------------ WeightNormSparsifier
LAYER_SHAPES = ((24, 36), (12, 24), (10, 14))


def weight_norm_model(shapes=LAYER_SHAPES, dtype=torch.float32):
    layers = []
    for i, (rows, cols) in enumerate(shapes):
        layer = nn.Linear(cols, rows, bias=False, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(tie_free((rows, cols), dtype=dtype, seed=10 + i))
        layers.append(layer)
    return nn.Sequential(*layers)


def run_weight_norm(sparsifier_args, config_extra=None, steps=3, scheduler=False, shapes=LAYER_SHAPES,
                    dtype=torch.float32, cls=ao.WeightNormSparsifier):
    """Prepares a fresh model with torch.ao.pruning's WeightNormSparsifier, steps it (between steps the
    weights drift a little, as in training) and returns what a user can observe after each step."""
    model = weight_norm_model(shapes, dtype)
    sparsifier = cls(**sparsifier_args)
    config = [{"tensor_fqn": f"{i}.weight", **(config_extra or {})} for i in range(len(shapes))]
    sparsifier.prepare(model, config)
    masks = [layer.parametrizations.weight[0].mask for layer in model]  # held across steps
    sl_scheduler = ao.LambdaSL(sparsifier, lambda epoch: 1.0 + 0.2 * epoch) if scheduler else None
    snapshots = []
    for step in range(steps):
        sparsifier.step()
        if sl_scheduler is not None:
            sl_scheduler.step()
        for i, layer in enumerate(model):
            assert layer.parametrizations.weight[0].mask is masks[i]
            assert sparsifier.state[f"{i}.weight"]["mask"] is masks[i]
            snapshots += [(f"step{step}.mask{i}", masks[i].clone()), (f"step{step}.weight{i}", layer.weight.detach())]
        with torch.no_grad():
            for i, layer in enumerate(model):
                original = layer.parametrizations.weight.original
                original.add_(tie_free(tuple(original.shape), dtype=dtype, seed=100 * step + i) * 1e-3)
    state = sparsifier.state_dict()
    snapshots += [(f"state.{fqn}", entry["mask"]) for fqn, entry in sorted(state["state"].items())]
    return snapshots, state["groups"]


WEIGHT_NORM_CASES = [
    dict(sparsity_level=0.5, sparse_block_shape=(1, 4)),
    dict(sparsity_level=0.3, sparse_block_shape=(2, 2), norm=1),
    dict(sparsity_level=0.7, sparse_block_shape=(4, 1)),
    dict(sparsity_level=0.5, sparse_block_shape=(4, 4)),  # partial edge blocks on the 10 x 14 layer
    dict(sparsity_level=0.4, sparse_block_shape=(3, 5), norm=1),
    dict(sparsity_level=0.6, sparse_block_shape=(1, 1)),
    dict(sparsity_level=0.999, sparse_block_shape=(2, 2)),  # rounds to every block; clamped to all but one
    dict(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=2, norm=1),
    dict(sparsity_level=0.5, sparse_block_shape=(2, 2), zeros_per_block=1),
    dict(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2),  # 2:4
    dict(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2, norm=1),
    dict(sparsity_level=1.5, sparse_block_shape=(2, 2), zeros_per_block=3),  # torch.ao: >= 1 selects all blocks
]


@pytest.mark.parametrize("args", WEIGHT_NORM_CASES, ids=lambda a: "-".join(f"{v}" for v in a.values()))
def test_weight_norm_same_masks_weights_and_state(args, kernel_calls):
    shapes = LAYER_SHAPES if args.get("zeros_per_block") is None else LAYER_SHAPES[:2]  # torch.ao crashes else
    expected, got = both_ways(lambda: run_weight_norm(args, shapes=shapes))
    assert_same_snapshots(expected[0], got[0])
    assert got[1] == expected[1]
    assert kernel_calls["weight_norm"] == 3 * len(shapes)
    # from the second step at the latest the mask has the dtype the step gives it: updated in place
    assert kernel_calls["weight_norm_in_place"] >= 2 * len(shapes)


def test_weight_norm_with_scheduler_and_config_overrides(kernel_calls):
    args = dict(sparsity_level=0.3, sparse_block_shape=(1, 4))
    expected, got = both_ways(lambda: run_weight_norm(args, {"sparse_block_shape": (2, 2), "sparsity_level": 0.4},
                                                      steps=4, scheduler=True))
    assert_same_snapshots(expected[0], got[0])
    assert got[1] == expected[1]
    assert kernel_calls["weight_norm"] == 4 * len(LAYER_SHAPES)


def test_existing_instance_is_accelerated_and_restored(kernel_calls):
    model = weight_norm_model()
    sparsifier = ao.WeightNormSparsifier(sparsity_level=0.5)
    sparsifier.prepare(model, None)  # all Linear layers
    sparsifier.step()
    unpatched = [layer.parametrizations.weight[0].mask.clone() for layer in model]
    sparsity_ext.accelerate_torch_ao()
    sparsifier.step()
    assert kernel_calls["weight_norm"] == len(LAYER_SHAPES)
    for layer, want in zip(model, unpatched):
        assert torch.equal(layer.parametrizations.weight[0].mask, want)
    sparsity_ext.restore_torch_ao()
    sparsifier.step()
    assert kernel_calls["weight_norm"] == len(LAYER_SHAPES)


def test_reference_backend_gives_the_same_masks():
    args = dict(sparsity_level=0.5, sparse_block_shape=(2, 2))
    expected = run_weight_norm(args, steps=1)
    with sparsity_ext.accelerate_torch_ao(), sparsity_ext.use_backend("reference"):
        got = run_weight_norm(args, steps=1)
    assert_same_snapshots(expected[0], got[0])


# -------------------------------------------------------------------------------- DataNormSparsifier
class _GrowingLevel(BaseDataScheduler):
    """A torch.ao data scheduler: each step raises every sparsity level by 10% of its base value."""

    def get_schedule_param(self):
        return {name: min(1.0, base * (1 + 0.1 * self.last_epoch)) for name, base in self.base_param.items()}


def data_norm_inputs():
    embedding = nn.Embedding(40, 12)
    bag = nn.EmbeddingBag(33, 8)
    with torch.no_grad():
        embedding.weight.copy_(tie_free((40, 12), seed=1))
        bag.weight.copy_(tie_free((33, 8), seed=2))
    return [("table", tie_free((30, 20), seed=3)), ("row", tie_free((1, 17), seed=4)),
            ("param", nn.Parameter(tie_free((9, 10), seed=5))), ("embedding", embedding), ("bag", bag)]


def run_data_norm(args, overrides=None, steps=3, scheduler=False):
    """add_data + step several times (the data drifting in between) with torch.ao.pruning's
    DataNormSparsifier; returns the masks after each step and the state_dict."""
    sparsifier = DataNormSparsifier(**args)
    for name, data in data_norm_inputs():
        sparsifier.add_data(name, data, **(overrides or {}).get(name, {}))
    masks = {name: sparsifier.get_mask(name) for name in sparsifier.data_groups}
    level_scheduler = _GrowingLevel(sparsifier, "sparsity_level") if scheduler else None
    snapshots = []
    for step in range(steps):
        sparsifier.step()
        if level_scheduler is not None:
            level_scheduler.step()
        for name, mask in masks.items():
            container = sparsifier._container
            assert sparsifier.get_mask(name) is mask
            assert getattr(container.parametrizations, name)[0].mask is mask
            snapshots += [(f"step{step}.{name}.mask", mask.clone()),
                          (f"step{step}.{name}.sparse", sparsifier.get_data(name, return_original=False))]
        with torch.no_grad():
            for i, name in enumerate(masks):
                data = sparsifier.get_data(name)
                data.add_(tie_free(tuple(data.shape), seed=50 * step + i) * 1e-3)
    state = sparsifier.state_dict()
    snapshots += [(f"state.{name}", entry["mask"].to_dense()) for name, entry in sorted(state["state"].items())]
    snapshots += [(f"container.{key}", value) for key, value in sorted(state["_container"].items())]
    return snapshots, state["data_groups"]


DATA_NORM_CASES = [
    dict(sparsity_level=0.5),
    dict(sparsity_level=0.8, sparse_block_shape=(1, 4), norm="L2"),
    dict(sparsity_level=0.3, sparse_block_shape=(3, 3)),  # partial blocks
    dict(sparsity_level=0.6, sparse_block_shape=(2, 4), zeros_per_block=3),  # partial blocks, partial zeroing
    dict(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2, norm="L2"),  # 2:4
    dict(sparsity_level=0.99, sparse_block_shape=(4, 4)),  # rounds to every block: all of them go
    dict(sparsity_level=0.0, sparse_block_shape=(2, 2), zeros_per_block=1),
]


@pytest.mark.parametrize("args", DATA_NORM_CASES, ids=lambda a: "-".join(f"{v}" for v in a.values()))
def test_data_norm_same_masks_and_state(args, kernel_calls):
    overrides = {"row": {"sparsity_level": 0.4}, "bag": {"sparsity_level": 0.25}}
    expected, got = both_ways(lambda: run_data_norm(args, overrides))
    assert_same_snapshots(expected[0], got[0])
    assert got[1] == expected[1]
    assert kernel_calls["data_norm"] == 3 * 5


def test_data_norm_with_scheduler(kernel_calls):
    expected, got = both_ways(lambda: run_data_norm(dict(sparsity_level=0.4), steps=4, scheduler=True))
    assert_same_snapshots(expected[0], got[0])
    assert got[1] == expected[1]
    assert kernel_calls["data_norm"] == 4 * 5


# -------------------------------------------------------------------------- NearlyDiagonalSparsifier
@pytest.mark.parametrize("shape", [(7, 7), (5, 9), (9, 4)])
@pytest.mark.parametrize("nearliness", [1, 3, 5])
def test_nearly_diagonal_same_masks(shape, nearliness):
    def run():
        model = nn.Sequential(nn.Linear(shape[1], shape[0], bias=False))
        sparsifier = ao.NearlyDiagonalSparsifier(nearliness=nearliness)
        sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
        mask = model[0].parametrizations.weight[0].mask
        sparsifier.step()
        assert sparsifier.state["0.weight"]["mask"] is mask
        return [("mask", mask.clone())]

    expected, got = both_ways(run)
    assert_same_snapshots(expected, got)


# ----------------------------------------------------------------------------- patch / restore
def test_restore_gives_back_the_original_methods():
    handle = sparsity_ext.accelerate_torch_ao()
    assert accelerate.torch_ao_accelerated()
    for cls in PATCHED_CLASSES:
        assert cls.__dict__["update_mask"] is not ORIGINAL_METHODS[cls]
        assert cls.update_mask.__wrapped__ is ORIGINAL_METHODS[cls]
    handle.restore()
    assert not accelerate.torch_ao_accelerated()
    for cls in PATCHED_CLASSES:
        assert cls.__dict__["update_mask"] is ORIGINAL_METHODS[cls]
    sparsity_ext.restore_torch_ao()  # restoring again is harmless
    assert all(cls.__dict__["update_mask"] is ORIGINAL_METHODS[cls] for cls in PATCHED_CLASSES)


def test_patching_twice_is_harmless():
    sparsity_ext.accelerate_torch_ao()
    patched = {cls: cls.__dict__["update_mask"] for cls in PATCHED_CLASSES}
    with sparsity_ext.accelerate_torch_ao():  # already on: changes nothing, and its exit keeps it on
        assert all(cls.__dict__["update_mask"] is patched[cls] for cls in PATCHED_CLASSES)
    assert all(cls.__dict__["update_mask"] is patched[cls] for cls in PATCHED_CLASSES)
    sparsity_ext.restore_torch_ao()
    assert all(cls.__dict__["update_mask"] is ORIGINAL_METHODS[cls] for cls in PATCHED_CLASSES)


def test_context_manager_restores_on_error():
    with pytest.raises(KeyError):
        with sparsity_ext.accelerate_torch_ao():
            assert accelerate.torch_ao_accelerated()
            raise KeyError("boom")
    assert all(cls.__dict__["update_mask"] is ORIGINAL_METHODS[cls] for cls in PATCHED_CLASSES)


# ------------------------------------------------------------------------------------ fallbacks
class _HalvedTensorMask(ao.WeightNormSparsifier):
    """A subclass overriding one of the hooks torch.ao.pruning's update_mask calls."""

    def _make_tensor_mask(self, data, input_shape, sparsity_level, sparse_block_shape, mask=None):
        return super()._make_tensor_mask(data, input_shape, sparsity_level / 2, sparse_block_shape, mask)


def _outcome(run):
    """run()'s snapshots, or the type and message of what it raised."""
    try:
        return run()
    except Exception as error:  # noqa: BLE001  (any error must be the same with the patch)
        return type(error), str(error)


WEIGHT_NORM_FALLBACKS = {
    "custom-norm": (ao.WeightNormSparsifier, dict(sparsity_level=0.5, norm=lambda t: t.abs() ** 3), {}),
    "overridden-hook": (_HalvedTensorMask, dict(sparsity_level=0.6), {}),
    "float64": (ao.WeightNormSparsifier, dict(sparsity_level=0.5), {"dtype": torch.float64}),
    # one step: torch.ao.pruning's float32 mask makes the masked weight float32 from the second step on
    "bfloat16": (ao.WeightNormSparsifier, dict(sparsity_level=0.5), {"dtype": torch.bfloat16, "steps": 1}),
    "level-above-1": (ao.WeightNormSparsifier, dict(sparsity_level=1.5, sparse_block_shape=(1, 4)), {}),
    "level-below-0": (ao.WeightNormSparsifier, dict(sparsity_level=-0.5), {}),
    "level-0": (ao.WeightNormSparsifier, dict(sparsity_level=0.0, zeros_per_block=2), {}),
    "zeros-0": (ao.WeightNormSparsifier, dict(sparsity_level=0.5, zeros_per_block=0), {}),
    "zeros-above-block": (ao.WeightNormSparsifier, dict(sparsity_level=0.5, zeros_per_block=5), {}),
    "partial-2:4-crashes": (ao.WeightNormSparsifier, dict(sparsity_level=1.0, zeros_per_block=2),
                            {"shapes": ((6, 30),)}),
    "partial-block-zeros": (ao.WeightNormSparsifier, dict(sparsity_level=0.5, sparse_block_shape=(4, 4),
                                                          zeros_per_block=3), {"shapes": ((10, 14),)}),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_NORM_FALLBACKS))
def test_weight_norm_falls_back(case, kernel_calls):
    cls, args, model_args = WEIGHT_NORM_FALLBACKS[case]
    expected, got = both_ways(lambda: _outcome(lambda: run_weight_norm(args, cls=cls, **{"steps": 2, **model_args})))
    assert kernel_calls["weight_norm"] == 0
    if isinstance(expected, tuple) and isinstance(expected[0], type):
        assert got == expected
    else:
        assert_same_snapshots(expected[0], got[0])


def _single_data_outcome(data, args):
    def run():
        sparsifier = DataNormSparsifier(**args)
        sparsifier.add_data("data", data.clone())
        sparsifier.step()
        return [("mask", sparsifier.get_mask("data").clone())]
    return _outcome(run)


DATA_NORM_FALLBACKS = {
    "1-D": (tie_free((24,), seed=7), dict(sparsity_level=0.5)),
    "one-column": (tie_free((16, 1), seed=7), dict(sparsity_level=0.5, sparse_block_shape=(4, 1))),
    "float64": (tie_free((16, 8), dtype=torch.float64, seed=7), dict(sparsity_level=0.5)),
    "level-above-1": (tie_free((16, 8), seed=7), dict(sparsity_level=1.5)),
    "level-below-0": (tie_free((16, 8), seed=7), dict(sparsity_level=-0.5)),  # torch.ao keeps a prefix
    "zeros-above-block": (tie_free((16, 8), seed=7), dict(sparsity_level=0.5, zeros_per_block=5)),
}


@pytest.mark.parametrize("case", sorted(DATA_NORM_FALLBACKS))
def test_data_norm_falls_back(case, kernel_calls):
    data, args = DATA_NORM_FALLBACKS[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, got = both_ways(lambda: _single_data_outcome(data, args))
    assert kernel_calls["data_norm"] == 0
    if isinstance(expected, tuple):
        assert got == expected
    else:
        assert_same_snapshots(expected, got)


@pytest.mark.parametrize("nearliness", [0, 2, 9, 3.0])
def test_nearly_diagonal_falls_back(nearliness):
    def run():
        model = nn.Sequential(nn.Linear(6, 8, bias=False))
        sparsifier = ao.NearlyDiagonalSparsifier(nearliness=nearliness)
        sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
        sparsifier.step()
        return [("mask", model[0].parametrizations.weight[0].mask.clone())]

    expected, got = both_ways(lambda: _outcome(run))
    if isinstance(expected, tuple):
        assert got == expected
    else:
        assert_same_snapshots(expected, got)


class _Scale(nn.Module):
    def forward(self, x):
        return 2 * x


def test_nearly_diagonal_with_a_second_parametrization_falls_back():
    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8, bias=False))
        sparsifier = ao.NearlyDiagonalSparsifier(nearliness=3)
        sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
        nn.utils.parametrize.register_parametrization(model[0], "weight", _Scale())
        sparsifier.step()
        return [("mask", model[0].parametrizations.weight[0].mask.clone()), ("weight", model[0].weight.detach())]

    expected, got = both_ways(run)
    assert_same_snapshots(expected, got)


# ------------------------------------------------------------------------------------ meta device
def _meta_masks():
    """The masks torch.ao.pruning's three sparsifiers give after two steps on meta (shape-only) tensors."""
    masks = []
    for args in (dict(sparsity_level=0.5), dict(sparsity_level=0.5, zeros_per_block=2)):
        model = nn.Linear(32, 16, device="meta")
        sparsifier = ao.WeightNormSparsifier(**args)
        sparsifier.prepare(model, [{"tensor_fqn": "weight"}])
        sparsifier.step()
        sparsifier.step()
        masks.append(model.parametrizations.weight[0].mask)
    data_sparsifier = DataNormSparsifier(sparsity_level=0.5)
    data_sparsifier.add_data("e", torch.randn(16, 32, device="meta"))
    data_sparsifier.step()
    masks.append(data_sparsifier.get_mask("e"))
    model = nn.Linear(10, 8, device="meta")
    diagonal = ao.NearlyDiagonalSparsifier(nearliness=3)
    diagonal.prepare(model, [{"tensor_fqn": "weight"}])
    diagonal.step()
    masks.append(model.parametrizations.weight[0].mask)
    return masks


def test_meta_models_step_as_unpatched():
    expected, got = both_ways(_meta_masks)
    assert [(m.device.type, m.shape, m.dtype) for m in got] == [(m.device.type, m.shape, m.dtype) for m in expected]
    assert all(m.device.type == "meta" for m in got)
