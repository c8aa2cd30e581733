"""post_training_sparse_quantize: sparsify and weight-quantize a model's embedding tables.

Mirrors torch.ao.pruning._experimental.data_sparsifier.quantization_utils. Quantization is torch's own
eager-mode weight-only embedding quantization (torch.ao.quantization, float_qparams_weight_only_qconfig:
per-row uint8 with float scales and zero points).
"""
from __future__ import annotations

import torch
from torch import nn

from ..sparsifier.utils import fqn_to_module, module_to_fqn

__all__ = ["post_training_sparse_quantize", "SUPPORTED_MODULES"]

SUPPORTED_MODULES = {nn.Embedding, nn.EmbeddingBag}


def _fetch_all_embeddings(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(fqn, module) of every submodule of model (not model itself) whose exact type is Embedding/EmbeddingBag."""
    return [(fqn, module) for fqn, module in model.named_modules()
            if fqn and type(module) in SUPPORTED_MODULES]


def _selected_embeddings(model: nn.Module, select_embeddings) -> list[tuple[str, nn.Module]]:
    if not isinstance(select_embeddings, list):
        raise TypeError(f"select_embeddings must be a list of embedding modules, got {type(select_embeddings).__name__}")
    selected = []
    for module in select_embeddings:
        if type(module) not in SUPPORTED_MODULES:
            raise TypeError(f"select_embeddings may hold only nn.Embedding / nn.EmbeddingBag, got {type(module).__name__}")
        fqn = module_to_fqn(model, module)
        if not fqn:
            raise ValueError(f"select_embeddings: {module} is not a submodule of the model")
        selected.append((fqn, module))
    return selected


def _quantize_embeddings(model: nn.Module, embeddings: list[tuple[str, nn.Module]]) -> None:
    """Swaps the given embeddings for their weight-only quantized versions, in place."""
    for _, module in embeddings:
        module.qconfig = torch.ao.quantization.float_qparams_weight_only_qconfig
    torch.ao.quantization.prepare(model, inplace=True)
    torch.ao.quantization.convert(model, inplace=True)


def post_training_sparse_quantize(model: nn.Module, data_sparsifier_class, sparsify_first: bool = True,
                                  select_embeddings: list[nn.Module] | None = None, **sparse_config) -> None:
    """Sparsifies and quantizes the embeddings of `model` in place (other modules are left alone).

    Args:
        model: the model; its Embedding / EmbeddingBag submodules are replaced by quantized ones.
        data_sparsifier_class: a BaseDataSparsifier subclass, built with **sparse_config.
        sparsify_first: True: sparsify the float weights (step + squash_mask), then quantize them.
            False: quantize first; then sparsify the dequantized weights and requantize them with the
            saved per-row scales and zero points.
        select_embeddings: the embedding modules to process (default: every one in the model).
    Each embedding is added to the sparsifier under its fqn with '.' replaced by '_'.
    """
    data_sparsifier = data_sparsifier_class(**sparse_config)
    embeddings = (_fetch_all_embeddings(model) if select_embeddings is None
                  else _selected_embeddings(model, select_embeddings))

    if sparsify_first:
        for fqn, module in embeddings:
            data_sparsifier.add_data(name=fqn.replace(".", "_"), data=module)
        data_sparsifier.step()
        data_sparsifier.squash_mask()
        _quantize_embeddings(model, embeddings)
        return

    _quantize_embeddings(model, embeddings)
    saved = {}
    for fqn, _ in embeddings:
        quantized_weight = fqn_to_module(model, fqn).weight()
        dequantized = torch.dequantize(quantized_weight)
        saved[fqn] = (dequantized, quantized_weight.q_per_channel_scales(),
                      quantized_weight.q_per_channel_zero_points(), quantized_weight.q_per_channel_axis(),
                      quantized_weight.dtype)
        data_sparsifier.add_data(name=fqn.replace(".", "_"), data=dequantized)
    data_sparsifier.step()
    data_sparsifier.squash_mask()  # squashes into `dequantized` itself (same tensor object)
    for fqn, (dequantized, scales, zero_points, axis, dtype) in saved.items():
        requantized = torch.quantize_per_channel(dequantized, scales=scales, zero_points=zero_points,
                                                 axis=axis, dtype=dtype)
        fqn_to_module(model, fqn).set_weight(requantized)
