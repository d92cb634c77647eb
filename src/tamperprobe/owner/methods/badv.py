"""TamperNN's BADV markers: FGSM adversarial inputs just past the decision boundary.

For each natural seed ``x`` with intact label ``y`` the FGSM direction ``g = sign(∇x CE(f(x), y))``
is fixed, and the smallest ε for which ``x_ε = clip(x + ε·g, low, high)`` is classified
otherwise is found per sample: a geometric search (``eps_start``, ×2, … up to ``high − low``)
brackets the flip, then ``steps`` bisection steps shrink the bracket. The marker is the input at
the upper end of the bracket, just past the flip. "Flipped" means that some other class beats
``y`` by at least ``min_margin`` logits, so the flip holds under batch-size noise; the markers
are re-checked at batch size 1 and at the default batch size and dropped if not flipped there.

Seeds whose label does not flip anywhere on the FGSM ray are skipped; ``oversample`` seeds per
marker are tried in a random order and the first ``bag`` successes are kept.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..._params import Interval
from ..._util import Progress
from ...data import Dataset
from ...models import Model
from ...outputs import signed_margin
from ..markers import sample_indices
from .base import Bag, Method


def fgsm_direction(module: Any, x: np.ndarray, y: np.ndarray, chunk: int = 256) -> np.ndarray:
    """``sign(∇x cross_entropy(module(x), y))`` for each row of ``x``, as float32."""
    import torch

    from ..._torch import as_logits, module_device, to_tensor

    out = []
    device = module_device(module)
    for i in range(0, len(x), chunk):
        xt = to_tensor(x[i : i + chunk]).to(device).requires_grad_(True)
        yt = torch.from_numpy(np.asarray(y[i : i + chunk], dtype=np.int64)).to(device)
        with torch.enable_grad():
            loss = torch.nn.functional.cross_entropy(as_logits(module(xt)).float(), yt, reduction="sum")
            (g,) = torch.autograd.grad(loss, xt)
        out.append(torch.sign(g).cpu().numpy().astype(np.float32))
    return np.concatenate(out) if out else np.zeros_like(x, dtype=np.float32)


def _beaten_by(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """max over other classes minus the logit of y (float64): > 0 when y is no longer top-1."""
    return -signed_margin(logits, y)


class Badv(Method):
    """TamperNN BADV: FGSM inputs at the smallest step that flips the label."""

    name = "badv"
    needs_weights = True
    constraints = {
        "eps_start": Interval(0.0, None, closed="neither"),
        "steps": Interval(1, None, integer=True),
        "min_margin": Interval(0.0, None),
        "oversample": Interval(1.0, None),
    }

    def __init__(self, *, eps_start: float = 1e-3, steps: int = 30, min_margin: float = 1e-4, oversample: float = 2.0) -> None:
        self.eps_start = eps_start
        self.steps = steps
        self.min_margin = min_margin
        self.oversample = oversample

    def _generate(self, model: Model, data: Dataset, bag: int, rng: np.random.Generator, progress: Progress) -> Bag:
        n = min(len(data.x), max(bag, int(math.ceil(self.oversample * bag))))
        idx = sample_indices(len(data.x), n, rng)
        x0 = data.x[idx].astype(np.float32)
        y0 = model.logits(x0).argmax(axis=1)
        g = fgsm_direction(model.module, x0, y0)
        lo32, hi32 = np.float32(data.low), np.float32(data.high)
        shape = (-1,) + (1,) * (x0.ndim - 1)

        def at(rows: np.ndarray, eps: np.ndarray) -> np.ndarray:
            return np.clip(x0[rows] + eps.astype(np.float32).reshape(shape) * g[rows], lo32, hi32).astype(np.float32)

        def flipped(rows: np.ndarray, eps: np.ndarray) -> np.ndarray:
            return _beaten_by(model.logits(at(rows, eps)), y0[rows]) >= self.min_margin

        # 1. geometric bracket: the first eps of the ladder that flips
        span = float(data.high - data.low)
        ladder = [self.eps_start * 2.0**k for k in range(64) if self.eps_start * 2.0**k < span] + [span]
        lo = np.zeros(n)
        hi = np.full(n, np.nan)
        rows_all = np.arange(n)
        for k, e in enumerate(ladder):
            open_rows = rows_all[np.isnan(hi)]
            if not len(open_rows):
                break
            f = flipped(open_rows, np.full(len(open_rows), e))
            hi[open_rows[f]] = e
            lo[open_rows[~f]] = e
            progress(k + 1, len(ladder) + self.steps)
        ok = ~np.isnan(hi)
        rows = rows_all[ok]
        lo, hi = lo[ok], hi[ok]
        # 2. bisection between the last non-flipping and the first flipping eps
        for s in range(self.steps):
            mid = 0.5 * (lo + hi)
            f = flipped(rows, mid)
            hi = np.where(f, mid, hi)
            lo = np.where(f, lo, mid)
            progress(len(ladder) + s + 1, len(ladder) + self.steps)
        markers = at(rows, hi)
        # 3. keep only markers flipped at batch size 1 and at the default batch size too
        z_def = model.logits(markers)
        z_one = model.logits(markers, batch_size=1)
        beat = np.minimum(_beaten_by(z_def, y0[rows]), _beaten_by(z_one, y0[rows]))
        good = beat > 0
        rows, hi, markers, beat, labels = rows[good], hi[good], markers[good], beat[good], z_def[good].argmax(axis=1)
        keep = slice(0, min(bag, len(rows)))
        info = {
            "epsilon": hi[keep],
            "seed_label": y0[rows][keep].astype(np.int64),
            "label": labels[keep].astype(np.int64),
            "beaten_by": beat[keep],
            "index": idx[rows][keep],
            "found": int(len(rows)),
            "tried": int(n),
        }
        return Bag(np.ascontiguousarray(markers[keep]), x0[rows][keep].copy(), None, info)
