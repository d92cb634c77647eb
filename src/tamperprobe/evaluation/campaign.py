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
``errors`` and the campaign goes on. The design, step by step, is in ``docs/design/campaign.md``;
what it costs is measured in ``bench/results``.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .._params import Interval, Options, Settings
from .._util import Progress, derive_seed, one_line
from ..attacks import attack_class, attack_names, get_attack
from ..data import Dataset
from ..errors import UsageError
from ..fingerprint import MAX_TOLERANCE, check_tolerance
from ..models import Model, TorchModel
from ..outputs import DEFAULT_TOLERANCE, OutputSpec, changed_markers
from ..owner.budget import key_size_or_none
from ..owner.calibrate import DEFAULT_RUNTIMES, noise_floor, parse_runtimes, runtime_logits, tolerance_from_noise
from ..owner.methods import Bag, get_method, method_names
from ..owner.selection import units_of
from .protocol import CONFIDENCES, MAX_NS, SELECTIONS, detection_curve, empirical_ns, manc_orders, selection_orders, unit_any
from .report import jsonable, results_json

if TYPE_CHECKING:
    from ..attacks.base import Attack
    from ..owner.methods import Method

DEFAULT_SPECS = ("top1", "topk:3", "topk:5", "top1-prob:2", "probs:1", "probs:2", "logits")
BASELINES = ("natural", "noise", "rotation", "distortion")
RUNTIMES = DEFAULT_RUNTIMES


# ----------------------------------------------------------------------------- what a campaign measured


@dataclass
class Evaluation:
    """Everything a campaign measured; rows are plain dicts (one CSV line each)."""

    params: dict[str, Any]
    machine: dict[str, Any]
    started: str
    seconds: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)
    methods: list[dict] = field(default_factory=list)
    attacks: list[dict] = field(default_factory=list)
    trigger: list[dict] = field(default_factory=list)
    detection: list[dict] = field(default_factory=list)
    key_sizes: list[dict] = field(default_factory=list)
    false_alarms: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)  # measured, but worth a look (e.g. an attack that changed nothing)
    timings: dict[str, float] = field(default_factory=dict)
    samples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def measured(self) -> bool:
        """True when at least one (method, attack) pair was measured."""
        return bool(self.trigger)

    @property
    def benign_flagged(self) -> int:
        return int(sum(r["flagged"] for r in self.false_alarms if r.get("flagged") is not None))

    @property
    def benign_checks(self) -> int:
        return int(sum(r["markers"] for r in self.false_alarms if r.get("flagged") is not None))

    @property
    def max_benign_dlogit(self) -> float | None:
        return max((r["max_abs_dlogit"] for r in self.false_alarms if r.get("max_abs_dlogit") is not None), default=None)

    @property
    def key_spec(self) -> str:
        """The spec the headline tables use: top1 when measured, else the first one."""
        specs = self.params["specs"]
        return "top1" if "top1" in specs else specs[0]

    def detection_table(self, spec: str = "top1") -> dict[tuple[str, str], list[float]]:
        """(method, attack) -> detection rate at N_S = 1..MAX_NS under ``spec``."""
        out: dict[tuple[str, str], list[float]] = {}
        for r in self.detection:
            if r["spec"] == spec:
                out.setdefault((r["method"], r["attack"]), [0.0] * MAX_NS)[r["ns"] - 1] = r["rate"]
        return out

    def detection_summary(self, ns: Sequence[int] = (1, 5, 10)) -> tuple[list[str], list[str], dict[tuple[str, str], list[float]]]:
        """(methods, attacks, (method, attack) -> rates at each of ``ns``) under ``key_spec``: the headline table."""
        table = self.detection_table(self.key_spec)
        methods = list(dict.fromkeys(m for m, _ in table))
        attacks = list(dict.fromkeys(a for _, a in table))
        return methods, attacks, {k: [curve[n - 1] for n in ns] for k, curve in table.items()}

    def mean_trigger(self) -> dict[tuple[str, str, str], tuple[float, float, float]]:
        """(method, attack, spec) -> (mean, min, max) trigger ratio over the attack's trials."""
        acc: dict[tuple[str, str, str], list[float]] = {}
        for r in self.trigger:
            acc.setdefault((r["method"], r["attack"], r["spec"]), []).append(r["ratio"])
        return {k: (float(np.mean(v)), float(np.min(v)), float(np.max(v))) for k, v in acc.items()}

    def measured_names(self) -> tuple[list[str], list[str]]:
        """The methods (that produced markers and were measured) and the attacks that were measured, in order."""
        methods = [m["method"] for m in self.methods if not m.get("error")]
        attacks = list(dict.fromkeys(r["attack"] for r in self.trigger))
        methods = [m for m in methods if any(r["method"] == m for r in self.trigger)] or methods
        return methods, attacks

    def to_json(self) -> dict[str, Any]:
        """The ``results.json`` document (``tamperprobe.evaluation/v1``)."""
        return results_json(self)


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu": cpu,
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- the campaign's state


@dataclass(frozen=True)
class _Settings(Settings):
    """The campaign's arguments, checked when built (``_params.Settings``)."""

    specs: tuple[OutputSpec, ...]
    trials: int
    bag: int
    select: str
    resamples: int
    seed: int
    test_fraction: float
    runtimes: tuple[str, ...]
    tolerance: float | None  # None: measured per method, as a fingerprint sets it
    manc_fraction: float
    layer: str | None
    attack_samples: int | None  # None: all of the training data

    constraints: ClassVar[dict[str, Any]] = {
        "trials": Interval(1, None, integer=True),
        "bag": Interval(1, None, integer=True),
        "select": Options(*SELECTIONS),
        "resamples": Interval(1, None, integer=True),
        "test_fraction": Interval(0, 1, closed="neither"),
        "manc_fraction": Interval(0, 1, closed="right"),
        "attack_samples": Interval(0, None, integer=True, text="at least 0 (0: all)"),
    }
    labels: ClassVar[dict[str, str]] = {
        "trials": "--trials",
        "bag": "--bag",
        "select": "selection",
        "resamples": "--resamples",
        "test_fraction": "--test-fraction",
        "attack_samples": "--attack-samples",
    }


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
    settings: _Settings
    ev: Evaluation
    progress: Progress
    methods: dict[str, str | Method]  # label -> name or instance
    method_params: dict[str, dict]
    attack_runs: list[tuple[str, int, str | Attack]]  # (label, trial, name or instance)
    attack_params: dict[str, dict]
    total: int = 0
    done: int = 0
    generated: dict[str, Bag] = field(default_factory=dict)
    bags: dict[str, _Bag] = field(default_factory=dict)
    markers: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))  # every bag's inputs, concatenated
    reference: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))  # the intact logits on them
    curves: dict[tuple[str, str, str], list[np.ndarray]] = field(default_factory=dict)
    intact_accuracy: float | None = None  # the intact module's accuracy on the test part, as Attack.run measures it (given to every attack)

    def step(self, what: str) -> None:
        self.done += 1
        self.progress(self.done, self.total, what)

    def within(self, what: str) -> Progress:
        """A progress callback for the work inside the current step: shown as ``what d/t detail`` on the campaign's count."""
        self.progress(self.done, self.total, what)

        def update(done: int, total: int, detail: str = "", /) -> None:
            count = f" {done}/{total}" if total > 0 else ""
            self.progress(self.done, self.total, f"{what}{count}{f' ({detail})' if detail else ''}")

        return update

    def error(self, stage: str, name: str, exc: BaseException | str) -> str:
        text = one_line(exc, with_type=True)
        self.ev.errors.append({"stage": stage, "name": name, "error": text})
        return text

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.ev.timings[key] = time.monotonic() - t0

    def logits_of(self, name: str, logits: np.ndarray) -> np.ndarray:
        """The rows of ``logits`` (over every marker) that belong to method ``name``."""
        b = self.bags[name]
        return logits[b.start : b.stop]


def _no_progress(done: int, total: int, what: str = "", /) -> None:
    return None


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
) -> Evaluation:
    """Run the campaign described in the module docstring and return its measurements.

    ``methods``/``attacks`` (names or ``Method``/``Attack`` instances) default to every
    registered one. ``method_params`` and ``attack_params`` map a name to keyword
    hyper-parameters (typed values or text, coerced by the constructor's annotations).
    ``progress(done, total, what)`` is told of every step. ``attack_data`` (default: the
    training part) is what the attacks train on. ``tolerance`` ``None`` measures each method's
    tolerance as a fingerprint does (module doc, step 3); a number is used for every method.
    """
    t_start = time.monotonic()
    settings = _settings(specs, trials, bag, select, resamples, seed, test_fraction, runtimes, tolerance, manc_fraction, layer, attack_samples)
    c = _start(model, data, settings, methods, attacks, baselines, method_params, attack_params, progress, attack_data)
    _intact_model(c)
    _generate_bags(c)
    _reference_logits(c)
    c.step("intact answers")
    _selections(c)
    _benign_runtimes(c)
    _attacks(c)
    _check_intact(c)
    _aggregate(c)
    c.ev.seconds = time.monotonic() - t_start
    c.ev.timings["total"] = c.ev.seconds
    c.step("done")
    return c.ev


def _settings(
    specs: Sequence[str],
    trials: int,
    bag: int,
    select: str,
    resamples: int,
    seed: int,
    test_fraction: float,
    runtimes: Sequence[str],
    tolerance: float | None,
    manc_fraction: float,
    layer: str | None,
    attack_samples: int | None = None,
) -> _Settings:
    """The arguments checked (``_Settings`` declares the ranges); UsageError for anything out of range."""
    names = list(dict.fromkeys(str(OutputSpec.parse(s)) for s in specs))
    return _Settings(
        specs=tuple(OutputSpec.parse(s) for s in names),
        trials=trials,
        bag=bag,
        select=select,
        resamples=resamples,
        seed=seed,
        test_fraction=test_fraction,
        runtimes=parse_runtimes(runtimes) if runtimes else (),
        tolerance=None if tolerance is None else check_tolerance(tolerance),
        manc_fraction=manc_fraction,
        layer=layer,
        attack_samples=attack_samples or None,
    )


def attacker_data(train: Dataset, samples: int | None, seed: int) -> Dataset:
    """The attacker's data: a seeded subset of at most ``samples`` of ``train`` (in their order), or all of it (None, 0)."""
    if not samples or samples >= len(train):
        return train
    idx = np.sort(np.random.default_rng(derive_seed(seed, "attack data")).permutation(len(train))[:samples])
    y = None if train.y is None else train.y[idx]
    return Dataset(train.x[idx], y, f"{train.name}[{samples}]", train.low, train.high, dict(train.meta))


def labelled_entries(entries: Sequence[str | Any]) -> dict[str, Any]:
    """Label -> entry: the name, an instance's ``name``, or the label of a ``(label, entry)`` pair; the first of equal labels wins."""
    out: dict[str, Any] = {}
    for entry in entries:
        if isinstance(entry, tuple):
            label, entry = entry
            out.setdefault(str(label), entry)
        else:
            out.setdefault(entry if isinstance(entry, str) else entry.name, entry)
    return out


def instances_of(entry: str | Attack, trials: int) -> int:
    """Instances of an attack to run: ``trials`` for a random one, else one (an unknown name fails once)."""
    try:
        cls = attack_class(entry) if isinstance(entry, str) else entry
    except UsageError:
        return 1
    return trials if cls.random else 1


def _start(
    model: Model,
    data: Dataset,
    s: _Settings,
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
    runs = [(label, t, entry) for label, entry in attack_entries.items() for t in range(instances_of(entry, s.trials))]
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
        "data": {
            "name": data.name,
            "size": len(data),
            "train": len(train),
            "test": len(test),
            "attack": len(attack_data),
            "shape": list(data.x.shape[1:]),
            "low": float(data.low),
            "high": float(data.high),
        },
        "attack_data": {"name": attack_data.name, "size": len(attack_data)},
    }
    ev = Evaluation(params=params, machine=machine_info(), started=datetime.now(UTC).isoformat(timespec="seconds"))
    c = _Campaign(model, train, test, attack_data, s, ev, progress or _no_progress, method_entries, method_params, runs, attack_params)
    c.total = 2 * len(method_entries) + len(s.runtimes) + len(runs) + 3
    c.progress(0, c.total, "starting")
    return c


# ----------------------------------------------------------------------------- the phases


def _intact_model(c: _Campaign) -> None:
    """Describe the intact model: digest, classes (checked against the specs), accuracy."""
    model, ev = c.model, c.ev
    ev.model = {"source": model.source, "kind": model.format}
    try:
        ev.model["digest"] = model.digest()
    except Exception as exc:  # pragma: no cover - a damaged model
        ev.model["digest"] = None
        c.error("model", model.source, exc)
    classes = int(model.logits(c.train.x[:2]).shape[1])
    ev.model["classes"] = classes
    for spec in c.settings.specs:
        if spec.label_count > classes:
            raise UsageError(f"output spec {spec} asks for {spec.label_count} labels; the model has {classes} classes")
    from .._torch import accuracy
    from ..train import accuracy as module_accuracy

    for name, part in (("train", c.train), ("test", c.test)):
        if part.y is not None and len(part):
            c.progress(c.done, c.total, f"intact model: accuracy on the {name} part")
            # on a torch module, as Attack.run measures it: the attacks reuse the test accuracy instead of measuring it again
            acc = module_accuracy(model.module, part.x, part.y) if model.module is not None else accuracy(model.logits(part.x), part.y)
            ev.model[f"acc_{name}"] = acc
    c.intact_accuracy = ev.model.get("acc_test")
    c.step("intact model")


def _generate_bags(c: _Campaign) -> None:
    """Generate each method's bag of candidate markers from the training part."""
    with c.timed("methods"):
        for label, entry in c.methods.items():
            with c.timed(f"method:{label}"):
                c.ev.methods.append(_generate_bag(c, label, entry, c.within(f"markers: {label}")))
            c.step(f"markers: {label}")


def _generate_bag(c: _Campaign, label: str, entry: str | Method, progress: Progress) -> dict[str, Any]:
    row: dict[str, Any] = {"method": label, "params": c.method_params.get(label, {}), "markers": 0, "groups": None, "error": None}
    try:
        generated, row["params"] = make_bag(
            c.model, c.train, entry, c.method_params.get(label, {}), c.settings.bag, c.settings.seed, label, progress=progress
        )
    except Exception as exc:
        row["error"] = c.error("method", label, exc)
        return row
    c.generated[label] = generated
    row["markers"] = len(generated)
    row["groups"] = None if generated.groups is None else int(len(np.unique(generated.groups)))
    return row


def make_bag(
    model: Model,
    data: Dataset,
    entry: str | Method,
    params: dict[str, Any],
    bag: int,
    seed: int,
    label: str,
    *,
    progress: Progress | None = None,
) -> tuple[Bag, dict[str, Any]]:
    """A method's bag of ``bag`` candidates from ``data``, seeded by ``seed`` and the method's ``label``, and its parameters.

    The inputs are returned in the model's domain (8-bit markers decoded), so that they can be run
    and compared directly. Raises UsageError when the method produces nothing usable.
    ``progress`` hears about the generation (the method's own steps).
    """
    import torch

    method = get_method(entry, **params)
    torch.manual_seed(derive_seed(seed, "method", label))
    rng = np.random.default_rng(derive_seed(seed, "method", label))
    generated = method.generate(model, data, bag, rng, progress)
    if len(generated) == 0:
        raise UsageError("the method produced no markers")
    if generated.encoding is not None:
        generated = Bag(generated.decoded(), generated.encoding.decode(generated.seeds), generated.groups, generated.info)
    x = np.ascontiguousarray(generated.inputs, dtype=np.float32)
    if x.shape[1:] != data.x.shape[1:]:
        raise UsageError(f"markers have shape {x.shape[1:]}, inputs {data.x.shape[1:]}")
    return Bag(x, generated.seeds, generated.groups, generated.info), method.get_params()


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
        c.error("model", c.model.source, "the intact model returns non-finite logits on some markers")


def _selections(c: _Campaign) -> None:
    """Resample each method's selections (the query orders every attack is measured with)."""
    with c.timed("selections"):
        for row in c.ev.methods:
            b = c.bags.get(row["method"])
            if b is not None:
                c.within(f"selections: {row['method']} ({c.settings.resamples} × {c.settings.select})")
                _select(c, b)
                row.update(selection=b.selection, units=b.units, group_size=b.group_size)
            c.step(f"selections: {row['method']}")


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
        c.ev.errors.append(
            {"stage": "selection", "name": b.name, "error": f"{s.select} selection failed, fell back to random: {one_line(exc, with_type=True)}"}
        )
        b.selection = "random"
        b.orders = selection_orders(b.units, depth, s.resamples, np.random.default_rng(derive_seed(s.seed, "select", "random", b.name)))


def _benign_runtimes(c: _Campaign) -> None:
    """Re-run every marker under each benign runtime, set each method's tolerance, count the answers that would be flagged."""
    observed: dict[str, np.ndarray | str] = {}
    with c.timed("runtimes"), tempfile.TemporaryDirectory(prefix="tamperprobe-eval-") as tmp:
        for rt in c.settings.runtimes:
            c.within(f"benign runtime: {rt}")
            with c.timed(f"runtime:{rt}"):
                observed[rt] = _benign_logits(c, rt, Path(tmp))
            c.step(f"benign runtime: {rt}")
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
        return c.error("runtime", rt, exc)
    return other


def _tolerances(c: _Campaign, observed: list[np.ndarray]) -> None:
    """Each method's comparison tolerance: the given one, or as a fingerprint measures it on its markers (module doc, step 3)."""
    for row in c.ev.methods:
        b = c.bags.get(row["method"])
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
                c.error("tolerance", b.name, exc)
                b.tolerance = MAX_TOLERANCE
        row.update(tolerance=b.tolerance, benign_floor=floor)


def _benign_rows(c: _Campaign, rt: str, other: np.ndarray | str) -> list[dict[str, Any]]:
    if isinstance(other, str):
        return [
            {"method": n, "runtime": rt, "spec": None, "flagged": None, "markers": b.stop - b.start, "max_abs_dlogit": None, "error": other}
            for n, b in c.bags.items()
        ]
    rows = []
    for n, b in c.bags.items():
        e, o = c.logits_of(n, c.reference), c.logits_of(n, other)
        dmax = float(np.max(np.abs(o.astype(np.float64) - e))) if len(e) else 0.0
        for spec in c.settings.specs:
            flagged = int(changed_markers(spec, e, o, b.tolerance).sum())
            rows.append(
                {
                    "method": n,
                    "runtime": rt,
                    "spec": str(spec),
                    "flagged": flagged,
                    "markers": len(e),
                    "max_abs_dlogit": dmax,
                    "tolerance": b.tolerance,
                    "error": None,
                }
            )
    return rows


def _attacks(c: _Campaign) -> None:
    """Run every attack instance and measure every method's markers against it."""
    with c.timed("attacks"):
        for label, trial, entry in c.attack_runs:
            with c.timed(f"attack:{label}#{trial}"):
                _attack(c, label, trial, entry, c.within(f"attack: {label} #{trial}"))
            c.step(f"attack: {label} #{trial}")


def _attack(c: _Campaign, label: str, trial: int, entry: str | Attack, progress: Progress) -> None:
    aseed = derive_seed(c.settings.seed, "attack", label, trial)
    row: dict[str, Any] = {
        "attack": label,
        "trial": trial,
        "seed": aseed,
        "params": c.attack_params.get(label, {}),
        "acc_before": None,
        "acc_after": None,
        "success": None,
        "changed": None,
        "error": None,
    }
    try:
        module = c.model.require_torch("an attack")
        if not c.bags:
            raise UsageError("no method produced markers")
        result = get_attack(entry, c.attack_params.get(label)).run(
            module, c.attack_data, seed=aseed, eval_data=c.test, progress=progress, acc_before=c.intact_accuracy
        )
        row.update(
            params=jsonable(result.params),
            acc_before=jsonable(result.acc_before),
            acc_after=jsonable(result.acc_after),
            success=jsonable(result.success),
            changed=jsonable(result.changed),
        )
        progress(0, 0, "querying the markers")
        tampered = TorchModel(result.model, f"attack:{label}").logits(c.markers)
        if tampered.shape != c.reference.shape:
            raise UsageError(f"the attacked model returns logits of shape {tampered.shape}, expected {c.reference.shape}")
    except Exception as exc:
        row["error"] = c.error("attack", f"{label}#{trial}", exc)
        c.ev.attacks.append(row)
        return
    row["max_abs_dlogit"] = float(np.max(np.abs(tampered.astype(np.float64) - c.reference))) if c.reference.size else 0.0
    if row["changed"] == 0 or row["max_abs_dlogit"] == 0.0:
        c.ev.warnings.append(
            {
                "stage": "attack",
                "name": f"{label}#{trial}",
                "warning": f"the attack changed {row['changed']} weights and moved no logit by more than {row['max_abs_dlogit']:.3g}: nothing to detect",
            }
        )
    c.ev.attacks.append(row)
    _measure(c, label, trial, tampered)


def _measure(c: _Campaign, label: str, trial: int, tampered: np.ndarray) -> None:
    """Trigger ratio and detection curve of every method under every spec, for one attacked model."""
    for n, b in c.bags.items():
        e, o = c.logits_of(n, c.reference), c.logits_of(n, tampered)
        for spec in c.settings.specs:
            changed = changed_markers(spec, e, o, b.tolerance)
            c.ev.trigger.append(
                {
                    "method": n,
                    "attack": label,
                    "trial": trial,
                    "spec": str(spec),
                    "changed": int(changed.sum()),
                    "markers": len(changed),
                    "ratio": float(changed.mean()) if len(changed) else 0.0,
                }
            )
            assert b.orders is not None  # every bag got its selections
            curve = detection_curve(unit_any(changed, b.unit_of, b.units), b.orders, b.group_size)
            c.curves.setdefault((n, label, str(spec)), []).append(curve)


def _check_intact(c: _Campaign) -> None:
    """Attacks must work on a copy: the intact model must still give the reference logits."""
    if not (c.attack_runs and c.bags):
        return
    try:
        if not np.array_equal(c.model.logits(c.markers), c.reference, equal_nan=True):
            c.error("model", c.model.source, "the intact model's logits changed during the campaign (an attack modified it in place)")
    except Exception as exc:  # pragma: no cover
        c.error("model", c.model.source, exc)


def _aggregate(c: _Campaign) -> None:
    """Detection rates averaged over attack instances, and key sizes from the mean trigger ratio."""
    ev = c.ev
    for (n, label, spec), curves in c.curves.items():
        mean, lowest = np.mean(curves, axis=0), np.min(curves, axis=0)
        for ns in range(1, MAX_NS + 1):
            ev.detection.append(
                {
                    "method": n,
                    "attack": label,
                    "spec": spec,
                    "ns": ns,
                    "rate": float(mean[ns - 1]),
                    "min_trial": float(lowest[ns - 1]),
                    "trials": len(curves),
                    "resamples": c.settings.resamples,
                    "selection": c.bags[n].selection,
                }
            )
        p = float(np.mean([r["ratio"] for r in ev.trigger if (r["method"], r["attack"], r["spec"]) == (n, label, spec)]))
        for conf in CONFIDENCES:
            ev.key_sizes.append(
                {
                    "method": n,
                    "attack": label,
                    "spec": spec,
                    "p": p,
                    "c": conf,
                    "s": key_size_or_none(p, conf),
                    "empirical_ns": empirical_ns(mean, conf),
                }
            )
