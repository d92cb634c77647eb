"""Random weight noise (VerIDeep's perturbation attack; weight-only, works on any module)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .._params import Interval
from ..errors import UsageError
from .base import Attack, Context, float_parameters


class Noise(Attack):
    """Gaussian noise on a random fraction of the weights.

    A share ``fraction`` (0.001, at least one entry) of all floating-point parameter entries,
    drawn with the seed, gets Gaussian noise N(0, sigma^2): ``sigma`` (0.01) is absolute, or with
    ``relative=true`` a multiple of each tensor's standard deviation.
    """

    name = "noise"
    random = True
    constraints: ClassVar[dict[str, Any]] = {
        "fraction": Interval(0, 1, closed="right"),
        "sigma": Interval(0, None, closed="neither"),
    }

    def __init__(self, *, fraction: float = 0.001, sigma: float = 0.01, relative: bool = False) -> None:
        self.fraction = fraction
        self.sigma = sigma
        self.relative = relative

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        params = [t for _, t in float_parameters(model)]
        total = sum(t.numel() for t in params)
        if total == 0:
            raise UsageError("the model has no floating-point parameters")
        k = min(total, max(1, int(round(self.fraction * total))))
        gen = torch.Generator().manual_seed(int(ctx.seed))  # drawn on the CPU: the same noise whatever the model's device
        picked = torch.randperm(total, generator=gen, device="cpu")[:k].sort().values
        noise = torch.randn(k, generator=gen, dtype=torch.float64, device="cpu")
        start = 0
        with torch.no_grad():
            for t in params:
                lo, hi = start, start + t.numel()
                sel = (picked >= lo) & (picked < hi)
                if sel.any():
                    scale = self.sigma
                    if self.relative:
                        std = float(t.float().std()) if t.numel() > 1 else float(t.abs().max())
                        scale = self.sigma * (std if std > 0 else 1.0)
                    flat = t.view(-1)
                    pos = (picked[sel] - lo).to(t.device)  # drawn on the CPU: the same noise on every device
                    flat[pos] = flat[pos] + (noise[sel] * scale).to(t.device, t.dtype)
                start = hi
        return model
