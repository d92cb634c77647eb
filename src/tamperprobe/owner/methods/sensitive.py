"""VerIDeep's sensitive samples: natural inputs nudged to maximise the output's weight sensitivity.

Each candidate starts from a natural seed ``v0`` drawn from the data and climbs
``S(v) = sum_i ||d f_i / dW||_F^2`` (``tamperprobe.owner.sensitivity``) by projected gradient
ascent with Adam, batched over the bag. After every step each sample is projected onto the
ball ``||v - v0||_2 <= epsilon * ||v0||_2`` and then clipped into the box ``[low, high]``.
Since ``v0`` lies in the box and clipping is a non-expansive projection fixing ``v0``, the
clipped point stays in the ball: one pass satisfies both constraints (a last rescale guards
against rounding). Each sample keeps its best iterate, so its sensitivity never falls below
the seed's.

**Per-sample convergence.** A sample whose best sensitivity has not risen by a factor
``1 + min_delta`` for ``patience`` steps leaves the batch (its best iterate is kept); the
ascent ends when every sample has left or after ``steps`` steps. Adam acts element-wise and
S of one sample does not depend on the others, so leaving changes no other sample's path.
``patience=0`` turns early stopping off.

**bfloat16** (``autocast="bf16"``): the network runs under bfloat16 autocast during the ascent
(the probability terms stay float64). The recorded sensitivities are then recomputed in the
model's own precision, and a sample whose best bfloat16 iterate is not above its seed in that
precision falls back to the seed. Markers and recorded logits are float32 either way.

**Preset** ``preset="verideep"``: the settings of VerIDeep (He et al.): Adam with learning rate
1e-3 for 1,000 iterations, no early stopping (``patience=0``), and W = the weight matrix of
the last layer alone (its bias excluded, as in the authors' code, which differentiates
``fc8.weight``). The preset does not set ``epsilon``. A preset replaces the defaults of the
parameters it sets; giving one of them another value as well is a usage error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..._params import Interval, Options
from ..._util import Progress
from ...data import Dataset
from ...models import Model
from ..markers import sample_indices
from ..sensitivity import AUTOCASTS, OUTPUTS, Autocast, Output, resolve_params, sensitivity_and_grad
from .base import Bag, Method

#: Parameter values each preset sets (``Configurable.presets``; its W is chosen in ``_weights``).
PRESETS: dict[str, dict[str, Any]] = {
    "verideep": {"lr": 1e-3, "steps": 1000, "patience": 0},
}

_BETAS = (0.9, 0.999)  # Adam's defaults (Kingma & Ba), as torch.optim.Adam
_ADAM_EPS = 1e-8


class SensitiveSamples(Method):
    """VerIDeep Sensitive-Samples: natural inputs moved by projected ascent on the weight sensitivity ‖∂f/∂W‖².

    Hyper-parameters: ``epsilon`` (relative L2 radius around the seed), ``lr`` (Adam),
    ``steps``, ``patience`` and ``min_delta`` (per-sample early stopping; ``patience=0``: none),
    ``output`` (``softmax`` or ``logits``), ``params`` (the weights W; default the last
    layer's weight and bias), ``autocast`` (``bf16``: the network in bfloat16 during the
    ascent) and ``preset`` (``verideep``: the paper's settings, see the module doc).
    """

    name = "sensitive"
    needs_weights = True
    constraints = {
        "epsilon": Interval(0.0, None),
        "lr": Interval(0.0, None, closed="neither"),
        "steps": Interval(0, None, integer=True),
        "patience": Interval(0, None, integer=True),
        "min_delta": Interval(0.0, None),
        "output": Options(*OUTPUTS),
        "autocast": Options(*AUTOCASTS),
        "preset": Options(*PRESETS),
    }
    presets = PRESETS

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
        autocast: Autocast | None = None,
        preset: str | None = None,
    ) -> None:
        self.epsilon = epsilon
        self.lr = lr
        self.steps = steps
        self.patience = patience
        self.min_delta = min_delta
        self.output = output
        self.params = params
        self.autocast = autocast
        self.preset = preset

    def _weights(self, model: Model) -> list[str]:
        """The parameter names of W: ``params``, else the last layer's (its weight alone under the verideep preset)."""
        names = resolve_params(model.module, self.params)
        if self.preset == "verideep" and self.params is None:
            names = names[:1]
        return names

    def _generate(self, model: Model, data: Dataset, bag: int, rng: np.random.Generator, progress: Progress) -> Bag:
        """``bag`` sensitive samples grown from natural seeds of ``data``."""
        names = self._weights(model)
        idx = sample_indices(len(data), bag, rng)
        seeds = np.ascontiguousarray(data.x[idx], dtype=np.float32)
        x0 = torch.from_numpy(seeds.copy())
        x0_flat = x0.double().reshape(bag, -1)
        radius = self.epsilon * x0_flat.norm(dim=1)
        low, high = float(data.low), float(data.high)

        def project(v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            """Rows ``rows`` onto the ε-ball around their seeds, then into the box; exact up to float32 rounding."""
            origin, r = x0_flat[rows], radius[rows]
            d = v.double().reshape(len(rows), -1) - origin
            norm = d.norm(dim=1)
            shrink = torch.where(norm > r, r / norm.clamp_min(1e-300), torch.ones_like(norm))
            out = (origin + d * shrink[:, None]).clamp(low, high).float()
            over = (out.double() - origin).norm(dim=1) > r
            if over.any():  # float32 rounding pushed a sample out: pull it slightly inwards
                d = out.double() - origin
                scale = r / d.norm(dim=1).clamp_min(1e-300) * (1 - 1e-6)
                fixed = (origin + d * scale[:, None]).clamp(low, high).float()
                out = torch.where(over[:, None], fixed, out)
            return out.reshape(v.shape)

        def evaluate(v: torch.Tensor, autocast: Autocast | None) -> tuple[torch.Tensor, torch.Tensor]:
            return sensitivity_and_grad(model, v, names, self.output, autocast=autocast)

        s_seed, grad = evaluate(x0, self.autocast)
        best_s, best_x = s_seed.clone(), x0.clone()
        x = x0.clone()
        m1, m2 = torch.zeros_like(x), torch.zeros_like(x)  # Adam's moments
        stall = torch.zeros(bag, dtype=torch.int64)
        ran = torch.zeros(bag, dtype=torch.int64)  # steps each sample took before it left
        active = torch.arange(bag)
        done = 0
        for step in range(1, self.steps + 1):
            if len(active) == 0:
                break
            xa = self._adam(x[active], m1, m2, active, grad, step)
            x[active] = project(xa, active)
            s, grad = evaluate(x[active], self.autocast)
            better = s > best_s[active]
            improved = s > best_s[active] * (1 + self.min_delta) + 1e-300
            best_s[active] = torch.where(better, s, best_s[active])
            best_x[active[better]] = x[active[better]]
            stall[active] = torch.where(improved, torch.zeros_like(stall[active]), stall[active] + 1)
            ran[active] = step
            done = step
            progress(step, self.steps)
            if self.patience:
                keep = stall[active] < self.patience
                active, grad = active[keep], grad[keep]
        if done < self.steps:
            progress(self.steps, self.steps)
        if self.autocast is not None:  # record the sensitivities in the model's own precision
            s_seed, _ = evaluate(x0, None)
            best_s, _ = evaluate(best_x, None)
            worse = best_s < s_seed
            best_x[worse], best_s[worse] = x0[worse], s_seed[worse]
        return Bag(
            inputs=best_x.numpy().astype(np.float32),
            seeds=seeds,
            info={
                "sensitivity_seed": s_seed.numpy().astype(np.float64),
                "sensitivity": best_s.numpy().astype(np.float64),
                "ascent_steps": ran.numpy(),
                "steps": done,
                "params": list(names),
            },
        )

    def _adam(self, x: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, step: int) -> torch.Tensor:
        """One Adam ascent step (as ``torch.optim.Adam(maximize=True)``) on ``rows``; updates their moments in place."""
        b1, b2 = _BETAS
        m1[rows] = b1 * m1[rows] + (1 - b1) * grad
        m2[rows] = b2 * m2[rows] + (1 - b2) * grad * grad
        denom = (m2[rows].sqrt() / (1 - b2**step) ** 0.5) + _ADAM_EPS
        return x + (self.lr / (1 - b1**step)) * m1[rows] / denom
