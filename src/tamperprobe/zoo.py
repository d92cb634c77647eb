"""Small classifiers of the papers' kinds, sized for CPU.

``mlp`` (like Keras' mnist_mlp), ``cnn`` (like Keras' mnist_cnn, narrower), ``irnn`` (a ReLU
RNN over image rows with identity-initialised recurrence, Le et al. 2015), ``perceptron``
(a single linear layer). Every model takes (N, 1, H, W) images and returns logits.
Refer to one as ``tamperprobe.zoo:NAME`` or build it with ``build(NAME, shape, classes)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UsageError


class MLP(nn.Module):
    def __init__(self, in_features: int = 64, classes: int = 10, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    def __init__(self, side: int = 8, classes: int = 10, channels: tuple[int, int] = (8, 16), hidden: int = 64):
        super().__init__()
        c1, c2 = channels
        pool = 2 if side >= 16 else 1
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            *([nn.MaxPool2d(pool)] if pool > 1 else []),
        )
        out_side = side // 2 // pool
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c2 * out_side * out_side, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class IRNN(nn.Module):
    """Reads the image row by row; recurrence initialised to the identity, ReLU units."""

    def __init__(self, width: int = 8, classes: int = 10, hidden: int = 64):
        super().__init__()
        self.rnn = nn.RNN(width, hidden, nonlinearity="relu", batch_first=True)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(torch.eye(hidden))
            self.rnn.bias_hh_l0.zero_()
            self.rnn.weight_ih_l0.normal_(0.0, 0.01)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.reshape(x.shape[0], x.shape[-2], x.shape[-1])
        _, h = self.rnn(seq)
        return self.out(h[-1])


class Perceptron(nn.Module):
    def __init__(self, in_features: int = 64, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


ARCHITECTURES = ("mlp", "cnn", "irnn", "perceptron")


def build(name: str, shape: tuple[int, ...] = (1, 8, 8), classes: int = 10) -> nn.Module:
    """Build an untrained zoo model for inputs of ``shape`` (C, H, W) with ``classes`` outputs."""
    if len(shape) != 3 or shape[0] != 1 or shape[1] != shape[2]:
        raise UsageError(f"zoo models take square one-channel images (1, H, H), got {tuple(shape)}")
    side = shape[1]
    if name == "mlp":
        return MLP(side * side, classes, hidden=128 if side <= 8 else 256)
    if name == "cnn":
        return CNN(side, classes, channels=(8, 16) if side <= 8 else (16, 32), hidden=64 if side <= 8 else 128)
    if name == "irnn":
        return IRNN(side, classes, hidden=64 if side <= 8 else 100)
    if name == "perceptron":
        return Perceptron(side * side, classes)
    raise UsageError(f"unknown architecture {name!r}: choose one of {', '.join(ARCHITECTURES)}")


def digits_mlp() -> nn.Module:
    return build("mlp", (1, 8, 8))


def digits_cnn() -> nn.Module:
    return build("cnn", (1, 8, 8))


def digits_irnn() -> nn.Module:
    return build("irnn", (1, 8, 8))


def mnist_mlp() -> nn.Module:
    return build("mlp", (1, 28, 28))


def mnist_cnn() -> nn.Module:
    return build("cnn", (1, 28, 28))


def mnist_irnn() -> nn.Module:
    return build("irnn", (1, 28, 28))
