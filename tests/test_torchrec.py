"""sparsity_ext.torchrec on unsharded TorchRec models (one process): every table's mask equals
DataNormSparsifier's mask of that table, the weights are edited in place, masks hold through fused-optimizer
training, bad input changes nothing."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

try:
    import torchrec  # noqa: F401
    from torchrec import (EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig,
                          KeyedJaggedTensor)
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
except (ImportError, OSError) as exc:  # OSError: fbgemm_gpu's library failing to load against this torch
    pytest.skip(f"torchrec is not importable ({exc}); install the extra: see setup in ./run",
                allow_module_level=True)

from sparsity_ext import ops
from sparsity_ext.data_sparsifier import DataNormSparsifier
from sparsity_ext.torchrec import TorchRecSparsifier, sparsify_torchrec

CPU = torch.device("cpu")


def _bag_configs():
    return [EmbeddingBagConfig(name="small", embedding_dim=8, num_embeddings=30, feature_names=["f_small"]),
            EmbeddingBagConfig(name="wide", embedding_dim=20, num_embeddings=45, feature_names=["f_wide"])]


def _fill_tie_free(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights (tie-free block scores) written into the model's tables; returns copies by state_dict key."""
    g = torch.Generator().manual_seed(seed)
    originals = {}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith(".weight"):
                value.copy_(torch.randn(value.shape, generator=g))
                originals[key] = value.clone()
    return originals


def _data_norm_mask(weight: torch.Tensor, **config) -> torch.Tensor:
    reference = DataNormSparsifier(mask_dtype=torch.bool, **config)
    reference.add_data("t", weight.clone())
    reference.step()
    return reference.get_mask("t")


def _models():
    return {
        "ebc": EmbeddingBagCollection(tables=_bag_configs(), device=CPU),
        "ec": EmbeddingCollection(tables=[EmbeddingConfig(name="small", embedding_dim=8, num_embeddings=30,
                                                          feature_names=["f_small"]),
                                          EmbeddingConfig(name="wide", embedding_dim=8, num_embeddings=45,
                                                          feature_names=["f_wide"])], device=CPU),
        "fused": FusedEmbeddingBagCollection(tables=_bag_configs(), optimizer_type=torch.optim.SGD,
                                             optimizer_kwargs={"lr": 0.1}, device=CPU),
    }


@pytest.mark.parametrize("kind", ["ebc", "ec", "fused"])
@pytest.mark.parametrize("config", [dict(), dict(sparsity_level=0.7, sparse_block_shape=(2, 4), zeros_per_block=3,
                                                  norm="L2"), dict(sparsity_level=0.3, sparse_block_shape=(3, 5))],
                         ids=["default", "2x4z3L2", "3x5"])
def test_tables_match_data_norm_sparsifier(kind, config):
    model = _models()[kind]
    originals = _fill_tie_free(model)
    sparsifier = sparsify_torchrec(model, **config)
    assert set(sparsifier.tables) == {"small", "wide"}
    state = model.state_dict()
    for key, original in originals.items():
        name = key.split(".")[-2]
        expected = _data_norm_mask(original, **config)
        mask, = sparsifier.get_mask(name)
        assert torch.equal(mask, expected), (kind, name)
        # the model's own weights were zeroed in place, the rest kept bit for bit
        assert torch.equal(state[key], torch.where(expected, original, torch.zeros(())))
        assert not state[key][~expected].any() and 0 < int((~expected).sum()) < expected.numel()


def test_fused_collection_forward_sees_the_zeros():
    model = _models()["fused"]
    _fill_tie_free(model)
    features = KeyedJaggedTensor.from_lengths_sync(keys=["f_small", "f_wide"], values=torch.arange(6),
                                                   lengths=torch.tensor([1, 2, 1, 2]))
    before = model(features).values().clone()
    sparsifier = sparsify_torchrec(model, sparsity_level=0.5)
    after = model(features).values()
    small, = sparsifier.get_mask("small")
    weight = model.state_dict()["embedding_bags.small.weight"]
    assert torch.equal(after[0, :8], weight[0])  # example 0's bag of f_small is row 0 alone
    assert not torch.equal(before, after)
    assert torch.equal(after[0, :8] == 0, ~small[0] | (weight[0] == 0))


def test_raw_tbe_module():
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                        SplitTableBatchedEmbeddingBagsCodegen)
    tbe = SplitTableBatchedEmbeddingBagsCodegen([(40, 8, EmbeddingLocation.HOST, ComputeDevice.CPU),
                                                 (25, 12, EmbeddingLocation.HOST, ComputeDevice.CPU)])
    holder = torch.nn.Sequential(tbe)
    g = torch.Generator().manual_seed(1)
    originals = []
    with torch.no_grad():
        for weight in tbe.split_embedding_weights():
            weight.copy_(torch.randn(weight.shape, generator=g))
            originals.append(weight.clone())
    sparsifier = sparsify_torchrec(holder, sparsity_level=0.4, sparse_block_shape=(1, 4), mask_dtype="packed")
    assert list(sparsifier.tables) == ["0[0]", "0[1]"]
    for i, (weight, original) in enumerate(zip(tbe.split_embedding_weights(), originals)):
        expected = _data_norm_mask(original, sparsity_level=0.4)
        assert torch.equal(sparsifier.get_mask(f"0[{i}]")[0], expected)
        assert torch.equal(sparsifier.masks[f"0[{i}]"][0], ops.pack_mask(expected))
        assert torch.equal(weight, torch.where(expected, original, torch.zeros(())))


def test_table_selection_and_overrides():
    model = _models()["ebc"]
    originals = _fill_tie_free(model)
    sparsifier = sparsify_torchrec(model, sparsity_level=0.5, tables={"wide": {"sparsity_level": 0.25}})
    assert list(sparsifier.tables) == ["wide"]
    assert torch.equal(model.state_dict()["embedding_bags.small.weight"], originals["embedding_bags.small.weight"])
    assert torch.equal(sparsifier.get_mask("wide")[0],
                       _data_norm_mask(originals["embedding_bags.wide.weight"], sparsity_level=0.25))
    only_small = TorchRecSparsifier(model, tables=["small"])
    assert list(only_small.tables) == ["small"]


@pytest.mark.parametrize("tables, error, pattern", [
    (["small", "nope"], ValueError, "no table named ['nope']"),
    ({"small": {"sparsity_level": 0.5, "bogus": 1}}, ValueError, "must be a dict with keys"),
    ({"small": {"sparse_block_shape": (0, 4)}}, ValueError, "block"),
    ({"small": {"zeros_per_block": 99}}, ValueError, "cannot exceed"),
    ({"small": {"zeros_per_block": 1.5}}, TypeError, "zeros_per_block must be an int"),
    ({"small": {"sparsity_level": "half"}}, TypeError, "sparsity_level must be a number"),
])
def test_bad_tables_or_configs_change_nothing(tables, error, pattern):
    model = _models()["fused"]
    originals = _fill_tie_free(model)
    with pytest.raises(error, match=pattern.replace("[", r"\[").replace("]", r"\]")):
        sparsify_torchrec(model, tables=tables)
    for key, value in model.state_dict().items():
        assert torch.equal(value, originals[key])


def test_bad_arguments():
    model = _models()["ebc"]
    with pytest.raises(ValueError, match="norm must be"):
        TorchRecSparsifier(model, norm="L3")
    with pytest.raises(ValueError, match="mask_dtype"):
        TorchRecSparsifier(model, mask_dtype=torch.float32)


@pytest.mark.parametrize("hold", [True, False])
def test_masks_held_through_fused_optimizer_training(hold):
    model = _models()["fused"]
    _fill_tie_free(model)
    sparsifier = sparsify_torchrec(model, sparsity_level=0.5, hold_masks=hold)
    masks = {name: sparsifier.get_mask(name)[0].clone() for name in ("small", "wide")}
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=["f_small", "f_wide"], values=torch.cat([torch.randint(0, 30, (12,), generator=g),
                                                          torch.randint(0, 45, (12,), generator=g)]),
            lengths=torch.full((8,), 3))
        model(features).values().pow(2).sum().backward()
    state = model.state_dict()
    pruned_nonzero = sum(int(state[f"embedding_bags.{name}.weight"][~mask].ne(0).sum()) for name, mask in masks.items())
    if hold:
        assert pruned_nonzero == 0
    else:  # the fused update writes into pruned entries: why the hook exists
        assert pruned_nonzero > 0
    sparsifier.squash_mask()
    assert sparsifier.masks == {}


def test_state_dict_round_trip():
    model = _models()["ebc"]
    _fill_tie_free(model)
    sparsifier = sparsify_torchrec(model, sparsity_level=0.6, mask_dtype="packed")
    state = sparsifier.state_dict()
    assert set(state["masks"]) == {"small", "wide"} and list(state["masks"]["small"]) == [(0, 0)]
    fresh = TorchRecSparsifier(model, mask_dtype="packed")
    fresh.load_state_dict(state)
    for name in ("small", "wide"):
        assert torch.equal(fresh.get_mask(name)[0], sparsifier.get_mask(name)[0])
    assert fresh.configs["small"]["sparsity_level"] == 0.6
    bad = {"masks": {"small": {(4, 0): state["masks"]["small"][(0, 0)]}}, "configs": {}}
    with pytest.raises(ValueError, match="local pieces"):
        fresh.load_state_dict(bad)
    bool_sparsifier = TorchRecSparsifier(model)
    with pytest.raises(ValueError, match="not a bool mask"):
        bool_sparsifier.load_state_dict(state)
    assert bool_sparsifier.masks == {}


def test_add_data_accepts_table_batched_embedding_slices():
    from torchrec.distributed.composable.table_batched_embedding_slice import TableBatchedEmbeddingSlice
    flat = torch.randn(10 * 8 + 6 * 4, generator=torch.Generator().manual_seed(3))
    piece = TableBatchedEmbeddingSlice(flat, 80, 104, 6, 4)
    original = piece.detach().clone()
    sparsifier = DataNormSparsifier(sparsity_level=0.5, mask_dtype=torch.bool)
    sparsifier.add_data("slice", piece)
    sparsifier.step()
    sparsifier.squash_mask()
    assert torch.equal(flat[80:].view(6, 4), torch.where(_data_norm_mask(original), original, torch.zeros(())))


def test_importing_sparsity_ext_does_not_import_torchrec():
    code = "import sys, sparsity_ext, sparsity_ext.data_sparsifier; print('torchrec' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def _torch_ao_sparsified(weight: torch.Tensor, level: float, block: tuple[int, int]) -> torch.Tensor:
    """torch.ao.pruning's DataNormSparsifier (the oracle, not ours) squashed into a copy of weight."""
    from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as TorchAoDataNormSparsifier
    data = weight.clone()
    sparsifier = TorchAoDataNormSparsifier(sparsity_level=level, sparse_block_shape=block,
                                           zeros_per_block=block[0] * block[1])
    sparsifier.add_data("t", data)
    sparsifier.step()
    sparsifier.squash_mask()
    return data


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (torch.equal calls -0.0 and 0.0 equal; torch.ao's squash writes -0.0)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def _checkpoint_models():
    from torchrec.models.dlrm import DLRM
    same_dim = [EmbeddingBagConfig(name=name, embedding_dim=8, num_embeddings=rows, feature_names=[f"f_{name}"])
                for name, rows in (("t_user", 30), ("t_item", 45))]  # DLRM wants one dim for all tables
    return {  # DLRM: a collection beside dense layers, which the default pattern must leave alone
        "dlrm_ebc": DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=same_dim, device=CPU),
                         dense_in_features=4, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[8, 1]),
        "ec": _models()["ec"],
        "fused": _models()["fused"],  # its state_dict tensors are views into one flat buffer
    }


@pytest.mark.parametrize("kind", ["dlrm_ebc", "ec", "fused"])
@pytest.mark.parametrize("options, level, block", [([], 0.8, (1, 4)), (["--level", "0.5", "--block", "2x4"], 0.5, (2, 4))],
                         ids=["defaults", "2x4"])
def test_cli_sparsifies_exactly_the_tables_of_a_torchrec_checkpoint(kind, options, level, block, tmp_path, capsys):
    """`sparsity-ext sparsify` with the default --tensors on a torch.save'd TorchRec state_dict: every table (and
    nothing else) becomes torch.ao.pruning's DataNormSparsifier result on it, byte for byte."""
    from sparsity_ext import cli
    model = _checkpoint_models()[kind]
    _fill_tie_free(model, seed=5)  # tie-free tables (and dense weights)
    originals = {key: value.clone() for key, value in model.state_dict().items()}
    tables = [key for key in originals if key.endswith(".weight") and (".embedding_bags." in f".{key}"
                                                                        or ".embeddings." in f".{key}")]
    assert len(tables) == 2
    source, output = tmp_path / "model.pt", tmp_path / "model.sparse.pt"
    torch.save(model.state_dict(), source)
    status = cli.main(["sparsify", str(source), "-o", str(output), *options])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert f"{len(tables)} matched, {len(tables)} sparsified, 0 skipped" in printed
    result = torch.load(output, weights_only=True)
    assert list(result) == list(originals)
    for key, original in originals.items():
        expected = _torch_ao_sparsified(original, level, block) if key in tables else original
        assert torch.equal(result[key], expected), key  # the same mask, the kept values unchanged
        assert _bytes_equal(result[key], expected), f"{key}: the sign of a zeroed negative weight (x * 0 is -0.0)"
    for key in tables:
        zeroed = float((result[key] == 0).float().mean())
        assert 0 < zeroed < 1, (key, zeroed)
