"""Small classifiers of the papers' kinds, sized for CPU.

``mlp`` (like Keras' mnist_mlp), ``cnn`` (like Keras' mnist_cnn, narrower), ``irnn`` (a ReLU
RNN over image rows with identity-initialised recurrence, Le et al. 2015), ``perceptron``
(a single linear layer). Every model takes (N, 1, H, W) images and returns logits.
Refer to one as ``tamperprobe.zoo:NAME``, build it with ``build(NAME, shape, classes)``, or
build and train it on labelled data with ``train_model(NAME, data)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ._util import Progress
from .data import Dataset
from .errors import DataError, UsageError


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
            self.rnn.get_parameter("weight_hh_l0").copy_(torch.eye(hidden))
            self.rnn.get_parameter("bias_hh_l0").zero_()
            self.rnn.get_parameter("weight_ih_l0").normal_(0.0, 0.01)
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


def check_architecture(name: str) -> str:
    """``name`` when the zoo has it; UsageError naming the choices otherwise."""
    if name not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {name!r}: choose one of {', '.join(ARCHITECTURES)}")
    return name


def build(name: str, shape: tuple[int, ...] = (1, 8, 8), classes: int = 10) -> nn.Module:
    """Build an untrained zoo model for inputs of ``shape`` (C, H, W) with ``classes`` outputs."""
    if len(shape) != 3 or shape[0] != 1 or shape[1] != shape[2]:
        raise UsageError(f"zoo models take square one-channel images (1, H, H), got {tuple(shape)}")
    side = shape[1]
    if check_architecture(name) == "mlp":
        return MLP(side * side, classes, hidden=128 if side <= 8 else 256)
    if name == "cnn":
        return CNN(side, classes, channels=(8, 16) if side <= 8 else (16, 32), hidden=64 if side <= 8 else 128)
    if name == "irnn":
        return IRNN(side, classes, hidden=64 if side <= 8 else 100)
    return Perceptron(side * side, classes)


@dataclass(frozen=True)
class Trained:
    """A zoo model trained on a data set, with its accuracy on the training part and on the held-out part."""

    module: nn.Module
    data: str
    train_accuracy: float
    test_accuracy: float
    held_out: int
    example: np.ndarray  # a batch of training inputs, for writing the model in a traced format


def train_model(
    name: str,
    data: Dataset,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
    test_fraction: float = 0.25,
    progress: Progress | None = None,
    device: Any = None,
) -> Trained:
    """Build zoo model ``name`` for ``data``'s shape and classes and train it (``train.fit``) on a seeded split.

    ``progress(step, steps, "epoch e/E")`` hears about every training step; ``device`` (a
    ``torch.device``, default the CPU) is where it trains.
    """
    from .train import accuracy, fit

    check_architecture(name)
    if not 0.0 < test_fraction < 1.0:
        raise UsageError(f"--test-fraction must lie in (0, 1), got {test_fraction}")
    if epochs < 1 or lr <= 0:
        raise UsageError("--epochs must be >= 1 and --lr > 0")
    if data.y is None:
        raise DataError(f"{data.name} has no labels: training needs y")
    train, test = data.split(test_fraction, seed=seed)
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"{data.name}: too few samples ({len(data)}) to split off a test set")
    assert train.y is not None and test.y is not None
    torch.manual_seed(seed)
    module = build(name, tuple(data.x.shape[1:]), int(np.max(data.y)) + 1)
    if device is not None:
        module = module.to(device)
    fit(module, train.x, train.y, epochs=epochs, lr=lr, seed=seed, progress=progress)
    return Trained(module, data.name, accuracy(module, train.x, train.y), accuracy(module, test.x, test.y), len(test), train.x[:2])


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
