"""The evaluation campaign: how well does each marker method detect each attack, under each API?

``run_evaluation`` runs a whole campaign on one white-box model and ``write_report``
(``tamperprobe.evaluation.report``) writes it out (markdown, CSV, PNG, ``results.json``). The
steps: split the data (seeded) into the marker seeds' part and the accuracy part; generate a bag
of candidate markers per method and record the intact logits, as a fingerprint would; re-run the
bags under the benign runtimes of ``owner.calibrate`` to set each method's tolerance and count
false alarms (expected 0); run every attack on a copy of the model with the attacker's bounded data;
measure each marker's trigger ratio per output spec; estimate the detection rate against the number
of queries N_S over resampled selections (``evaluation.protocol``: random orderings, or MANC on
random half-bags, pairs picked whole), and the TamperNN key size.

Everything random derives from ``seed`` by name (method, attack, trial), so a seed fixes every
table whichever methods or attacks are included; a failing method, runtime or attack is recorded in
``errors`` and the campaign goes on. An attack none of whose instances moves the logits past the
campaign's benign floor reads "no functional change" instead of a detection rate. The design, step by step, is in ``docs/design/campaign.md``;
what it costs is measured in ``bench/results``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._util import Progress, derive_seed, one_line
from ..attacks import attack_names
from ..data import Dataset
from ..errors import UsageError
from ..fingerprint import MAX_TOLERANCE
from ..models import Model
from ..outputs import DEFAULT_TOLERANCE, changed_markers
from ..owner.budget import key_size_or_none
from ..owner.calibrate import DEFAULT_RUNTIMES, noise_floor, runtime_logits, tolerance_from_noise
from ..owner.methods import Bag, method_names
from ..owner.selection import units_of
from .backends import Cell, LocalBackend, Outcome, RayBackend, get_backend
from .protocol import CONFIDENCES, MAX_NS, detection_curve, empirical_ns, manc_orders, selection_orders, unit_any
from .results import (
    MEASURED,
    NO_CHANGE,
    AttackRow,
    DetectionRow,
    ErrorRow,
    Evaluation,
    FalseAlarmRow,
    KeySizeRow,
    MethodRow,
    TriggerRow,
    WarningRow,
)
from .runner import Attacked, AttackRun, Steps, attack_cell, attacker_data, labelled_entries, machine_info, make_bag, plan_attacks
from .settings import CampaignSettings, campaign_settings

if TYPE_CHECKING:
    from ..attacks.base import Attack
    from ..owner.methods import Method

DEFAULT_SPECS = ("top1", "topk:3", "topk:5", "top1-prob:2", "probs:1", "probs:2", "logits")
BASELINES = ("natural", "noise", "rotation", "distortion")
RUNTIMES = DEFAULT_RUNTIMES


# ----------------------------------------------------------------------------- the campaign's state


@dataclass
class _Bag:
    """One method's markers within the campaign's concatenated marker array, and its query units."""

    name: str
    start: int
    stop: int
    unit_of: np.ndarray  # marker -> unit index
    units: int
    group_size: int
    orders: np.ndarray | None = None  # (resamples, depth) unit indices
    selection: str = ""
    tolerance: float = DEFAULT_TOLERANCE  # the comparison tolerance of this method's markers


@dataclass
class _Campaign:
    """What the phases of ``run_evaluation`` share."""

    model: Model
    train: Dataset
    test: Dataset
    attack_data: Dataset
    settings: CampaignSettings
    ev: Evaluation
    steps: Steps
    methods: dict[str, str | Method]  # label -> name or instance
    method_params: dict[str, dict]
    attack_runs: list[AttackRun]
    attack_params: dict[str, dict]
    generated: dict[str, Bag] = field(default_factory=dict)
    bags: dict[str, _Bag] = field(default_factory=dict)
    markers: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))  # every bag's inputs, concatenated
    reference: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))  # the intact logits on them
    curves: dict[tuple[str, str, str], list[np.ndarray]] = field(default_factory=dict)
    test_logits: np.ndarray | None = None  # the intact logits on the test part (an attack's functional change is measured there too)
    floor: float | None = None  # the benign floor: the largest |Δlogit| a benign runtime caused on any method's markers
    intact_accuracy: float | None = None  # the intact module's accuracy on the test part, as Attack.run measures it (given to every attack)
    backend: LocalBackend | RayBackend = field(default_factory=LocalBackend)
    attack_cells: list[Cell] = field(default_factory=list)
    submitted: Sequence[Any] = ()  # the attack cells as the backend runs them

    def logits_of(self, name: str, logits: np.ndarray) -> np.ndarray:
        """The rows of ``logits`` (over every marker) that belong to method ``name``."""
        b = self.bags[name]
        return logits[b.start : b.stop]

    def update_method(self, name: str, **changes: Any) -> None:
        """Fill in columns of method ``name``'s row (its selection, its tolerance)."""
        self.ev.methods = [r.replace(**changes) if r.method == name else r for r in self.ev.methods]


# ----------------------------------------------------------------------------- run_evaluation


def run_evaluation(
    model: Model,
    data: Dataset,
    *,
    methods: Sequence[str | Method] | None = None,
    attacks: Sequence[str | Attack] | None = None,
    specs: Sequence[str] = DEFAULT_SPECS,
    trials: int = 3,
    bag: int = 100,
    select: str = "manc",
    resamples: int = 10_000,
    seed: int = 0,
    progress: Progress | None = None,
    test_fraction: float = 0.3,
    baselines: bool = True,
    runtimes: Sequence[str] = RUNTIMES,
    tolerance: float | None = None,
    method_params: dict[str, dict] | None = None,
    attack_params: dict[str, dict] | None = None,
    manc_fraction: float = 0.5,
    layer: str | None = None,
    attack_samples: int | None = 1000,
    attack_data: Dataset | None = None,
    backend: str | LocalBackend | RayBackend | None = None,
    address: str | None = None,
) -> Evaluation:
    """Run the campaign described in the module docstring and return its measurements.

    ``methods``/``attacks`` (names or ``Method``/``Attack`` instances) default to every
    registered one. ``method_params`` and ``attack_params`` map a name to keyword
    hyper-parameters (typed values or text, coerced by the constructor's annotations).
    ``progress(done, total, what)`` is told of every step. ``attack_data`` (default: the
    training part) is what the attacks train on. ``tolerance`` ``None`` measures each method's
    tolerance as a fingerprint does (module doc, step 3); a number is used for every method.
    ``backend`` runs the bags and the attacks: ``local`` (default, in this process) or ``ray``
    (Ray tasks, on the cluster at ``address``; ``tamperprobe.evaluation.backends``); the results
    are the same.
    """
    t_start = time.monotonic()
    runner = get_backend(backend, address)
    settings = campaign_settings(
        specs, trials, bag, select, resamples, seed, test_fraction, runtimes, tolerance, manc_fraction, layer, attack_samples
    )
    c = _start(model, data, settings, methods, attacks, baselines, method_params, attack_params, progress, attack_data)
    c.backend = runner
    try:
        _run(c)
    finally:
        if runner is not backend:
            runner.close()
    c.ev.seconds = time.monotonic() - t_start
    c.ev.timings["total"] = c.ev.seconds
    c.steps.step("done")
    return c.ev


def _run(c: _Campaign) -> None:
    _intact_model(c)
    _generate_bags(c)  # submits the bag cells, then the attack cells, then waits for the bags
    _reference_logits(c)
    c.steps.step("intact answers")
    _selections(c)
    _benign_runtimes(c)
    _attacks(c)
    _check_intact(c)
    _aggregate(c)


def _start(
    model: Model,
    data: Dataset,
    s: CampaignSettings,
    methods: Sequence[str | Method] | None,
    attacks: Sequence[str | Attack] | None,
    baselines: bool,
    method_params: dict[str, dict] | None,
    attack_params: dict[str, dict] | None,
    progress: Progress | None,
    attack_data: Dataset | None = None,
) -> _Campaign:
    """Split the data, plan every step and record the parameters."""
    method_entries = labelled_entries([*(method_names() if methods is None else methods), *(BASELINES if baselines else ())])
    attack_entries = labelled_entries(attack_names() if attacks is None else attacks)
    runs = plan_attacks(attack_entries, s.trials)
    method_params, attack_params = dict(method_params or {}), dict(attack_params or {})
    train, test = data.split(s.test_fraction, seed=s.seed)
    attack_data = attacker_data(train if attack_data is None else attack_data, s.attack_samples, s.seed)
    params = {
        "seed": s.seed,
        "methods": list(method_entries),
        "attacks": list(attack_entries),
        "specs": [str(spec) for spec in s.specs],
        "trials": s.trials,
        "bag": s.bag,
        "select": s.select,
        "resamples": s.resamples,
        "test_fraction": s.test_fraction,
        "tolerance": s.tolerance,
        "max_ns": MAX_NS,
        "confidences": list(CONFIDENCES),
        "runtimes": list(s.runtimes),
        "manc_fraction": s.manc_fraction,
        "layer": s.layer,
        "attack_samples": s.attack_samples,
        "baselines": bool(baselines),
        "method_params": method_params,
        "attack_params": attack_params,
        "data": _data_params(data, train, test, attack_data),
        "attack_data": {"name": attack_data.name, "size": len(attack_data)},
    }
    ev = Evaluation(params=params, machine=machine_info(), started=datetime.now(UTC).isoformat(timespec="seconds"))
    steps = Steps(progress, 2 * len(method_entries) + len(s.runtimes) + len(runs) + 3, ev.timings, ev.errors)
    steps.progress(0, steps.total, "starting")
    return _Campaign(model, train, test, attack_data, s, ev, steps, method_entries, method_params, runs, attack_params)


def _data_params(data: Dataset, train: Dataset, test: Dataset, attack_data: Dataset) -> dict[str, Any]:
    return {
        "name": data.name,
        "size": len(data),
        "train": len(train),
        "test": len(test),
        "attack": len(attack_data),
        "shape": list(data.x.shape[1:]),
        "low": float(data.low),
        "high": float(data.high),
    }


# ----------------------------------------------------------------------------- the phases


def _intact_model(c: _Campaign) -> None:
    """Describe the intact model: digest, classes (checked against the specs), accuracy."""
    model, ev = c.model, c.ev
    ev.model = {"source": model.source, "kind": model.format}
    try:
        ev.model["digest"] = model.digest()
    except Exception as exc:  # pragma: no cover - a damaged model
        ev.model["digest"] = None
        c.steps.error("model", model.source, exc)
    classes = int(model.logits(c.train.x[:2]).shape[1])
    ev.model["classes"] = classes
    for spec in c.settings.specs:
        if spec.label_count > classes:
            raise UsageError(f"output spec {spec} asks for {spec.label_count} labels; the model has {classes} classes")
    from .._torch import accuracy
    from ..train import accuracy as module_accuracy

    for name, part in (("train", c.train), ("test", c.test)):
        if part.y is not None and len(part):
            c.steps.within(f"intact model: accuracy on the {name} part")
            # on a torch module, as Attack.run measures it: the attacks reuse the test accuracy instead of measuring it again
            acc = module_accuracy(model.module, part.x, part.y) if model.module is not None else accuracy(model.logits(part.x), part.y)
            ev.model[f"acc_{name}"] = acc
    c.intact_accuracy = ev.model.get("acc_test")
    c.test_logits = model.logits(c.test.x) if len(c.test) else None
    c.steps.step("intact model")


def _generate_bags(c: _Campaign) -> None:
    """Generate each method's bag of candidate markers from the training part (one cell per method)."""
    s, model, train = c.settings, c.backend.put(c.model), c.backend.put(c.train)
    args = [(model, train, entry, c.method_params.get(label, {}), s.bag, s.seed, label) for label, entry in c.methods.items()]
    cells = [Cell(f"method:{a[-1]}", f"markers: {a[-1]}", make_bag, a) for a in args]
    submitted = c.backend.submit(cells)
    # the attacks after the bags: with fewer workers than cells, a free worker takes a bag first, so the driver's own
    # work (selections, benign runtimes), which waits for the bags, overlaps with the attacks' training
    _submit_attacks(c)
    with c.steps.timed("methods"):
        for label, out in zip(c.methods, c.backend.outcomes(cells, submitted, c.steps)):
            c.ev.methods.append(_bag_row(c, label, out))


def _bag_row(c: _Campaign, label: str, out: Outcome) -> MethodRow:
    params = c.method_params.get(label, {})
    if out.error is not None:
        return MethodRow(label, params, error=c.steps.fail("method", label, out.error))
    generated, params = out.value
    c.generated[label] = generated
    groups = None if generated.groups is None else int(len(np.unique(generated.groups)))
    return MethodRow(label, params, markers=len(generated), groups=groups)


def _reference_logits(c: _Campaign) -> None:
    """Concatenate every bag, run the intact model on it once, and index each method's units."""
    names = list(c.generated)
    if names:
        c.markers = np.concatenate([np.asarray(c.generated[n].inputs, dtype=np.float32) for n in names])
        c.reference = c.model.logits(c.markers)
    else:
        c.markers = np.zeros((0, *c.train.x.shape[1:]), dtype=np.float32)
        c.reference = np.zeros((0, int(c.ev.model["classes"])), dtype=np.float32)
    pos = 0
    for n in names:
        generated = c.generated[n]
        unit_of, units, sizes = units_of(generated.groups, len(generated))
        c.bags[n] = _Bag(n, pos, pos + len(generated), unit_of, units, int(sizes.max()))
        pos += len(generated)
        k = min(8, len(generated))
        c.ev.samples[n] = {
            "seeds": np.asarray(generated.seeds[:k]),
            "inputs": np.asarray(generated.inputs[:k]),
            "labels": c.logits_of(n, c.reference)[:k].argmax(1),
        }
    if not np.isfinite(c.reference).all():
        c.steps.error("model", c.model.source, "the intact model returns non-finite logits on some markers")


def _selections(c: _Campaign) -> None:
    """Resample each method's selections (the query orders every attack is measured with)."""
    with c.steps.timed("selections"):
        for row in list(c.ev.methods):
            b = c.bags.get(row.method)
            if b is not None:
                c.steps.within(f"selections: {row.method} ({c.settings.resamples} × {c.settings.select})")
                _select(c, b)
                c.update_method(row.method, selection=b.selection, units=b.units, group_size=b.group_size)
            c.steps.step(f"selections: {row.method}")


def _select(c: _Campaign, b: _Bag) -> None:
    s = c.settings
    depth = max(1, MAX_NS // b.group_size)
    b.selection = s.select
    try:
        rng = np.random.default_rng(derive_seed(s.seed, "select", s.select, b.name))
        if s.select == "manc":
            from ..owner.features import activations

            active = activations(c.model, c.logits_of(b.name, c.markers), s.layer) > 0
            b.orders = manc_orders(unit_any(active, b.unit_of, b.units).astype(np.float32), depth, s.resamples, rng, s.manc_fraction)
        else:
            b.orders = selection_orders(b.units, depth, s.resamples, rng)
    except Exception as exc:
        c.ev.errors.append(ErrorRow("selection", b.name, f"{s.select} selection failed, fell back to random: {one_line(exc, with_type=True)}"))
        b.selection = "random"
        b.orders = selection_orders(b.units, depth, s.resamples, np.random.default_rng(derive_seed(s.seed, "select", "random", b.name)))


def _benign_runtimes(c: _Campaign) -> None:
    """Re-run every marker under each benign runtime, set each method's tolerance, count the answers that would be flagged."""
    observed: dict[str, np.ndarray | str] = {}
    with c.steps.timed("runtimes"), tempfile.TemporaryDirectory(prefix="tamperprobe-eval-") as tmp:
        for rt in c.settings.runtimes:
            c.steps.within(f"benign runtime: {rt}")
            with c.steps.timed(f"runtime:{rt}"):
                observed[rt] = _benign_logits(c, rt, Path(tmp))
            c.steps.step(f"benign runtime: {rt}")
    _tolerances(c, [o for o in observed.values() if not isinstance(o, str)])
    for rt, other in observed.items():
        c.ev.false_alarms.extend(_benign_rows(c, rt, other))


def _benign_logits(c: _Campaign, rt: str, workdir: Path) -> np.ndarray | str:
    """Every marker's logits under runtime ``rt``, or the error (recorded) that kept it from running."""
    try:
        if not c.bags:
            raise UsageError("no markers to re-verify")
        other = runtime_logits(c.model, rt, c.markers, workdir)
        if other.shape != c.reference.shape:
            raise UsageError(f"runtime returned logits of shape {other.shape}, expected {c.reference.shape}")
    except Exception as exc:
        return c.steps.error("runtime", rt, exc)
    return other


def _tolerances(c: _Campaign, observed: list[np.ndarray]) -> None:
    """Each method's comparison tolerance: the given one, or as a fingerprint measures it on its markers (module doc, step 3)."""
    for row in list(c.ev.methods):
        b = c.bags.get(row.method)
        if b is None:
            continue
        e = c.logits_of(b.name, c.reference).astype(np.float64)
        measured = max((float(np.max(np.abs(c.logits_of(b.name, o) - e))) for o in observed if len(e)), default=0.0)
        floor = noise_floor(measured, float(np.abs(e).max()) if e.size else 0.0)
        b.tolerance = c.settings.tolerance if c.settings.tolerance is not None else DEFAULT_TOLERANCE
        if c.settings.tolerance is None:
            try:
                b.tolerance = tolerance_from_noise(floor)
            except UsageError as exc:  # a fingerprint would be refused: compare under the largest tolerance, and say so
                c.steps.error("tolerance", b.name, exc)
                b.tolerance = MAX_TOLERANCE
        c.update_method(row.method, tolerance=b.tolerance, benign_floor=floor)
        c.floor = floor if c.floor is None else max(c.floor, floor)


def _benign_rows(c: _Campaign, rt: str, other: np.ndarray | str) -> list[FalseAlarmRow]:
    if isinstance(other, str):
        return [FalseAlarmRow(n, rt, None, None, b.stop - b.start, None, error=other) for n, b in c.bags.items()]
    rows = []
    for n, b in c.bags.items():
        e, o = c.logits_of(n, c.reference), c.logits_of(n, other)
        dmax = float(np.max(np.abs(o.astype(np.float64) - e))) if len(e) else 0.0
        for spec in c.settings.specs:
            flagged = int(changed_markers(spec, e, o, b.tolerance).sum())
            rows.append(FalseAlarmRow(n, rt, str(spec), flagged, len(e), dmax, tolerance=b.tolerance))
    return rows


def _submit_attacks(c: _Campaign) -> None:
    """Plan one cell per attack instance; a backend that runs cells elsewhere starts them now (they need no bag)."""
    s, model, data, test = c.settings, c.backend.put(c.model), c.backend.put(c.attack_data), c.backend.put(c.test)
    c.attack_cells = [
        Cell(
            f"attack:{run.name}",
            f"attack: {run.label} #{run.trial}",
            attack_cell,
            (model, run, s.seed, c.attack_params.get(run.label), data, test, c.intact_accuracy),
        )
        for run in c.attack_runs
    ]
    if c.bags or c.backend.name != "local":
        c.submitted = c.backend.submit(c.attack_cells)


def _attacks(c: _Campaign) -> None:
    """Take every attack instance's outcome and measure every method's markers against it."""
    with c.steps.timed("attacks"):
        if not c.bags:  # nothing to measure against: every instance fails alike
            for run in c.attack_runs:
                _attack(c, run, Outcome())
                c.steps.step(f"attack: {run.label} #{run.trial}")
            return
        for run, out in zip(c.attack_runs, c.backend.outcomes(c.attack_cells, c.submitted, c.steps)):
            _attack(c, run, out)


def _attack(c: _Campaign, run: AttackRun, out: Outcome) -> None:
    params = c.attack_params.get(run.label)
    row = AttackRow(run.label, run.trial, run.seed(c.settings.seed), params or {})
    try:
        c.model.require_torch("an attack")
        if not c.bags:
            raise UsageError("no method produced markers")
        if isinstance(out.error, BaseException):
            raise out.error
        if out.error is not None:
            c.ev.attacks.append(row.replace(error=c.steps.fail("attack", run.name, out.error)))
            return
        attacked: Attacked = out.value
        row = AttackRow(run.label, run.trial, **attacked.report())
        c.steps.within(f"attack: {run.label} #{run.trial}")(0, 0, "querying the markers")
        tampered = attacked.model.logits(c.markers)
        if tampered.shape != c.reference.shape:
            raise UsageError(f"the attacked model returns logits of shape {tampered.shape}, expected {c.reference.shape}")
    except Exception as exc:
        c.ev.attacks.append(row.replace(error=c.steps.error("attack", run.name, exc)))
        return
    dmax = float(np.max(np.abs(tampered.astype(np.float64) - c.reference))) if c.reference.size else 0.0
    row = row.replace(max_abs_dlogit=dmax, **_functional_change(c, attacked.model, dmax))
    if row.changed == 0 or dmax == 0.0:
        c.ev.warnings.append(
            WarningRow("attack", run.name, f"the attack changed {row.changed} weights and moved no logit by more than {dmax:.3g}: nothing to detect")
        )
    c.ev.attacks.append(row)
    _measure(c, run, tampered)


def _functional_change(c: _Campaign, attacked: Model, dmax: float) -> dict[str, Any]:
    """The attacked model's largest |Δlogit| on the test part, the benign floor, and whether either change passes the floor."""
    dtest = None
    if c.test_logits is not None:
        dtest = float(np.max(np.abs(attacked.logits(c.test.x).astype(np.float64) - c.test_logits))) if c.test_logits.size else 0.0
    floor = c.floor if c.floor is not None else 0.0  # every bag has a floor once the runtimes ran
    return {"max_abs_dlogit_test": dtest, "benign_floor": floor, "functional_change": max(dmax, dtest or 0.0) > floor}


def _measure(c: _Campaign, run: AttackRun, tampered: np.ndarray) -> None:
    """Trigger ratio and detection curve of every method under every spec, for one attacked model."""
    for n, b in c.bags.items():
        e, o = c.logits_of(n, c.reference), c.logits_of(n, tampered)
        for spec in c.settings.specs:
            changed = changed_markers(spec, e, o, b.tolerance)
            ratio = float(changed.mean()) if len(changed) else 0.0
            c.ev.trigger.append(TriggerRow(n, run.label, run.trial, str(spec), int(changed.sum()), len(changed), ratio))
            assert b.orders is not None  # every bag got its selections
            curve = detection_curve(unit_any(changed, b.unit_of, b.units), b.orders, b.group_size)
            c.curves.setdefault((n, run.label, str(spec)), []).append(curve)


def _check_intact(c: _Campaign) -> None:
    """Attacks must work on a copy: the intact model must still give the reference logits."""
    if not (c.attack_runs and c.bags):
        return
    try:
        if not np.array_equal(c.model.logits(c.markers), c.reference, equal_nan=True):
            c.steps.error("model", c.model.source, "the intact model's logits changed during the campaign (an attack modified it in place)")
    except Exception as exc:  # pragma: no cover
        c.steps.error("model", c.model.source, exc)


def _aggregate(c: _Campaign) -> None:
    """Detection rates averaged over attack instances, and key sizes from the mean trigger ratio.

    An attack none of whose instances changed the function beyond the benign floor gets no rate:
    its cells read ``NO_CHANGE`` (nothing to detect), whatever a near-tie marker may have done.
    """
    ev = c.ev
    changed_function = {r.attack for r in ev.attacks if r.functional_change}
    for (n, label, spec), curves in c.curves.items():
        mean, lowest = np.mean(curves, axis=0), np.min(curves, axis=0)
        selection, measured = c.bags[n].selection, label in changed_function
        status = MEASURED if measured else NO_CHANGE
        for ns in range(1, MAX_NS + 1):
            rate, low = (float(mean[ns - 1]), float(lowest[ns - 1])) if measured else (None, None)
            ev.detection.append(DetectionRow(n, label, spec, ns, rate, low, len(curves), c.settings.resamples, selection, status))
        p = float(np.mean([r.ratio for r in ev.trigger if (r.method, r.attack, r.spec) == (n, label, spec)]))
        for conf in CONFIDENCES:
            s, emp = (key_size_or_none(p, conf), empirical_ns(mean, conf)) if measured else (None, None)
            ev.key_sizes.append(KeySizeRow(n, label, spec, p, conf, s, emp, status))
