"""BaseDataSparsifier / DataNormSparsifier: parity with torch.ao.pruning, the behaviours its own test
suite checks, the lean (bool / packed) masks, the chunked path, and bad input."""
import copy
import itertools
import logging
import pickle
import re
import types
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrize import is_parametrized

from conftest import backend_available, tie_free
from sparsity_ext import ops, reference, use_backend
from sparsity_ext.data_sparsifier import (BaseDataSparsifier, DataNormSparsifier, PackedFakeSparsity,
                                          block_norm_mask_chunked)
from sparsity_ext.data_sparsifier.data_norm_sparsifier import data_norm_level
from sparsity_ext.sparsifier.utils import FakeSparsity

torch_ao = pytest.importorskip("torch.ao.pruning._experimental.data_sparsifier")
TorchDataNormSparsifier = torch_ao.DataNormSparsifier

LEAN = [torch.bool, "packed"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: on a busy 2-core machine, intra-op threads only add wake-up latency."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weight(data):
    return data.weight if isinstance(data, (nn.Embedding, nn.EmbeddingBag)) else data


def _make(kind, shape, seed):
    """Tie-free data of `shape` wrapped as `kind` (tensor, parameter, embedding, embedding bag), twice
    (one for each library), plus the bare values."""
    values = tie_free(shape, seed=seed)
    made = []
    for _ in range(2):
        if kind == "tensor":
            made.append(values.clone())
        elif kind == "parameter":
            made.append(nn.Parameter(values.clone()))
        else:
            module = nn.Embedding(*shape) if kind == "embedding" else nn.EmbeddingBag(*shape)
            with torch.no_grad():
                module.weight.copy_(values)
            made.append(module)
    return made[0], made[1], values


# ------------------------------------------------------------------------------- parity with torch.ao
PARITY_BLOCKS = [(1, 1), (1, 4), (2, 2), (4, 1), (3, 2), (2, 5)]
PARITY_LEVELS = [-1.0, 0.0, 0.3, 0.5, 0.8, 0.97, 1.0, 2.0]


@pytest.mark.parametrize("kind", ["tensor", "parameter", "embedding", "embedding_bag"])
@pytest.mark.parametrize("norm", ["L1", "L2"])
@pytest.mark.parametrize("shape", [(7, 10), (16, 12), (1, 9)])
def test_masks_match_torch_ao(kind, norm, shape):
    """Every (block, level, zeros_per_block) as a separate data entry of one sparsifier per library:
    masks (int8, as torch.ao leaves them) and squashed data are identical."""
    ours, theirs = DataNormSparsifier(norm=norm), TorchDataNormSparsifier(norm=norm)
    names = []
    for i, (block, level) in enumerate(itertools.product(PARITY_BLOCKS, PARITY_LEVELS)):
        size = block[0] * block[1]
        for zeros in sorted({0, 1, size // 2, size}):
            name = f"d{i}_{zeros}"
            mine, other, _ = _make(kind, shape, seed=len(names))
            config = dict(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros)
            ours.add_data(name, mine, **config)
            theirs.add_data(name, other, **config)
            names.append(name)
    ours.step()
    theirs.step()
    for name in names:
        assert ours.get_mask(name).dtype == theirs.get_mask(name).dtype == torch.int8
        assert torch.equal(ours.get_mask(name), theirs.get_mask(name)), (name, ours.data_groups[name])
    ours.squash_mask()
    theirs.squash_mask()
    for name in names:
        assert torch.equal(ours.get_data(name, return_original=False), theirs.get_data(name, return_original=False))


@pytest.mark.parametrize("mask_dtype", LEAN)
def test_lean_masks_equal_default(mask_dtype):
    default, lean = DataNormSparsifier(sparsity_level=0.6), DataNormSparsifier(sparsity_level=0.6, mask_dtype=mask_dtype)
    for i, (block, zeros) in enumerate([((1, 4), 4), ((2, 3), 2), ((1, 1), 1), ((3, 3), 8)]):
        values = tie_free((11, 13), seed=i)
        default.add_data(f"d{i}", values.clone(), sparse_block_shape=block, zeros_per_block=zeros)
        lean.add_data(f"d{i}", values.clone(), sparse_block_shape=block, zeros_per_block=zeros)
    default.step()
    lean.step()
    for name in default.data_groups:
        mask = lean.get_mask(name)
        if mask_dtype == "packed":
            assert mask.dtype == torch.uint8 and mask.shape == ((11 * 13 + 7) // 8,)
        else:
            assert mask.dtype == torch.bool and mask.shape == (11, 13)
        assert torch.equal(lean.get_mask(name, as_bool=True), default.get_mask(name) != 0)
        assert torch.equal(lean.get_data(name, return_original=False), default.get_data(name, return_original=False))
    default.squash_mask()
    lean.squash_mask()
    for name in default.data_groups:
        assert torch.equal(lean.get_data(name, return_original=False), default.get_data(name, return_original=False))


@pytest.mark.parametrize("mask_dtype", LEAN)
def test_lean_mask_never_allocates_a_float_mask_and_squashes_in_place(mask_dtype):
    emb = nn.EmbeddingBag(1000, 16)
    pointer = emb.weight.data_ptr()
    sparsifier = DataNormSparsifier(sparsity_level=0.75, mask_dtype=mask_dtype)
    sparsifier.add_data("emb", emb)
    mask = sparsifier.get_mask("emb")
    assert mask.element_size() * mask.numel() <= 16_000  # 1 byte (bool) or 1 bit (packed) per element
    parametrization = sparsifier._container.parametrizations.emb[0]
    assert type(parametrization) is (PackedFakeSparsity if mask_dtype == "packed" else FakeSparsity)
    assert parametrization.mask is mask
    mask_pointer = mask.data_ptr()
    sparsifier.step()
    assert sparsifier.get_mask("emb") is mask and mask.dtype in (torch.bool, torch.uint8)
    assert mask.data_ptr() == mask_pointer  # the lean mask is rewritten in place, not replaced
    expected = emb.weight.detach() * sparsifier.get_mask("emb", as_bool=True)
    sparsifier.squash_mask()
    assert emb.weight.data_ptr() == pointer  # zeroed in place: no new storage
    assert torch.equal(emb.weight.detach(), expected)
    assert (emb.weight == 0).float().mean().item() == pytest.approx(0.75)


@pytest.mark.parametrize("mask_dtype", [None, *LEAN])
def test_add_data_returns_the_data_itself_only_for_a_fresh_lean_mask(mask_dtype):
    """A lean sparsifier's add_data hands back the data (no table-sized product); torch.ao's format, and any
    mask that drops something, give the parametrized data, a new tensor."""
    data = torch.randn(40, 8)
    sparsifier = DataNormSparsifier(mask_dtype=mask_dtype)
    returned = sparsifier.add_data("t", data)
    assert torch.equal(returned, data)
    assert (returned is data) == (mask_dtype is not None)
    given = torch.rand(40, 8) < 0.5
    masked = sparsifier.add_data("m", data.clone(), mask=given)
    assert masked is not data and torch.equal(masked, data * given)


def test_data_norm_level_follows_torch_ao_rounding():
    # round(s * n) blocks, capped at n only: 0.9 of 4 blocks rounds to all 4 (WeightNorm would keep 1)
    assert data_norm_level(0.9, 4) == 1.0
    assert data_norm_level(0.5, 4) == 0.5
    assert data_norm_level(-1.0, 4) == 0.0 and data_norm_level(2.0, 4) == 1.0
    sparsifier = DataNormSparsifier(sparsity_level=0.9, sparse_block_shape=(1, 4))
    sparsifier.add_data("d", tie_free((1, 16)))
    sparsifier.step()
    assert not sparsifier.get_mask("d").any()


# ----------------------------------------------------------------------------------- the chunked path
CHUNK_CASES = list(itertools.product(
    [(37, 13), (64, 8), (5, 3), (1, 50), (50,)], [(1, 4), (2, 2), (3, 5), (1, 1)], [0.0, 0.3, 0.9, 1.0]))


@pytest.mark.parametrize("shape,block,level", CHUNK_CASES)
@pytest.mark.parametrize("data_kind", ["tie_free", "ties", "nan"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_chunked_equals_one_shot(shape, block, level, data_kind, backend):
    """Row chunks (down to one block row per chunk) give the one-shot op's mask bit for bit, packed or
    not, including ties across chunk boundaries (broken by lower block index) and NaN (kept)."""
    if not backend_available(backend, "cpu"):
        pytest.skip(f"the {backend} backend is not built")
    with use_backend(backend):
        _check_chunked_equals_one_shot(shape, block, level, data_kind)


def _check_chunked_equals_one_shot(shape, block, level, data_kind):
    data = tie_free(shape, seed=7)
    if data_kind == "ties":
        data = torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(1)).float()
    elif data_kind == "nan":
        data.view(-1)[::7] = float("nan")
    size = block[0] * block[1]
    for zeros, packed in itertools.product(sorted({0, 1, size}), [False, True]):
        one_shot = ops.block_norm_mask(data, level, block, zeros, 1, packed=packed)
        for budget in (1, 60, 1 << 20):
            chunked = block_norm_mask_chunked(data, level, block, zeros, "L1", packed=packed, max_chunk_bytes=budget)
            assert torch.equal(chunked, one_shot), (zeros, packed, budget)


def test_chunked_apply_zeroes_in_place_like_one_shot():
    data = tie_free((301, 24), seed=3)
    expected = data.clone()
    expected_mask = ops.block_norm_mask_apply_(expected, 0.7, (2, 4), 5, 2)
    pointer = data.data_ptr()
    mask = block_norm_mask_chunked(data, 0.7, (2, 4), 5, "L2", apply=True, max_chunk_bytes=1000)
    assert data.data_ptr() == pointer
    assert torch.equal(mask, expected_mask) and torch.equal(data, expected)
    transposed = tie_free((24, 301), seed=3).t()  # non-contiguous rows
    expected = transposed.contiguous()
    ops.block_norm_mask_apply_(expected, 0.7, (2, 4), 5, 2)
    block_norm_mask_chunked(transposed, 0.7, (2, 4), 5, "L2", apply=True, max_chunk_bytes=1000)
    assert torch.equal(transposed, expected)


@pytest.mark.parametrize("mask_dtype", [None, torch.bool, "packed"])
def test_sparsifier_chunked_equals_unchunked(mask_dtype):
    values = tie_free((203, 20), seed=5)
    whole = DataNormSparsifier(sparsity_level=0.65, sparse_block_shape=(2, 4), zeros_per_block=3, mask_dtype=mask_dtype)
    chunked = DataNormSparsifier(sparsity_level=0.65, sparse_block_shape=(2, 4), zeros_per_block=3,
                                 mask_dtype=mask_dtype, max_chunk_bytes=700)
    whole.add_data("t", values.clone())
    chunked.add_data("t", values.clone())
    whole.step()
    chunked.step()
    assert torch.equal(whole.get_mask("t"), chunked.get_mask("t"))


# ------------------------------------------------- the behaviours torch.ao.pruning's test suite checks
class CountingSparsifier(BaseDataSparsifier):
    """A minimal subclass: masks the first row, counts its steps in the state."""

    def update_mask(self, name, data, **kwargs):
        mask = self.get_mask(name)
        mask[0] = 0
        state = self.state[name]
        state["step_count"] = state.get("step_count", 0) + 1


def _data_sets():
    """(data_list, data_with_config, defaults) for each supported type, torch.ao-test style."""
    return {
        "tensor": ([("t1", torch.randn(4, 4)), ("t2", torch.randn(4, 4))],
                   [{"name": "t3", "data": torch.randn(4, 4), "config": {"sparsity_level": 0.7}}]),
        "parameter": ([("p1", nn.Parameter(torch.randn(4, 4))), ("p2", nn.Parameter(torch.randn(4, 8)))],
                      [{"name": "p3", "data": nn.Parameter(torch.randn(8, 4)), "config": {"sparsity_level": 0.3}}]),
        "embedding": ([("e1", nn.Embedding(10, 4)), ("e2", nn.EmbeddingBag(20, 8))],
                      [{"name": "e3", "data": nn.Embedding(12, 4),
                        "config": {"sparsity_level": 0.4, "sparse_block_shape": (2, 2)}}]),
    }


DEFAULTS = {"sparsity_level": 0.5, "sparse_block_shape": (1, 4), "zeros_per_block": 4}


def _build(cls, data_list, data_with_config, **kwargs):
    sparsifier = cls(data_list=data_list, **DEFAULTS, **kwargs)
    for entry in data_with_config:
        sparsifier.add_data(entry["name"], entry["data"], **entry["config"])
    return sparsifier


SPARSIFIERS = [(CountingSparsifier, {}), (DataNormSparsifier, {}), (DataNormSparsifier, {"norm": "L2"}),
               (DataNormSparsifier, {"mask_dtype": torch.bool}), (DataNormSparsifier, {"mask_dtype": "packed"})]
SPARSIFIER_IDS = ["counting", "L1", "L2", "bool", "packed"]


@pytest.fixture(params=list(_data_sets()))
def data_set(request):
    return _data_sets()[request.param]


@pytest.fixture(params=SPARSIFIERS, ids=SPARSIFIER_IDS)
def make_sparsifier(request, data_set):
    cls, kwargs = request.param
    return lambda: _build(cls, *copy.deepcopy(data_set), **kwargs)


def test_constructor(make_sparsifier, data_set):
    data_list, data_with_config = data_set
    sparsifier = make_sparsifier()
    assert len(sparsifier.data_groups) == len(data_list) + len(data_with_config)
    for name, _ in data_list:
        assert sparsifier.data_groups[name] == DEFAULTS
    for entry in data_with_config:
        assert sparsifier.data_groups[entry["name"]] == {**DEFAULTS, **entry["config"]}
    for name in sparsifier.data_groups:
        assert is_parametrized(sparsifier._container, name)
        assert torch.equal(sparsifier.get_mask(name, as_bool=True),
                           torch.ones(sparsifier.get_data(name).shape, dtype=torch.bool))


def test_step_masks_the_data(make_sparsifier):
    sparsifier = make_sparsifier()
    originals = {name: sparsifier.get_data(name).clone() for name in sparsifier.data_groups}
    for name, original in originals.items():
        assert torch.equal(sparsifier.get_data(name, return_original=False), original)
    for _ in range(3):
        sparsifier.step()
    for name, original in originals.items():
        keep = sparsifier.get_mask(name, as_bool=True)
        assert not keep.all()
        assert torch.equal(sparsifier.get_data(name, return_original=False), original * keep)
        assert torch.equal(sparsifier.get_data(name, return_original=True), original)
    if isinstance(sparsifier, CountingSparsifier):
        assert all(state["step_count"] == 3 for state in sparsifier.state.values())
        assert all(not sparsifier.get_mask(name, as_bool=True)[0].any() for name in sparsifier.data_groups)


def test_step_does_nothing_when_mask_update_is_disabled(make_sparsifier):
    sparsifier = make_sparsifier()
    sparsifier.enable_mask_update = False
    sparsifier.step()
    assert all(sparsifier.get_mask(name, as_bool=True).all() for name in sparsifier.data_groups)


def test_memory_reference(make_sparsifier, data_set):
    data_list, data_with_config = data_set
    sparsifier = _build(type(make_sparsifier()), data_list, data_with_config)
    for name, data in data_list + [(e["name"], e["data"]) for e in data_with_config]:
        weight = sparsifier._extract_weight(data)
        assert weight is _weight(data)
        with torch.no_grad():
            weight.add_(torch.randn(weight.shape))  # changed outside: seen inside
        inside = sparsifier.get_data(name)
        assert inside.data_ptr() == weight.data_ptr() and torch.equal(inside, weight)


def test_add_data_replaces_and_reuses_the_mask(make_sparsifier, data_set):
    sparsifier = make_sparsifier()
    sparsifier.step()
    for name in list(sparsifier.data_groups):
        config = copy.deepcopy(sparsifier.data_groups[name])
        old = sparsifier.get_data(name)
        old_copy = old.clone()
        mask = sparsifier.get_mask(name).clone()
        new = torch.randn(old.shape)
        with pytest.warns(UserWarning, match="replacing"):
            returned = sparsifier.add_data(name, new)
        assert torch.equal(sparsifier.get_data(name), new)
        assert torch.equal(returned, new * sparsifier.get_mask(name, as_bool=True))
        assert torch.equal(sparsifier.get_mask(name), mask)  # mask kept
        assert torch.equal(old, old_copy)  # the replaced data is untouched
        assert sparsifier.data_groups[name] == config  # and so is the config


def test_add_data_replacing_with_new_config_or_mask():
    sparsifier = DataNormSparsifier(sparsity_level=0.5)
    sparsifier.add_data("a", torch.randn(4, 8), sparse_block_shape=(2, 2))
    sparsifier.step()
    with pytest.warns(UserWarning):
        sparsifier.add_data("a", torch.randn(8, 8), reuse_mask=False, sparsity_level=0.25)
    assert sparsifier.data_groups["a"] == {"sparsity_level": 0.25, "sparse_block_shape": (2, 2), "zeros_per_block": 4}
    assert torch.equal(sparsifier.get_mask("a"), torch.ones(8, 8))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="same shape|its shape"):
        sparsifier.add_data("a", torch.randn(3, 3))
    assert sparsifier.get_data("a").shape == (8, 8)  # the failed replacement changed nothing
    sparsifier.squash_mask()
    with pytest.warns(UserWarning):  # squashed data can be replaced (torch.ao.pruning raises here)
        sparsifier.add_data("a", torch.randn(8, 8), reuse_mask=False)
    assert is_parametrized(sparsifier._container, "a")


def test_add_data_with_a_given_mask():
    mask = torch.zeros(4, 4)
    mask[:, :2] = 1
    dense = DataNormSparsifier()
    dense.add_data("a", torch.ones(4, 4), mask=mask)
    assert dense.get_mask("a") is mask
    packed = DataNormSparsifier(mask_dtype="packed")
    packed.add_data("a", torch.ones(4, 4), mask=mask)
    assert torch.equal(packed.get_mask("a"), ops.pack_mask(mask != 0))
    assert torch.equal(packed.get_data("a", return_original=False), mask)


def test_squash_mask(make_sparsifier):
    sparsifier = make_sparsifier()
    for name in sparsifier.data_groups:
        assert hasattr(sparsifier._container, name) and is_parametrized(sparsifier._container, name)
    sparsifier.step()
    expected = {name: sparsifier.get_data(name, return_original=False).clone() for name in sparsifier.data_groups}
    sparsifier.squash_mask()
    for name in sparsifier.data_groups:
        assert not is_parametrized(sparsifier._container, name)
        with pytest.raises(ValueError):
            sparsifier.get_data(name, return_original=True)
        assert torch.equal(sparsifier.get_data(name, return_original=False), expected[name])
    with pytest.raises(ValueError, match="already squashed"):
        sparsifier.squash_mask()


def test_squash_mask_writes_into_the_embedding_and_selected_names():
    for mask_dtype in (None, torch.bool, "packed"):
        emb, other = nn.Embedding(16, 8), torch.randn(4, 4)
        sparsifier = DataNormSparsifier(sparsity_level=0.5, mask_dtype=mask_dtype)
        sparsifier.add_data("emb", emb)
        sparsifier.add_data("other", other)
        sparsifier.step()
        expected = emb.weight.detach() * sparsifier.get_mask("emb", as_bool=True)
        sparsifier.squash_mask(names=["emb"])
        assert torch.equal(emb.weight.detach(), expected) and sparsifier._container.emb is emb.weight
        assert is_parametrized(sparsifier._container, "other")
        sparsifier.squash_mask(names=["other"], leave_parametrized=False)
        assert sparsifier.get_data("other", return_original=False) is other and (other != 0).all()


@pytest.mark.parametrize("squash", [False, True])
def test_state_dict_round_trip(make_sparsifier, data_set, squash):
    first = make_sparsifier()
    data_list, _ = copy.deepcopy(data_set)
    second = _build(type(first), data_list[:1], [], **({"mask_dtype": first.mask_dtype}
                                                      if isinstance(first, DataNormSparsifier) else {}))
    if isinstance(first, DataNormSparsifier):
        second.norm = first.norm
    first.step()
    if squash:
        first.squash_mask(names=[data_list[1][0]])
    saved = first.state_dict()
    snapshot = copy.deepcopy(saved)
    name0 = data_list[0][0]
    assert not torch.equal(first.get_mask(name0, as_bool=True), second.get_mask(name0, as_bool=True))

    second.load_state_dict(saved)
    assert len(second.state) == len(first.state) and second.data_groups == first.data_groups
    for name, state in saved["state"].items():
        mask1, mask2 = state["mask"], second.state[name]["mask"]
        assert mask1.is_sparse == (first.mask_dtype is None) and not mask2.is_sparse
        assert torch.equal(mask1.to_dense(), mask2)
        assert torch.equal(getattr(first._container, name), getattr(second._container, name))
        assert is_parametrized(first._container, name) == is_parametrized(second._container, name)
        if is_parametrized(second._container, name):
            param1 = getattr(first._container.parametrizations, name)[0]
            param2 = getattr(second._container.parametrizations, name)[0]
            assert type(param1) is type(param2) and torch.equal(param1.mask, param2.mask)
            assert param2.mask is second.get_mask(name)
        if isinstance(first, CountingSparsifier):
            assert second.state[name]["step_count"] == 1
    # the loaded sparsifier owns copies: changing its data changes neither the saved dict nor `first`
    with torch.no_grad():
        for name in second.data_groups:
            second.get_data(name, return_original=is_parametrized(second._container, name)).mul_(0)
    for key in saved["_container"]:
        assert torch.equal(saved["_container"][key], snapshot["_container"][key])
    assert all(first.get_data(n, return_original=False).any() for n in first.data_groups)


def test_load_state_dict_non_strict_keeps_current_data():
    first = DataNormSparsifier(sparsity_level=0.5)
    first.add_data("a", torch.randn(4, 8))
    first.add_data("b", torch.randn(4, 8))
    first.step()
    second = DataNormSparsifier(sparsity_level=0.25)
    mine = torch.randn(4, 8)
    second.add_data("a", mine)
    second.add_data("c", torch.randn(2, 4))
    second.load_state_dict(first.state_dict(), strict=False)
    assert set(second.data_groups) == {"a", "b", "c"}
    assert second.get_data("a") is mine and second.data_groups["a"]["sparsity_level"] == 0.25
    assert torch.equal(second.get_mask("b"), first.get_mask("b"))
    second.add_data("d", torch.randn(4, 4))  # the loaded state still accepts new names
    second.load_state_dict(first.state_dict())  # strict: exactly the saved names
    assert set(second.data_groups) == {"a", "b"}


def test_state_dict_crosses_with_torch_ao():
    values = {"a": tie_free((8, 12), seed=1), "b": tie_free((6, 4), seed=2)}
    theirs = TorchDataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(2, 2))
    ours = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(2, 2))
    for name, v in values.items():
        theirs.add_data(name, v.clone())
        ours.add_data(name, v.clone())
    theirs.step()
    ours.step()
    loaded = DataNormSparsifier()
    loaded.load_state_dict(theirs.state_dict())
    back = TorchDataNormSparsifier()
    back.load_state_dict(ours.state_dict())
    for name in values:
        assert torch.equal(loaded.get_mask(name), theirs.get_mask(name))
        assert torch.equal(back.get_mask(name), ours.get_mask(name))
        assert torch.equal(loaded.get_data(name, return_original=False), back.get_data(name, return_original=False))


@pytest.mark.parametrize("mask_dtype", [None, torch.bool, "packed"])
def test_pickle_round_trip(mask_dtype):
    sparsifier = DataNormSparsifier(sparsity_level=0.5, norm="L2", mask_dtype=mask_dtype, max_chunk_bytes=1 << 16)
    sparsifier.add_data("emb", nn.EmbeddingBag(10, 8))
    sparsifier.add_data("t", torch.randn(3, 9), sparse_block_shape=(3, 3))
    sparsifier.step()
    sparsifier.squash_mask(names=["t"])
    restored = pickle.loads(pickle.dumps(sparsifier))
    assert (restored.norm, restored.mask_dtype, restored.max_chunk_bytes) == ("L2", mask_dtype, 1 << 16)
    assert restored.data_groups == sparsifier.data_groups
    for name in ("emb", "t"):
        assert torch.equal(restored.get_mask(name), sparsifier.get_mask(name))
        assert torch.equal(restored.get_data(name, return_original=False),
                           sparsifier.get_data(name, return_original=False))
    assert is_parametrized(restored._container, "emb") and not is_parametrized(restored._container, "t")
    restored.step()  # usable after unpickling (torch.ao.pruning's is not: it loses norm and enable_mask_update)
    restored.squash_mask(names=["emb"])


def test_repr():
    sparsifier = DataNormSparsifier(sparsity_level=0.3)
    sparsifier.add_data("table", torch.randn(4, 4), zeros_per_block=2)
    text = repr(sparsifier)
    assert text.startswith("DataNormSparsifier (") and text.endswith(")")
    for line in ("Data Group", "name: table", "sparsity_level: 0.3", "zeros_per_block: 2", "sparse_block_shape: (1, 4)"):
        assert line in text


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_sparsity_level_bounds(norm):
    """torch.ao.pruning's grid: levels outside [0, 1] are clamped; the fraction of zeros is exactly
    level * zeros_per_block / block size."""
    data = tie_free((16, 16))
    sparsifier = DataNormSparsifier(norm=norm)
    cases = [c for c in itertools.product([-1.0, 0.0, 0.5, 1.0, 2.0], [(1, 1), (1, 4), (2, 2), (4, 1)], range(5))
             if c[2] <= c[1][0] * c[1][1]]
    for i, (level, block, zeros) in enumerate(cases):
        sparsifier.add_data(f"d{i}", data.clone(), sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros)
    sparsifier.step()
    sparsifier.squash_mask()
    for i, (level, block, zeros) in enumerate(cases):
        zero_fraction = (sparsifier.get_data(f"d{i}", return_original=False) == 0).float().mean().item()
        assert zero_fraction == min(max(level, 0.0), 1.0) * zeros / (block[0] * block[1]), (level, block, zeros)


def test_negative_level_masks_nothing_where_torch_ao_masks_most_blocks():
    # torch.ao.pruning slices its sorted blocks with the negative count round(-0.1 * 40) = -4: all but 4 go
    data = tie_free((10, 16))
    masks = []
    for cls in (DataNormSparsifier, TorchDataNormSparsifier):
        sparsifier = cls(sparsity_level=-0.1)
        sparsifier.add_data("table", data.clone())
        sparsifier.step()
        masks.append(sparsifier.get_mask("table"))
    ours, theirs = masks
    assert ours.all()
    assert int((theirs == 0).sum()) == 36 * 4


@pytest.mark.parametrize("norm", ["L1", "L2"])
@pytest.mark.parametrize("mask_dtype", [None, torch.bool, "packed"])
def test_2_of_4(norm, mask_dtype):
    data = torch.randn(8, 16)
    sparsifier = DataNormSparsifier([("w", data)], sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2,
                                    norm=norm, mask_dtype=mask_dtype)
    sparsifier.step()
    keep = sparsifier.get_mask("w", as_bool=True)
    assert keep.float().mean().item() == 0.5
    groups, kept = data.abs().view(8, 4, 4), keep.view(8, 4, 4)
    assert (kept.sum(-1) == 2).all()
    smallest_kept = torch.where(kept, groups, torch.inf).amin(-1)
    largest_dropped = torch.where(kept, -torch.inf, groups).amax(-1)
    assert (smallest_kept > largest_dropped).all()  # the two largest |x| of each group of 4 survive
    assert torch.equal(keep, ops.nm_mask(data, 2, 4))


def test_one_dimensional_data_is_a_row():
    """torch.ao.pruning builds a (1, N) mask for N-element data and then fails; here 1-D data is one row."""
    data = tie_free((10,))
    sparsifier = DataNormSparsifier([("bias", data)], sparsity_level=0.5, sparse_block_shape=(1, 2))
    sparsifier.step()
    mask = sparsifier.get_mask("bias")
    assert mask.shape == (10,)
    assert torch.equal(mask != 0, ops.block_norm_mask(data.view(1, 10), 0.5, (1, 2), 2, 1).view(10))
    column = tie_free((9, 1))  # torch.ao.pruning squeezes this to a row, then fails on the shape
    sparsifier.add_data("column", column, sparse_block_shape=(3, 1), zeros_per_block=3, sparsity_level=0.34)
    sparsifier.step()
    assert torch.equal(sparsifier.get_mask("column") != 0, ops.block_norm_mask(column, 0.34, (3, 1), 3, 1))


@pytest.mark.parametrize("mask_dtype", [None, *LEAN])
@pytest.mark.parametrize("shape", [(1, 12, 16), (1, 1, 12, 16), (1, 1, 15), (1, 7, 10)])
def test_data_with_leading_size_1_dims_masks_as_torch_ao(shape, mask_dtype):
    """torch.ao.pruning squeezes such data and returns the mask of its last two dims; ours has the data's shape
    and the values of torch.ao.pruning's mask broadcast to it, for every level, block and zeros_per_block."""
    ours = DataNormSparsifier(norm="L2", mask_dtype=mask_dtype)
    theirs = TorchDataNormSparsifier(norm="L2")
    configs = [dict(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros)
               for block in ((1, 4), (2, 2), (3, 2)) for level in (0.3, 0.5, 1.0)
               for zeros in (1, block[0] * block[1])]
    for i, config in enumerate(configs):
        data = tie_free(shape, seed=i)
        ours.add_data(f"d{i}", data.clone(), **config)
        theirs.add_data(f"d{i}", data, **config)
    for _ in range(2):
        ours.step()
        theirs.step()
    for i in range(len(configs)):
        name = f"d{i}"
        if mask_dtype is None:
            assert ours.get_mask(name).shape == shape and ours.get_mask(name).dtype == torch.int8
        want = theirs.get_mask(name).expand(shape) != 0
        assert torch.equal(ours.get_mask(name, as_bool=True), want), configs[i]
        assert torch.equal(ours.get_data(name, return_original=False), theirs.get_data(name) * want)
    ours.squash_mask()
    for i in range(len(configs)):
        assert torch.equal(ours.get_data(f"d{i}", return_original=False), theirs.get_data(f"d{i}") *
                           (theirs.get_mask(f"d{i}").expand(shape) != 0))


@pytest.mark.parametrize("shape", [(12, 1, 16), (12, 16, 1), (1, 12, 1), (1, 12, 16, 1), (1, 1, 1), (2, 3, 4)])
def test_data_torch_ao_would_mask_in_the_wrong_shape_is_rejected(shape):
    """torch.ao.pruning raises on some of these and on others gives a mask that broadcasts to another shape
    (e.g. (12, 1, 16) -> a (12, 16) mask -> (12, 12, 16)); here each raises, naming the shape, before any mask
    changes."""
    sparsifier = DataNormSparsifier(sparsity_level=0.5)
    sparsifier.add_data("good", torch.randn(8, 8))
    sparsifier.add_data("bad", torch.randn(shape))
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        sparsifier.step()
    assert torch.equal(sparsifier.get_mask("good"), torch.ones(8, 8))


def test_half_precision_data_is_scored_in_fp32():
    data = tie_free((12, 16), dtype=torch.float16)
    sparsifier = DataNormSparsifier([("h", data)], sparsity_level=0.5, mask_dtype=torch.bool)
    sparsifier.step()
    assert torch.equal(sparsifier.get_mask("h"), ops.block_norm_mask(data.float(), 0.5, (1, 4), 4, 1))
    sparsifier.squash_mask()
    assert data.dtype == torch.float16 and (data == 0).float().mean().item() == 0.5


def test_empty_data():
    sparsifier = DataNormSparsifier([("e", torch.empty(0, 4))], mask_dtype="packed")
    sparsifier.step()
    sparsifier.squash_mask()
    assert sparsifier.get_data("e", return_original=False).shape == (0, 4)


@pytest.mark.parametrize("mask_dtype", [None, *LEAN])
@pytest.mark.parametrize("config", [{}, {"sparse_block_shape": (2, 2), "zeros_per_block": 2}])
def test_meta_data_gives_the_masks_shape(mask_dtype, config):
    """Data on the meta device (shapes only) steps as under torch.ao.pruning (its mask there: int8 meta of the
    data's shape); our mask has the format and dtype the same step gives on the CPU."""
    def mask_after_step(cls, device, **kwargs):
        sparsifier = cls(sparsity_level=0.5, **kwargs)
        sparsifier.add_data("e", torch.randn(16, 32, device=device), **config)
        sparsifier.step()
        return sparsifier.get_mask("e")

    ours = mask_after_step(DataNormSparsifier, "meta", mask_dtype=mask_dtype)
    on_cpu = mask_after_step(DataNormSparsifier, "cpu", mask_dtype=mask_dtype)
    assert ours.device.type == "meta" and (ours.shape, ours.dtype) == (on_cpu.shape, on_cpu.dtype)
    if mask_dtype is None:
        theirs = mask_after_step(TorchDataNormSparsifier, "meta")
        assert ours.shape == theirs.shape


# ----------------------------------------------------------------------------------------- bad input
def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="norm"):
        DataNormSparsifier(norm="L3")
    with pytest.raises(ValueError, match="mask_dtype"):
        DataNormSparsifier(mask_dtype=torch.float16)
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        DataNormSparsifier(max_chunk_bytes=0)
    with pytest.raises(NotImplementedError):
        DataNormSparsifier().prepare(nn.Linear(2, 2), None)


def test_bad_add_data():
    sparsifier = DataNormSparsifier()
    with pytest.raises(TypeError, match="not supported"):
        sparsifier.add_data("lin", nn.Linear(4, 4))
    with pytest.raises(ValueError, match="without '.'"):
        sparsifier.add_data("emb.weight", torch.randn(4, 4))
    with pytest.raises(ValueError, match="reserved"):
        sparsifier.add_data("training", torch.randn(4, 4))
    with pytest.raises(ValueError, match="mask shape"):
        sparsifier.add_data("a", torch.randn(4, 4), mask=torch.ones(3, 3))
    assert not sparsifier.data_groups and not sparsifier.state
    for call in (lambda: sparsifier.get_data("x"), lambda: sparsifier.get_mask("x"),
                 lambda: sparsifier.squash_mask(names=["x"])):
        with pytest.raises(ValueError, match="no data named"):
            call()


def _raising_parametrization(mask):
    raise RuntimeError("parametrization refused the mask")


@pytest.mark.parametrize("mask_dtype", [None, *LEAN])
@pytest.mark.parametrize("data,kwargs,error,message", [
    (torch.randn(8, 8), dict(reuse_mask=False, mask=torch.ones(3, 3)), ValueError, "mask shape"),
    (torch.randn(8, 8), dict(reuse_mask=False, mask=[[1.0] * 8] * 8), TypeError, "mask must be a torch.Tensor"),
    (torch.randn(4, 8), dict(reuse_mask=True), ValueError, "to reuse the mask"),
    (torch.randn(8, 8), dict(parametrization=lambda mask: "not a module"), TypeError, "must be an nn.Module"),
    (torch.randn(8, 8), dict(parametrization=_raising_parametrization), RuntimeError, "refused"),
    (nn.Linear(8, 8), {}, TypeError, "not supported"),
])
def test_replacing_data_with_bad_arguments_leaves_the_old_entry(mask_dtype, data, kwargs, error, message):
    sparsifier = DataNormSparsifier(sparsity_level=0.5, mask_dtype=mask_dtype)
    original = torch.randn(8, 8)
    sparsifier.add_data("emb", original, sparse_block_shape=(2, 2))
    sparsifier.step()
    mask, mask_values = sparsifier.get_mask("emb"), sparsifier.get_mask("emb").clone()
    config = copy.deepcopy(dict(sparsifier.data_groups["emb"]))
    parametrization = sparsifier._container.parametrizations.emb[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "replacing" warning comes first, as in torch.ao.pruning
        with pytest.raises(error, match=message):
            sparsifier.add_data("emb", data, **kwargs)
    assert sparsifier.get_data("emb") is original
    assert sparsifier.get_mask("emb") is mask and torch.equal(mask, mask_values)
    assert sparsifier._container.parametrizations.emb[0] is parametrization and parametrization.mask is mask
    assert dict(sparsifier.data_groups["emb"]) == config
    assert torch.equal(sparsifier.get_data("emb", return_original=False),
                       original * sparsifier.get_mask("emb", as_bool=True))


@pytest.mark.parametrize("config,data,error", [
    ({"zeros_per_block": 5}, torch.randn(4, 4), ValueError),
    ({"zeros_per_block": -1}, torch.randn(4, 4), ValueError),
    ({"sparsity_level": float("nan")}, torch.randn(4, 4), ValueError),
    ({"sparse_block_shape": (0, 4)}, torch.randn(4, 4), ValueError),
    ({}, torch.randn(2, 3, 4), ValueError),
    ({}, torch.randn(())[None][0], ValueError),
    ({}, torch.arange(16).view(4, 4), TypeError),
])
def test_bad_config_or_data_leaves_every_mask_untouched(config, data, error):
    sparsifier = DataNormSparsifier(sparsity_level=0.5)
    sparsifier.add_data("good", torch.randn(8, 8))
    sparsifier.add_data("bad", data, **config)
    with pytest.raises(error):
        sparsifier.step()
    assert torch.equal(sparsifier.get_mask("good"), torch.ones(8, 8))  # not half-updated


def test_bad_state_dict_changes_nothing():
    sparsifier = DataNormSparsifier()
    sparsifier.add_data("a", torch.randn(4, 4))
    good = sparsifier.state_dict()
    container = sparsifier._container
    for broken in (
        {**good, "data_groups": {}},
        {**good, "_container": {}},
        {**good, "state": {"a": {"mask": torch.ones(2, 2).to_sparse_coo()}}},
    ):
        with pytest.raises(RuntimeError, match="Error loading"):
            sparsifier.load_state_dict(broken)
        assert sparsifier._container is container and set(sparsifier.data_groups) == {"a"}


# ------------------------------------------------------------------------------- lightning callbacks
def test_lightning_callbacks_import_cleanly_or_say_what_is_missing():
    import importlib
    import importlib.util
    has_lightning = any(importlib.util.find_spec(m) is not None for m in ("lightning", "pytorch_lightning"))
    module = "sparsity_ext.data_sparsifier.lightning.callbacks.data_sparsity"
    if has_lightning:
        callbacks = importlib.import_module(module)
        assert callbacks.PostTrainingDataSparsity.on_fit_end
    else:
        with pytest.raises(ImportError, match="needs lightning"):
            importlib.import_module(module)


class _Scheduler:
    """Stand-in data scheduler: halves sparsity_level at each step."""

    def __init__(self, data_sparsifier, schedule_param="sparsity_level"):
        self.data_sparsifier, self.schedule_param = data_sparsifier, schedule_param

    def step(self):
        for config in self.data_sparsifier.data_groups.values():
            config[self.schedule_param] *= 0.5


def _lightning_module():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    return types.SimpleNamespace(model=model)


def test_post_training_hooks(caplog):
    from sparsity_ext.data_sparsifier.lightning.callbacks._data_sparsity_utils import PostTrainingDataSparsityHooks
    pl_module = _lightning_module()
    before = copy.deepcopy(pl_module.model.state_dict())
    hooks = PostTrainingDataSparsityHooks(DataNormSparsifier, {"sparsity_level": 0.5, "sparse_block_shape": (1, 4)})
    with caplog.at_level(logging.INFO):
        hooks.on_fit_end(None, pl_module)
    for name, tensor in pl_module.model.state_dict().items():
        assert torch.equal(tensor, before[name])  # the trained model is untouched
    assert not hooks.sparsified.training
    weight = hooks.sparsified[0].weight
    assert (weight == 0).float().mean().item() == 0.5
    assert not is_parametrized(hooks.data_sparsifier._container, "0_weight")
    assert "Sparsity in layer 0.weight = 50.00%" in caplog.text


def test_training_aware_hooks():
    from sparsity_ext.data_sparsifier.lightning.callbacks._data_sparsity_utils import TrainingAwareDataSparsityHooks
    pl_module = _lightning_module()
    hooks = TrainingAwareDataSparsityHooks(DataNormSparsifier, {"sparsity_level": 0.5, "sparse_block_shape": (1, 4)},
                                           _Scheduler, {"schedule_param": "sparsity_level"})
    hooks.on_train_start(None, pl_module)
    assert hooks.data_scheduler.data_sparsifier is hooks.data_sparsifier
    levels = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # add_data's "replacing" warning at each epoch
        for _ in range(3):
            hooks.on_train_epoch_start(None, pl_module)
            with torch.no_grad():
                for p in pl_module.model.parameters():
                    p.add_(0.01)  # "training"
            hooks.on_train_epoch_end(None, pl_module)
            levels.append(hooks.data_sparsifier.data_groups["0_weight"]["sparsity_level"])
    assert levels == [0.25, 0.125, 0.0625]
    assert hooks.data_sparsifier_state_dict["data_groups"]["0_weight"]["sparsity_level"] == 0.0625
    hooks.on_train_end(None, pl_module)
    assert not is_parametrized(hooks.data_sparsifier._container, "0_weight")
    assert (hooks.sparsified[0].weight == 0).float().mean().item() == 0.125  # the last step used 0.125


@pytest.mark.parametrize("mask_dtype", [None, torch.bool, "packed"])
def test_get_mask_as_bool_is_a_new_bool_tensor_in_every_format(mask_dtype):
    # A bool mask is copied, not compared with 0 (which computes in int64: 8 bytes per element).
    data = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    sparsifier = DataNormSparsifier(sparsity_level=0.5, mask_dtype=mask_dtype)
    sparsifier.add_data("t", data)
    sparsifier.step()
    keep = sparsifier.get_mask("t", as_bool=True)
    live = sparsifier.get_mask("t")
    assert keep.dtype == torch.bool and keep.shape == data.shape
    assert torch.equal(keep, reference.block_norm_mask(data, 0.5, (1, 4), 4, 1))
    keep.zero_()
    assert torch.equal(sparsifier.get_mask("t", as_bool=True), reference.block_norm_mask(data, 0.5, (1, 4), 4, 1))
    assert sparsifier.get_mask("t") is live
