"""An operator who sees the queries: how much detection survives when the server routes markers to the original model.

The threat (``tamperprobe.evaluation.routers``): the party running the server holds the original
model O and a tampered copy T, sees every request, answers the requests a *router* flags with O
and the rest with T. A flagged marker always gets the intact answer. The operator pays for O on
the ordinary requests it flags: the router's **cost**, the share of ordinary traffic flagged.

``run_adversary`` measures, for every marker method, attack, output spec and router:

1. **Traffic.** The operator's ordinary traffic (``Traffic``) comes in three disjoint parts of
   natural inputs, none used as a marker seed: ``seen`` (earlier traffic: the history of the
   stream routers and the negatives of the learned one), ``calibration`` (where the operator
   picks each threshold, ``routers.threshold_for_cost``) and ``measure`` (held out: the cost
   actually paid, with the threshold from calibration).
2. **Bags.** Each method generates a bag of candidate markers from the owner's ``data``
   (``campaign.make_bag``, seeded as in the campaign). The bag is the pool a fingerprint draws
   from; the query units (boundary pairs picked whole) and the resampled selections are those
   of the campaign (``protocol.selection_orders`` / ``manc_orders``, ``resamples`` of them).
3. **Runs.** ``reuse="fresh"`` (the default) models a verifier that never sends a marker twice:
   the current run's markers are new to the operator, who has however seen the rest of the pool
   in earlier runs. So a stream router compares a marker with all ordinary traffic, every
   marker of the other units, and the members of its own unit sent before it in the run (the
   order within a unit is drawn per selection; every order is scored). The learned router is
   cross-fitted: the units are split into ``folds`` folds, and each fold is scored by a
   detector trained on the markers of the other folds against the ``seen`` traffic, with its
   own threshold. ``reuse="repeat"`` models today's ``watch``, which re-sends the same markers
   every run: the operator has seen this very selection (the whole bag, conservatively) and the
   learned router trains on all of it.
4. **Attacks.** Each attack runs on a copy of the model with ``attack_data`` (the operator's
   labelled data; default ``data``), ``trials`` seeded instances of the random ones.
5. **Detection under a router.** A marker's answer changes under a spec when
   ``OutputSpec.changed`` says so for T's logits; under a router it reveals the tampering only
   when it changed **and** was not flagged. A unit detects when one of its members does; a
   selection of N_S queries detects when one of its units does (``protocol.hits_curve``), and
   the detection rate is the share of resampled selections that detect, averaged over attack
   instances. The passive case (no router) is the campaign's measurement. Thresholds are
   computed for every cost of ``costs`` (a sweep); ``COSTS`` are the headline ones.
6. **Breaking cost.** For each (method, attack, spec, router), the smallest cost of the sweep at
   which the detection rate at the largest budget falls below ``target`` (99 %).

Every row records the cost measured on the held-out part next to the cost asked for. Results go
to ``AdversaryEvaluation`` (plain rows) and ``write_adversary_report`` writes markdown, CSV and
JSON.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._util import Progress, atomic_write_text, derive_seed, one_line
from ..attacks import get_attack
from ..data import Dataset
from ..errors import UsageError
from ..models import Model, TorchModel
from ..outputs import DEFAULT_TOLERANCE, OutputSpec, top_margin
from ..owner.selection import units_of
from .campaign import attacker_data, instances_of, labelled_entries, machine_info, make_bag
from .protocol import SELECTIONS, hits_curve, manc_orders, selection_orders, unit_any
from .report import fmt_cell, jsonable, md_table, write_csv
from .routers import Operator, Router, cost_of, get_router, router_names, threshold_for_cost

if TYPE_CHECKING:
    from ..attacks.base import Attack
    from ..owner.methods import Bag, Method
    from .campaign import Evaluation

SPECS = ("top1", "topk:3", "probs:2", "logits")
BUDGETS = (2, 4, 6, 10)
COSTS = (0.01, 0.05, 0.2)  # the operator costs the tables show
SWEEP = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # every cost measured (breaking cost)
REUSE = ("fresh", "repeat")
TARGET = 0.99
PASSIVE = "passive"
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
class AdversaryEvaluation:
    """Everything ``run_adversary`` measured; rows are plain dicts (one CSV line each)."""

    params: dict[str, Any]
    machine: dict[str, Any]
    started: str
    seconds: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)
    methods: list[dict] = field(default_factory=list)
    attacks: list[dict] = field(default_factory=list)
    routers: list[dict] = field(default_factory=list)  # threshold and costs per router, cost (and attack for T routers)
    flagged: list[dict] = field(default_factory=list)  # share of each method's markers a router flags
    trigger: list[dict] = field(default_factory=list)  # share of markers whose answer changed (passive)
    pairs: list[dict] = field(default_factory=list)  # what the label-only guarantee of two-member units became
    detection: list[dict] = field(default_factory=list)
    breaking: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    _index: dict[tuple, float] = field(default_factory=dict, repr=False)

    def rate(self, method: str, attack: str, spec: str, router: str, cost: float, ns: int) -> float | None:
        """One detection rate (``router="passive"``, cost 0, for no router); None when not measured."""
        if len(self._index) != len(self.detection):
            self._index = {(r["method"], r["attack"], r["spec"], r["router"], round(r["cost"], 9), r["ns"]): r["rate"] for r in self.detection}
        value = self._index.get((method, attack, spec, router, round(cost, 9), ns))
        return None if value is None else float(value)

    def names(self) -> tuple[list[str], list[str], list[str]]:
        """Methods, attacks and routers that were measured, in order."""
        methods = list(dict.fromkeys(r["method"] for r in self.detection))
        attacks = list(dict.fromkeys(r["attack"] for r in self.detection))
        routers = [r for r in dict.fromkeys(r["router"] for r in self.detection) if r != PASSIVE]
        return methods, attacks, routers

    def to_json(self) -> dict[str, Any]:
        return jsonable(
            {
                "format": "tamperprobe.adversary/v1",
                "params": self.params,
                "machine": self.machine,
                "started": self.started,
                "seconds": round(self.seconds, 3),
                "model": self.model,
                "methods": self.methods,
                "attacks": self.attacks,
                "routers": self.routers,
                "flagged": self.flagged,
                "trigger": self.trigger,
                "pairs": self.pairs,
                "detection": self.detection,
                "breaking": self.breaking,
                "errors": self.errors,
                "timings": {k: round(v, 3) for k, v in self.timings.items()},
            }
        )


# ----------------------------------------------------------------------------- internal state


@dataclass
class _Pool:
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
class _Fit:
    """One fitted router's scores: ordinary calibration and measurement parts, and the markers it scores."""

    calibration: np.ndarray
    measure: np.ndarray
    rows: np.ndarray  # marker indices scored by this fit
    markers: np.ndarray  # (len(rows), orders): a marker's score for each within-unit order


@dataclass
class _Scores:
    fits: list[_Fit]
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


@dataclass(frozen=True)
class _Settings:
    specs: tuple[OutputSpec, ...]
    budgets: tuple[int, ...]
    costs: tuple[float, ...]
    bag: int
    trials: int
    resamples: int
    select: str
    folds: int
    reuse: str
    seed: int
    tolerance: float
    target: float


def _check(
    specs: Sequence[str],
    budgets: Sequence[int],
    costs: Sequence[float],
    bag: int,
    trials: int,
    resamples: int,
    select: str,
    folds: int,
    reuse: str,
    seed: int,
    tolerance: float,
    target: float,
) -> _Settings:
    names = list(dict.fromkeys(str(OutputSpec.parse(s)) for s in specs))
    if not names:
        raise UsageError("give at least one output spec")
    if not budgets or any(int(b) != b or b < 1 for b in budgets):
        raise UsageError(f"query budgets must be whole numbers >= 1, got {list(budgets)}")
    if any(not 0.0 <= c <= 1.0 for c in costs):
        raise UsageError(f"costs are shares of ordinary traffic in [0, 1], got {list(costs)}")
    if select not in SELECTIONS:
        raise UsageError(f"unknown selection {select!r}: choose {' or '.join(SELECTIONS)}")
    if reuse not in REUSE:
        raise UsageError(f"unknown reuse {reuse!r}: choose {' or '.join(REUSE)}")
    if min(bag, trials, resamples) < 1 or folds < 2:
        raise UsageError("bag, trials and resamples must be at least 1, folds at least 2")
    if not 0.0 < target <= 1.0:
        raise UsageError(f"the target detection rate must be in (0, 1], got {target}")
    return _Settings(
        specs=tuple(OutputSpec.parse(s) for s in names),
        budgets=tuple(sorted({int(b) for b in budgets})),
        costs=tuple(sorted({float(c) for c in costs})),
        bag=int(bag),
        trials=int(trials),
        resamples=int(resamples),
        select=select,
        folds=int(folds),
        reuse=reuse,
        seed=int(seed),
        tolerance=float(tolerance),
        target=float(target),
    )


def _no_progress(done: int, total: int, what: str = "", /) -> None:
    return None


# ----------------------------------------------------------------------------- run_adversary


def run_adversary(
    model: Model,
    data: Dataset,
    traffic: Traffic,
    *,
    methods: Sequence[str | Method] = ("boundary",),
    attacks: Sequence[str | Attack] = ("noise",),
    routers: Sequence[str | Router] | None = None,
    attack_data: Dataset | None = None,
    eval_data: Dataset | None = None,
    specs: Sequence[str] = SPECS,
    budgets: Sequence[int] = BUDGETS,
    costs: Sequence[float] = SWEEP,
    bag: int = 100,
    trials: int = 1,
    resamples: int = 2000,
    select: str = "random",
    folds: int = 5,
    reuse: str = "fresh",
    seed: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
    target: float = TARGET,
    method_params: dict[str, dict] | None = None,
    attack_params: dict[str, dict] | None = None,
    progress: Progress | None = None,
) -> AdversaryEvaluation:
    """Measure detection against an operator who routes flagged requests to the original model (module doc).

    ``data`` holds the owner's natural inputs (marker seeds); ``traffic`` the operator's ordinary
    traffic (disjoint from ``data``). ``routers`` default to every registered one. Methods,
    attacks and routers are names or instances; ``method_params``/``attack_params`` map a name to
    its keyword parameters. A failing method or attack is recorded in ``errors``; the run goes on.
    """
    t_start = time.monotonic()
    s = _check(specs, budgets, costs, bag, trials, resamples, select, folds, reuse, seed, tolerance, target)
    progress = progress or _no_progress
    method_entries = labelled_entries(list(methods))
    attack_entries = labelled_entries(list(attacks))
    router_list = [get_router(r) for r in (router_names() if routers is None else routers)]
    if len({r.name for r in router_list}) != len(router_list):
        raise UsageError("two routers share a name: give each router once")
    runs = [(label, t, entry) for label, entry in attack_entries.items() for t in range(instances_of(entry, s.trials))]
    method_params, attack_params = dict(method_params or {}), dict(attack_params or {})
    ev = AdversaryEvaluation(
        params={
            "seed": s.seed,
            "methods": list(method_entries),
            "attacks": list(attack_entries),
            "routers": [r.name for r in router_list],
            "router_params": {r.name: r.get_params() for r in router_list},
            "specs": [str(x) for x in s.specs],
            "budgets": list(s.budgets),
            "costs": list(s.costs),
            "bag": s.bag,
            "trials": s.trials,
            "resamples": s.resamples,
            "select": s.select,
            "folds": s.folds,
            "reuse": s.reuse,
            "tolerance": s.tolerance,
            "target": s.target,
            "method_params": method_params,
            "attack_params": attack_params,
            "data": {"name": data.name, "size": len(data), "low": float(data.low), "high": float(data.high)},
            "traffic": traffic.sizes(),
            "attack_data": None if attack_data is None else {"name": attack_data.name, "size": len(attack_data)},
        },
        machine=machine_info(),
        started=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    total = len(method_entries) + len(runs) + 1
    done = [0]

    def step(what: str) -> None:
        done[0] += 1
        progress(done[0], total, what)

    operator = Operator(model, None, float(data.low), float(data.high))
    ordinary_logits = model.logits(np.concatenate([traffic.calibration, traffic.measure]))
    ev.model = {"source": model.source, "classes": int(ordinary_logits.shape[1])}
    ordinary_margin = top_margin(ordinary_logits[len(traffic.calibration) :])[1]

    # bags, their selections and the routers that do not depend on the tampered model
    pools: dict[str, _Pool] = {}
    t0 = time.monotonic()
    for label, entry in method_entries.items():
        row: dict[str, Any] = {"method": label, "markers": 0, "error": None}
        try:
            generated, row["params"] = make_bag(model, data, entry, method_params.get(label, {}), s.bag, s.seed, label)
            pools[label] = _pool(model, label, generated, s)
            row.update(_describe_bag(pools[label], generated, ordinary_margin, data))
        except Exception as exc:
            row["error"] = _error(ev, "method", label, exc)
        ev.methods.append(row)
        step(f"markers: {label}")
    ev.timings["methods"] = time.monotonic() - t0

    t0 = time.monotonic()
    fixed: dict[tuple[str, str], _Scores] = {}
    ordinary_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for router in router_list:
        if router.uses_tampered:
            continue
        for label, pool in pools.items():
            try:
                fixed[(router.name, label)] = _score(router, pool, traffic, operator, s, ordinary_cache)
            except Exception as exc:
                _error(ev, "router", f"{router.name} on {label}", exc)
    ev.timings["routers"] = time.monotonic() - t0
    step("routers")

    curves: dict[tuple[str, str, str, str, float], list[np.ndarray]] = {}
    paid: dict[tuple[str, str, float], list[tuple[float, float]]] = {}  # (router, method, cost) -> [(calibration, measured)]
    flagged: dict[tuple[str, str, float], list[float]] = {}
    t0 = time.monotonic()
    for label, trial, entry in runs:
        row = {"attack": label, "trial": trial, "error": None}
        try:
            module = model.require_torch("an attack")
            aseed = derive_seed(s.seed, "attack", label, trial)
            result = get_attack(entry, attack_params.get(label)).run(
                module, attack_data if attack_data is not None else data, seed=aseed, eval_data=eval_data
            )
            tampered = TorchModel(result.model, f"attack:{label}")
            row.update(
                seed=aseed,
                params=jsonable(result.params),
                acc_before=jsonable(result.acc_before),
                acc_after=jsonable(result.acc_after),
                success=jsonable(result.success),
                changed=jsonable(result.changed),
            )
            row.update(_ordinary_change(s, ordinary_logits[len(traffic.calibration) :], tampered.logits(traffic.measure), ordinary_margin))
        except Exception as exc:
            row["error"] = _error(ev, "attack", f"{label}#{trial}", exc)
            ev.attacks.append(row)
            step(f"attack: {label} #{trial}")
            continue
        ev.attacks.append(row)
        op_t = Operator(model, tampered, operator.low, operator.high)
        t_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, pool in pools.items():
            scores = dict((r.name, fixed[(r.name, name)]) for r in router_list if (r.name, name) in fixed)
            for router in router_list:
                if router.uses_tampered:
                    try:
                        scores[router.name] = _score(router, pool, traffic, op_t, s, t_cache)
                    except Exception as exc:
                        _error(ev, "router", f"{router.name} on {name} under {label}#{trial}", exc)
            _measure(ev, s, pool, label, trial, tampered.logits(pool.x), scores, curves, paid, flagged)
        step(f"attack: {label} #{trial}")
    ev.timings["attacks"] = time.monotonic() - t0
    _aggregate(ev, s, curves, paid, flagged)
    ev.seconds = ev.timings["total"] = time.monotonic() - t_start
    return ev


def _error(ev: AdversaryEvaluation, stage: str, name: str, exc: BaseException) -> str:
    text = one_line(exc, with_type=True)
    ev.errors.append({"stage": stage, "name": name, "error": text})
    return text


def _pool(model: Model, label: str, generated: Bag, s: _Settings) -> _Pool:
    x = np.ascontiguousarray(generated.inputs, dtype=np.float32)
    unit_of, units, sizes = units_of(generated.groups, len(x))
    g = int(sizes.max())
    if g > 6:
        raise UsageError(f"units of {g} markers: the harness scores every order of a unit, at most 6 members")
    depth = max(1, max(s.budgets) // g)
    rng = np.random.default_rng(derive_seed(s.seed, "select", s.select, label))
    if s.select == "manc":
        from ..owner.features import activations

        active = activations(model, x) > 0
        orders = manc_orders(unit_any(active, unit_of, units).astype(np.float32), depth, s.resamples, rng)
    else:
        orders = selection_orders(units, depth, s.resamples, rng)
    draw = rng.integers(0, _ORDERS, size=orders.shape)
    return _Pool(label, x, model.logits(x), unit_of, units, g, orders, draw)


def _describe_bag(pool: _Pool, generated: Bag, ordinary_margin: np.ndarray, data: Dataset) -> dict[str, Any]:
    """How the markers look to an operator: margins against ordinary traffic (KS test), distance to seeds, twin distance."""
    from scipy.stats import ks_2samp

    from .routers import nearest_earlier

    margin = top_margin(pool.reference)[1]
    ks = ks_2samp(margin, ordinary_margin)
    span = float(data.high - data.low)
    seeds = np.asarray(generated.seeds, dtype=np.float64).reshape(len(pool.x), -1)
    diff = np.abs(pool.x.reshape(len(pool.x), -1).astype(np.float64) - seeds).max(axis=1) / span
    twins = []
    for u in range(pool.units):
        members = np.flatnonzero(pool.unit_of == u)
        if len(members) > 1:
            twins.append(float(nearest_earlier(pool.x[members]).min()))
    return {
        "markers": len(pool.x),
        "units": pool.units,
        "group_size": pool.group_size,
        "margin_median": float(np.median(margin)),
        "ordinary_margin_median": float(np.median(ordinary_margin)),
        "margin_ks": float(ks.statistic),
        "margin_ks_p": float(ks.pvalue),
        "linf_to_seed_max": float(diff.max()),
        "linf_to_seed_median": float(np.median(diff)),
        "twin_distance_median": float(np.median(twins)) if twins else None,
    }


def _orders_of(g: int) -> list[tuple[int, ...]]:
    return list(itertools.permutations(range(g)))


def _score(
    router: Router, pool: _Pool, traffic: Traffic, operator: Operator, s: _Settings, cache: dict[str, tuple[np.ndarray, np.ndarray]]
) -> _Scores:
    """Fit ``router`` as the operator would and score the ordinary parts and every marker of ``pool``."""
    n = len(pool.x)
    if router.learns_markers:
        return _score_learned(router, pool, traffic, operator, s)
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
    if not router.stream:
        return _Scores([_Fit(cal, meas, np.arange(n), fitted.score(pool.x)[:, None])], 1)
    ordinary = [np.asarray(p, dtype=np.float64) for p in (traffic.seen, traffic.calibration, traffic.measure)]
    if s.reuse == "repeat":  # the operator saw this very selection in the previous run
        return _Scores([_Fit(cal, meas, np.arange(n), fitted.score(pool.x, [*ordinary, pool.x])[:, None])], 1)
    orders = _orders_of(pool.group_size)
    out = np.zeros((n, len(orders)))
    for u in range(pool.units):
        members = np.flatnonzero(pool.unit_of == u)
        history = [*ordinary, pool.x[pool.unit_of != u]]
        for p, perm in enumerate(orders):
            order = members[list(perm[: len(members)])] if len(members) == pool.group_size else members
            out[order, p] = fitted.score(pool.x[order], history)
    return _Scores([_Fit(cal, meas, np.arange(n), out)], len(orders))


def _score_learned(router: Router, pool: _Pool, traffic: Traffic, operator: Operator, s: _Settings) -> _Scores:
    n = len(pool.x)
    if s.reuse == "repeat":
        fitted = router.clone().fit(traffic.seen, operator=operator, seen=pool.x)
        return _Scores([_Fit(fitted.score(traffic.calibration), fitted.score(traffic.measure), np.arange(n), fitted.score(pool.x)[:, None])], 1)
    folds = min(s.folds, pool.units)
    if folds < 2:
        raise UsageError(f"the learned router needs at least two units of {pool.name} to cross-fit, found {pool.units}")
    rng = np.random.default_rng(derive_seed(s.seed, "folds", pool.name))
    fold_of_unit = rng.permutation(pool.units) % folds
    fold = fold_of_unit[pool.unit_of]
    fits = []
    for f in range(folds):
        rows = np.flatnonzero(fold == f)
        fitted = router.clone().fit(traffic.seen, operator=operator, seen=pool.x[fold != f])
        fits.append(_Fit(fitted.score(traffic.calibration), fitted.score(traffic.measure), rows, fitted.score(pool.x[rows])[:, None]))
    return _Scores(fits, 1)


def _ordinary_change(s: _Settings, intact: np.ndarray, tampered: np.ndarray, margin: np.ndarray) -> dict[str, Any]:
    """How much of the ordinary (measurement) traffic T answers differently, per spec and above margin quantiles."""
    out: dict[str, Any] = {}
    for spec in s.specs:
        out[f"ordinary_changed:{spec}"] = float(spec.changed(intact, tampered, s.tolerance).mean())
    top1 = OutputSpec.parse("top1").changed(intact, tampered, s.tolerance)
    for q in COSTS:
        above = margin > np.quantile(margin, q)
        out[f"ordinary_top1_changed_above_q{q:g}"] = float(top1[above].mean()) if above.any() else None
    return out


def _measure(
    ev: AdversaryEvaluation,
    s: _Settings,
    pool: _Pool,
    attack: str,
    trial: int,
    tampered: np.ndarray,
    scores: dict[str, _Scores],
    curves: dict[tuple[str, str, str, str, float], list[np.ndarray]],
    paid: dict[tuple[str, str, float], list[tuple[float, float]]],
    flagged: dict[tuple[str, str, float], list[float]],
) -> None:
    n = len(pool.x)
    if pool.group_size == 2:
        ev.pairs.append(
            {"method": pool.name, "attack": attack, "trial": trial, **pair_guarantee(pool.reference, tampered, pool.unit_of, s.tolerance)}
        )
    flag_sets = {(r, c): sc.flags(n, c) for r, sc in scores.items() for c in s.costs}
    for (r, c), (fl, cal, meas) in flag_sets.items():
        paid.setdefault((r, pool.name, c), []).append((cal, meas))
        flagged.setdefault((r, pool.name, c), []).append(float(fl.mean()))
    for spec in s.specs:
        changed = spec.changed(pool.reference, tampered, s.tolerance)
        ev.trigger.append({"method": pool.name, "attack": attack, "trial": trial, "spec": str(spec), "changed": int(changed.sum()), "markers": n})
        curves.setdefault((pool.name, attack, str(spec), PASSIVE, 0.0), []).append(
            detection_at(changed, np.zeros((n, 1), dtype=bool), pool, s.budgets)
        )
        for (r, c), (fl, _, _) in flag_sets.items():
            curves.setdefault((pool.name, attack, str(spec), r, c), []).append(detection_at(changed, fl, pool, s.budgets))


def campaign_tolerance(campaign: Evaluation) -> float:
    """The campaign's tolerance: the given one, or the largest it measured for a method (this sweep takes one for all)."""
    given = campaign.params["tolerance"]
    if given is not None:
        return float(given)
    return max((float(r["tolerance"]) for r in campaign.methods if r.get("tolerance") is not None), default=DEFAULT_TOLERANCE)


def pair_guarantee(intact: np.ndarray, tampered: np.ndarray, unit_of: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, int]:
    """What the label-only guarantee of two-member units (boundary or crossed pairs) became under one tampering.

    For a pair labelled ``a`` and ``c`` by the intact model, Δ_i is the change of ``z_a − z_c`` at
    half ``i``. The pair is *shifted* when both |Δ_i| exceed both halves' top-1 margins (the
    boundary moved by more than the band at both points), *opposite* when the two Δ differ in
    sign, and *silent* when neither half's top-1 label changed. A near-twin pair is never silent
    when shifted; a pair of distant halves can be, when the boundary moved apart (opposite signs).
    """
    labels = intact.argmax(axis=1)
    margin = top_margin(intact)[1]
    changed = OutputSpec.parse("top1").changed(intact, tampered, tolerance)
    counts = {"pairs": 0, "shifted": 0, "shifted_opposite": 0, "silent_shifted": 0, "silent_shifted_same_sign": 0}
    for u in np.unique(unit_of):
        members = np.flatnonzero(unit_of == u)
        if len(members) != 2 or labels[members[0]] == labels[members[1]]:
            continue
        a, c = labels[members[0]], labels[members[1]]
        d = (tampered[members, a] - tampered[members, c]).astype(np.float64) - (intact[members, a] - intact[members, c]).astype(np.float64)
        counts["pairs"] += 1
        if np.abs(d).min() <= margin[members].max():
            continue
        counts["shifted"] += 1
        opposite = bool(np.sign(d[0]) != np.sign(d[1]))
        counts["shifted_opposite"] += int(opposite)
        if not changed[members].any():
            counts["silent_shifted"] += 1
            counts["silent_shifted_same_sign"] += int(not opposite)
    return counts


def detection_at(changed: np.ndarray, flags: np.ndarray, pool: _Pool, budgets: Sequence[int]) -> np.ndarray:
    """Detection rate at each budget when the markers ``flags`` marks (markers, orders) get the intact answer.

    A marker detects when it ``changed`` and was not flagged in the order its unit was sent in.
    """
    escaped = unit_any(np.asarray(changed, dtype=bool)[:, None] & ~np.asarray(flags, dtype=bool), pool.unit_of, pool.units)
    hit = escaped[pool.orders, pool.order_draw % escaped.shape[1]]
    curve = hits_curve(hit, pool.group_size, max(budgets))
    return np.array([curve[b - 1] for b in budgets])


def _aggregate(
    ev: AdversaryEvaluation,
    s: _Settings,
    curves: dict[tuple[str, str, str, str, float], list[np.ndarray]],
    paid: dict[tuple[str, str, float], list[tuple[float, float]]],
    flagged: dict[tuple[str, str, float], list[float]],
) -> None:
    cost_paid: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for (r, m, c), pairs in paid.items():
        cal, meas = float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs]))
        cost_paid.setdefault((r, c), []).extend(pairs)
        ev.flagged.append(
            {"method": m, "router": r, "cost": c, "calibration_cost": cal, "measured_cost": meas, "flagged": float(np.mean(flagged[(r, m, c)]))}
        )
    for (r, c), pairs in cost_paid.items():  # averaged over methods (learned: folds) and attacks (routers on T)
        ev.routers.append(
            {
                "router": r,
                "cost": c,
                "calibration_cost": float(np.mean([p[0] for p in pairs])),
                "measured_cost": float(np.mean([p[1] for p in pairs])),
            }
        )
    mean_curves = {k: (np.mean(v, axis=0), len(v)) for k, v in curves.items()}
    for (m, a, spec, r, c), (curve, n_trials) in mean_curves.items():
        meas = 0.0 if r == PASSIVE else float(np.mean([p[1] for p in paid[(r, m, c)]]))
        for i, ns in enumerate(s.budgets):
            ev.detection.append(
                {
                    "method": m,
                    "attack": a,
                    "spec": spec,
                    "router": r,
                    "cost": c,
                    "measured_cost": meas,
                    "ns": ns,
                    "rate": float(curve[i]),
                    "trials": n_trials,
                }
            )
    top = len(s.budgets) - 1
    for (m, a, spec, r, c), _ in mean_curves.items():
        if r != PASSIVE or c != 0.0:
            continue
        passive = float(mean_curves[(m, a, spec, PASSIVE, 0.0)][0][top])
        for router in dict.fromkeys(k[3] for k in mean_curves if k[3] != PASSIVE):
            sweep = [(cc, float(mean_curves[(m, a, spec, router, cc)][0][top])) for cc in s.costs if (m, a, spec, router, cc) in mean_curves]
            below = [(cc, rate) for cc, rate in sweep if rate < s.target]
            row = {
                "method": m,
                "attack": a,
                "spec": spec,
                "router": router,
                "ns": s.budgets[top],
                "passive": passive,
                "cost": None,
                "measured_cost": None,
                "rate": None,
            }
            if passive < s.target:
                row["status"] = "passive below target"
            elif not below:
                row["status"] = "never"
            else:
                cc, rate = below[0]
                row.update(status="falls", cost=cc, measured_cost=float(np.mean([p[1] for p in paid[(router, m, cc)]])), rate=rate)
            ev.breaking.append(row)


# ----------------------------------------------------------------------------- report


def breaking_cell(row: dict[str, Any] | None) -> str:
    """A breaking-cost table cell: the cost asked for (measured) at which detection falls below the target."""
    if row is None:
        return "–"
    if row["status"] == "passive below target":
        return f"passive {row['passive']:.2f}"
    if row["status"] == "never":
        return "> sweep"
    return f"{row['cost']:.2%} ({row['measured_cost']:.2%})"


def markdown(ev: AdversaryEvaluation, costs: Sequence[float] = COSTS) -> str:
    """The report: setup, markers as the operator sees them, router costs, flagged shares, detection tables, breaking costs."""
    p = ev.params
    methods, attacks, routers = ev.names()
    budgets = p["budgets"]
    top = budgets[-1]
    lines = [
        f"# An operator who sees the queries: {ev.model.get('source')}",
        "",
        f"- started {ev.started}, took {ev.seconds:.0f} s on {ev.machine.get('nproc')} cores ({ev.machine.get('cpu')}, torch {ev.machine.get('torch')})",
        f"- owner data {p['data']['name']} ({p['data']['size']} inputs, marker seeds); ordinary traffic {p['traffic']}; attack data "
        + (f"{p['attack_data']['name']} ({p['attack_data']['size']})" if p.get("attack_data") else "the owner data"),
        f"- bag {p['bag']} per method; {p['select']} selection over {p['resamples']} resamples; budgets N_S = {budgets}; "
        f"markers {'fresh every run (never re-sent)' if p['reuse'] == 'fresh' else 'repeated every run'}; learned router cross-fitted over {p['folds']} folds",
        f"- routers {', '.join(p['routers'])}; thresholds set on the calibration part for costs {[f'{c:.2%}' for c in p['costs']]}; "
        "costs paid measured on the held-out part",
        "",
        "## Markers as the operator sees them",
        "",
        "Margin: top-1 minus top-2 logit of the original model; KS: two-sample Kolmogorov–Smirnov test of the markers' margins "
        "against the ordinary traffic's (p > 0.05: indistinguishable at 5 %). L∞ to seed in units of the input range; twin "
        "distance: L2 between the members of a unit.",
        "",
    ]
    rows = [
        [
            r["method"],
            r.get("markers"),
            r.get("units"),
            r.get("margin_median"),
            r.get("ordinary_margin_median"),
            r.get("margin_ks"),
            None if r.get("margin_ks_p") is None else f"{r['margin_ks_p']:.2g}",
            r.get("linf_to_seed_max"),
            r.get("twin_distance_median"),
            r.get("error"),
        ]
        for r in ev.methods
    ]
    lines.append(
        md_table(["method", "markers", "units", "margin median", "ordinary median", "KS D", "KS p", "max L∞ to seed", "twin distance", "error"], rows)
    )
    lines += ["", "## Attacks", ""]
    spec_keys = [f"ordinary_changed:{x}" for x in p["specs"]]
    lines.append(
        md_table(
            ["attack", "trial", "acc before", "acc after", "success"] + [f"ordinary changed ({x})" for x in p["specs"]] + ["error"],
            [
                [r["attack"], r["trial"], r.get("acc_before"), r.get("acc_after"), r.get("success")]
                + [r.get(k) for k in spec_keys]
                + [r.get("error")]
                for r in ev.attacks
            ],
        )
    )
    lines += [
        "",
        "## What each router costs",
        "",
        "Share of ordinary traffic flagged (answered by the original model): on the calibration part / on the held-out part.",
        "",
    ]
    cost_of_row = {(r["router"], r["cost"]): r for r in ev.routers}
    lines.append(
        md_table(
            ["router"] + [f"{c:.2%}" for c in p["costs"]],
            [
                [r]
                + [
                    f"{cost_of_row[(r, c)]['calibration_cost']:.2%} / {cost_of_row[(r, c)]['measured_cost']:.2%}" if (r, c) in cost_of_row else None
                    for c in p["costs"]
                ]
                for r in routers
            ],
        )
    )
    lines += ["", "## Share of markers each router flags", ""]
    fl = {(r["method"], r["router"], r["cost"]): r["flagged"] for r in ev.flagged}
    lines.append(
        md_table(
            ["method"] + [f"{r} @{c:.0%}" for r in routers for c in costs],
            [[m] + [fl.get((m, r, c)) for r in routers for c in costs] for m in methods],
        )
    )
    for spec in p["specs"]:
        lines += ["", f"## Detection ({spec})", ""]
        if spec == p["specs"][0]:
            lines += [f"Each cell: detection rate at N_S = {' / '.join(map(str, budgets))}.", ""]
            for r in routers:
                lines += [f"**{r}**", ""]
                header = ["method", "attack", PASSIVE] + [f"{r} @{c:.0%}" for c in costs]
                body: list[list[Any]] = []
                for m in methods:
                    for a in attacks:
                        cells = [_curve_cell(ev, m, a, spec, PASSIVE, 0.0, budgets)] + [_curve_cell(ev, m, a, spec, r, c, budgets) for c in costs]
                        body.append([m, a, *cells])
                lines += [md_table(header, body), ""]
        else:
            lines += [f"Detection rate at N_S = {top}.", ""]
            header = ["method", "attack", PASSIVE] + [f"{r} @{c:.0%}" for r in routers for c in costs]
            body = [
                [m, a, ev.rate(m, a, spec, PASSIVE, 0.0, top), *[ev.rate(m, a, spec, r, c, top) for r in routers for c in costs]]
                for m in methods
                for a in attacks
            ]
            lines += [md_table(header, body), ""]
    if ev.pairs:
        lines += [
            "",
            "## Pairs: what the label-only guarantee became",
            "",
            "Per attack (summed over trials): pairs; *shifted*: z_a − z_c moved by more than both halves' margins at both halves; "
            "of those, with opposite signs at the two halves; and *silent* (no half's top-1 label changed), in total and with the same sign.",
            "",
        ]
        summed: dict[tuple[str, str], dict[str, int]] = {}
        for pair_row in ev.pairs:
            acc = summed.setdefault((pair_row["method"], pair_row["attack"]), {})
            for k in ("pairs", "shifted", "shifted_opposite", "silent_shifted", "silent_shifted_same_sign"):
                acc[k] = acc.get(k, 0) + int(pair_row[k])
        lines.append(
            md_table(
                ["method", "attack", "pairs", "shifted", "shifted, opposite signs", "shifted and silent", "shifted, same sign, silent"],
                [
                    [m, a, v["pairs"], v["shifted"], v["shifted_opposite"], v["silent_shifted"], v["silent_shifted_same_sign"]]
                    for (m, a), v in summed.items()
                ],
            )
        )
    lines += [
        "",
        f"## Cost at which detection at N_S = {top} falls below {p['target']:.0%}",
        "",
        "The smallest cost of the sweep (asked for; paid on the held-out part in brackets) at which the detection rate falls below "
        "the target; '> sweep': still above it at the largest cost; 'passive x': below it even without a router.",
        "",
    ]
    br = {(r["method"], r["attack"], r["spec"], r["router"]): r for r in ev.breaking}
    for spec in p["specs"]:
        lines += [f"**{spec}**", ""]
        lines.append(
            md_table(
                ["method", "attack"] + routers, [[m, a] + [breaking_cell(br.get((m, a, spec, r))) for r in routers] for m in methods for a in attacks]
            )
        )
        lines.append("")
    if ev.errors:
        lines += [
            "## Errors (the run continued)",
            "",
            md_table(["stage", "name", "error"], [[e["stage"], e["name"], e["error"]] for e in ev.errors]),
            "",
        ]
    lines += ["## Timings (seconds)", "", md_table(["phase", "seconds"], [[k, v] for k, v in ev.timings.items()]), ""]
    return "\n".join(lines) + "\n"


def _curve_cell(ev: AdversaryEvaluation, m: str, a: str, spec: str, r: str, c: float, budgets: Sequence[int]) -> str:
    rates = [ev.rate(m, a, spec, r, c, ns) for ns in budgets]
    return " / ".join(fmt_cell(x, 2) for x in rates)


CSV_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "methods.csv": (
        "methods",
        (
            "method",
            "markers",
            "units",
            "group_size",
            "margin_median",
            "ordinary_margin_median",
            "margin_ks",
            "margin_ks_p",
            "linf_to_seed_max",
            "twin_distance_median",
            "params",
            "error",
        ),
    ),
    "attacks.csv": ("attacks", ("attack", "trial", "seed", "acc_before", "acc_after", "success", "changed", "params", "error")),
    "routers.csv": ("routers", ("router", "cost", "calibration_cost", "measured_cost")),
    "flagged.csv": ("flagged", ("method", "router", "cost", "calibration_cost", "measured_cost", "flagged")),
    "trigger.csv": ("trigger", ("method", "attack", "trial", "spec", "changed", "markers")),
    "pairs.csv": ("pairs", ("method", "attack", "trial", "pairs", "shifted", "shifted_opposite", "silent_shifted", "silent_shifted_same_sign")),
    "detection.csv": ("detection", ("method", "attack", "spec", "router", "cost", "measured_cost", "ns", "rate", "trials")),
    "breaking.csv": ("breaking", ("method", "attack", "spec", "router", "ns", "passive", "status", "cost", "measured_cost", "rate")),
    "errors.csv": ("errors", ("stage", "name", "error")),
}


def write_adversary_report(ev: AdversaryEvaluation, out_dir: str | os.PathLike, *, costs: Sequence[float] = COSTS) -> list[Path]:
    """Write ``adversary.md``, one CSV per table and ``adversary.json`` into ``out_dir``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_csv(out / name, getattr(ev, attr), cols) for name, (attr, cols) in CSV_TABLES.items()]
    written.append(atomic_write_text(out / "adversary.json", json.dumps(ev.to_json(), separators=(",", ":"), allow_nan=False)))
    written.append(atomic_write_text(out / "adversary.md", markdown(ev, costs)))
    return written


# ----------------------------------------------------------------------------- with a campaign's settings (evaluate --adversary)


TRAFFIC_PARTS = (0.2, 0.4)  # shares of the held-out part the operator saw earlier and calibrates on (the rest: measured)


def run_adversary_for(
    campaign: Evaluation,
    model: Model,
    data: Dataset,
    *,
    routers: Sequence[str | Router] | None = None,
    costs: Sequence[float] = COSTS,
    progress: Progress | None = None,
) -> AdversaryEvaluation:
    """``run_adversary`` with the settings of a campaign run on ``model`` and ``data`` (``evaluate --adversary``).

    The campaign's seeded split is reused: its training part holds the owner's marker seeds (and
    the attacker's data, bounded as in the campaign: ``campaign.attacker_data``), and its held-out part is the operator's ordinary traffic (``TRAFFIC_PARTS``:
    20 % seen earlier, 40 % to calibrate thresholds, 40 % to measure the cost paid) and the
    accuracy set. Methods (baselines included), attacks, output specs, bag, trials, resamples,
    selection, tolerance, seed and parameters are the campaign's; ``costs`` are measured beside
    the sweep and are the ones the tables show.
    """
    p = campaign.params
    train, test = data.split(p["test_fraction"], seed=p["seed"])
    n = len(test)
    seen, calibration = int(TRAFFIC_PARTS[0] * n), int(TRAFFIC_PARTS[1] * n)
    traffic = Traffic.split(test.x, seen=seen, calibration=calibration, seed=derive_seed(p["seed"], "traffic"))
    return run_adversary(
        model,
        train,
        traffic,
        methods=p["methods"],
        attacks=p["attacks"],
        routers=routers,
        attack_data=attacker_data(train, p.get("attack_samples"), p["seed"]),
        eval_data=test,
        specs=p["specs"],
        costs=sorted({*SWEEP, *costs}),
        bag=p["bag"],
        trials=p["trials"],
        resamples=p["resamples"],
        select=p["select"],
        seed=p["seed"],
        tolerance=campaign_tolerance(campaign),
        method_params=p["method_params"],
        attack_params=p["attack_params"],
        progress=progress,
    )
