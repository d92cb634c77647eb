"""The one seeded training loop (``fit``), shared by the zoo, the demo and the attacks, and a model's accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ._torch import accuracy as _accuracy
from ._torch import as_logits, eval_mode, predict, set_training, to_tensor
from ._util import Progress


def fit(
    module: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    params: Sequence[torch.Tensor] | None = None,
    weight_decay: float = 0.0,
    progress: Progress | None = None,
    clip: float | None = 5.0,
) -> nn.Module:
    """Train ``module`` in place with Adam on (x, y), batches in a seeded order; only ``params`` are updated when given.

    Works on any module returning logits (a tensor, or the first of a tuple or dict), including
    ``torch.export`` programs and TorchScript. Leaves the module in eval mode.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt = to_tensor(x)
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    trainable = list(params) if params is not None else [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    set_training(module, True)
    steps_per_epoch = max(1, (len(xt) + batch_size - 1) // batch_size)
    total = epochs * steps_per_epoch
    done = 0
    for epoch in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            loss = loss_fn(as_logits(module(xt[idx])), yt[idx])
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(trainable, clip)
            opt.step()
            done += 1
            if progress:
                progress(done, total, f"epoch {epoch + 1}/{epochs}")
    set_training(module, False)
    return module


def accuracy(module: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Share of ``x`` that ``module`` (run in eval mode, its training flags restored) labels as ``y``."""
    with eval_mode(module):
        return _accuracy(predict(module, x), y)
