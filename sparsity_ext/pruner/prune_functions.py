"""Conversion functions: physically remove the pruned channels of a matched chain of layers.

Mirrors torch.ao.pruning._experimental.pruner.prune_functions (same function names and arguments;
BaseStructuredSparsifier.prune calls them with the modules / functions of each matched chain).

What the pruned model computes: the masked model's function. In the masked model a pruned output
channel of a Linear / Conv2d carries a constant, its original bias (zero with prune_bias or without a
bias). That constant is pushed through the per-channel ops between the layer and its consumer
(activations, BatchNorm, pooling) and folded into the consumer's bias, then the channel is removed
from the layer, the BatchNorm and the consumer's input. Where the constant cannot be folded exactly
(the consumer is a padded Conv2d, or an average pool counts zero padding) and the channel may carry a
nonzero constant, the layer keeps all its channels (`prune_conv2d_padded`), as torch.ao.pruning does
for padded convolutions with a bias.

Differences from torch.ao.pruning, each where its pruned model differs from the masked one or
crashes: the constant is computed for every chain, not only for layers with a bias and
prune_bias=False (an activation with f(0) != 0, such as sigmoid, or a BatchNorm makes it nonzero);
functional activations keep their arguments (F.leaky_relu(x, 0.2)); a bias propagated into a layer
is kept when that layer is pruned with prune_bias=True, and a final layer with prune_bias=False keeps
its bias; conv -> pool -> flatten -> linear works without a bias; the padded path allocates on the
layer's device. New chains: Conv2d -> BatchNorm2d -> ... (every Conv2d chain, and to the output) and
Conv2d -> activation -> adaptive pool -> flatten -> Linear. BatchNorm uses its running statistics in
eval mode and batch statistics in train mode (a constant channel then normalizes to its bias), the
mode it is in when prune() runs.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from .parametrization import BiasHook, structured_mask

__all__ = [
    "BoundFunction",
    "prune_linear", "prune_linear_linear", "prune_linear_activation_linear",
    "prune_conv2d", "prune_conv2d_padded", "prune_conv2d_conv2d", "prune_conv2d_activation_conv2d",
    "prune_conv2d_activation_pool_conv2d", "prune_conv2d_pool_activation_conv2d",
    "prune_conv2d_pool_flatten_linear", "prune_conv2d_activation_pool_flatten_linear",
    "prune_conv2d_batchnorm", "prune_conv2d_batchnorm_conv2d", "prune_conv2d_batchnorm_activation_conv2d",
    "prune_conv2d_batchnorm_activation_pool_conv2d", "prune_conv2d_batchnorm_pool_activation_conv2d",
    "prune_conv2d_batchnorm_pool_flatten_linear", "prune_conv2d_batchnorm_activation_pool_flatten_linear",
    "prune_lstm_output_linear", "prune_lstm_output_layernorm_linear",
]


class BoundFunction:
    """A functional call of the traced graph with its other arguments bound: calling it with a tensor
    runs target(tensor, *args, **kwargs). prune() passes these in place of functional activations and
    pools that were called with extra arguments (e.g. F.leaky_relu(x, 0.2))."""

    def __init__(self, target: Callable, args: Sequence[Any], kwargs: dict[str, Any]):
        self.target, self.args, self.kwargs = target, tuple(args), dict(kwargs)

    def __call__(self, x: Tensor) -> Tensor:
        return self.target(x, *self.args, **self.kwargs)

    def __repr__(self) -> str:
        return f"BoundFunction({getattr(self.target, '__name__', self.target)}, args={self.args}, kwargs={self.kwargs})"


# ------------------------------------------------------------------------- weights and biases
def _weight_tensor(module: nn.Module) -> Tensor:
    """The unmasked weight: the parametrization's original when the weight is parametrized."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def _set_weight_tensor(module: nn.Module, value: Tensor) -> None:
    if parametrize.is_parametrized(module, "weight"):
        module.parametrizations.weight.original = nn.Parameter(value)
    else:
        module.weight = nn.Parameter(value)


def _remove_bias_handles(module: nn.Module) -> None:
    """Detaches the module's BiasHooks."""
    for hook_id in [i for i, hook in module._forward_hooks.items() if isinstance(hook, BiasHook)]:
        del module._forward_hooks[hook_id]
        module._forward_hooks_with_kwargs.pop(hook_id, None)
        module._forward_hooks_always_called.pop(hook_id, None)


def _prune_output_rows(module: nn.Module) -> Tensor:
    """Folds the mask into the weight, keeps only its kept rows and detaches the BiasHook; returns the mask."""
    mask = structured_mask(module)
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    module.weight = nn.Parameter(module.weight[mask])
    if isinstance(module, nn.Conv2d):
        module.out_channels = module.weight.shape[0]
    else:
        module.out_features = module.weight.shape[0]
    _remove_bias_handles(module)
    return mask


def _pruned_channel_bias(module: nn.Module, mask: Tensor) -> Tensor | None:
    """The original bias of the pruned channels, what they output in the masked model; None where that is
    zero (no bias, or prune_bias)."""
    original = getattr(module, "_bias", None)
    if original is None or getattr(module, "prune_bias", False):
        return None
    return original[~mask]


def _propagate_module_bias(module: nn.Module, mask: Tensor) -> Tensor | None:
    """Shrinks the module's bias to the kept channels (the bias propagated into it by an earlier prune if
    there is one, else its original bias) and drops `_bias`.

    Returns the pruned channels' original bias (see _pruned_channel_bias)."""
    pruned = _pruned_channel_bias(module, mask)
    original = getattr(module, "_bias", None)
    current = module.bias if module.bias is not None else original
    if current is not None:
        module.bias = nn.Parameter(current[mask])
    if hasattr(module, "_bias"):
        delattr(module, "_bias")
    return pruned


def _get_adjusted_next_layer_bias(next_layer: nn.Module, pruned_biases: Tensor, mask: Tensor) -> nn.Parameter:
    """next_layer's bias once its inputs where `mask` is False, which carry the constants
    `pruned_biases`, are removed: bias + W[:, ~mask] . pruned_biases (summed over the kernel for Conv2d)."""
    dropped = _weight_tensor(next_layer)[:, ~mask]
    if isinstance(next_layer, nn.Conv2d):
        scaled = torch.einsum("opij,p->o", dropped, pruned_biases)
    elif isinstance(next_layer, nn.Linear):
        scaled = dropped @ pruned_biases
    else:
        raise NotImplementedError(f"bias propagation into {type(next_layer).__name__} is not supported")
    base = getattr(next_layer, "_bias", None)
    if base is None:
        base = next_layer.bias
    return nn.Parameter(scaled if base is None else scaled + base)


def _prune_input_channels(consumer: nn.Module, keep: Tensor) -> None:
    """Keeps only the input columns `keep` of a Linear / Conv2d weight (its unmasked original if parametrized)."""
    weight = _weight_tensor(consumer)[:, keep]
    _set_weight_tensor(consumer, weight)
    if isinstance(consumer, nn.Conv2d):
        consumer.in_channels = weight.shape[1]
    else:
        consumer.in_features = weight.shape[1]


def _prune_batch_norm(bn: _BatchNorm, keep: Tensor) -> None:
    if bn.weight is not None:
        bn.weight = nn.Parameter(bn.weight[keep])
        bn.bias = nn.Parameter(bn.bias[keep])
    if bn.running_mean is not None:
        bn.running_mean = bn.running_mean[keep]
        bn.running_var = bn.running_var[keep]
    bn.num_features = int(keep.sum())


# -------------------------------------------------------------------- constants of pruned channels
def _batch_norm_of_constant(bn: _BatchNorm, x: Tensor) -> Tensor:
    """BatchNorm of channels that are constant over batch and space, in the mode bn is in."""
    if bn.training or bn.running_mean is None:
        out = torch.zeros_like(x)  # batch statistics: a constant channel minus its mean is 0
        return out if bn.bias is None else out + bn.bias.reshape((1, -1) + (1,) * (x.dim() - 2))
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _channel_constants(pruned_values: Tensor | None, mask: Tensor, channel_ops: Sequence, like: Tensor,
                       spatial_dims: int) -> Tensor:
    """What each pruned channel carries after `channel_ops` (activations and BatchNorms; None entries are
    skipped), as a vector over the pruned channels. The ops see all channels, shaped (1, C, 1, ...), so
    per-channel ops (PReLU with C weights, BatchNorm) apply each channel's own parameters."""
    x = torch.zeros(mask.shape[0], dtype=like.dtype, device=like.device)
    if pruned_values is not None:
        x[~mask] = pruned_values
    x = x.reshape((1, -1) + (1,) * spatial_dims)
    for op in channel_ops:
        if op is not None:
            x = _batch_norm_of_constant(op, x) if isinstance(op, _BatchNorm) else op(x)
    return x.reshape(-1)[~mask]


def _any_positive(padding) -> bool:
    return any(p > 0 for p in padding) if isinstance(padding, (tuple, list)) else padding > 0


def _is_padded(conv: nn.Conv2d) -> bool:
    if isinstance(conv.padding, str):
        return conv.padding == "same"
    return _any_positive(conv.padding)


# F.avg_pool2d's arguments after the input, in order.
_AVG_POOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _pool_keeps_constants(pool) -> bool:
    """Whether pooling maps a constant channel to the same constant: max and adaptive pools always, average
    pools unless zero padding counts in the mean or a divisor override rescales it."""
    if isinstance(pool, nn.AvgPool2d):
        padding, count_pad, divisor = pool.padding, pool.count_include_pad, pool.divisor_override
    elif isinstance(pool, BoundFunction) and pool.target is F.avg_pool2d:
        given = dict(zip(_AVG_POOL_ARGS, pool.args), **pool.kwargs)
        padding, count_pad, divisor = given.get("padding", 0), given.get("count_include_pad", True), \
            given.get("divisor_override")
    else:
        return True
    return divisor is None and not (count_pad and _any_positive(padding))


# ------------------------------------------------------------------------------------ the engine
def _keep_channels(layer: nn.Module) -> None:
    """Removes the layer's parametrization without removing channels: the pruned rows stay zero and their
    bias (original, zero with prune_bias) stays, so the layer computes what the masked layer did."""
    mask = structured_mask(layer)
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    _remove_bias_handles(layer)
    original = getattr(layer, "_bias", None)
    if original is not None:
        kept = layer.bias if layer.bias is not None else original
        pruned = torch.zeros_like(original) if getattr(layer, "prune_bias", False) else original
        layer.bias = nn.Parameter(torch.where(mask, kept, pruned))
        delattr(layer, "_bias")
    elif layer.bias is not None:  # a bias propagated from the previous layer: the pruned channels had none
        layer.bias[~mask] = 0


@torch.no_grad()
def _prune_chain(producer: nn.Module, channel_ops: Sequence = (), pools: Sequence = (),
                 consumer: nn.Module | None = None, flatten: bool = False) -> None:
    """Prunes producer's output channels through `channel_ops` (activations, BatchNorms, in order) and
    `pools` into `consumer` (None: the producer's output leaves the model). With `flatten`, the consumer
    is a Linear fed by the flattened (C, H, W) output."""
    mask = structured_mask(producer)
    batch_norms = [op for op in channel_ops if isinstance(op, _BatchNorm)]
    if consumer is None:
        _prune_output_rows(producer)
        _propagate_module_bias(producer, mask)
        for bn in batch_norms:
            _prune_batch_norm(bn, mask)
        return

    pruned_values = _pruned_channel_bias(producer, mask)
    spatial_dims = 2 if isinstance(producer, nn.Conv2d) else 0
    constants = _channel_constants(pruned_values, mask, channel_ops, _weight_tensor(producer), spatial_dims)
    nonzero = bool(constants.any())
    exact = all(_pool_keeps_constants(p) for p in pools) and not (isinstance(consumer, nn.Conv2d) and _is_padded(consumer))
    has_bias = producer.bias is not None or getattr(producer, "_bias", None) is not None
    if not exact and (has_bias or nonzero):
        _keep_channels(producer)
        return

    _prune_output_rows(producer)
    _propagate_module_bias(producer, mask)
    for bn in batch_norms:
        _prune_batch_norm(bn, mask)
    keep = mask
    if flatten:
        # channel c of the (C, H, W) output becomes inputs c*H*W ... (c+1)*H*W - 1 of the Linear
        scale = _weight_tensor(consumer).shape[1] // mask.shape[0]
        keep, constants = mask.repeat_interleave(scale), constants.repeat_interleave(scale)
    if pruned_values is not None or nonzero:
        consumer.bias = _get_adjusted_next_layer_bias(consumer, constants, keep)
    _prune_input_channels(consumer, keep)


# ------------------------------------------------------------------------- torch.ao's functions
def prune_linear(linear: nn.Linear) -> None:
    """Linear -> output: removes the pruned output features (and their bias)."""
    _prune_chain(linear)


def prune_linear_linear(linear1: nn.Linear, linear2: nn.Linear) -> None:
    _prune_chain(linear1, consumer=linear2)


def prune_linear_activation_linear(linear1: nn.Linear, activation: Callable | None, linear2: nn.Linear) -> None:
    _prune_chain(linear1, [activation], consumer=linear2)


def prune_conv2d(conv2d: nn.Conv2d) -> None:
    """Conv2d -> output: removes the pruned output channels (and their bias)."""
    _prune_chain(conv2d)


@torch.no_grad()
def prune_conv2d_padded(conv2d_1: nn.Conv2d) -> None:
    """Removes the parametrization but keeps every channel (the next layer pads, so a pruned channel's
    constant output cannot be folded into its bias)."""
    _keep_channels(conv2d_1)


def prune_conv2d_conv2d(conv2d_1: nn.Conv2d, conv2d_2: nn.Conv2d) -> None:
    _prune_chain(conv2d_1, consumer=conv2d_2)


def prune_conv2d_activation_conv2d(conv2d_1: nn.Conv2d, activation: Callable | None, conv2d_2: nn.Conv2d) -> None:
    _prune_chain(conv2d_1, [activation], consumer=conv2d_2)


def prune_conv2d_pool_activation_conv2d(c1: nn.Conv2d, pool, activation: Callable | None, c2: nn.Conv2d) -> None:
    _prune_chain(c1, [activation], [pool], c2)


def prune_conv2d_activation_pool_conv2d(c1: nn.Conv2d, activation: Callable | None, pool, c2: nn.Conv2d) -> None:
    _prune_chain(c1, [activation], [pool], c2)


def prune_conv2d_pool_flatten_linear(conv2d: nn.Conv2d, pool, flatten, linear: nn.Linear) -> None:
    _prune_chain(conv2d, (), [pool], linear, flatten=True)


# ------------------------------------------------------------------------------ chains added here
def prune_conv2d_activation_pool_flatten_linear(conv2d: nn.Conv2d, activation: Callable | None, pool, flatten,
                                                linear: nn.Linear) -> None:
    _prune_chain(conv2d, [activation], [pool], linear, flatten=True)


def prune_conv2d_batchnorm(conv2d: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Conv2d -> BatchNorm2d -> output."""
    _prune_chain(conv2d, [bn])


def prune_conv2d_batchnorm_conv2d(conv2d_1: nn.Conv2d, bn: nn.BatchNorm2d, conv2d_2: nn.Conv2d) -> None:
    _prune_chain(conv2d_1, [bn], consumer=conv2d_2)


def prune_conv2d_batchnorm_activation_conv2d(conv2d_1: nn.Conv2d, bn: nn.BatchNorm2d, activation: Callable | None,
                                             conv2d_2: nn.Conv2d) -> None:
    _prune_chain(conv2d_1, [bn, activation], consumer=conv2d_2)


def prune_conv2d_batchnorm_activation_pool_conv2d(c1: nn.Conv2d, bn: nn.BatchNorm2d, activation: Callable | None,
                                                  pool, c2: nn.Conv2d) -> None:
    _prune_chain(c1, [bn, activation], [pool], c2)


def prune_conv2d_batchnorm_pool_activation_conv2d(c1: nn.Conv2d, bn: nn.BatchNorm2d, pool,
                                                  activation: Callable | None, c2: nn.Conv2d) -> None:
    _prune_chain(c1, [bn, activation], [pool], c2)


def prune_conv2d_batchnorm_pool_flatten_linear(conv2d: nn.Conv2d, bn: nn.BatchNorm2d, pool, flatten,
                                               linear: nn.Linear) -> None:
    _prune_chain(conv2d, [bn], [pool], linear, flatten=True)


def prune_conv2d_batchnorm_activation_pool_flatten_linear(conv2d: nn.Conv2d, bn: nn.BatchNorm2d,
                                                          activation: Callable | None, pool, flatten,
                                                          linear: nn.Linear) -> None:
    _prune_chain(conv2d, [bn, activation], [pool], linear, flatten=True)


# ------------------------------------------------------------------------------------------ LSTM
def _keep_rows(module: nn.Module, name: str, keep: Tensor) -> None:
    tensor = getattr(module, name, None)
    if tensor is not None:
        setattr(module, name, nn.Parameter(tensor[keep]))


def prune_lstm_output_linear(lstm: nn.LSTM, getitem: Callable, linear: nn.Linear) -> None:
    prune_lstm_output_layernorm_linear(lstm, getitem, None, linear)


@torch.no_grad()
def prune_lstm_output_layernorm_linear(lstm: nn.LSTM, getitem: Callable, layernorm: nn.LayerNorm | None,
                                       linear: nn.Linear) -> None:
    """LSTM -> output[0] -> (LayerNorm ->) Linear, as torch.ao.pruning does it.

    Each masked weight_ih_l{k} keeps its mask's rows (and bias_ih rows). Each masked weight_hh_l{k} is
    cut per gate (input, forget, cell, output): gate g keeps rows and columns where its part of the
    mask is True. The hidden units the output gate keeps are the inputs kept by the next layer's
    weight_ih, or by the LayerNorm and the Linear after the last layer. (Masking an LSTM's rows is not
    the same function as removing hidden units, so the pruned LSTM is not the masked one.)
    """
    hidden = lstm.hidden_size
    for layer in range(lstm.num_layers):
        ih, hh = f"weight_ih_l{layer}", f"weight_hh_l{layer}"
        if parametrize.is_parametrized(lstm, ih):
            mask = structured_mask(lstm, ih)
            parametrize.remove_parametrizations(lstm, ih, leave_parametrized=True)
            _keep_rows(lstm, ih, mask)
            _keep_rows(lstm, f"bias_ih_l{layer}", mask)
        if not parametrize.is_parametrized(lstm, hh):
            continue
        mask = structured_mask(lstm, hh)
        parametrize.remove_parametrizations(lstm, hh, leave_parametrized=True)
        gate_masks = mask.reshape(4, hidden)
        gate_weights = getattr(lstm, hh).split(hidden)
        setattr(lstm, hh, nn.Parameter(torch.cat([w[m][:, m] for w, m in zip(gate_weights, gate_masks)])))
        _keep_rows(lstm, f"bias_hh_l{layer}", mask)
        output_units = gate_masks[3]
        if layer + 1 == lstm.num_layers:
            lstm.hidden_size = int(gate_masks[0].sum())
            _prune_input_channels(linear, output_units)
            if layernorm is not None:
                layernorm.normalized_shape = (linear.in_features,)
                _keep_rows(layernorm, "weight", output_units)
                _keep_rows(layernorm, "bias", output_units)
        else:
            next_ih = f"weight_ih_l{layer + 1}"
            if parametrize.is_parametrized(lstm, next_ih):
                original = lstm.parametrizations[next_ih].original
                lstm.parametrizations[next_ih].original = nn.Parameter(original[:, output_units])
            else:
                setattr(lstm, next_ih, nn.Parameter(getattr(lstm, next_ih)[:, output_units]))
