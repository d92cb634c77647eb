"""How an operator meets a bag of markers: the ordinary traffic, the bag's selections, each router's scores and flags.

``Traffic`` is the operator's ordinary traffic in three disjoint parts; ``make_pool`` turns a
method's bag into the units and resampled selections a verifier sends; ``score`` fits a router as
the operator would (``reuse`` fresh: cross-fitted, or repeat) and scores the ordinary parts and
every marker; ``Scores.flags`` gives the markers flagged at the threshold of a cost; and
``detection_at`` is the detection rate when flagged markers get the intact answer. The harness
that drives them is ``tamperprobe.evaluation.adversary``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .._util import derive_seed
from ..errors import UsageError
from ..models import Model
from ..owner.selection import units_of
from .protocol import hits_curve, manc_orders, selection_orders, unit_any
from .routers import Operator, Router, cost_of, threshold_for_cost

if TYPE_CHECKING:
    from ..owner.methods import Bag

_ORDERS = 720  # per-selection order draws; divisible by the number of orders of any unit of up to 6 members


@dataclass(frozen=True)
class Traffic:
    """The operator's ordinary traffic: natural inputs it saw earlier, calibrates on, and pays on (disjoint)."""

    seen: np.ndarray
    calibration: np.ndarray
    measure: np.ndarray

    @classmethod
    def split(cls, x: np.ndarray, *, seen: int, calibration: int, measure: int | None = None, seed: int = 0) -> Traffic:
        """A seeded shuffle of ``x`` cut into parts of the given sizes (``measure`` None: the rest)."""
        order = np.random.default_rng(seed).permutation(len(x))
        rest = len(x) - seen - calibration
        m = rest if measure is None else measure
        if min(seen, calibration, m) < 1 or seen + calibration + m > len(x):
            raise UsageError(f"cannot cut {len(x)} inputs into traffic parts of {seen}, {calibration} and {m}")
        a, b = seen, seen + calibration
        take = lambda idx: np.ascontiguousarray(x[idx], dtype=np.float32)  # noqa: E731
        return cls(take(order[:a]), take(order[a:b]), take(order[b : b + m]))

    def sizes(self) -> dict[str, int]:
        return {"seen": len(self.seen), "calibration": len(self.calibration), "measure": len(self.measure)}


@dataclass
class Pool:
    """One method's bag as the harness sees it: inputs, intact logits, units and resampled selections."""

    name: str
    x: np.ndarray
    reference: np.ndarray
    unit_of: np.ndarray
    units: int
    group_size: int
    orders: np.ndarray  # (resamples, depth) unit indices
    order_draw: np.ndarray  # (resamples, depth) which within-unit order each selected unit was sent in


@dataclass
class Fit:
    """One fitted router's scores: ordinary calibration and measurement parts, and the markers it scores."""

    calibration: np.ndarray
    measure: np.ndarray
    rows: np.ndarray  # marker indices scored by this fit
    markers: np.ndarray  # (len(rows), orders): a marker's score for each within-unit order


@dataclass
class Scores:
    fits: list[Fit]
    orders: int

    def flags(self, n: int, cost: float) -> tuple[np.ndarray, float, float]:
        """(markers flagged (n, orders), calibration cost, measured cost) at the threshold for ``cost``."""
        out = np.zeros((n, self.orders), dtype=bool)
        cal, meas = [], []
        for f in self.fits:
            t = threshold_for_cost(f.calibration, cost)
            out[f.rows] = f.markers > t
            cal.append(cost_of(f.calibration, t))
            meas.append(cost_of(f.measure, t))
        return out, float(np.mean(cal)), float(np.mean(meas))


def make_pool(model: Model, label: str, generated: Bag, *, budgets: Sequence[int], select: str, resamples: int, seed: int) -> Pool:
    """A method's bag as the operator meets it: its units, ``resamples`` selections deep enough for the largest budget, and
    the order each selected unit is sent in (seeded from ``seed`` and the method's ``label``, as the campaign's selections)."""
    x = np.ascontiguousarray(generated.inputs, dtype=np.float32)
    unit_of, units, sizes = units_of(generated.groups, len(x))
    g = int(sizes.max())
    if g > 6:
        raise UsageError(f"units of {g} markers: the harness scores every order of a unit, at most 6 members")
    depth = max(1, max(budgets) // g)
    rng = np.random.default_rng(derive_seed(seed, "select", select, label))
    if select == "manc":
        from ..owner.features import activations

        active = activations(model, x) > 0
        orders = manc_orders(unit_any(active, unit_of, units).astype(np.float32), depth, resamples, rng)
    else:
        orders = selection_orders(units, depth, resamples, rng)
    draw = rng.integers(0, _ORDERS, size=orders.shape)
    return Pool(label, x, model.logits(x), unit_of, units, g, orders, draw)


def _orders_of(g: int) -> list[tuple[int, ...]]:
    return list(itertools.permutations(range(g)))


def score(
    router: Router,
    pool: Pool,
    traffic: Traffic,
    operator: Operator,
    cache: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    reuse: str,
    folds: int,
    seed: int,
) -> Scores:
    """Fit ``router`` as the operator would and score the ordinary parts and every marker of ``pool``.

    ``reuse`` is ``fresh`` or ``repeat`` (module doc of ``adversary``, step 3); ``folds`` and ``seed``
    cross-fit a router that learns markers; ``cache`` keeps the ordinary parts' scores of routers
    whose fit does not depend on the markers.
    """
    n = len(pool.x)
    if router.learns_markers:
        return _score_learned(router, pool, traffic, operator, reuse=reuse, folds=folds, seed=seed)
    fitted = router.clone().fit(traffic.seen, operator=operator)
    if router.name not in cache:  # ordinary scores do not depend on the method
        if router.stream:
            cache[router.name] = (
                fitted.score(traffic.calibration, [traffic.seen]),
                fitted.score(traffic.measure, [traffic.seen, traffic.calibration]),
            )
        else:
            cache[router.name] = (fitted.score(traffic.calibration), fitted.score(traffic.measure))
    cal, meas = cache[router.name]
    if getattr(fitted, "sender_aware", False):  # the markers go out from the verifier's client, the traffic from the ordinary one
        return Scores([Fit(cal, meas, np.arange(n), fitted.score(pool.x, sender="verifier")[:, None])], 1)  # type: ignore[call-arg]
    if not router.stream:
        return Scores([Fit(cal, meas, np.arange(n), fitted.score(pool.x)[:, None])], 1)
    ordinary = [np.asarray(p, dtype=np.float64) for p in (traffic.seen, traffic.calibration, traffic.measure)]
    if reuse == "repeat":  # the operator saw this very selection in the previous run
        return Scores([Fit(cal, meas, np.arange(n), fitted.score(pool.x, [*ordinary, pool.x])[:, None])], 1)
    orders = _orders_of(pool.group_size)
    out = np.zeros((n, len(orders)))
    for u in range(pool.units):
        members = np.flatnonzero(pool.unit_of == u)
        history = [*ordinary, pool.x[pool.unit_of != u]]
        for p, perm in enumerate(orders):
            order = members[list(perm[: len(members)])] if len(members) == pool.group_size else members
            out[order, p] = fitted.score(pool.x[order], history)
    return Scores([Fit(cal, meas, np.arange(n), out)], len(orders))


def _score_learned(router: Router, pool: Pool, traffic: Traffic, operator: Operator, *, reuse: str, folds: int, seed: int) -> Scores:
    n = len(pool.x)
    if reuse == "repeat":
        fitted = router.clone().fit(traffic.seen, operator=operator, seen=pool.x)
        return Scores([Fit(fitted.score(traffic.calibration), fitted.score(traffic.measure), np.arange(n), fitted.score(pool.x)[:, None])], 1)
    folds = min(folds, pool.units)
    if folds < 2:
        raise UsageError(f"the learned router needs at least two units of {pool.name} to cross-fit, found {pool.units}")
    rng = np.random.default_rng(derive_seed(seed, "folds", pool.name))
    fold_of_unit = rng.permutation(pool.units) % folds
    fold = fold_of_unit[pool.unit_of]
    fits = []
    for f in range(folds):
        rows = np.flatnonzero(fold == f)
        fitted = router.clone().fit(traffic.seen, operator=operator, seen=pool.x[fold != f])
        fits.append(Fit(fitted.score(traffic.calibration), fitted.score(traffic.measure), rows, fitted.score(pool.x[rows])[:, None]))
    return Scores(fits, 1)


def detection_at(changed: np.ndarray, flags: np.ndarray, pool: Pool, budgets: Sequence[int]) -> np.ndarray:
    """Detection rate at each budget when the markers ``flags`` marks (markers, orders) get the intact answer.

    A marker detects when it ``changed`` and was not flagged in the order its unit was sent in.
    """
    escaped = unit_any(np.asarray(changed, dtype=bool)[:, None] & ~np.asarray(flags, dtype=bool), pool.unit_of, pool.units)
    hit = escaped[pool.orders, pool.order_draw % escaped.shape[1]]
    curve = hits_curve(hit, pool.group_size, max(budgets))
    return np.array([curve[b - 1] for b in budgets])
