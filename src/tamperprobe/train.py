"""Seeded training and evaluation loops shared by the demo, the zoo and the attacks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

Progress = Callable[[int, int], None]


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def fit(
    module: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    params: list[nn.Parameter] | None = None,
    weight_decay: float = 0.0,
    progress: Progress | None = None,
    clip: float | None = 5.0,
) -> nn.Module:
    """Train ``module`` in place with Adam on (x, y); only ``params`` are updated when given."""
    gen = seed_everything(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    trainable = list(params) if params is not None else [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    module.train()
    steps_per_epoch = max(1, (len(xt) + batch_size - 1) // batch_size)
    total = epochs * steps_per_epoch
    done = 0
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            loss = loss_fn(module(xt[idx]), yt[idx])
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(trainable, clip)
            opt.step()
            done += 1
            if progress:
                progress(done, total)
    module.eval()
    return module


def predict(module: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Top-1 labels of ``module`` on x."""
    module.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(module(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32))).argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def accuracy(module: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(module, x) == np.asarray(y)).mean())
