"""VerIDeep's alternative baselines: natural inputs altered by a random, weight-independent transform.

VerIDeep (He et al., 2019, §VI) compares Sensitive-Samples with markers that need no access to
the weights: natural images with random noise, small rotations and distortions. They show how
much of a method's power comes from the gradient search rather than from merely moving off
the data manifold. Three generators:

``noise``       seed + random Gaussian-direction noise of L2 norm ``ε·||seed||₂``: the edge of the
                same relative ball Sensitive-Samples search (``||v − v0||₂ <= ε·||v0||₂``,
                default ε = 0.1), then clipped to the box (clipping only moves it closer to
                the seed, so the marker stays inside the ball).
``rotation``    seed rotated by a random angle with ``min_degrees <= |angle| <= max_degrees``
                (default 2°..15°) about the image centre (``affine_grid``/``grid_sample``,
                bilinear; uncovered corners take the background value ``low``).
``distortion``  a random elastic distortion (Simard et al. 2003: a uniform random displacement
                field smoothed by a Gaussian of width ``sigma``, rescaled so that its largest
                displacement is ``alpha``; both are fractions of the image side, default
                0.05 and 0.12, i.e. 1.4 px and 3.4 px on 28x28) composed with a random affine
                map (scale ``1 ± scale``, shear ``± shear``, shift ``± shift`` of the side),
                applied with ``grid_sample``.

All randomness comes from the ``rng`` passed to ``generate``, so a seed fixes the bag. The
seeds are natural inputs drawn from ``data`` by ``markers.sample_indices`` (without
replacement while the data lasts). ``rotation`` and ``distortion`` need image inputs
(C, H, W); ``noise`` takes inputs of any shape.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import numpy as np

from ..._params import Interval
from ..._util import Progress
from ...data import Dataset
from ...errors import UsageError
from ...models import Model
from ..markers import sample_indices
from .base import Bag, Method


def _need_images(name: str, x: np.ndarray) -> None:
    if x.ndim != 4:
        raise UsageError(f"method {name} needs image inputs (C, H, W); the data has shape {tuple(x.shape[1:])}")


def _resample(x: np.ndarray, grid: np.ndarray, low: float, high: float) -> np.ndarray:
    """Sample images ``x`` (N, C, H, W) at ``grid`` (N, H, W, 2) in [-1, 1] coordinates; outside is ``low``."""
    import torch
    import torch.nn.functional as F

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) - low
    gt = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))
    with torch.no_grad():
        out = F.grid_sample(xt, gt, mode="bilinear", padding_mode="zeros", align_corners=False) + low
    return np.clip(out.numpy(), low, high).astype(np.float32)


def _affine_grid(theta: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        g = F.affine_grid(torch.from_numpy(theta.astype(np.float32)), list(shape), align_corners=False)
    return g.numpy()


class _Transform(Method):
    """A natural input altered by a random transform (the shared part of VerIDeep's baselines)."""

    def _generate(self, model: Model, data: Dataset, bag: int, rng: np.random.Generator, progress: Progress) -> Bag:
        idx = sample_indices(len(data), bag, rng)
        seeds = np.ascontiguousarray(data.x[idx], dtype=np.float32)
        inputs, info = self._apply(seeds, data.low, data.high, rng)
        progress(bag, bag)
        return Bag(inputs.astype(np.float32), seeds, None, {"seed_index": idx, **info})

    @abstractmethod
    def _apply(self, seeds: np.ndarray, low: float, high: float, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        """The transformed seeds and per-marker statistics."""


class NoiseMarkers(_Transform):
    """VerIDeep baseline: natural inputs plus random noise of L2 norm ε·‖seed‖, clipped to the box."""

    name = "noise"
    constraints = {"epsilon": Interval(0.0, None, closed="neither")}

    def __init__(self, *, epsilon: float = 0.1) -> None:
        self.epsilon = epsilon

    def _apply(self, seeds: np.ndarray, low: float, high: float, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        n = len(seeds)
        x0 = seeds.astype(np.float64).reshape(n, -1)
        direction = rng.standard_normal(size=x0.shape)
        direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-12)
        radius = self.epsilon * np.linalg.norm(x0, axis=1, keepdims=True)
        out = np.clip(x0 + radius * direction, low, high)
        dist = np.linalg.norm(out - x0, axis=1)
        scale = np.minimum(1.0, radius[:, 0] / np.maximum(dist, 1e-300))  # guard against rounding
        out = (x0 + (out - x0) * scale[:, None]).reshape(seeds.shape).astype(np.float32)
        rel = np.linalg.norm(out.reshape(n, -1).astype(np.float64) - x0, axis=1) / np.maximum(np.linalg.norm(x0, axis=1), 1e-12)
        return np.clip(out, low, high), {"relative_l2": rel}


class RotationMarkers(_Transform):
    """VerIDeep baseline: natural images rotated by a small random angle about their centre."""

    name = "rotation"
    constraints = {"max_degrees": Interval(0.0, 180.0), "min_degrees": Interval(0.0, 180.0)}

    def __init__(self, *, max_degrees: float = 15.0, min_degrees: float = 2.0) -> None:
        self.max_degrees = max_degrees
        self.min_degrees = min_degrees

    def _check_together(self, params: dict[str, Any]) -> None:
        if params["min_degrees"] > params["max_degrees"]:
            raise UsageError(f"need min_degrees <= max_degrees, got {params['min_degrees']} and {params['max_degrees']}")

    def _apply(self, seeds: np.ndarray, low: float, high: float, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        _need_images(self.name, seeds)
        n = len(seeds)
        mag = rng.uniform(self.min_degrees, self.max_degrees, size=n)
        angle = mag * rng.choice([-1.0, 1.0], size=n)
        a = np.deg2rad(angle)
        h, w = seeds.shape[-2:]
        # affine_grid works in normalised coordinates; correct for a non-square aspect ratio.
        theta = np.zeros((n, 2, 3))
        theta[:, 0, 0] = np.cos(a)
        theta[:, 0, 1] = -np.sin(a) * h / w
        theta[:, 1, 0] = np.sin(a) * w / h
        theta[:, 1, 1] = np.cos(a)
        out = _resample(seeds, _affine_grid(theta, seeds.shape), low, high)
        return out, {"angle": angle}


class DistortionMarkers(_Transform):
    """VerIDeep baseline: natural images under a random elastic displacement and affine map."""

    name = "distortion"
    constraints = {
        "alpha": Interval(0.0, None),
        "sigma": Interval(0.0, None, closed="neither"),
        "scale": Interval(0.0, 1.0, closed="left"),
        "shear": Interval(0.0, None),
        "shift": Interval(0.0, None),
    }

    def __init__(self, *, alpha: float = 0.05, sigma: float = 0.12, scale: float = 0.08, shear: float = 0.08, shift: float = 0.04) -> None:
        self.alpha = alpha
        self.sigma = sigma
        self.scale = scale
        self.shear = shear
        self.shift = shift

    def _apply(self, seeds: np.ndarray, low: float, high: float, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        import torch
        import torch.nn.functional as F

        _need_images(self.name, seeds)
        n = len(seeds)
        h, w = seeds.shape[-2:]
        sx = 1.0 + rng.uniform(-self.scale, self.scale, size=n)
        sy = 1.0 + rng.uniform(-self.scale, self.scale, size=n)
        sh = rng.uniform(-self.shear, self.shear, size=n)
        tx = rng.uniform(-self.shift, self.shift, size=n) * 2.0
        ty = rng.uniform(-self.shift, self.shift, size=n) * 2.0
        theta = np.zeros((n, 2, 3))
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = sx, sh, tx
        theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = 0.0, sy, ty
        grid = _affine_grid(theta, seeds.shape)
        # Elastic part: a smoothed random field, displacement in pixels converted to [-1, 1] units.
        field = rng.uniform(-1.0, 1.0, size=(n, 2, h, w)).astype(np.float32)
        side = float(min(h, w))
        sigma_px, alpha_px = max(self.sigma * side, 0.3), self.alpha * side
        radius = max(1, int(math.ceil(3 * sigma_px)))
        t = np.arange(-radius, radius + 1, dtype=np.float64)
        k = np.exp(-0.5 * (t / sigma_px) ** 2)
        k = (k / k.sum()).astype(np.float32)
        with torch.no_grad():
            f = torch.from_numpy(field).reshape(n * 2, 1, h, w)
            kx = torch.from_numpy(k).reshape(1, 1, 1, -1)
            ky = torch.from_numpy(k).reshape(1, 1, -1, 1)
            f = F.conv2d(F.pad(f, (radius, radius, 0, 0), mode="replicate"), kx)
            f = F.conv2d(F.pad(f, (0, 0, radius, radius), mode="replicate"), ky)
            disp = f.reshape(n, 2, h, w).numpy().astype(np.float64)
        peak = np.abs(disp).reshape(n, -1).max(axis=1).reshape(n, 1, 1, 1)
        disp = disp / np.maximum(peak, 1e-12) * alpha_px  # the largest displacement is alpha of the side
        grid = grid.astype(np.float64)
        grid[..., 0] += disp[:, 0] * 2.0 / w
        grid[..., 1] += disp[:, 1] * 2.0 / h
        out = _resample(seeds, grid, low, high)
        return out, {"max_displacement_px": np.full(n, alpha_px)}
