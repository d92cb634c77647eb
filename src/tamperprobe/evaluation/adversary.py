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
to ``AdversaryEvaluation`` (``tamperprobe.evaluation.results``) and ``write_adversary_report``
(``tamperprobe.evaluation.adversary_report``) writes markdown, CSV and JSON. The bags and the
attacked models are made as the campaign makes them (``tamperprobe.evaluation.runner``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from .._util import Progress, derive_seed
from ..data import Dataset
from ..errors import UsageError
from ..models import Model
from ..outputs import DEFAULT_TOLERANCE, OutputSpec, top_margin
from .adversary_report import COSTS, breaking_cell, markdown, write_adversary_report
from .backends import Cell, LocalBackend, Outcome, RayBackend, get_backend
from .protocol import SELECTIONS
from .results import PASSIVE, AdversaryEvaluation, BreakingRow, ChangedRow, Evaluation, FlaggedRow, PairRow, RoutedDetectionRow, RouterCostRow
from .routers import Operator, Router, get_router, router_names
from .routing import Pool, Scores, Traffic, detection_at, make_pool, score
from .runner import Attacked, AttackRun, Steps, attack_cell, attacker_data, labelled_entries, machine_info, make_bag, plan_attacks

if TYPE_CHECKING:
    from ..attacks.base import Attack
    from ..owner.methods import Bag, Method

__all__ = [
    "BUDGETS",
    "COSTS",
    "PASSIVE",
    "SPECS",
    "SWEEP",
    "AdversaryEvaluation",
    "Traffic",
    "breaking_cell",
    "markdown",
    "pair_guarantee",
    "run_adversary",
    "run_adversary_for",
    "write_adversary_report",
]

SPECS = ("top1", "topk:3", "probs:2", "logits")
BUDGETS = (2, 4, 6, 10)
SWEEP = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # every cost measured (breaking cost)
REUSE = ("fresh", "repeat")
TARGET = 0.99


# ----------------------------------------------------------------------------- internal state


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


_Curves = dict[tuple[str, str, str, str, float], list[np.ndarray]]  # (method, attack, spec, router, cost) -> a curve per trial
_Paid = dict[tuple[str, str, float], list[tuple[float, float]]]  # (router, method, cost) -> [(calibration, measured)]


@dataclass
class _Harness:
    """What the phases of ``run_adversary`` share."""

    model: Model
    data: Dataset
    traffic: Traffic
    settings: _Settings
    ev: AdversaryEvaluation
    steps: Steps
    methods: dict[str, Any]  # label -> name or Method
    method_params: dict[str, dict]
    runs: list[AttackRun]
    attack_params: dict[str, dict]
    routers: list[Router]
    attack_data: Dataset | None
    eval_data: Dataset | None
    operator: Operator
    ordinary_logits: np.ndarray  # the original model on the calibration, then the measurement part
    ordinary_margin: np.ndarray  # its top-1 margin on the measurement part
    pools: dict[str, Pool] = field(default_factory=dict)
    fixed: dict[tuple[str, str], Scores] = field(default_factory=dict)  # (router, method) -> scores of routers blind to T
    curves: _Curves = field(default_factory=dict)
    paid: _Paid = field(default_factory=dict)
    flagged: dict[tuple[str, str, float], list[float]] = field(default_factory=dict)


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
    backend: str | LocalBackend | RayBackend | None = None,
    address: str | None = None,
) -> AdversaryEvaluation:
    """Measure detection against an operator who routes flagged requests to the original model (module doc).

    ``data`` holds the owner's natural inputs (marker seeds); ``traffic`` the operator's ordinary
    traffic (disjoint from ``data``). ``routers`` default to every registered one. Methods,
    attacks and routers are names or instances; ``method_params``/``attack_params`` map a name to
    its keyword parameters. A failing method or attack is recorded in ``errors``; the run goes on.
    ``backend`` runs the bags and the attacked models (``local`` or ``ray``, as ``run_evaluation``);
    the routers are fitted and scored here.
    """
    t_start = time.monotonic()
    runner = get_backend(backend, address)
    s = _check(specs, budgets, costs, bag, trials, resamples, select, folds, reuse, seed, tolerance, target)
    router_list = [get_router(r) for r in (router_names() if routers is None else routers)]
    if len({r.name for r in router_list}) != len(router_list):
        raise UsageError("two routers share a name: give each router once")
    h = _start(model, data, traffic, s, methods, attacks, router_list, attack_data, eval_data, method_params, attack_params, progress)
    try:
        model_ref = runner.put(model)
        attacks_on, eval_ref = runner.put(attack_data if attack_data is not None else data), runner.put(eval_data)
        args = [(model_ref, run, s.seed, h.attack_params.get(run.label), attacks_on, eval_ref, None) for run in h.runs]
        attack_cells = [Cell(f"attack:{a[1].name}", f"attack: {a[1].label} #{a[1].trial}", attack_cell, a) for a in args]
        submitted = runner.submit(attack_cells)  # elsewhere, the attacks start now: they need no bag
        with h.steps.timed("methods"):
            _bags(h, runner, model_ref)
        with h.steps.timed("routers"):
            _fixed_routers(h)
        h.steps.step("routers")
        with h.steps.timed("attacks"):
            for run, out in zip(h.runs, runner.outcomes(attack_cells, submitted, h.steps)):
                _attack(h, run, out)
    finally:
        if runner is not backend:
            runner.close()
    _aggregate(h.ev, s, h.curves, h.paid, h.flagged)
    h.ev.seconds = h.ev.timings["total"] = time.monotonic() - t_start
    return h.ev


def _start(
    model: Model,
    data: Dataset,
    traffic: Traffic,
    s: _Settings,
    methods: Sequence[str | Method],
    attacks: Sequence[str | Attack],
    router_list: list[Router],
    attack_data: Dataset | None,
    eval_data: Dataset | None,
    method_params: dict[str, dict] | None,
    attack_params: dict[str, dict] | None,
    progress: Progress | None,
) -> _Harness:
    """Plan every step, record the parameters, and answer the ordinary traffic with the original model."""
    method_entries = labelled_entries(list(methods))
    attack_entries = labelled_entries(list(attacks))
    runs = plan_attacks(attack_entries, s.trials)
    method_params, attack_params = dict(method_params or {}), dict(attack_params or {})
    params = {
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
    }
    ev = AdversaryEvaluation(params=params, machine=machine_info(), started=datetime.now(UTC).isoformat(timespec="seconds"))
    steps = Steps(progress, len(method_entries) + len(runs) + 1, ev.timings, ev.errors)
    ordinary_logits = model.logits(np.concatenate([traffic.calibration, traffic.measure]))
    ev.model = {"source": model.source, "classes": int(ordinary_logits.shape[1])}
    ordinary_margin = top_margin(ordinary_logits[len(traffic.calibration) :])[1]
    operator = Operator(model, None, float(data.low), float(data.high))
    return _Harness(
        model, data, traffic, s, ev, steps, method_entries, method_params, runs, attack_params, router_list, attack_data, eval_data, operator,
        ordinary_logits, ordinary_margin,
    )  # fmt: skip


def _bags(h: _Harness, runner: LocalBackend | RayBackend, model_ref: Any) -> None:
    """Each method's bag (a cell each), its query units and resampled selections, and how its markers look to the operator."""
    s, data_ref = h.settings, runner.put(h.data)
    args = [(model_ref, data_ref, entry, h.method_params.get(label, {}), s.bag, s.seed, label) for label, entry in h.methods.items()]
    cells = [Cell(f"method:{a[-1]}", f"markers: {a[-1]}", make_bag, a) for a in args]
    for label, out in zip(h.methods, runner.outcomes(cells, runner.submit(cells), h.steps)):
        row: dict[str, Any] = {"method": label, "markers": 0, "error": None}
        try:
            if isinstance(out.error, BaseException):
                raise out.error
            if out.error is not None:
                row["error"] = h.steps.fail("method", label, out.error)
            else:
                generated, row["params"] = out.value
                h.pools[label] = make_pool(h.model, label, generated, budgets=s.budgets, select=s.select, resamples=s.resamples, seed=s.seed)
                row.update(_describe_bag(h.pools[label], generated, h.ordinary_margin, h.data))
        except Exception as exc:
            row["error"] = h.steps.error("method", label, exc)
        h.ev.methods.append(row)


def _fixed_routers(h: _Harness) -> None:
    """Fit and score the routers that do not depend on the tampered model, once for every attack."""
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for router in h.routers:
        if router.uses_tampered:
            continue
        for label, pool in h.pools.items():
            try:
                h.fixed[(router.name, label)] = score(
                    router, pool, h.traffic, h.operator, cache, reuse=h.settings.reuse, folds=h.settings.folds, seed=h.settings.seed
                )
            except Exception as exc:
                h.steps.error("router", f"{router.name} on {label}", exc)


def _attack(h: _Harness, run: AttackRun, out: Outcome) -> None:
    """One attack instance: its effect on ordinary traffic, then every method's detection under every router."""
    s, traffic = h.settings, h.traffic
    row: dict[str, Any] = {"attack": run.label, "trial": run.trial, "error": None}
    try:
        if isinstance(out.error, BaseException):
            raise out.error
        if out.error is not None:
            row["error"] = h.steps.fail("attack", run.name, out.error)
            h.ev.attacks.append(row)
            return
        attacked: Attacked = out.value
        tampered = attacked.model
        row.update(attacked.report())
        row.update(_ordinary_change(s, h.ordinary_logits[len(traffic.calibration) :], tampered.logits(traffic.measure), h.ordinary_margin))
    except Exception as exc:
        row["error"] = h.steps.error("attack", run.name, exc)
        h.ev.attacks.append(row)
        return
    h.ev.attacks.append(row)
    op_t = Operator(h.model, tampered, h.operator.low, h.operator.high)
    t_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, pool in h.pools.items():
        scores = {r.name: h.fixed[(r.name, name)] for r in h.routers if (r.name, name) in h.fixed}
        for router in h.routers:
            if router.uses_tampered:
                try:
                    scores[router.name] = score(router, pool, traffic, op_t, t_cache, reuse=s.reuse, folds=s.folds, seed=s.seed)
                except Exception as exc:
                    h.steps.error("router", f"{router.name} on {name} under {run.name}", exc)
        _measure(h, pool, run, tampered.logits(pool.x), scores)


def _describe_bag(pool: Pool, generated: Bag, ordinary_margin: np.ndarray, data: Dataset) -> dict[str, Any]:
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


def _measure(h: _Harness, pool: Pool, run: AttackRun, tampered: np.ndarray, scores: dict[str, Scores]) -> None:
    """One method under one attack instance: the pair guarantee, each router's flags and cost, and every detection curve."""
    s, n = h.settings, len(pool.x)
    if pool.group_size == 2:
        h.ev.pairs.append(PairRow(pool.name, run.label, run.trial, **pair_guarantee(pool.reference, tampered, pool.unit_of, s.tolerance)))
    flag_sets = {(r, c): sc.flags(n, c) for r, sc in scores.items() for c in s.costs}
    for (r, c), (fl, cal, meas) in flag_sets.items():
        h.paid.setdefault((r, pool.name, c), []).append((cal, meas))
        h.flagged.setdefault((r, pool.name, c), []).append(float(fl.mean()))
    for spec in s.specs:
        changed = spec.changed(pool.reference, tampered, s.tolerance)
        h.ev.trigger.append(ChangedRow(pool.name, run.label, run.trial, str(spec), int(changed.sum()), n))
        h.curves.setdefault((pool.name, run.label, str(spec), PASSIVE, 0.0), []).append(
            detection_at(changed, np.zeros((n, 1), dtype=bool), pool, s.budgets)
        )
        for (r, c), (fl, _, _) in flag_sets.items():
            h.curves.setdefault((pool.name, run.label, str(spec), r, c), []).append(detection_at(changed, fl, pool, s.budgets))


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
        ev.flagged.append(FlaggedRow(m, r, c, cal, meas, float(np.mean(flagged[(r, m, c)]))))
    for (r, c), pairs in cost_paid.items():  # averaged over methods (learned: folds) and attacks (routers on T)
        ev.routers.append(RouterCostRow(r, c, float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs]))))
    mean_curves = {k: (np.mean(v, axis=0), len(v)) for k, v in curves.items()}
    for (m, a, spec, r, c), (curve, n_trials) in mean_curves.items():
        meas = 0.0 if r == PASSIVE else float(np.mean([p[1] for p in paid[(r, m, c)]]))
        for i, ns in enumerate(s.budgets):
            ev.detection.append(RoutedDetectionRow(m, a, spec, r, c, meas, ns, float(curve[i]), n_trials))
    top = len(s.budgets) - 1
    for (m, a, spec, r, c), _ in mean_curves.items():
        if r != PASSIVE or c != 0.0:
            continue
        passive = float(mean_curves[(m, a, spec, PASSIVE, 0.0)][0][top])
        for router in dict.fromkeys(k[3] for k in mean_curves if k[3] != PASSIVE):
            sweep = [(cc, float(mean_curves[(m, a, spec, router, cc)][0][top])) for cc in s.costs if (m, a, spec, router, cc) in mean_curves]
            below = [(cc, rate) for cc, rate in sweep if rate < s.target]
            row = BreakingRow(m, a, spec, router, s.budgets[top], passive)
            if passive < s.target:
                row = row.replace(status="passive below target")
            elif not below:
                row = row.replace(status="never")
            else:
                cc, rate = below[0]
                row = row.replace(status="falls", cost=cc, measured_cost=float(np.mean([p[1] for p in paid[(router, m, cc)]])), rate=rate)
            ev.breaking.append(row)


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
    backend: str | LocalBackend | RayBackend | None = None,
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
        backend=backend,
    )
