"""Margin-matched markers: their top-2 margins on the intact model follow those of ordinary inputs.

Why. Boundary-style markers all have tiny margins, so an operator who routes low-margin requests
to the original model (the ``margin-original`` router of ``tamperprobe.evaluation.routers``)
catches every one of them while paying for about 1 % of its ordinary traffic. Markers whose
margins are distributed like ordinary traffic's force such a router to route a matching share of
*all* traffic: to catch a share ``c`` of the markers it must pay ``c`` of its traffic.

What they can still detect. A marker with an ordinary margin ``m`` changes its top-1 label only
when a tampering moves its margin by more than ``m``: large changes (trojans, poisoning,
fine-tuning) can, tiny ones (fp16, int8) cannot. With richer outputs (top-k, probabilities,
logits) every marker reveals much smaller changes.

Construction, for ``bag`` markers:

1. **Reference margins.** The intact model's top-1 minus top-2 logit on ``reference`` natural
   inputs of the data: the owner's estimate of the margin distribution of ordinary traffic.
2. **Targets.** Stratified quantiles of the reference margins, one per marker:
   ``q_i = (i + U_i) / bag``.
3. **Paths.** ``oversample`` · bag candidates, each a segment from a start ``A`` (label ``a``) to an
   end ``B`` of lower margin for ``a``. ``source="natural"``: ``A`` a natural input and ``B`` the end
   of projected sign-gradient steps lowering ``z_a − z_b`` (``b`` the runner-up) inside the L∞ ball
   of radius ``linf`` · (high − low) around ``A``, so markers look like their natural seed
   (adversarial-example style; ``linf = 8/255`` gives at least 30.1 dB PSNR); pixels at either end
   of the range (a black background, white highlights) are left as they are unless
   ``saturated=True``, since a perturbation shows most there. ``source="grid"``:
   ``A`` and ``B`` a random-bit image (every pixel at the low or high end, TamperNN's GRID) moved by
   ``steps`` sign-gradient steps (5 % of the range each, anywhere in the input box) that raise,
   respectively lower, its margin, so markers are off the natural data (and look it).
4. **Assignment.** Targets in increasing order each take an unused candidate whose margin range
   ``[margin(B), margin(A)]`` holds it, the one with the smallest ``margin(A)`` (the greedy that
   reaches the most targets when matching points to intervals). Targets no candidate can reach
   are dropped; ``info`` says how many were reached.
5. **Bisection** along the segment (40 halvings) for the point whose margin equals the target. With ``uint8=True`` the point is rounded to the 8-bit grid (and kept inside
   the ball), which moves its margin slightly; the markers are then sent as 8-bit images.

``info`` holds per marker ``margin`` (as sent), ``target``, ``label``, ``psnr`` and ``snr`` (dB against
the start), ``linf_to_seed``, ``seed_index`` (natural source) and the scalars ``source``, ``linf``,
``uint8``, ``reference_median``, ``ks_statistic`` and ``ks_pvalue`` (two-sample Kolmogorov–Smirnov
test of the markers' margins against the reference margins), ``targets`` and ``reached``.
"""

from __future__ import annotations

import math

import numpy as np

from ..._params import Interval, Options
from ..._util import Progress
from ...data import Dataset
from ...errors import UsageError
from ...models import Model
from ...outputs import signed_margin, top_margin
from ..markers import decode_uint8, encode_uint8, psnr_db, sample_indices, snr_db
from .base import Bag, Encoding, Method

SOURCES = ("natural", "grid")
_BISECT = 40


class MarginMatched(Method):
    """Markers whose top-2 margins follow those of natural inputs (a margin router must route as much of all traffic).

    See the module doc for the construction and every hyper-parameter.
    """

    name = "matched"
    needs_weights = True
    constraints = {
        "source": Options(*SOURCES),
        "linf": Interval(0.0, 1.0, closed="right"),
        "reference": Interval(10, None, integer=True),
        "oversample": Interval(1.0, None),
        "steps": Interval(1, None, integer=True),
    }

    def __init__(
        self,
        *,
        source: str = "natural",
        linf: float = 8 / 255,
        uint8: bool = False,
        reference: int = 2000,
        oversample: float = 3.0,
        steps: int = 20,
        saturated: bool = False,
    ) -> None:
        self.source = source
        self.linf = linf
        self.uint8 = uint8
        self.reference = reference
        self.oversample = oversample
        self.steps = steps
        self.saturated = saturated

    def _generate(self, model: Model, data: Dataset, bag: int, rng: np.random.Generator, progress: Progress) -> Bag:
        low, high = float(data.low), float(data.high)
        ref_idx = sample_indices(len(data.x), min(len(data.x), int(self.reference)), rng)
        reference = top_margin(model.logits(data.x[ref_idx]))[1]
        targets = np.sort(np.quantile(reference, (np.arange(bag) + rng.random(bag)) / bag))
        n = int(math.ceil(self.oversample * bag))
        if self.source == "natural":
            seed_idx = sample_indices(len(data.x), min(n, len(data.x)), rng)
            A = np.asarray(data.x[seed_idx], dtype=np.float32)
            a = model.logits(A).argmax(axis=1)
            radius = float(self.linf) * (high - low)
            movable = None if self.saturated else _unsaturated(A, low, high)
            B = _sign_steps(model, A, a, -1.0, radius, radius / 4.0, int(self.steps), low, high, movable)
        else:
            seed_idx = np.full(n, -1, dtype=np.int64)
            bits = np.where(rng.random((n, *data.x.shape[1:])) < 0.5, np.float32(low), np.float32(high)).astype(np.float32)
            a = model.logits(bits).argmax(axis=1)
            # raise and lower the margin (anywhere in the input box) so that the segment between covers every target
            A = _sign_steps(model, bits, a, 1.0, high - low, 0.05 * (high - low), int(self.steps), low, high, None)
            B = _sign_steps(model, bits, a, -1.0, high - low, 0.05 * (high - low), int(self.steps), low, high, None)
        progress(1, 3)
        m_a, m_b = signed_margin(model.logits(A), a), signed_margin(model.logits(B), a)
        taken = _assign(targets, m_a, m_b)
        keep = taken >= 0
        if not keep.any():
            raise UsageError("matched: no candidate reaches the reference margins; try a larger oversample or linf")
        cand, goal = taken[keep], targets[keep]
        x = _bisect(model, A[cand], B[cand], a[cand], goal)
        progress(2, 3)
        seeds = A[cand]
        if self.uint8:
            sent = encode_uint8(x, low, high)
            if self.source == "natural":  # rounding must not leave the ball around the 8-bit seed
                r = int(math.floor(float(self.linf) * 255.0 + 1e-9))
                s8 = encode_uint8(seeds, low, high).astype(np.int16)
                sent = np.clip(sent.astype(np.int16), s8 - r, s8 + r).clip(0, 255).astype(np.uint8)
            x, seeds_sent = decode_uint8(sent, low, high), encode_uint8(seeds, low, high)
        else:
            sent, seeds_sent = x, seeds
        margin = signed_margin(model.logits(x), a[cand])
        from scipy.stats import ks_2samp

        ks = ks_2samp(top_margin(model.logits(x))[1], reference)
        info = {
            "margin": margin,
            "target": goal,
            "label": a[cand].astype(np.int64),
            "psnr": psnr_db(x, seeds, low, high),
            "snr": snr_db(x, seeds),
            "linf_to_seed": np.abs(x - seeds).reshape(len(x), -1).max(axis=1).astype(np.float64) / (high - low),
            "seed_index": seed_idx[cand],
            "source": self.source,
            "linf": float(self.linf) if self.source == "natural" else None,
            "uint8": bool(self.uint8),
            "reference_median": float(np.median(reference)),
            "ks_statistic": float(ks.statistic),
            "ks_pvalue": float(ks.pvalue),
            "targets": int(bag),
            "reached": int(keep.sum()),
        }
        progress(3, 3)
        order = rng.permutation(len(cand))  # no order by margin: a fingerprint's prefix is margin-matched too
        return Bag(
            np.ascontiguousarray(sent[order]),
            np.ascontiguousarray(seeds_sent[order]),
            None,
            {k: (v[order] if isinstance(v, np.ndarray) else v) for k, v in info.items()},
            Encoding("uint8", low, high) if self.uint8 else None,
        )


def _unsaturated(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """1 where a pixel lies strictly inside the range (by more than half an 8-bit level), else 0."""
    tol = 0.5 / 255.0 * (high - low)
    return ((x > low + tol) & (x < high - tol)).astype(np.float32)


def _sign_steps(
    model: Model,
    x0: np.ndarray,
    a: np.ndarray,
    direction: float,
    radius: float,
    step: float,
    steps: int,
    low: float,
    high: float,
    movable: np.ndarray | None,
) -> np.ndarray:
    """Sign-gradient steps raising (``direction`` 1) or lowering (−1) z_a − z_b, b the runner-up at x0,
    inside the L∞ ball of ``radius`` around x0 and the input range; only ``movable`` pixels move (None: all)."""
    from ..._torch import margin_gradient

    z = model.logits(x0).astype(np.float64)
    z[np.arange(len(z)), a] = -np.inf
    b = z.argmax(axis=1)
    lo = np.maximum(x0 - np.float32(radius), np.float32(low)).astype(np.float32)
    hi = np.minimum(x0 + np.float32(radius), np.float32(high)).astype(np.float32)
    mask = np.float32(1.0) if movable is None else movable
    x = x0.copy()
    module = model.require_torch("matched markers")
    for _ in range(steps):
        g = margin_gradient(module, x, a, b)
        x = np.clip(x + np.float32(direction * step) * np.sign(g).astype(np.float32) * mask, lo, hi).astype(np.float32)
    return x


def _assign(targets: np.ndarray, m_a: np.ndarray, m_b: np.ndarray) -> np.ndarray:
    """For each target (increasing), the unused candidate with the smallest m_a whose [m_b, m_a] holds it; −1 when none."""
    used = np.zeros(len(m_a), dtype=bool)
    out = np.full(len(targets), -1, dtype=np.int64)
    for i, t in enumerate(targets):
        ok = np.flatnonzero(~used & (m_b <= t) & (m_a >= t))
        if len(ok):
            j = ok[np.argmin(m_a[ok])]
            used[j] = True
            out[i] = j
    return out


def _bisect(model: Model, A: np.ndarray, B: np.ndarray, a: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """Points on A→B whose margin for label a is the goal: bisection keeping margin(lo) ≥ goal ≥ margin(hi)."""
    lo, hi = np.zeros(len(A)), np.ones(len(A))
    shape = (-1,) + (1,) * (A.ndim - 1)

    def at(t: np.ndarray) -> np.ndarray:
        return (A + t.reshape(shape).astype(np.float32) * (B - A)).astype(np.float32)

    for _ in range(_BISECT):
        mid = 0.5 * (lo + hi)
        above = signed_margin(model.logits(at(mid)), a) >= goal
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        if np.all(hi - lo < 1e-12):
            break
    return at(lo)
