"""Boundary markers: pairs of nearly identical inputs on either side of a decision boundary.

Why pairs. With a top-1 API a marker only reveals which side of the decision boundary it lies
on. A single input with logit margin ``m`` (top-1 minus top-2) flips when a tampering lowers
its margin by more than ``m``, but stays silent when the tampering *raises* it. A pair
``(x_a, x_c)`` that straddles the boundary between classes ``a`` and ``c``, each with margin in
``[δ, k·δ]``, is silent only if the change of ``z_a − z_c`` stays within ``(−m_c, m_a)`` at both
points: any weight change that moves the boundary there by more than about ``k·δ`` logits
flips one of the two labels, in either direction.

Search (for each candidate, vectorised over candidates):

1. **Path.** ``path="blend"``: the segment from a natural input ``x0`` (label ``a``) to a natural
   input of another label, so markers look like a cross-fade of two natural images;
   ``path="gradient"``: the segment from ``x0`` to an adversarial point obtained by sign-gradient
   steps (``step``·(high − low) each, at most ``max_steps``) that raise ``z_b − z_a``, ``b`` the
   runner-up class at ``x0``. ``linf`` (gradient path only) keeps the path inside the L∞ ball of
   radius ``linf``·(high − low) around ``x0`` (projected steps of at most an eighth of the radius),
   so every marker differs from its natural seed by at most that much per pixel (adversarial-example
   style edge points; ``linf = 8/255`` gives a PSNR of at least 30.1 dB); seeds whose label does
   not change within the ball are skipped. Pixels at either end of the range (a black background,
   white highlights) then stay as they are unless ``saturated=True``: a perturbation shows most
   there. In the 8-bit domain the radius is ``floor(linf·255)`` pixel levels and the pixel search
   below stays inside it.
2. **Crossing.** Bisection on the path parameter ``t`` for the first label change: ``t_lo``
   (label ``a``) and ``t_hi`` (label ``c``) end up adjacent.
3. **Margins** (float domain). On each side, a geometric ladder of ``t`` moving away from the
   crossing brackets the point where that side's margin enters the band ``[δ·(1 + (k−1)/10), k·δ]``,
   and bisection on the margin finds a point inside the band. The small lift above δ absorbs
   batch-size noise; the guarantee is checked afterwards.
4. **uint8 domain** (``uint8=True``). Markers are exact 8-bit images ``u`` in 0..255; the model sees
   ``decode_uint8(u) = u / 255 · (high − low) + low`` computed in float32 (``markers.decode_uint8``),
   and the API must be sent ``u`` itself. The path points are rounded to integers, the crossing is
   found by bisection over the blend coefficient, and each side is then adjusted greedily pixel by
   pixel (±1 per step; the moves are ranked by the gradient and the best ``neighbors`` evaluated
   exactly) to bring its margin down to just above δ (up first if it starts below). The
   granularity of one pixel step limits how close to δ a margin gets.
5. **Guarantee.** Every marker's margin is recomputed with ``model.logits`` in float32 at batch
   size 1, 64 and the default batch size (``markers.checked_margins``, the paths verification
   uses); a pair whose member has
   margin < δ in any of them, or whose members share a label, is dropped.
6. **Coverage.** Of the surviving candidates (``oversample`` per marker wanted), MANC
   (``selection.manc``, the greedy of the selection step) keeps those whose active neurons at the
   input of the output layer (union over the pair) add the most not-yet-covered neurons,
   resetting the covered set when nothing new can be added (``sensitivity.activations``, on every
   model format). When no penultimate activations can be read the order is random.

``pairs=False`` gives single markers (the ``x0`` side only, margin in the same band). Bag layout
with pairs: ``[a_0, c_0, a_1, c_1, …]`` with ``groups = [0, 0, 1, 1, …]``; ``bag // 2`` pairs are
made (at least one). ``info`` holds per marker ``margin`` (the smallest over the batch sizes),
``label``, ``psnr`` and ``snr`` (dB, against the seed, in the model's domain), ``linf_to_seed`` (max per-pixel
distance to the seed over the input range), ``t``, ``side``
(0: seed side, 1: far side), ``seed_index`` and ``partner_index`` (blend), and the scalars
``delta``, ``k``, ``pairs``, ``path``, ``linf`` and ``uint8``; in the 8-bit domain the bag's ``encoding`` is set.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..._params import Interval, Options
from ..._util import Progress
from ...data import Dataset
from ...errors import UsageError
from ...models import Model
from ...outputs import signed_margin
from ..markers import checked_margins, decode_uint8, encode_uint8, psnr_db, sample_indices, snr_db
from ..selection import manc
from .base import Bag, Encoding, Method

DEFAULT_DELTA = 1e-4
PATHS = ("blend", "gradient")
_MAX_POOL = 20000


class Boundary(Method):
    """Pairs straddling a decision boundary, each member's top-1 margin just above δ (works with a top-1 API).

    See the module doc for the search and every hyper-parameter.
    """

    name = "boundary"
    constraints = {
        "delta": Interval(0.0, None, closed="neither"),
        "k": Interval(1.0, None, closed="neither"),
        "path": Options(*PATHS),
        "linf": Interval(0.0, 1.0, closed="right"),
        "oversample": Interval(1.0, None),
        "step": Interval(0.0, 1.0, closed="right"),
        "max_steps": Interval(1, None, integer=True),
        "greedy_steps": Interval(1, None, integer=True),
        "neighbors": Interval(1, None, integer=True),
        "rounds": Interval(1, None, integer=True),
    }

    def __init__(
        self,
        *,
        delta: float = DEFAULT_DELTA,
        k: float = 1.5,
        path: str = "blend",
        linf: float | None = None,
        saturated: bool = False,
        pairs: bool = True,
        uint8: bool = False,
        coverage: bool = True,
        oversample: float = 3.0,
        step: float = 0.02,
        max_steps: int = 100,
        greedy_steps: int = 60,
        neighbors: int = 24,
        rounds: int = 4,
    ) -> None:
        self.delta = delta
        self.k = k
        self.path = path
        self.linf = linf
        self.saturated = saturated
        self.pairs = pairs
        self.uint8 = uint8
        self.coverage = coverage
        self.oversample = oversample
        self.step = step
        self.max_steps = max_steps
        self.greedy_steps = greedy_steps
        self.neighbors = neighbors
        self.rounds = rounds

    def _check_together(self, params: dict[str, Any]) -> None:
        if params["linf"] is not None and params["path"] != "gradient":
            raise UsageError("linf bounds the gradient path: use path=gradient with linf")

    def _generate(self, model: Model, data: Dataset, bag: int, rng: np.random.Generator, progress: Progress) -> Bag:
        return _Search(self, model, data).run(bag, rng, progress)


class _Search:
    """One generation run: the validated parameters, the model and the input range, and the search steps.

    Lives for one ``Boundary.generate`` call, so the plug-in object keeps no reference to the model.
    """

    def __init__(self, params: Boundary, model: Model, data: Dataset) -> None:
        self.p = params
        self.model = model
        self.data = data
        # white-box only where gradients are taken (gradient path, 8-bit pixel search)
        needs_gradients = params.path == "gradient" or params.uint8
        what = f"boundary markers with path={params.path}{', uint8' if params.uint8 else ''}"
        self.module: Any = model.require_torch(what) if needs_gradients else None
        self.low, self.high = float(data.low), float(data.high)
        self.lo32, self.hi32 = np.float32(self.low), np.float32(self.high)
        # the search band: slightly above delta so that batch-size noise cannot push a margin below it
        self.band_lo = params.delta * (1.0 + (params.k - 1.0) / 10.0)
        self.band_hi = params.delta * params.k
        # the L∞ ball around each seed that a gradient path stays in (None: unbounded)
        self.radius = None if params.linf is None else float(params.linf) * (self.high - self.low)
        self.radius_u8 = None if params.linf is None else int(math.floor(float(params.linf) * 255.0 + 1e-9))

    # ------------------------------------------------------------------ plumbing
    def _domain(self, x_sent: np.ndarray) -> np.ndarray:
        """Inputs as sent -> the float32 inputs the model sees."""
        if self.p.uint8:
            return decode_uint8(x_sent, self.low, self.high)
        return np.asarray(x_sent, dtype=np.float32)

    def _logits(self, x_sent: np.ndarray) -> np.ndarray:
        if len(x_sent) == 0:
            return np.zeros((0, 1), dtype=np.float32)
        return self.model.logits(self._domain(x_sent))

    def _at(self, A: np.ndarray, B: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Path points A + t (B − A), as sent (float32 clipped to the range, or rounded uint8)."""
        tt = t.reshape((-1,) + (1,) * (A.ndim - 1))
        p = A + tt * (B - A)
        if self.p.uint8:
            return np.clip(np.rint(p), 0, 255).astype(np.uint8)
        return np.clip(p, self.lo32, self.hi32).astype(np.float32)

    def _movable(self, x0: np.ndarray) -> np.ndarray:
        """1 where a seed pixel lies strictly inside the range (by more than half an 8-bit level), else 0."""
        tol = 0.5 / 255.0 * (self.high - self.low)
        return ((x0 > self.low + tol) & (x0 < self.high - tol)).astype(np.float32)

    def _grad_margin(self, x: np.ndarray, cls: np.ndarray, other: np.ndarray) -> np.ndarray:
        """∂(z_cls − z_other)/∂x for model-domain inputs x (float64 array of x's shape)."""
        from ..._torch import margin_gradient

        return margin_gradient(self.module, x, cls, other)

    # ------------------------------------------------------------------ endpoints
    def _candidates(self, n: int, rng: np.random.Generator, pool_x: np.ndarray, pool_lab: np.ndarray, pool_idx: np.ndarray):
        """Seed indices (into the pool) and path endpoints A (seed) and B, as float64 arrays in the sent domain."""
        seeds = sample_indices(len(pool_x), n, rng)
        if self.p.path == "blend":
            partner = np.full(n, -1, dtype=np.int64)
            for i, s in enumerate(seeds):
                other = np.flatnonzero(pool_lab != pool_lab[s])
                if len(other):
                    partner[i] = other[rng.integers(0, len(other))]
            ok = partner >= 0
            seeds, partner = seeds[ok], partner[ok]
            A = pool_x[seeds].astype(np.float64)
            B = pool_x[partner].astype(np.float64)
            return seeds, pool_idx[partner], A, B
        A = pool_x[seeds].astype(np.float64)
        B = self._gradient_endpoints(self._domain(pool_x[seeds]), pool_lab[seeds])
        if self.p.uint8:
            B = encode_uint8(B, self.low, self.high).astype(np.float64)
        return seeds, np.full(len(seeds), -1, dtype=np.int64), A, B

    def _gradient_endpoints(self, x0: np.ndarray, a: np.ndarray) -> np.ndarray:
        """Sign-gradient steps raising z_b − z_a (b: runner-up at x0) until the label leaves a."""
        z0 = self.model.logits(x0)
        zz = z0.astype(np.float64).copy()
        zz[np.arange(len(zz)), a] = -np.inf
        b = zz.argmax(axis=1)
        x = x0.astype(np.float32).copy()
        step = self.p.step * (self.high - self.low)
        if self.radius is not None:
            step = min(step, self.radius / 8.0)
            r = np.float32(self.radius) * (np.ones_like(x0) if self.p.saturated else self._movable(x0))
            ball_lo = np.maximum(x0 - r, self.lo32).astype(np.float32)
            ball_hi = np.minimum(x0 + r, self.hi32).astype(np.float32)
        for _ in range(self.p.max_steps):
            open_rows = np.flatnonzero(self.model.logits(x).argmax(axis=1) == a)
            if not len(open_rows):
                break
            g = self._grad_margin(x[open_rows], b[open_rows], a[open_rows])
            moved = x[open_rows] + np.float32(step) * np.sign(g).astype(np.float32)
            if self.radius is not None:
                moved = np.clip(moved, ball_lo[open_rows], ball_hi[open_rows])
            x[open_rows] = np.clip(moved, self.lo32, self.hi32)
        return x.astype(np.float64)

    # ------------------------------------------------------------------ search
    def _crossing(self, A: np.ndarray, B: np.ndarray, a: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = np.zeros(len(A)), np.ones(len(A))
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            same = self._logits(self._at(A, B, mid)).argmax(axis=1) == a
            lo = np.where(same, mid, lo)
            hi = np.where(same, hi, mid)
        return lo, hi

    def _band(self, A, B, t_in, t_out, cls, iters: int = 60):
        """A t between t_in (near the crossing) and t_out (path end) where the cls-margin lies in the band.

        Returns (t, margin, ok). A geometric ladder from t_in towards t_out brackets the first entry
        into the band; bisection keeps margin(inner) < band_lo and margin(outer) > band_hi.
        """
        n = len(A)
        span = np.abs(t_out - t_in)
        direction = np.sign(t_out - t_in)
        h0 = 2.0**-44
        levels = int(max(1, math.ceil(math.log(max(float(span.max()), h0) / h0, 4)))) + 1
        steps = np.minimum(h0 * 4.0 ** np.arange(levels)[None, :], span[:, None])  # (n, L)
        ladder = np.concatenate([t_in[:, None], t_in[:, None] + direction[:, None] * steps], axis=1)  # (n, L+1)
        L = ladder.shape[1]
        rows = np.repeat(np.arange(n), L)
        s = signed_margin(self._logits(self._at(A[rows], B[rows], ladder.reshape(-1))), cls[rows]).reshape(n, L)
        t = np.full(n, np.nan)
        marg = np.full(n, np.nan)
        inner = np.full(n, np.nan)
        outer = np.full(n, np.nan)
        for i in range(n):
            entered = np.flatnonzero(s[i] >= self.band_lo)
            if not len(entered):
                continue
            j = int(entered[0])
            if s[i, j] <= self.band_hi:
                t[i], marg[i] = ladder[i, j], s[i, j]
            elif j > 0:
                inner[i], outer[i] = ladder[i, j - 1], ladder[i, j]
        todo = np.flatnonzero(~np.isnan(inner))
        for _ in range(iters):
            if not len(todo):
                break
            mid = 0.5 * (inner[todo] + outer[todo])
            sm = signed_margin(self._logits(self._at(A[todo], B[todo], mid)), cls[todo])
            low_side = sm < self.band_lo
            high_side = sm > self.band_hi
            found = ~low_side & ~high_side
            t[todo[found]], marg[todo[found]] = mid[found], sm[found]
            inner[todo[low_side]] = mid[low_side]
            outer[todo[high_side]] = mid[high_side]
            todo = todo[~found]
        ok = ~np.isnan(t)
        return t, marg, ok

    def _greedy_uint8(self, u: np.ndarray, cls: np.ndarray, center: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel ±1 steps bringing each image's cls-margin to just above band_lo (up first if below).

        With ``center`` (the 8-bit seeds) and an L∞ radius, no pixel leaves the ball around its seed.
        Returns the adjusted uint8 images and their margins (at the default batch size).
        """
        cur = u.astype(np.int16).copy()
        n = len(cur)
        flat = cur.reshape(n, -1)
        P = flat.shape[1]
        top = np.full((n, P), 255, dtype=np.int16)
        bottom = np.zeros((n, P), dtype=np.int16)
        if center is not None and self.radius_u8 is not None:
            c = np.rint(np.asarray(center, dtype=np.float64)).astype(np.int16).reshape(n, P)
            reach = np.full((n, P), self.radius_u8, dtype=np.int16)
            if not self.p.saturated:
                reach[(c == 0) | (c == 255)] = 0
            top, bottom = np.minimum(top, c + reach), np.maximum(bottom, c - reach)
        s = signed_margin(self._logits(cur.astype(np.uint8)), cls)
        active = np.ones(n, dtype=bool)
        target = 0.5 * (self.band_lo + self.band_hi)
        scale = (self.high - self.low) / 255.0
        m = min(self.p.neighbors, 2 * P)
        for _ in range(self.p.greedy_steps):
            active &= ~((s >= self.band_lo) & (s <= self.band_hi))
            idx = np.flatnonzero(active)
            if not len(idx):
                break
            x = decode_uint8(cur[idx].astype(np.uint8), self.low, self.high)
            z = self.model.logits(x).astype(np.float64)
            zo = z.copy()
            zo[np.arange(len(idx)), cls[idx]] = -np.inf
            other = zo.argmax(axis=1)
            g = self._grad_margin(x, cls[idx], other).reshape(len(idx), P) * scale  # margin change per +1
            pred = np.concatenate([s[idx, None] + g, s[idx, None] - g], axis=1)  # (k, 2P): +1 moves then -1 moves
            pix = flat[idx]
            valid = np.concatenate([pix < top[idx], pix > bottom[idx]], axis=1)
            up = s[idx] < self.band_lo
            score = np.where(up[:, None], -pred, np.abs(pred - target))
            score[~valid] = np.inf
            pick = np.argsort(score, axis=1, kind="stable")[:, :m]  # (k, m)
            pick_ok = np.take_along_axis(valid, pick, axis=1)
            trials = np.repeat(pix[:, None, :], m, axis=1)  # (k, m, P)
            pixel = pick % P
            sign = np.where(pick < P, 1, -1).astype(np.int16)
            kk, mm = np.meshgrid(np.arange(len(idx)), np.arange(m), indexing="ij")
            trials[kk, mm, pixel] += np.where(pick_ok, sign, 0).astype(np.int16)
            trial_u = np.clip(trials, 0, 255).astype(np.uint8).reshape((len(idx) * m,) + u.shape[1:])
            st = signed_margin(self._logits(trial_u), np.repeat(cls[idx], m)).reshape(len(idx), m)
            st[~pick_ok] = np.nan
            for r, i in enumerate(idx):
                row = st[r]
                if up[r]:
                    if np.all(np.isnan(row)):
                        active[i] = False
                        continue
                    j = int(np.nanargmax(row))
                    if not row[j] > s[i]:
                        active[i] = False
                        continue
                else:
                    good = (row >= self.band_lo) & (row < s[i])
                    if not good.any():
                        active[i] = False
                        continue
                    j = int(np.flatnonzero(good)[np.argmin(row[good])])
                flat[i] = trials[r, j]
                s[i] = row[j]
        return np.clip(cur, 0, 255).astype(np.uint8), s

    def _search(self, A: np.ndarray, B: np.ndarray):
        """Run one batch of candidates. Returns per candidate: x_a, x_c, t_a, t_c, ok (both sides when pairs)."""
        n = len(A)
        la = self._logits(self._at(A, B, np.zeros(n))).argmax(axis=1)
        lb = self._logits(self._at(A, B, np.ones(n))).argmax(axis=1)
        ok = la != lb
        lo, hi = self._crossing(A, B, la, 30 if self.p.uint8 else 52)
        x_lo, x_hi = self._at(A, B, lo), self._at(A, B, hi)
        lc = self._logits(x_hi).argmax(axis=1)
        ok &= lc != la
        if self.p.uint8:
            xa, sa = self._greedy_uint8(x_lo, la, A)
            ok &= sa >= self.band_lo
            ta = lo
            if self.p.pairs:
                xc, sc = self._greedy_uint8(x_hi, lc, A)
                ok &= sc >= self.band_lo
                tc = hi
            else:
                xc, tc = xa, ta
        else:
            ta, _, oka = self._band(A, B, lo, np.zeros(n), la)
            ok &= oka
            ta = np.where(oka, ta, 0.0)
            xa = self._at(A, B, ta)
            if self.p.pairs:
                tc, _, okc = self._band(A, B, hi, np.ones(n), lc)
                ok &= okc
                tc = np.where(okc, tc, 1.0)
                xc = self._at(A, B, tc)
            else:
                xc, tc = xa, ta
        return xa, xc, ta, tc, ok

    # ------------------------------------------------------------------ run
    def run(self, bag: int, rng: np.random.Generator, progress: Progress) -> Bag:
        data = self.data
        need = max(1, bag // 2) if self.p.pairs else bag
        pool_idx = sample_indices(len(data.x), min(len(data.x), _MAX_POOL), rng)
        pool_x = data.x[pool_idx].astype(np.float32)
        if self.p.uint8:
            pool_x = encode_uint8(pool_x, self.low, self.high)
        pool_lab = self._logits(pool_x).argmax(axis=1)
        if self.p.path == "blend" and len(np.unique(pool_lab)) < 2:
            raise UsageError("boundary markers with path=blend need natural inputs of at least two predicted classes")

        found: dict[str, list[np.ndarray]] = {k: [] for k in ("xa", "xc", "ta", "tc", "seed", "partner", "sa", "sc", "la", "lc")}
        total = 0
        tried = 0
        for r in range(self.p.rounds):
            want = int(math.ceil(self.p.oversample * need)) if r == 0 else 2 * (need - total) + 2
            seeds, partner, A, B = self._candidates(want, rng, pool_x, pool_lab, pool_idx)
            tried += len(seeds)
            if len(seeds):
                xa, xc, ta, tc, ok = self._search(A, B)
                la, sa, same_a = checked_margins(self.model, self._domain(xa))
                lc, sc, same_c = checked_margins(self.model, self._domain(xc))
                ok &= same_a & (sa >= self.p.delta)
                if self.p.pairs:
                    ok &= same_c & (sc >= self.p.delta) & (la != lc)
                sel = np.flatnonzero(ok)
                for key, arr in (
                    ("xa", xa),
                    ("xc", xc),
                    ("ta", ta),
                    ("tc", tc),
                    ("seed", pool_idx[seeds]),
                    ("partner", partner),
                    ("sa", sa),
                    ("sc", sc),
                    ("la", la),
                    ("lc", lc),
                ):
                    found[key].append(arr[sel])
                total += len(sel)
            progress(min(total, need), need)
            if total >= need:
                break
        cat = {k: np.concatenate(v) for k, v in found.items()}
        if total == 0:
            raise UsageError(f"boundary: no marker found in {tried} tries (delta={self.p.delta:g}); try another path or a larger delta")
        order = self._coverage_order(cat, min(need, total), rng)
        return self._bag(cat, order)

    def _coverage_order(self, cat: dict[str, np.ndarray], need: int, rng: np.random.Generator) -> np.ndarray:
        """``need`` of the candidates in ``cat``, chosen by MANC over the pair's active neurons (random without activations)."""
        total = len(cat["xa"])
        if self.p.coverage:
            from ..features import activations

            try:
                active = activations(self.model, self._domain(cat["xa"])) > 0
                if self.p.pairs:
                    active |= activations(self.model, self._domain(cat["xc"])) > 0
            except UsageError:  # no penultimate activations (logits not a linear layer's output): a random order
                pass
            else:
                return manc(active, need, rng)
        return rng.permutation(total)[:need]

    def _bag(self, cat: dict[str, np.ndarray], order: np.ndarray) -> Bag:
        seeds_sent = self.data.x[cat["seed"][order]].astype(np.float32)
        if self.p.uint8:
            seeds_sent = encode_uint8(seeds_sent, self.low, self.high)
        if self.p.pairs:
            n = len(order)
            inputs = np.empty((2 * n,) + cat["xa"].shape[1:], dtype=cat["xa"].dtype)
            inputs[0::2], inputs[1::2] = cat["xa"][order], cat["xc"][order]
            seeds = np.repeat(seeds_sent, 2, axis=0)
            inter = lambda a, c: np.stack([a[order], c[order]], axis=1).reshape(-1)  # noqa: E731
            margin, label = inter(cat["sa"], cat["sc"]), inter(cat["la"], cat["lc"])
            t = inter(cat["ta"], cat["tc"])
            side = np.tile(np.array([0, 1], dtype=np.int64), n)
            groups = np.repeat(np.arange(n, dtype=np.int64), 2)
            seed_index, partner_index = np.repeat(cat["seed"][order], 2), np.repeat(cat["partner"][order], 2)
        else:
            inputs, seeds = cat["xa"][order], seeds_sent
            margin, label, t = cat["sa"][order], cat["la"][order], cat["ta"][order]
            side = np.zeros(len(order), dtype=np.int64)
            groups = None
            seed_index, partner_index = cat["seed"][order], cat["partner"][order]
        dom_in, dom_seed = self._domain(inputs), self._domain(seeds)
        info = {
            "margin": margin.astype(np.float64),
            "label": label.astype(np.int64),
            "t": t.astype(np.float64),
            "side": side,
            "psnr": psnr_db(dom_in, dom_seed, self.low, self.high),
            "linf_to_seed": np.abs(dom_in - dom_seed).reshape(len(dom_in), -1).max(axis=1).astype(np.float64) / (self.high - self.low),
            "snr": snr_db(dom_in, dom_seed),
            "seed_index": seed_index.astype(np.int64),
            "partner_index": partner_index.astype(np.int64),
            "delta": self.p.delta,
            "k": self.p.k,
            "pairs": self.p.pairs,
            "path": self.p.path,
            "linf": self.p.linf,
            "uint8": self.p.uint8,
        }
        encoding = Encoding("uint8", self.low, self.high) if self.p.uint8 else None
        return Bag(np.ascontiguousarray(inputs), np.ascontiguousarray(seeds), groups, info, encoding)
