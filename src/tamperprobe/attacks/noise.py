"""Random weight noise (VerIDeep's perturbation attack; weight-only, works on any module).

A share ``fraction`` (0.001, at least one entry) of all floating-point parameter entries,
drawn with the seed, gets Gaussian noise N(0, sigma^2): ``sigma`` (0.01) is absolute, or with
``relative=true`` a multiple of each tensor's standard deviation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from .base import Attack, Context, float_parameters, register


@register
class Noise(Attack):
    name = "noise"
    summary = "Gaussian noise on a random fraction of the weights"
    defaults = {"fraction": 0.001, "sigma": 0.01, "relative": False}
    random = True

    def apply(self, model: nn.Module, ctx: Context, p: dict[str, Any]) -> nn.Module:
        fraction, sigma = float(p["fraction"]), float(p["sigma"])
        if not 0.0 < fraction <= 1.0 or sigma <= 0:
            raise UsageError("noise needs 0 < fraction <= 1 and sigma > 0")
        params = [t for _, t in float_parameters(model)]
        total = sum(t.numel() for t in params)
        if total == 0:
            raise UsageError("the model has no floating-point parameters")
        k = min(total, max(1, int(round(fraction * total))))
        gen = torch.Generator().manual_seed(int(ctx.seed))
        picked = torch.randperm(total, generator=gen)[:k].sort().values
        noise = torch.randn(k, generator=gen, dtype=torch.float64)
        start = 0
        with torch.no_grad():
            for t in params:
                lo, hi = start, start + t.numel()
                sel = (picked >= lo) & (picked < hi)
                if sel.any():
                    scale = sigma
                    if p["relative"]:
                        std = float(t.float().std()) if t.numel() > 1 else float(t.abs().max())
                        scale = sigma * (std if std > 0 else 1.0)
                    flat = t.view(-1)
                    pos = picked[sel] - lo
                    flat[pos] = flat[pos] + (noise[sel] * scale).to(t.dtype)
                start = hi
        return model
