"""Drop-in parity: the same scripts, written once against a `torch.ao.pruning`-like root module, run on
torch.ao.pruning and on sparsity_ext (the text substitution a user makes), plain and under
sparsity_ext.accelerate_torch_ao(). Each run records, call by call: the model's parameters and buffers
(masks included: dtype, shape and bytes, so -0.0 and +0.0 differ), state_dict keys, dtypes and bytes,
scheduler levels, returned values, and the exception type of any call that raises. The records must be
equal. Also: every name torch.ao.pruning's modules define exists at the same path in sparsity_ext.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import pkgutil
import types
import warnings

import pytest
import torch
import torch.ao.pruning
from torch import nn

import sparsity_ext
from conftest import tie_free


# ----------------------------------------------------------------------------------------- recording
class Recorder:
    """The events of one run: (label, value) with tensors as (layout, dtype, shape, bytes)."""

    def __init__(self):
        self.events: list[tuple[str, object]] = []

    def add(self, label: str, value) -> None:
        self.events.append((label, _plain(value)))

    def model(self, label: str, model: nn.Module) -> None:
        tensors = dict(model.named_parameters())
        tensors.update(model.named_buffers())
        self.add(label, dict(sorted(tensors.items())))

    def call(self, label: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), recording its exception type if it raises (then returns `RAISED`)."""
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # the type is what is compared
            self.add(label, ("raised", _exception_kind(exc)))
            return RAISED
        self.add(label, "returned")
        return result


RAISED = object()


def _exception_kind(exc: Exception) -> str:
    """The builtin exception class an exception is, so a subclass with a clearer name still matches."""
    for kind in (ValueError, TypeError, RuntimeError, AssertionError, KeyError, NotImplementedError):
        if isinstance(exc, kind):
            return kind.__name__
    return type(exc).__name__


def _plain(value):
    """value with tensors replaced by (layout, dtype, shape, bytes) and containers walked, comparable with ==."""
    if isinstance(value, torch.Tensor):
        dense = value.detach().to_dense() if value.layout != torch.strided else value.detach()
        raw = dense.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return ("tensor", str(value.layout), value.dtype, tuple(value.shape), raw)
    if isinstance(value, dict):
        return {"dict": sorted((str(k), _plain(v)) for k, v in value.items())}
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_plain(v) for v in value])
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    return getattr(value, "__qualname__", type(value).__name__)  # functions given by the script itself


def assert_same_records(expected: list, got: list) -> None:
    for (want_label, want), (have_label, have) in zip(expected, got):
        assert have_label == want_label
        assert have == want, f"differs at {want_label!r}"
    assert [label for label, _ in got] == [label for label, _ in expected]


# ------------------------------------------------------------------------------------------- libraries
class Lib:
    """One library under its root name: `lib.at("._experimental.pruner")` imports root + the suffix."""

    def __init__(self, root: str):
        self.root = root
        self.top = importlib.import_module(root)

    def at(self, suffix: str):
        return importlib.import_module(self.root + suffix)


def run(script, root: str, accelerated: bool) -> list:
    rec = Recorder()
    torch.manual_seed(0)
    with sparsity_ext.accelerate_torch_ao() if accelerated else contextlib.nullcontext():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # both libraries warn alike (replacing data, get_sl)
            script(Lib(root), rec)
    return rec.events


# --------------------------------------------------------------------------------------------- models
def linear_model(seed: int = 0, dtype=torch.float32) -> nn.Module:
    """Linear layers with tie-free weights of both signs (zeroed negatives show as -0.0)."""
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        for i, layer in enumerate(m for m in model if isinstance(m, nn.Linear)):
            layer.weight.copy_(tie_free(layer.weight.shape, seed=seed * 10 + i) - 0.5)
    return model.to(dtype)


# -------------------------------------------------------------------------------------------- scripts
def weight_norm_lambda_overshoot(zeros_per_block):
    def script(lib, rec):
        model = linear_model()
        level = 0.9 if zeros_per_block is None else 1.0
        sparsifier = lib.top.WeightNormSparsifier(sparsity_level=level, sparse_block_shape=(1, 4),
                                                  zeros_per_block=zeros_per_block)
        rec.call("prepare", sparsifier.prepare, model, None)
        rec.model("after prepare", model)
        scheduler = lib.top.LambdaSL(sparsifier, sl_lambda=lambda epoch: 1.05 ** epoch)
        for epoch in range(5):  # the level passes 1 at epoch 3 (0.9 * 1.05 ** 3 > 1)
            if rec.call(f"step {epoch}", sparsifier.step) is RAISED:
                return
            rec.model(f"after step {epoch}", model)
            rec.add(f"levels {epoch}", [g["sparsity_level"] for g in sparsifier.groups])
            scheduler.step()
        rec.add("state_dict", sparsifier.state_dict())
        sparsifier.squash_mask()
        rec.model("squashed", model)
    return script


def weight_norm_cubic_overshoot(lib, rec):
    model = linear_model(seed=1)
    sparsifier = lib.top.WeightNormSparsifier(sparse_block_shape=(2, 4))
    config = [{"tensor_fqn": "0.weight", "sparsity_level": 1.2}, {"tensor_fqn": "2.weight", "sparsity_level": 0.8}]
    rec.call("prepare", sparsifier.prepare, model, config)
    scheduler = lib.top.CubicSL(sparsifier, init_sl=0.2, init_t=0, delta_t=1, total_t=4)
    for epoch in range(6):
        if rec.call(f"step {epoch}", sparsifier.step) is RAISED:
            return
        rec.model(f"after step {epoch}", model)
        rec.add(f"levels {epoch}", [g["sparsity_level"] for g in sparsifier.groups])
        scheduler.step()
    sparsifier.squash_mask()
    rec.model("squashed", model)


def state_equal_after_load(lib, rec):
    model0, model1 = linear_model(seed=2), linear_model(seed=3)
    s0 = lib.top.WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=2)
    s0.prepare(model0, None)
    s0.step()
    s1 = lib.top.WeightNormSparsifier(sparsity_level=0.5)
    s1.prepare(model1, None)
    rec.add("state_dict", s0.state_dict())
    s1.load_state_dict(s0.state_dict())
    rec.add("s0.state == s1.state", rec.call("compare", lambda: s0.state == s1.state))
    rec.add("groups", [{k: v for k, v in g.items() if k != "module"} for g in s1.groups])
    rec.model("loaded model", model1)
    s1.step()
    rec.model("stepped loaded model", model1)
    rec.model("model whose masks it shares", model0)
    s1.squash_mask()
    rec.model("squashed", model1)


def nearly_diagonal_illegal_nearliness(lib, rec):
    for nearliness, shape in ((2, (6, 6)), (7, (3, 8)), (3, (6, 6))):
        model = nn.Sequential(nn.Linear(shape[1], shape[0]))
        with torch.no_grad():
            model[0].weight.copy_(tie_free(shape, seed=nearliness) - 0.5)
        sparsifier = lib.top.NearlyDiagonalSparsifier(nearliness=nearliness)
        rec.call(f"prepare {nearliness}", sparsifier.prepare, model, None)
        if rec.call(f"step {nearliness}", sparsifier.step) is RAISED:
            continue
        rec.model(f"stepped {nearliness}", model)
        sparsifier.squash_mask()
        rec.model(f"squashed {nearliness}", model)


def pruner_distances_and_masks(lib, rec):
    pruner_lib = lib.at("._experimental.pruner")
    for dtype in (torch.float32, torch.float64):
        for dist in (None, 1):
            weight = tie_free((6, 3, 2, 2), seed=5).to(dtype)
            distance = pruner_lib.FPGMPruner(dist=dist)._compute_distance(weight)
            rec.add(f"FPGM distance {dtype} {dist}", (distance.dtype, tuple(distance.shape)))
    for cls in ("FPGMPruner", "SaliencyPruner"):
        model = nn.Sequential(nn.Conv2d(3, 6, 2), nn.ReLU(), nn.Conv2d(6, 4, 2))
        with torch.no_grad():
            for i, conv in enumerate((model[0], model[2])):
                conv.weight.copy_(tie_free(conv.weight.shape, seed=20 + i) - 0.5)
        pruner = pruner_lib.FPGMPruner(0.5) if cls == "FPGMPruner" else pruner_lib.SaliencyPruner({"sparsity_level": 0.5})
        pruner.prepare(model, [{"tensor_fqn": "0.weight"}])
        pruner.step()
        rec.add(f"{cls} mask", model[0].parametrizations.weight[0].mask)
        rec.add(f"{cls} state_dict", pruner.state_dict())


def data_sparsifier_and_scheduler(lib, rec):
    data_lib = lib.at("._experimental.data_sparsifier")
    scheduler_lib = lib.at("._experimental.data_scheduler")

    class HalvingScheduler(scheduler_lib.BaseDataScheduler):
        def get_schedule_param(self):
            return {name: config["sparsity_level"] * 1.5 for name, config in self.data_sparsifier.data_groups.items()}

    table = nn.Embedding(20, 12)
    with torch.no_grad():
        table.weight.copy_(tie_free((20, 12), seed=7) - 0.5)
    data_list = [("tensor", tie_free((8, 16), seed=8) - 0.5), ("param", nn.Parameter(tie_free((12, 8), seed=9) - 0.5))]
    sparsifier = data_lib.DataNormSparsifier(data_list=data_list, sparsity_level=0.4, sparse_block_shape=(1, 4))
    sparsifier.add_data("table", table, zeros_per_block=2, sparsity_level=0.6)
    rec.add("masks after add", {name: sparsifier.get_mask(name) for name in ("tensor", "param", "table")})
    scheduler = HalvingScheduler(sparsifier, schedule_param="sparsity_level")
    for epoch in range(3):  # the levels pass 1 at the last epoch
        rec.call(f"step {epoch}", sparsifier.step)
        rec.add(f"masks {epoch}", {name: sparsifier.get_mask(name) for name in ("tensor", "param", "table")})
        rec.add(f"levels {epoch}", {name: c["sparsity_level"] for name, c in sparsifier.data_groups.items()})
        scheduler.step()
    state_dict = sparsifier.state_dict()
    rec.add("state_dict", state_dict)
    rec.add("scheduler state_dict", {k: v for k, v in scheduler.state_dict().items() if k != "data_sparsifier"})
    loaded = data_lib.DataNormSparsifier()
    loaded.load_state_dict(state_dict)
    rec.add("loaded masks", {name: loaded.get_mask(name) for name in ("tensor", "param", "table")})
    sparsifier.squash_mask()
    rec.add("squashed", {name: sparsifier.get_data(name, return_original=False) for name in ("tensor", "param")})
    rec.add("squashed table", table.weight)


def _add(aggregate, x):
    return aggregate + x


def _mean_over_batch(aggregate):
    return aggregate.mean(dim=0)


def _smallest_half_mask(data, sparsity_level):
    mask = torch.ones_like(data)
    mask.view(-1)[torch.argsort(data.abs().flatten())[:round(sparsity_level * data.numel())]] = 0
    return mask


def activation_sparsifier(lib, rec):
    act_lib = lib.at("._experimental.activation_sparsifier.activation_sparsifier")
    model = linear_model(seed=4)
    sparsifier = act_lib.ActivationSparsifier(model, aggregate_fn=_add, reduce_fn=_mean_over_batch,
                                              mask_fn=_smallest_half_mask, sparsity_level=0.5)
    sparsifier.register_layer(model[2])
    sparsifier.register_layer(model[4], features=[0, 3], feature_dim=1)
    g = torch.Generator().manual_seed(11)
    inputs = [torch.randn(5, 16, generator=g) for _ in range(3)]
    for x in inputs:
        model(x)
    sparsifier.step()
    rec.add("masks", [sparsifier.get_mask("2"), sparsifier.get_mask("4")])
    rec.add("state_dict", sparsifier.state_dict())
    sparsifier.squash_mask()
    rec.add("sparsified output", model(inputs[0]))


SCRIPTS = {
    "weight_norm_lambda_overshoot": weight_norm_lambda_overshoot(None),
    "weight_norm_2:4_lambda_overshoot": weight_norm_lambda_overshoot(2),
    "weight_norm_cubic_overshoot": weight_norm_cubic_overshoot,
    "state_equal_after_load": state_equal_after_load,
    "nearly_diagonal_illegal_nearliness": nearly_diagonal_illegal_nearliness,
    "pruner_distances_and_masks": pruner_distances_and_masks,
    "data_sparsifier_and_scheduler": data_sparsifier_and_scheduler,
    "activation_sparsifier": activation_sparsifier,
}


@pytest.fixture(autouse=True)
def _torch_ao_unpatched():
    sparsity_ext.restore_torch_ao()
    yield
    sparsity_ext.restore_torch_ao()


@pytest.mark.parametrize("accelerated", [False, True], ids=["plain", "accelerate_torch_ao"])
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_same_script_same_record(name, accelerated):
    script = SCRIPTS[name]
    expected = run(script, "torch.ao.pruning", accelerated=False)
    assert len(expected) >= 3
    if accelerated:
        assert_same_records(expected, run(script, "torch.ao.pruning", accelerated=True))
    assert_same_records(expected, run(script, "sparsity_ext", accelerated=accelerated))


def test_records_tell_negative_zero_from_positive_zero():
    # the comparison the scripts rely on: torch.ao's squashed weights hold -0.0, and a +0.0 would differ
    negative_zero = torch.tensor([-1.5, 2.0]) * torch.tensor([0.0, 1.0])
    assert _plain(negative_zero) != _plain(torch.tensor([0.0, 2.0]))
    assert _plain(negative_zero) == _plain(torch.tensor([-0.0, 2.0]))


# ---------------------------------------------------------------------------------------------- names
def _torch_ao_modules():
    names = ["torch.ao.pruning"]
    names += [info.name for info in pkgutil.walk_packages(torch.ao.pruning.__path__, "torch.ao.pruning.")]
    return names


def _defined_names(module: types.ModuleType) -> list[str]:
    """The names a torch.ao.pruning module defines (not those it imports from elsewhere): its functions
    and classes, its constants, and its subpackages."""
    names = []
    for name in dir(module):
        if name.startswith("__"):
            continue
        obj = getattr(module, name)
        if isinstance(obj, types.ModuleType):
            if obj.__name__ == f"{module.__name__}.{name}":
                names.append(name)
        elif inspect.isclass(obj) or inspect.isfunction(obj):
            if obj.__module__ == module.__name__:
                names.append(name)
        elif not callable(obj) and not name.startswith("_"):
            names.append(name)
    return names


# torch.ao.pruning names sparsity_ext does not have, and why (the README lists them too).
LEFT_OUT = {
    "torch.ao.pruning.sparsifier.weight_norm_sparsifier._flat_idx_to_2d":
        "private index helper of torch.ao's mask code; the masks come from sparsity_ext.ops",
    "torch.ao.pruning._experimental.pruner.prune_functions._prune_linear_helper":
        "private step of torch.ao's prune functions; sparsity_ext's are built from other steps",
    "torch.ao.pruning._experimental.pruner.prune_functions._prune_conv2d_helper":
        "private step of torch.ao's prune functions; sparsity_ext's are built from other steps",
    "torch.ao.pruning._experimental.pruner.prune_functions._prune_module_bias":
        "private step of torch.ao's prune functions; sparsity_ext's are built from other steps",
}


def _has(module: types.ModuleType, name: str, is_module: bool) -> bool:
    """module has `name` (a submodule is imported first, as torch.ao.pruning's was by the walk)."""
    if is_module:
        try:
            importlib.import_module(f"{module.__name__}.{name}")
        except ImportError:
            return False
    return hasattr(module, name)


@pytest.mark.parametrize("module_name", _torch_ao_modules())
def test_every_torch_ao_name_exists_in_sparsity_ext(module_name):
    try:
        theirs = importlib.import_module(module_name)
    except ImportError:  # the lightning callbacks without lightning: ours must need it as well
        with pytest.raises(ImportError):
            importlib.import_module(module_name.replace("torch.ao.pruning", "sparsity_ext"))
        return
    ours = importlib.import_module(module_name.replace("torch.ao.pruning", "sparsity_ext"))
    missing = [name for name in _defined_names(theirs)
               if not _has(ours, name, isinstance(getattr(theirs, name), types.ModuleType))
               and f"{module_name}.{name}" not in LEFT_OUT]
    assert not missing, f"{ours.__name__} lacks {missing}"


def test_deep_experimental_imports_give_the_same_objects():
    from sparsity_ext._experimental.data_sparsifier.data_norm_sparsifier import DataNormSparsifier
    from sparsity_ext._experimental.pruner import FPGMPruner
    from sparsity_ext._experimental.pruner.FPGM_pruner import FPGMPruner as deep_fpgm
    from sparsity_ext.pruner import FPGMPruner as real_fpgm

    assert FPGMPruner is deep_fpgm is real_fpgm
    assert DataNormSparsifier is sparsity_ext.data_sparsifier.DataNormSparsifier
    assert importlib.import_module("sparsity_ext._experimental.data_scheduler") is sparsity_ext.data_scheduler
    assert sparsity_ext.data_scheduler.__spec__.name == "sparsity_ext.data_scheduler"


def test_sparse_quantized_mappings_equal_torch_aos():
    assert sparsity_ext.get_static_sparse_quantized_mapping() == torch.ao.pruning.get_static_sparse_quantized_mapping()
    assert sparsity_ext.get_dynamic_sparse_quantized_mapping() == \
        torch.ao.pruning.get_dynamic_sparse_quantized_mapping()


@pytest.mark.parametrize("mask_dtype", [torch.bool, "packed"])
@pytest.mark.parametrize("zeros_per_block", [4, 2])
def test_lean_mask_squash_has_torch_aos_bytes(mask_dtype, zeros_per_block):
    # lean masks are applied in place by sparsity_ext.ops; the result must be torch.ao's mask * data, -0.0 included
    from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as TorchDataNormSparsifier

    data = tie_free((24, 16), seed=12) - 0.5
    squashed = []
    for cls, kwargs in ((TorchDataNormSparsifier, {}), (sparsity_ext.data_sparsifier.DataNormSparsifier,
                                                        {"mask_dtype": mask_dtype})):
        sparsifier = cls(sparsity_level=0.5, zeros_per_block=zeros_per_block, **kwargs)
        sparsifier.add_data("table", data.clone())
        sparsifier.step()
        sparsifier.squash_mask()
        squashed.append(sparsifier.get_data("table", return_original=False))
    theirs, ours = squashed
    assert torch.signbit(theirs[theirs == 0]).any()  # the data has zeroed negatives
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
