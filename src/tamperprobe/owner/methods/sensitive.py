"""VerIDeep's sensitive samples: natural inputs nudged to maximise the output's weight sensitivity.

Each candidate starts from a natural seed ``v0`` drawn from the data and climbs
``S(v) = sum_i ||d f_i / dW||_F^2`` (``tamperprobe.owner.sensitivity``) by projected gradient
ascent with Adam, batched over the bag. After every step each sample is projected onto the
ball ``||v - v0||_2 <= epsilon * ||v0||_2`` and then clipped into the box ``[low, high]``.
Since ``v0`` lies in the box and clipping is a non-expansive projection fixing ``v0``, the
clipped point stays in the ball: one pass satisfies both constraints (a last rescale guards
against rounding). Each sample keeps its best iterate, so its sensitivity never falls below
the seed's.

**Absolute ball** (``rms``): the radius above scales with the seed, so a dark image may barely
move while a bright one moves far. With ``rms`` set, every sample gets the same ball instead,
``||v - v0||_2 <= rms * (high - low) * sqrt(n)`` for ``n`` input values: an RMS distance to the
seed of at most ``rms`` times the input range (``epsilon`` is then unused; giving both is a usage
error). The authors' code
uses this form with radius 10 on the 0–255 scale, i.e. ``rms = 10/255``.

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
1e-3 for 1,000 iterations, no early stopping (``patience=0``), W = the weight matrix of the last
layer alone (its bias excluded, as in the authors' code, which differentiates ``fc8.weight``),
and the authors' code's ball, ``rms=10/255`` (radius 10 on the 0–255 scale; the paper's text
was not available to check its CIFAR-10 value). A preset replaces the defaults of the
parameters it sets; giving one of them another value as well is a usage error.
``bench/verideep_table6.py`` measures each of these settings against the defaults on a
pretrained CIFAR-10 ResNet-56 (``bench/results/verideep-table6.md``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..._params import Interval, Options
from ..._util import Progress
from ...data import Dataset
from ...errors import UsageError
from ...models import Model
from ..markers import sample_indices
from ..sensitivity import AUTOCASTS, OUTPUTS, Autocast, Output, Sensitivity, resolve_params
from .base import Bag, Method

#: Parameter values each preset sets (``Configurable.presets``; its W is chosen in ``_weights``).
PRESETS: dict[str, dict[str, Any]] = {
    "verideep": {"lr": 1e-3, "steps": 1000, "patience": 0, "rms": 10 / 255},
}

_BETAS = (0.9, 0.999)  # Adam's defaults (Kingma & Ba), as torch.optim.Adam
_ADAM_EPS = 1e-8
#: Steps between two early-stopping checks (each reads one value back from the device).
CHECK_EVERY = 4


class SensitiveSamples(Method):
    """VerIDeep Sensitive-Samples: natural inputs moved by projected ascent on the weight sensitivity ‖∂f/∂W‖².

    Hyper-parameters: ``epsilon`` (relative L2 radius around the seed), ``rms`` (an absolute
    radius instead: the RMS distance to the seed as a share of the input range), ``lr`` (Adam),
    ``steps``, ``patience`` and ``min_delta`` (per-sample early stopping; ``patience=0``: none),
    ``output`` (``softmax`` or ``logits``), ``params`` (the weights W; default the last
    layer's weight and bias), ``autocast`` (``bf16``: the network in bfloat16 during the
    ascent) and ``preset`` (``verideep``: the paper's settings, see the module doc).
    """

    name = "sensitive"
    needs_weights = True
    constraints = {
        "epsilon": Interval(0.0, None),
        "rms": Interval(0.0, None),
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
        rms: float | None = None,
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
        self.rms = rms
        self.lr = lr
        self.steps = steps
        self.patience = patience
        self.min_delta = min_delta
        self.output = output
        self.params = params
        self.autocast = autocast
        self.preset = preset

    def _check_together(self, params: dict[str, Any]) -> None:
        """``epsilon`` and ``rms`` are two radii of the same ball: giving both is ambiguous."""
        if params["rms"] is not None and params["epsilon"] != self.defaults()["epsilon"]:
            raise UsageError(
                f"epsilon={params['epsilon']} and rms={params['rms']:.4g} are two radii for the same ball: give one (rms wins otherwise)"
            )

    def _weights(self, model: Model) -> list[str]:
        """The parameter names of W: ``params``, else the last layer's (its weight alone under the verideep preset)."""
        names = resolve_params(model.module, self.params)
        if self.preset == "verideep" and self.params is None:
            names = names[:1]
        return names

    def _generate(self, model: Model, data: Dataset, bag: int, rng: np.random.Generator, progress: Progress) -> Bag:
        """``bag`` sensitive samples grown from natural seeds of ``data``."""
        names = self._weights(model)
        route = self._route(model, names)
        idx = sample_indices(len(data), bag, rng)
        seeds = np.ascontiguousarray(data.x[idx], dtype=np.float32)
        x0 = torch.from_numpy(seeds.copy()).to(model.device)  # the whole ascent runs where the model does
        with route.session():
            s_seed, best_s, best_x, ran = self._ascend(route, x0, float(data.low), float(data.high), progress)
            if self.autocast is not None:  # record the sensitivities in the model's own precision
                s_seed, _ = route.value_and_grad(x0)
                best_s, _ = route.value_and_grad(best_x)
                worse = best_s < s_seed
                best_x[worse], best_s[worse] = x0[worse], s_seed[worse]
        return Bag(
            inputs=best_x.cpu().numpy().astype(np.float32),
            seeds=seeds,
            info={
                "sensitivity_seed": s_seed.cpu().numpy().astype(np.float64),
                "sensitivity": best_s.cpu().numpy().astype(np.float64),
                "ascent_steps": ran.cpu().numpy(),
                "steps": int(ran.max()) if len(ran) else 0,
                "params": list(names),
            },
        )

    def _ascend(
        self, route: Sensitivity, x0: torch.Tensor, low: float, high: float, progress: Progress
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batched ascent from ``x0``: the seeds' S, each sample's best S and iterate, and its number of steps.

        A step is S and dS/dx (one forward and one backward pass), Adam, the projection and a
        few ops of bookkeeping; on a tiny network the last three are a fixed cost comparable to
        the passes, so they are written as few tensor ops as possible, and the loop reads no
        value back to Python except the projection's rare rounding fix-up. With early stopping,
        a sample that stalls is *frozen* (its best no longer changes, its step count stops)
        and the frozen ones leave the batch at the next check, every ``CHECK_EVERY`` steps: the
        result is that of leaving at once, without a host sync every step.
        """
        bag = x0.shape[0]
        s_seed, grad = route.value_and_grad(x0, autocast=self.autocast)
        best_s, best_x = s_seed.clone(), x0.clone()
        ran = torch.zeros(bag, dtype=torch.int64, device=x0.device)  # steps each sample took before it left
        # the samples still in the batch, compacted: rows of the bag, iterate, best so far, Adam's moments, stall count
        rows = torch.arange(bag, device=x0.device)
        origin = x0.double().reshape(bag, -1)
        if self.rms is not None:  # the same ball for every seed (see the module doc)
            radius = torch.full((bag,), self.rms * (high - low) * origin.shape[1] ** 0.5, dtype=torch.float64)
        else:
            radius = self.epsilon * origin.norm(dim=1)
        x, top_x, top_s = x0.clone(), x0.clone(), s_seed.clone()
        m1, m2 = torch.zeros_like(x), torch.zeros_like(x)
        stall, taken = torch.zeros_like(ran), torch.zeros_like(ran)  # stall == patience: frozen
        rows_shape = (-1,) + (1,) * (x.dim() - 1)
        done = 0
        for step in range(1, self.steps + 1):
            if len(rows) == 0:
                break
            done = step
            x = _project(self._adam(x, m1, m2, grad, step), origin, radius, low, high)
            s, grad = route.value_and_grad(x, autocast=self.autocast)
            better = s > top_s
            if self.patience:
                climbing = stall < self.patience
                better &= climbing
                improved = s > top_s * (1 + self.min_delta) + 1e-300
                stall = torch.where(climbing, torch.where(improved, 0, stall + 1), stall)
                taken += climbing
            top_s = torch.where(better, s, top_s)
            top_x = torch.where(better.reshape(rows_shape), x, top_x)
            progress(step, self.steps)
            if self.patience and step % CHECK_EVERY == 0:
                keep = stall < self.patience
                if not bool(keep.all()):  # the frozen samples leave with their best iterate
                    gone = rows[~keep]
                    best_s[gone], best_x[gone], ran[gone] = top_s[~keep], top_x[~keep], taken[~keep]
                    rows, x, top_x, top_s, m1, m2, stall, taken, grad = (t[keep] for t in (rows, x, top_x, top_s, m1, m2, stall, taken, grad))
                    origin, radius = origin[keep], radius[keep]
        best_s[rows], best_x[rows], ran[rows] = top_s, top_x, taken if self.patience else done
        if done < self.steps:
            progress(self.steps, self.steps)
        return s_seed, best_s, best_x, ran

    def _route(self, model: Model, names: list[str]) -> Sensitivity:
        """The objective the ascent climbs: S over ``names``. A subclass can climb another objective with the same ``value_and_grad``."""
        return Sensitivity(model, names, self.output)

    def _adam(self, x: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, grad: torch.Tensor, step: int) -> torch.Tensor:
        """One Adam ascent step, as ``torch.optim.Adam(maximize=True)``; updates the moments in place."""
        b1, b2 = _BETAS
        m1.mul_(b1).add_(grad, alpha=1 - b1)
        m2.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = m2.sqrt().div_((1 - b2**step) ** 0.5).add_(_ADAM_EPS)
        return x.addcdiv(m1, denom, value=self.lr / (1 - b1**step))


def _project(v: torch.Tensor, origin: torch.Tensor, radius: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``v`` onto the ε-balls around the seeds ``origin`` (float64, flattened), then into the box; float32.

    Exact up to float32 rounding; when that rounding pushes a sample out of its ball (rare),
    the sample is pulled slightly inwards. Mixed float32 - float64 subtractions promote
    without a separate cast.
    """
    d = v.reshape(origin.shape) - origin
    shrink = (radius / d.norm(dim=1).clamp_min(1e-300)).clamp(max=1.0)
    out = (origin + d * shrink[:, None]).clamp(low, high).float()
    d = out - origin
    norm = d.norm(dim=1)
    over = norm > radius
    if over.any():  # float32 rounding pushed a sample out: pull it slightly inwards
        scale = radius / norm.clamp_min(1e-300) * (1 - 1e-6)
        fixed = (origin + d * scale[:, None]).clamp(low, high).float()
        out = torch.where(over[:, None], fixed, out)
    return out.reshape(v.shape)
