"""post_training_sparse_quantize: what torch.ao.pruning's tests check, and the same result as torch.ao's."""
import copy

import pytest
import torch
from torch import nn

from conftest import tie_free
from sparsity_ext.data_sparsifier import DataNormSparsifier
from sparsity_ext.data_sparsifier.quantization_utils import post_training_sparse_quantize

torch_ao_quant_utils = pytest.importorskip("torch.ao.pruning._experimental.data_sparsifier.quantization_utils")
torch_ao_sparsifier = pytest.importorskip("torch.ao.pruning._experimental.data_sparsifier")
QuantizedEmbedding = torch.ao.nn.quantized.Embedding
QuantizedEmbeddingBag = torch.ao.nn.quantized.EmbeddingBag

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb1 = nn.Embedding(100, 3)
        self.embbag1 = nn.EmbeddingBag(200, 32)
        self.emb_seq = nn.Sequential(nn.Embedding(150, 3), nn.EmbeddingBag(100, 3))
        self.linear1 = nn.Linear(32, 32)
        self.linear2 = nn.Linear(16, 16)


def _tie_free_model(seed=0):
    model = Model()
    with torch.no_grad():
        for i, module in enumerate(m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))):
            module.weight.copy_(tie_free(module.weight.shape, seed=seed + i))
    return model


def _near_zero_fraction(quantized_module):
    return (torch.dequantize(quantized_module.weight()).abs() < 1e-2).float().mean().item()


SPARSE_CONFIG = {"sparsity_level": 0.8, "sparse_block_shape": (1, 1)}


@pytest.mark.parametrize("mask_dtype", [None, "packed"])
def test_sparsify_first_selected_embeddings(mask_dtype):
    model = Model()
    linear_before = copy.deepcopy(model.linear1.state_dict())
    post_training_sparse_quantize(model, DataNormSparsifier, sparsify_first=True,
                                  select_embeddings=[model.embbag1, model.emb1], mask_dtype=mask_dtype, **SPARSE_CONFIG)
    assert type(model.emb1) is QuantizedEmbedding and type(model.embbag1) is QuantizedEmbeddingBag
    assert type(model.emb_seq[0]) is nn.Embedding and type(model.emb_seq[1]) is nn.EmbeddingBag  # not selected
    assert type(model.linear1) is nn.Linear and type(model.linear2) is nn.Linear
    assert all(torch.equal(t, linear_before[k]) for k, t in model.linear1.state_dict().items())
    assert abs(_near_zero_fraction(model.emb1) - 0.8) <= 0.05
    assert abs(_near_zero_fraction(model.embbag1) - 0.8) <= 0.05


def test_quantize_first_all_embeddings():
    model = Model()
    post_training_sparse_quantize(model, DataNormSparsifier, sparsify_first=False, **SPARSE_CONFIG)
    for module, kind in ((model.emb1, QuantizedEmbedding), (model.embbag1, QuantizedEmbeddingBag),
                         (model.emb_seq[0], QuantizedEmbedding), (model.emb_seq[1], QuantizedEmbeddingBag)):
        assert type(module) is kind
    assert type(model.linear1) is nn.Linear and type(model.linear2) is nn.Linear
    # In 3-wide rows whose values share a sign, 0 is outside the row's quantization range (torch.ao.pruning
    # gives the same); the 32-wide table reaches the level.
    assert abs(_near_zero_fraction(model.embbag1) - 0.8) <= 0.05


@pytest.mark.parametrize("sparsify_first", [True, False])
def test_same_as_torch_ao(sparsify_first):
    ours, theirs = _tie_free_model(), _tie_free_model()
    config = {"sparsity_level": 0.6, "sparse_block_shape": (1, 2)}
    post_training_sparse_quantize(ours, DataNormSparsifier, sparsify_first=sparsify_first, **config)
    torch_ao_quant_utils.post_training_sparse_quantize(theirs, torch_ao_sparsifier.DataNormSparsifier,
                                                       sparsify_first=sparsify_first, **config)
    compared = 0
    for (name, mine), (_, other) in zip(ours.named_modules(), theirs.named_modules()):
        assert type(mine) is type(other), name
        if isinstance(mine, (QuantizedEmbedding, QuantizedEmbeddingBag)):
            assert torch.equal(mine.weight().int_repr(), other.weight().int_repr()), name
            assert torch.equal(mine.weight().q_per_channel_scales(), other.weight().q_per_channel_scales())
            compared += 1
    assert compared == 4


def test_quantize_first_reuses_the_quantization_parameters():
    model = _tie_free_model()
    reference = copy.deepcopy(model)
    post_training_sparse_quantize(model, DataNormSparsifier, sparsify_first=False,
                                  select_embeddings=[model.embbag1], **SPARSE_CONFIG)
    reference.embbag1.qconfig = torch.ao.quantization.float_qparams_weight_only_qconfig  # same, no sparsity
    torch.ao.quantization.prepare(reference, inplace=True)
    torch.ao.quantization.convert(reference, inplace=True)
    ours, plain = model.embbag1.weight(), reference.embbag1.weight()
    assert torch.equal(ours.q_per_channel_scales(), plain.q_per_channel_scales())
    assert torch.equal(ours.q_per_channel_zero_points(), plain.q_per_channel_zero_points())
    changed = ours.int_repr() != plain.int_repr()
    assert changed.float().mean().item() == pytest.approx(0.8, abs=0.05)
    assert (torch.dequantize(ours)[changed].abs() < 1e-2).all()  # the masked elements, requantized
    assert type(model.emb1) is nn.Embedding


def test_bad_select_embeddings():
    model = Model()
    with pytest.raises(TypeError, match="list"):
        post_training_sparse_quantize(model, DataNormSparsifier, select_embeddings=model.emb1)
    with pytest.raises(TypeError, match="Embedding"):
        post_training_sparse_quantize(model, DataNormSparsifier, select_embeddings=[model.linear1])
    with pytest.raises(ValueError, match="not a submodule"):
        post_training_sparse_quantize(model, DataNormSparsifier, select_embeddings=[nn.Embedding(4, 4)])
    assert type(model.emb1) is nn.Embedding and (model.emb1.weight != 0).all()  # nothing was changed
