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
seeds are natural inputs drawn from ``data`` without replacement (with replacement only if
the bag is larger than the data). ``rotation`` and ``distortion`` need image inputs
(C, H, W); ``noise`` takes inputs of any shape.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from ...data import Dataset
from ...errors import UsageError
from ...models import Model
from .base import Bag, Method, Progress


def _draw_seeds(data: Dataset, bag: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if bag < 1:
        raise UsageError("the bag must hold at least one candidate")
    if len(data) == 0:
        raise UsageError("no natural inputs to start from")
    idx = rng.choice(len(data), size=bag, replace=bag > len(data))
    return idx.astype(np.int64), np.ascontiguousarray(data.x[idx], dtype=np.float32)


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
    name: ClassVar[str] = ""

    def generate(self, model: Model, data: Dataset, bag: int, rng: np.random.Generator, progress: Progress | None = None) -> Bag:
        idx, seeds = _draw_seeds(data, bag, rng)
        inputs, info = self._apply(seeds, data.low, data.high, rng)
        info = {"seed_index": idx, **info}
        if progress:
            progress(bag, bag)
        return Bag(inputs.astype(np.float32), seeds, None, info)

    def _apply(self, seeds: np.ndarray, low: float, high: float, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        raise NotImplementedError


class NoiseMarkers(_Transform):
    """Natural input plus random noise on the sphere ``||δ||₂ = ε·||seed||₂``, clipped to the box."""

    name = "noise"

    def __init__(self, *, epsilon: float = 0.1) -> None:
        if not float(epsilon) > 0:
            raise UsageError(f"epsilon must be > 0, got {epsilon}")
        super().__init__(epsilon=float(epsilon))

    def _apply(self, seeds, low, high, rng):
        n = len(seeds)
        x0 = seeds.astype(np.float64).reshape(n, -1)
        direction = rng.standard_normal(size=x0.shape)
        direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-12)
        radius = self._params["epsilon"] * np.linalg.norm(x0, axis=1, keepdims=True)
        out = np.clip(x0 + radius * direction, low, high)
        dist = np.linalg.norm(out - x0, axis=1)
        scale = np.minimum(1.0, radius[:, 0] / np.maximum(dist, 1e-300))  # guard against rounding
        out = (x0 + (out - x0) * scale[:, None]).reshape(seeds.shape).astype(np.float32)
        rel = np.linalg.norm(out.reshape(n, -1).astype(np.float64) - x0, axis=1) / np.maximum(np.linalg.norm(x0, axis=1), 1e-12)
        return np.clip(out, low, high), {"relative_l2": rel}


class RotationMarkers(_Transform):
    """Natural image rotated by a random small angle about its centre."""

    name = "rotation"

    def __init__(self, *, max_degrees: float = 15.0, min_degrees: float = 2.0) -> None:
        lo, hi = float(min_degrees), float(max_degrees)
        if not 0 <= lo <= hi <= 180:
            raise UsageError(f"need 0 <= min_degrees <= max_degrees <= 180, got {lo}, {hi}")
        super().__init__(max_degrees=hi, min_degrees=lo)

    def _apply(self, seeds, low, high, rng):
        _need_images(self.name, seeds)
        n = len(seeds)
        mag = rng.uniform(self._params["min_degrees"], self._params["max_degrees"], size=n)
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
    """Natural image under a random elastic displacement field composed with a random affine map."""

    name = "distortion"

    def __init__(self, *, alpha: float = 0.05, sigma: float = 0.12, scale: float = 0.08, shear: float = 0.08, shift: float = 0.04) -> None:
        vals = dict(alpha=float(alpha), sigma=float(sigma), scale=float(scale), shear=float(shear), shift=float(shift))
        if vals["sigma"] <= 0 or any(v < 0 for v in vals.values()):
            raise UsageError(f"distortion parameters must be non-negative and sigma > 0, got {vals}")
        if vals["scale"] >= 1:
            raise UsageError("scale must be below 1")
        super().__init__(**vals)

    def _apply(self, seeds, low, high, rng):
        import torch
        import torch.nn.functional as F

        _need_images(self.name, seeds)
        p = self._params
        n = len(seeds)
        h, w = seeds.shape[-2:]
        sx = 1.0 + rng.uniform(-p["scale"], p["scale"], size=n)
        sy = 1.0 + rng.uniform(-p["scale"], p["scale"], size=n)
        sh = rng.uniform(-p["shear"], p["shear"], size=n)
        tx = rng.uniform(-p["shift"], p["shift"], size=n) * 2.0
        ty = rng.uniform(-p["shift"], p["shift"], size=n) * 2.0
        theta = np.zeros((n, 2, 3))
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = sx, sh, tx
        theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = 0.0, sy, ty
        grid = _affine_grid(theta, seeds.shape)
        # Elastic part: a smoothed random field, displacement in pixels converted to [-1, 1] units.
        field = rng.uniform(-1.0, 1.0, size=(n, 2, h, w)).astype(np.float32)
        side = float(min(h, w))
        sigma_px, alpha_px = max(p["sigma"] * side, 0.3), p["alpha"] * side
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
            f = f.reshape(n, 2, h, w).numpy().astype(np.float64)
        peak = np.abs(f).reshape(n, -1).max(axis=1).reshape(n, 1, 1, 1)
        f = f / np.maximum(peak, 1e-12) * alpha_px  # the largest displacement is alpha of the side
        grid = grid.astype(np.float64)
        grid[..., 0] += f[:, 0] * 2.0 / w
        grid[..., 1] += f[:, 1] * 2.0 / h
        out = _resample(seeds, grid, low, high)
        return out, {"max_displacement_px": np.full(n, alpha_px)}
