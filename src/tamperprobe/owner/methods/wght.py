"""TamperNN's WGHT markers: inputs whose top-1 label flips under a small random change of every weight.

Algorithm (Merrer & Trédan, TamperNN 2019, "weight-perturbation" markers):

1. Draw a pool of candidate inputs (``source``: ``natural`` data samples, ``random`` uniform
   inputs in [low, high], or ``mixed``, half of each) and record their intact top-1 labels.
2. For ε = ``eps_start``, ``eps_start·eps_factor``, … up to ``eps_max``: add ``ε·s`` to every
   parameter, ``s`` a fresh random sign (±1) per scalar (``relative=True``: ``ε·s·|w|``),
   ``draws`` times per level; every candidate whose top-1 label changes becomes a marker,
   tagged with that ε and the seed of the sign pattern.
3. Stop as soon as ``bag`` markers are found (a random subset of the last level's flips fills the
   bag). Fewer than ``bag`` are returned when even ``eps_max`` does not flip enough.

``perturb_weights(module, epsilon, seed)`` reproduces the exact perturbation of a marker from
``info["epsilon"]`` and ``info["perturbation_seed"]``. Flips are judged with ``model.logits``
at its default batch size, the path verification uses.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..._params import Interval, Options
from ..._util import Progress
from ...data import Dataset
from ...errors import UsageError
from ...models import Model
from ..markers import sample_indices
from .base import Bag, Method

SOURCES = ("natural", "random", "mixed")


@contextmanager
def perturb_weights(module: Any, epsilon: float, seed: int, *, relative: bool = False) -> Iterator[None]:
    """Add ``epsilon * sign`` (random ±1 from ``seed``) to every parameter of ``module``; restore on exit.

    Parameters are visited in sorted name order and the signs drawn from
    ``numpy.random.default_rng(seed)``, so the same (epsilon, seed) always gives the same weights.
    The original values are restored bit-exactly.
    """
    import torch

    rng = np.random.default_rng(int(seed))
    params = sorted(module.named_parameters(), key=lambda kv: kv[0])
    saved = [p.detach().clone() for _, p in params]
    try:
        with torch.no_grad():
            for _, p in params:
                sign = (rng.integers(0, 2, size=tuple(p.shape)) * 2 - 1).astype(np.float32)
                delta = torch.from_numpy(sign).to(p.device, p.dtype) * float(epsilon)
                if relative:
                    delta = delta * p.detach().abs()
                p.add_(delta)
        yield
    finally:
        with torch.no_grad():
            for (_, p), old in zip(params, saved):
                p.copy_(old)


class Wght(Method):
    """TamperNN WGHT: inputs whose label flips under a random ±ε change of every weight."""

    name = "wght"
    needs_weights = True
    constraints = {
        "source": Options(*SOURCES),
        "candidates": Interval(0, None, integer=True),
        "eps_start": Interval(0.0, None, closed="neither"),
        "eps_factor": Interval(1.0, None, closed="neither"),
        "eps_max": Interval(0.0, None, closed="neither"),
        "draws": Interval(1, None, integer=True),
    }

    def __init__(
        self,
        *,
        source: str = "natural",
        candidates: int = 0,
        eps_start: float = 1e-4,
        eps_factor: float = 2.0,
        eps_max: float = 1.0,
        draws: int = 1,
        relative: bool = False,
    ) -> None:
        self.source = source
        self.candidates = candidates
        self.eps_start = eps_start
        self.eps_factor = eps_factor
        self.eps_max = eps_max
        self.draws = draws
        self.relative = relative

    def _check_together(self, params: dict[str, Any]) -> None:
        if params["eps_max"] < params["eps_start"]:
            raise UsageError(f"need eps_start <= eps_max, got {params['eps_start']} and {params['eps_max']}")

    def _pool(self, data: Dataset, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n_rand = {"natural": 0, "random": n, "mixed": n // 2}[self.source]
        n_nat = n - n_rand
        parts, index = [], []
        if n_nat:
            idx = sample_indices(len(data.x), min(n_nat, len(data.x)), rng)
            parts.append(data.x[idx].astype(np.float32))
            index.append(idx)
        if n_rand:
            r = rng.uniform(data.low, data.high, size=(n_rand, *data.x.shape[1:]))
            parts.append(np.clip(r, data.low, data.high).astype(np.float32))
            index.append(np.full(n_rand, -1, dtype=np.int64))
        return np.concatenate(parts), np.concatenate(index)

    def _generate(self, model: Model, data: Dataset, bag: int, rng: np.random.Generator, progress: Progress) -> Bag:
        n = self.candidates or max(8 * bag, 512)
        x, index = self._pool(data, n, rng)
        base = model.logits(x).argmax(axis=1)
        n = len(x)
        eps_of = np.full(n, np.nan)
        seed_of = np.full(n, -1, dtype=np.int64)
        to_of = np.full(n, -1, dtype=np.int64)
        rank = rng.random(n)  # tie-break among the flips of the last level
        levels = max(1, int(math.floor(math.log(self.eps_max / self.eps_start) / math.log(self.eps_factor) + 1e-9)) + 1)
        eps = self.eps_start
        chosen: list[np.ndarray] = []
        found = 0
        for level in range(levels):
            new_level = []
            for _ in range(self.draws):
                seed = int(rng.integers(0, 2**62))
                with perturb_weights(model.module, eps, seed, relative=self.relative):
                    labels = model.logits(x).argmax(axis=1)
                flip = (labels != base) & np.isnan(eps_of)
                eps_of[flip], seed_of[flip], to_of[flip] = eps, seed, labels[flip]
                new_level.append(np.flatnonzero(flip))
            new = np.concatenate(new_level)
            if found + len(new) >= bag:
                new = new[np.argsort(rank[new], kind="stable")][: bag - found]
            chosen.append(new)
            found += len(new)
            progress(level + 1, levels)
            if found >= bag:
                break
            eps *= self.eps_factor
        sel = np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)
        progress(levels, levels)
        info = {
            "epsilon": eps_of[sel],
            "perturbation_seed": seed_of[sel],
            "label": base[sel].astype(np.int64),
            "flipped_to": to_of[sel],
            "index": index[sel],
            "found": int(len(sel)),
            "relative": self.relative,
        }
        inputs = np.ascontiguousarray(x[sel])
        return Bag(inputs, inputs.copy(), None, info)
