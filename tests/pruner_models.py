"""Small seeded models for the structured-pruning tests (the chains torch.ao.pruning's prune() supports,
and the BatchNorm chains sparsity_ext adds), plus a deterministic row pruner for either library."""
import torch
import torch.nn.functional as F
from torch import nn


class LinearChain(nn.Module):
    """Linear -> Linear -> ... without biases, in a Sequential and as attributes."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(7, 5, bias=False), nn.Linear(5, 6, bias=False), nn.Linear(6, 4, bias=False))
        self.linear1 = nn.Linear(4, 4, bias=False)
        self.linear2 = nn.Linear(4, 10, bias=False)

    def forward(self, x):
        return self.linear2(self.linear1(self.seq(x)))


class LinearBiasChain(nn.Module):
    """Linear -> Linear with some biases on, some off."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(7, 5, bias=True), nn.Linear(5, 6, bias=False), nn.Linear(6, 3, bias=True),
                                 nn.Linear(3, 3, bias=True), nn.Linear(3, 10, bias=False))

    def forward(self, x):
        return self.seq(x)


class LinearActivationChain(nn.Module):
    """Linear -> activation module / function -> Linear."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(7, 5, bias=True), nn.ReLU(), nn.Linear(5, 6, bias=False), nn.Tanh(),
                                 nn.Linear(6, 4, bias=True))
        self.linear1 = nn.Linear(4, 3, bias=True)
        self.linear2 = nn.Linear(3, 8, bias=True)
        self.linear3 = nn.Linear(8, 10, bias=False)

    def forward(self, x):
        x = F.relu(self.seq(x))
        x = F.hardtanh(self.linear1(x))
        return self.linear3(F.gelu(self.linear2(x)))


class ConvChain(nn.Module):
    """Conv2d -> Conv2d without biases or padding."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.Conv2d(8, 12, 3, bias=False))
        self.conv1 = nn.Conv2d(12, 10, 3, bias=False)
        self.conv2 = nn.Conv2d(10, 9, 3, bias=False)

    def forward(self, x):
        return self.conv2(self.conv1(self.seq(x)))


class ConvBiasChain(nn.Module):
    """Conv2d -> Conv2d, some with biases."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(1, 8, 3, bias=True), nn.Conv2d(8, 8, 3, bias=True),
                                 nn.Conv2d(8, 12, 3, bias=False))
        self.conv1 = nn.Conv2d(12, 10, 3, bias=True)
        self.conv2 = nn.Conv2d(10, 9, 3, bias=False)

    def forward(self, x):
        return self.conv2(self.conv1(self.seq(x)))


class ConvActivationChain(nn.Module):
    """Conv2d -> activation module / function -> Conv2d."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(1, 8, 3, bias=True), nn.ReLU(), nn.Conv2d(8, 12, 3, bias=True), nn.Tanh(),
                                 nn.Conv2d(12, 12, 3, bias=False))
        self.conv1 = nn.Conv2d(12, 10, 3, bias=False)
        self.conv2 = nn.Conv2d(10, 9, 3, bias=True)

    def forward(self, x):
        x = F.relu(self.seq(x))
        return self.conv2(F.hardtanh(self.conv1(x)))


class ConvPaddingChain(nn.Module):
    """Conv2d -> activation -> Conv2d where the next conv pads, with and without biases."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=True), nn.ReLU(),
            nn.Conv2d(8, 8, 3, bias=False), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=True), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=True), nn.ReLU(),
            nn.Conv2d(8, 12, 3, bias=True), nn.Tanh(),
        )
        self.conv1 = nn.Conv2d(12, 10, 3, padding=1, bias=True)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(10, 9, 3, padding=1, bias=True)

    def forward(self, x):
        return self.conv2(self.act1(self.conv1(self.seq(x))))


class ConvPoolChain(nn.Module):
    """Conv2d -> pool -> activation -> Conv2d and Conv2d -> activation -> pool -> Conv2d, pools as
    modules and functions (the convolutions after average pools with padding pad too)."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=True), nn.MaxPool2d(2, 2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 12, 3, padding=1, bias=True), nn.Tanh(), nn.AvgPool2d(2, 2, padding=1),
        )
        self.conv1 = nn.Conv2d(12, 10, 3, padding=1, bias=True)
        self.maxpool = nn.MaxPool2d(2, 2, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(10, 9, 3, padding=1, bias=True)
        self.conv3 = nn.Conv2d(9, 9, 3, bias=True)
        self.conv4 = nn.Conv2d(9, 7, 1, bias=True)

    def forward(self, x):
        x = self.conv1(self.seq(x))
        x = self.conv2(self.act1(self.maxpool(x)))
        x = F.max_pool2d(F.relu(x), kernel_size=2, stride=2)
        x = F.relu(F.avg_pool2d(self.conv3(x), kernel_size=2, stride=1))
        return self.conv4(x)


class ConvPoolFlattenChain(nn.Module):
    """Conv2d -> adaptive pool -> nn.Flatten -> Linear (2x2 pooled: each channel feeds 4 inputs)."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=True), nn.MaxPool2d(2, 2, padding=1), nn.ReLU(),
                                 nn.Conv2d(3, 5, 3, padding=1, bias=True), nn.Tanh())
        self.conv1 = nn.Conv2d(5, 7, 3, padding=1, bias=True)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(7, 11, 3, padding=1, bias=True)
        self.avg_pool = nn.AdaptiveAvgPool2d((2, 2))
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(44, 13, bias=True)

    def forward(self, x):
        x = self.act1(self.conv1(self.seq(x)))
        return self.fc(self.flatten(self.avg_pool(self.conv2(x))))


class ConvPoolFlattenFunctionalChain(nn.Module):
    """Conv2d -> adaptive max pool -> torch.flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(6, 11, 3, padding=1, bias=True)
        self.pool = nn.AdaptiveMaxPool2d((1, 1))
        self.fc = nn.Linear(11, 13, bias=True)

    def forward(self, x):
        x = self.conv2(F.relu(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class LSTMLinear(nn.Module):
    """LSTM -> output -> Linear; returns the decoded output and the LSTM output."""

    def __init__(self, input_dim=8, hidden_dim=8, output_dim=8, num_layers=1):
        super().__init__()
        self.lstm = nn.LSTM(input_dim, hidden_dim, num_layers)
        self.linear = nn.Linear(hidden_dim, output_dim)

    def forward(self, x):
        output, _hidden = self.lstm(x)
        return self.linear(output), output


class LSTMLayerNormLinear(nn.Module):
    """LSTM -> output -> LayerNorm -> Linear."""

    def __init__(self, input_dim=8, hidden_dim=8, output_dim=8, num_layers=1):
        super().__init__()
        self.lstm = nn.LSTM(input_dim, hidden_dim, num_layers)
        self.norm = nn.LayerNorm(hidden_dim)
        self.linear = nn.Linear(hidden_dim, output_dim)

    def forward(self, x):
        output, _state = self.lstm(x)
        return self.linear(self.norm(output)), output


class ConvBatchNormChain(nn.Module):
    """Conv2d -> BatchNorm2d chains (sparsity_ext only): to a conv, through an activation and pools, to a
    padded conv, and through an adaptive pool and flatten to a Linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 10, 3, bias=True), nn.BatchNorm2d(10)
        self.conv3, self.bn3 = nn.Conv2d(10, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.conv4, self.bn4 = nn.Conv2d(12, 9, 3, bias=True), nn.BatchNorm2d(9)
        self.conv5 = nn.Conv2d(9, 9, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.fc = nn.Linear(36, 5)

    def forward(self, x):
        x = self.conv2(self.bn1(self.conv1(x)))                    # conv -> bn -> conv
        x = self.conv3(F.relu(self.bn2(x)))                          # conv -> bn -> relu -> padded conv
        x = self.conv4(nn.functional.max_pool2d(F.relu(self.bn3(x)), 2))  # conv -> bn -> relu -> pool -> conv
        x = self.conv5(F.relu(self.bn4(x)))                          # conv -> bn -> relu -> padded conv
        return self.fc(torch.flatten(self.pool(F.relu(x)), 1))      # conv -> relu -> pool -> flatten -> linear


def randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so BatchNorm matters in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


def every_third_row(mask: torch.Tensor) -> None:
    """Prunes rows 1, 4, 7, ... (a third of the rows, never all of them)."""
    mask[1::3] = False


def second_half_of_each_gate(mask: torch.Tensor) -> None:
    """LSTM masks: prunes the second half of each of the four gates' rows."""
    for gate in mask.split(len(mask) // 4):
        gate[len(gate) // 2:] = False


def row_pruner(base_cls):
    """A pruner class on `base_cls` (torch.ao's or sparsity_ext's BaseStructuredSparsifier) whose masks are
    every_third_row (second_half_of_each_gate for LSTM weights)."""

    class RowPruner(base_cls):
        def update_mask(self, module, tensor_name, **kwargs):
            mask = getattr(module.parametrizations, tensor_name)[0].mask
            if isinstance(module, nn.LSTM):
                second_half_of_each_gate(mask)
            else:
                every_third_row(mask)

    return RowPruner
