"""Fine-tuning attacks: plain fine-tuning and frontier-stitching watermarking.

``finetune``: ``n`` (300) training samples drawn with the seed, ``epochs`` (3) of Adam at
``lr`` (1e-4).
``watermark`` (Le Merrer et al. 2017, adversarial frontier stitching): FGSM examples of
``keys`` (100) correctly classified training samples at step ``eps`` (default 0.15 of the
input range), half "true adversaries" (now misclassified) and half "false adversaries"
(still right) where available, all labelled with their ORIGINAL class; the model is
fine-tuned on the clean training data plus the keys repeated ``repeat`` (4) times.
Both work on TorchScript and torch.export modules as well (gradients flow through them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from .base import Attack, Context, Driver, fit, keep_modes, labelled, predict, register, rng_for


@register
class Finetune(Attack):
    name = "finetune"
    summary = "fine-tune on a few training samples with a small learning rate"
    defaults = {"n": 300, "epochs": 3, "lr": 1e-4, "batch_size": 32}
    needs_data = True
    random = True

    def apply(self, model: nn.Module, ctx: Context, p: dict[str, Any]) -> nn.Module:
        x, y = labelled(ctx.train)
        n = int(p["n"])
        if n < 1:
            raise UsageError(f"finetune needs n >= 1 samples, got {n}")
        idx = rng_for(ctx.seed, 4).permutation(len(x))[:n]
        fit(model, x[idx], y[idx], p, ctx.seed)
        return model


def fgsm(model: nn.Module, x: np.ndarray, y: np.ndarray, eps: float, low: float, high: float) -> np.ndarray:
    drv = Driver(model)
    with keep_modes(model):
        drv.eval()
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).requires_grad_(True)
        loss = nn.functional.cross_entropy(drv(xt), torch.from_numpy(np.asarray(y, dtype=np.int64)))
        (grad,) = torch.autograd.grad(loss, xt)
    return (xt.detach() + eps * grad.sign()).clamp(low, high).numpy()


@register
class Watermark(Attack):
    name = "watermark"
    summary = "frontier stitching: fine-tune on FGSM examples relabelled to their original class plus clean data"
    defaults = {"keys": 100, "eps": None, "repeat": 4, "epochs": 3, "lr": 1e-4, "batch_size": 64}
    needs_data = True
    random = True

    def apply(self, model: nn.Module, ctx: Context, p: dict[str, Any]) -> nn.Module:
        ds = ctx.train
        x, y = labelled(ds)
        span = float(ds.high - ds.low)
        eps = p["eps"] = 0.15 * span if p["eps"] is None else float(p["eps"])
        keys = int(p["keys"])
        if keys < 1 or eps <= 0:
            raise UsageError("watermark needs keys >= 1 and eps > 0")
        order = rng_for(ctx.seed, 5).permutation(len(x))
        right = order[predict(model, x[order]) == y[order]]
        if len(right) == 0:
            raise UsageError("the model classifies no training sample correctly; nothing to stitch")
        adv = fgsm(model, x[right], y[right], eps, ds.low, ds.high)
        flipped = predict(model, adv) != y[right]
        true_adv, false_adv = np.flatnonzero(flipped), np.flatnonzero(~flipped)
        half = keys // 2
        take_t = true_adv[: max(half, keys - len(false_adv))]
        take_f = false_adv[: keys - len(take_t)]
        pick = np.concatenate([take_t, take_f])
        kx, ky = adv[pick], y[right][pick]
        reps = max(1, int(p["repeat"]))
        xs = np.concatenate([x, *([kx] * reps)])
        ys = np.concatenate([y, *([ky] * reps)])
        fit(model, xs, ys, p, ctx.seed)
        return model
