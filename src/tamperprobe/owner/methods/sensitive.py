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

import numpy as np
import torch

from ..._params import Interval, Options
from ..._util import Progress
from ...data import Dataset
from ...models import Model
from ..markers import sample_indices
from ..sensitivity import OUTPUTS, Output, resolve_params, sensitivity
from .base import Bag, Method


class SensitiveSamples(Method):
    """VerIDeep Sensitive-Samples: natural inputs moved by projected ascent on the weight sensitivity ‖∂f/∂W‖².

    Hyper-parameters: ``epsilon`` (relative L2 radius around the seed), ``lr``, ``steps``,
    ``patience`` and ``min_delta`` (early stopping on the mean best sensitivity), ``output``
    (``softmax`` or ``logits``) and ``params`` (the weights W; default the last layer's).
    """

    name = "sensitive"
    needs_weights = True
    constraints = {
        "epsilon": Interval(0.0, None),
        "lr": Interval(0.0, None, closed="neither"),
        "steps": Interval(0, None, integer=True),
        "patience": Interval(1, None, integer=True),
        "min_delta": Interval(0.0, None),
        "output": Options(*OUTPUTS),
    }

    def __init__(
        self,
        *,
        epsilon: float = 0.1,
        lr: float = 0.01,
        steps: int = 200,
        patience: int = 20,
        min_delta: float = 1e-4,
        output: Output = "softmax",
        params: list[str] | None = None,
    ) -> None:
        self.epsilon = epsilon
        self.lr = lr
        self.steps = steps
        self.patience = patience
        self.min_delta = min_delta
        self.output = output
        self.params = params

    def _generate(self, model: Model, data: Dataset, bag: int, rng: np.random.Generator, progress: Progress) -> Bag:
        """``bag`` sensitive samples grown from natural seeds of ``data``."""
        names = resolve_params(model.module, self.params)
        idx = sample_indices(len(data), bag, rng)
        seeds = np.ascontiguousarray(data.x[idx], dtype=np.float32)
        x0 = torch.from_numpy(seeds.copy())
        x0_64 = x0.double()
        radius = self.epsilon * x0_64.reshape(bag, -1).norm(dim=1)
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
            s = sensitivity(model, v, names, self.output)
            (grad,) = torch.autograd.grad(s.sum(), v)
            return s.detach(), grad

        x = x0.clone()
        s_seed, grad = evaluate(x)
        best_s, best_x = s_seed.clone(), x.clone()
        var = x.clone().requires_grad_(True)
        opt = torch.optim.Adam([var], lr=self.lr, maximize=True)
        best_mean = float(best_s.mean())
        stall, done = 0, 0
        for step in range(1, self.steps + 1):
            var.grad = grad
            opt.step()
            with torch.no_grad():
                var.copy_(project(var))
            s, grad = evaluate(var)
            better = s > best_s
            best_s = torch.where(better, s, best_s)
            best_x[better] = var.detach()[better]
            done = step
            progress(step, self.steps)
            mean = float(best_s.mean())
            if mean > best_mean * (1 + self.min_delta) + 1e-30:
                best_mean, stall = mean, 0
            else:
                stall += 1
                if stall >= self.patience:
                    break
        if done < self.steps:
            progress(self.steps, self.steps)
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
