"""Fine-tuning attacks: plain fine-tuning and frontier-stitching watermarking.

Both work on TorchScript and torch.export modules as well (gradients flow through them).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .._params import Interval
from .._torch import as_logits, module_device, predict, to_tensor
from ..errors import UsageError
from .base import TRAINING_CONSTRAINTS, Attack, Context, fine_tune, labelled, rng_for


class Finetune(Attack):
    """Fine-tune on a few training samples with a small learning rate.

    ``n`` (300) training samples drawn with the seed, ``epochs`` (3) of Adam at ``lr`` (1e-4).
    """

    name = "finetune"
    needs_data = True
    random = True
    constraints: ClassVar[dict[str, Any]] = {**TRAINING_CONSTRAINTS, "n": Interval(1, None, integer=True)}

    def __init__(self, *, n: int = 300, epochs: int = 3, lr: float = 1e-4, batch_size: int = 32) -> None:
        self.n = n
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        x, y = labelled(ctx.train)
        idx = rng_for(ctx.seed, 4).permutation(len(x))[: self.n]
        fine_tune(model, x[idx], y[idx], epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=ctx.seed)
        return model


def fgsm(model: nn.Module, x: np.ndarray, y: np.ndarray, eps: float, low: float, high: float) -> np.ndarray:
    """One FGSM step of size ``eps`` on the cross-entropy of ``model`` (in its current mode), clipped to [low, high]."""
    device = module_device(model)
    xt = to_tensor(x).to(device).requires_grad_(True)
    loss = nn.functional.cross_entropy(as_logits(model(xt)), torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device))
    (grad,) = torch.autograd.grad(loss, xt)
    return (xt.detach() + eps * grad.sign()).clamp(low, high).cpu().numpy()


class Watermark(Attack):
    """Frontier stitching: fine-tune on FGSM examples relabelled to their original class plus clean data.

    Le Merrer et al. 2017: FGSM examples of ``keys`` (100) correctly classified training samples
    at step ``eps`` (default 0.15 of the input range), half "true adversaries" (now
    misclassified) and half "false adversaries" (still right) where available, all labelled
    with their ORIGINAL class; the model is fine-tuned on the clean training data plus the keys
    repeated ``repeat`` (4) times.
    """

    name = "watermark"
    needs_data = True
    random = True
    constraints: ClassVar[dict[str, Any]] = {
        **TRAINING_CONSTRAINTS,
        "keys": Interval(1, None, integer=True),
        "eps": Interval(0, None, closed="neither"),
        "repeat": Interval(1, None, integer=True),
    }

    def __init__(
        self, *, keys: int = 100, eps: float | None = None, repeat: int = 4, epochs: int = 3, lr: float = 1e-4, batch_size: int = 64
    ) -> None:
        self.keys = keys
        self.eps = eps
        self.repeat = repeat
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size

    def resolve(self, model: nn.Module, ctx: Context) -> dict[str, Any]:
        if self.eps is not None or ctx.train is None:
            return {}
        return {"eps": 0.15 * float(ctx.train.high - ctx.train.low)}

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        ds = ctx.train
        x, y = labelled(ds)
        assert ds is not None and self.eps is not None  # resolved
        order = rng_for(ctx.seed, 5).permutation(len(x))
        right = order[predict(model, x[order]) == y[order]]
        if len(right) == 0:
            raise UsageError("the model classifies no training sample correctly; nothing to stitch")
        adv = fgsm(model, x[right], y[right], self.eps, ds.low, ds.high)
        flipped = predict(model, adv) != y[right]
        true_adv, false_adv = np.flatnonzero(flipped), np.flatnonzero(~flipped)
        half = self.keys // 2
        take_t = true_adv[: max(half, self.keys - len(false_adv))]
        take_f = false_adv[: self.keys - len(take_t)]
        pick = np.concatenate([take_t, take_f])
        kx, ky = adv[pick], y[right][pick]
        xs = np.concatenate([x, *([kx] * self.repeat)])
        ys = np.concatenate([y, *([ky] * self.repeat)])
        fine_tune(model, xs, ys, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=ctx.seed)
        return model
