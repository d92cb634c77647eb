"""VerIDeep's sensitive samples: natural inputs nudged to maximise the output's weight sensitivity.

Each candidate starts from a natural seed ``v0`` drawn from the data and climbs
``S(v) = sum_i ||d f_i / dW||_F^2`` (``tamperprobe.owner.sensitivity``) by projected gradient
ascent with Adam, batched over the whole bag. After every step each sample is projected
onto the ball ``||v - v0||_2 <= epsilon * ||v0||_2`` and then clipped into the box
``[low, high]``. Since ``v0`` lies in the box and clipping is a non-expansive projection
fixing ``v0``, the clipped point stays in the ball: one pass satisfies both constraints (a
last rescale guards against rounding). Each sample keeps its best iterate, so its
sensitivity never falls below the seed's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...data import Dataset
from ...errors import UsageError
from ...models import Model
from ..sensitivity import OUTPUTS, resolve_params, sensitivity
from .base import Bag, Method, Progress


class SensitiveSamples(Method):
    """Projected gradient ascent on the weight sensitivity (VerIDeep, owner side)."""

    name = "sensitive"

    def __init__(
        self,
        *,
        epsilon: float = 0.1,
        lr: float = 0.01,
        steps: int = 200,
        patience: int = 20,
        min_delta: float = 1e-4,
        output: str = "softmax",
        params: list[str] | None = None,
    ) -> None:
        if not epsilon >= 0:
            raise UsageError(f"epsilon must be >= 0, got {epsilon}")
        if not lr > 0:
            raise UsageError(f"lr must be > 0, got {lr}")
        if int(steps) != steps or steps < 0:
            raise UsageError(f"steps must be a whole number >= 0, got {steps}")
        if int(patience) != patience or patience < 1:
            raise UsageError(f"patience must be a whole number >= 1, got {patience}")
        if not min_delta >= 0:
            raise UsageError(f"min_delta must be >= 0, got {min_delta}")
        if output not in OUTPUTS:
            raise UsageError(f"unknown output {output!r}: choose softmax or logits")
        if isinstance(params, str):
            params = [p for p in params.split(",") if p]
        super().__init__(
            epsilon=float(epsilon),
            lr=float(lr),
            steps=int(steps),
            patience=int(patience),
            min_delta=float(min_delta),
            output=output,
            params=None if params is None else [str(p) for p in params],
        )

    def generate(self, model: Model, data: Dataset, bag: int, rng: np.random.Generator, progress: Progress | None = None) -> Bag:
        """Return ``bag`` sensitive samples grown from natural seeds of ``data``."""
        p: dict[str, Any] = self._params
        module = model.require_torch("the sensitive method")
        if bag < 1:
            raise UsageError(f"the bag size must be at least 1, got {bag}")
        if len(data) == 0:
            raise UsageError(f"data set {data.name} is empty")
        names = resolve_params(module, p["params"])
        idx = rng.choice(len(data), size=bag, replace=bag > len(data))
        seeds = np.ascontiguousarray(data.x[idx], dtype=np.float32)
        x0 = torch.from_numpy(seeds.copy())
        x0_64 = x0.double()
        radius = p["epsilon"] * x0_64.reshape(bag, -1).norm(dim=1)
        low, high = float(data.low), float(data.high)

        def project(v: torch.Tensor) -> torch.Tensor:
            """Onto the ε-ball around the seed, then into the box; exact up to float32 rounding."""
            d = (v.double() - x0_64).reshape(bag, -1)
            norm = d.norm(dim=1)
            shrink = torch.where(norm > radius, radius / norm.clamp_min(1e-300), torch.ones_like(norm))
            out = (x0_64.reshape(bag, -1) + d * shrink[:, None]).clamp(low, high).float()
            over = (out.double() - x0_64.reshape(bag, -1)).norm(dim=1) > radius
            if over.any():  # float32 rounding pushed a sample out: pull it slightly inwards
                d = out.double() - x0_64.reshape(bag, -1)
                scale = radius / d.norm(dim=1).clamp_min(1e-300) * (1 - 1e-6)
                fixed = (x0_64.reshape(bag, -1) + d * scale[:, None]).clamp(low, high).float()
                out = torch.where(over[:, None], fixed, out)
            return out.reshape(v.shape)

        def evaluate(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            v = v.detach().requires_grad_(True)
            s = sensitivity(model, v, names, p["output"])
            (grad,) = torch.autograd.grad(s.sum(), v)
            return s.detach(), grad

        x = x0.clone()
        s_seed, grad = evaluate(x)
        best_s, best_x = s_seed.clone(), x.clone()
        var = x.clone().requires_grad_(True)
        opt = torch.optim.Adam([var], lr=p["lr"], maximize=True)
        best_mean = float(best_s.mean())
        stall, done = 0, 0
        for step in range(1, p["steps"] + 1):
            var.grad = grad
            opt.step()
            with torch.no_grad():
                var.copy_(project(var))
            s, grad = evaluate(var)
            better = s > best_s
            best_s = torch.where(better, s, best_s)
            best_x[better] = var.detach()[better]
            done = step
            if progress is not None:
                progress(step, p["steps"])
            mean = float(best_s.mean())
            if mean > best_mean * (1 + p["min_delta"]) + 1e-30:
                best_mean, stall = mean, 0
            else:
                stall += 1
                if stall >= p["patience"]:
                    break
        if progress is not None and done < p["steps"]:
            progress(p["steps"], p["steps"])
        return Bag(
            inputs=best_x.numpy().astype(np.float32),
            seeds=seeds,
            info={
                "sensitivity_seed": s_seed.numpy().astype(np.float64),
                "sensitivity": best_s.numpy().astype(np.float64),
                "steps": done,
                "params": list(names),
            },
        )
