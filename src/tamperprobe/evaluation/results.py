"""What an evaluation measured: the result types, their rows and their JSON, apart from the code that computes them.

``Evaluation`` is a campaign's measurements (``campaign.run_evaluation``), ``AdversaryEvaluation``
the adversary harness's (``adversary.run_adversary``). A campaign's rows are frozen dataclasses, one
per table (``MethodRow``, ``AttackRow``, ``TriggerRow``, ``DetectionRow``, ``KeySizeRow``,
``FalseAlarmRow``, ``ErrorRow``, ``WarningRow``): a row is one line of its CSV file and one object of
``results.json``, its fields the columns in order. ``to_json``/``from_json`` write and read the
documents (``tamperprobe.evaluation/v1``, ``tamperprobe.adversary/v1``); ``jsonable`` is the one
conversion of measured values (numpy scalars, arrays, tensors, NaN) into JSON-safe ones.

The runners (``campaign``, ``adversary``, ``runner``) and the writers (``report``,
``adversary_report``, ``plots``) import these types; none of them imports another's module for a
type, so the package has no import cycle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, TypeVar

import numpy as np

from ..errors import UsageError
from .protocol import MAX_NS

FORMAT = "tamperprobe.evaluation/v1"
ADVERSARY_FORMAT = "tamperprobe.adversary/v1"
PASSIVE = "passive"  # the adversary's router name for "no router"
MEASURED = "measured"
NO_CHANGE = "no functional change"  # a cell whose attack moved no logit beyond the benign floor: nothing to detect

R = TypeVar("R", bound="Row")


def jsonable(v: Any) -> Any:
    """A JSON-safe copy of a measured value: NaN/inf become None, numpy and torch values plain numbers or lists."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, Row):
        return jsonable(v.to_json())
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist()) if v.size <= 64 else f"array{tuple(v.shape)}"
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    import torch

    if isinstance(v, torch.Tensor):
        return jsonable(v.detach().cpu().numpy())
    return str(v)


# ----------------------------------------------------------------------------- rows


class Row:
    """A table row: a frozen dataclass whose fields are the table's columns, in order.

    ``OPTIONAL`` names the columns a row leaves out of its JSON object while they are None (a
    measurement that did not happen, e.g. the selection of a method that produced no markers),
    so that the document says "not measured" by absence, as it always has. Columns are also
    readable by name (``row["method"]``, ``row.get("tolerance")``), as the CSV writer reads them.
    """

    OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if v is None and f.name in self.OPTIONAL:
                continue
            out[f.name] = v
        return out

    @classmethod
    def from_json(cls: type[R], doc: dict[str, Any]) -> R:
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(doc) - names
        if unknown:
            raise UsageError(f"{cls.__name__}: unknown column(s) {', '.join(sorted(unknown))}")
        return cls(**doc)

    def get(self, column: str, default: Any = None) -> Any:
        value = getattr(self, column, None)
        return default if value is None else value

    def __getitem__(self, column: str) -> Any:
        try:
            return getattr(self, column)
        except AttributeError:
            raise KeyError(column) from None

    def replace(self: R, **changes: Any) -> R:
        return replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class MethodRow(Row):
    """One marker method: its bag, and (once selected and calibrated) its query units, selection and tolerance."""

    OPTIONAL = frozenset({"selection", "units", "group_size", "tolerance", "benign_floor"})

    method: str
    params: dict[str, Any]
    markers: int = 0
    groups: int | None = None
    error: str | None = None
    selection: str | None = None
    units: int | None = None
    group_size: int | None = None
    tolerance: float | None = None
    benign_floor: float | None = None


@dataclass(frozen=True)
class AttackRow(Row):
    """One attack instance: what the attack reported, and how far it moved the logits against the benign floor.

    ``max_abs_dlogit`` is the largest |Δlogit| on the campaign's markers, ``max_abs_dlogit_test`` on
    its held-out part; ``benign_floor`` the largest |Δlogit| the benign runtimes caused on the
    markers (the campaign's floor). ``functional_change`` is false when neither change passes
    the floor: the attacked model answers as a benign runtime change of the intact one would, and
    no black-box method can tell them apart.
    """

    OPTIONAL = frozenset({"max_abs_dlogit", "max_abs_dlogit_test", "benign_floor", "functional_change"})

    attack: str
    trial: int
    seed: int
    params: dict[str, Any]
    acc_before: float | None = None
    acc_after: float | None = None
    success: float | None = None
    changed: int | None = None
    error: str | None = None
    max_abs_dlogit: float | None = None
    max_abs_dlogit_test: float | None = None
    benign_floor: float | None = None
    functional_change: bool | None = None


@dataclass(frozen=True)
class TriggerRow(Row):
    """How many of a method's markers one attack instance changed under one output spec."""

    method: str
    attack: str
    trial: int
    spec: str
    changed: int
    markers: int
    ratio: float


@dataclass(frozen=True)
class DetectionRow(Row):
    """Detection rate at ``ns`` queries (mean and lowest over the attack's trials).

    ``status`` is ``NO_CHANGE`` (and the rates None) when no instance of the attack changed the
    function beyond the benign floor (``AttackRow.functional_change``): there is nothing to detect.
    """

    method: str
    attack: str
    spec: str
    ns: int
    rate: float | None
    min_trial: float | None
    trials: int
    resamples: int
    selection: str
    status: str = MEASURED


@dataclass(frozen=True)
class KeySizeRow(Row):
    """TamperNN's key size ``s`` for confidence ``c`` from the mean trigger ratio ``p``, and the measured smallest N_S.

    ``status`` as in ``DetectionRow``: ``NO_CHANGE`` (``s`` and ``empirical_ns`` None) when the attack changed nothing to detect.
    """

    method: str
    attack: str
    spec: str
    p: float
    c: float
    s: int | None
    empirical_ns: int | None
    status: str = MEASURED


@dataclass(frozen=True)
class FalseAlarmRow(Row):
    """A method's markers re-run under one benign runtime: how many one spec flags, and the largest logit change."""

    OPTIONAL = frozenset({"tolerance"})

    method: str
    runtime: str
    spec: str | None
    flagged: int | None
    markers: int
    max_abs_dlogit: float | None
    tolerance: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class ErrorRow(Row):
    """A step that failed (the run went on)."""

    stage: str
    name: str
    error: str


@dataclass(frozen=True)
class WarningRow(Row):
    """A step that was measured but is worth a look (e.g. an attack that changed nothing)."""

    stage: str
    name: str
    warning: str


# ----------------------------------------------------------------------------- the adversary harness's rows


@dataclass(frozen=True)
class RouterCostRow(Row):
    """What a router costs at one asked-for cost: the share of ordinary traffic flagged, on calibration and held-out traffic."""

    router: str
    cost: float
    calibration_cost: float
    measured_cost: float


@dataclass(frozen=True)
class FlaggedRow(Row):
    """The share of a method's markers a router flags at one cost (and the costs it paid doing so)."""

    method: str
    router: str
    cost: float
    calibration_cost: float
    measured_cost: float
    flagged: float


@dataclass(frozen=True)
class ChangedRow(Row):
    """How many of a method's markers one attack instance changed under one spec (no router)."""

    method: str
    attack: str
    trial: int
    spec: str
    changed: int
    markers: int


@dataclass(frozen=True)
class PairRow(Row):
    """What the label-only guarantee of a method's two-member units became under one attack instance (``adversary.pair_guarantee``)."""

    method: str
    attack: str
    trial: int
    pairs: int
    shifted: int
    shifted_opposite: int
    silent_shifted: int
    silent_shifted_same_sign: int


@dataclass(frozen=True)
class RoutedDetectionRow(Row):
    """Detection rate at ``ns`` queries under a router at one cost (``PASSIVE``, cost 0: no router), mean over trials."""

    method: str
    attack: str
    spec: str
    router: str
    cost: float
    measured_cost: float
    ns: int
    rate: float
    trials: int


@dataclass(frozen=True)
class BreakingRow(Row):
    """The smallest cost of the sweep at which detection at ``ns`` falls below the target (``status`` falls), or why none does."""

    method: str
    attack: str
    spec: str
    router: str
    ns: int
    passive: float
    cost: float | None = None
    measured_cost: float | None = None
    rate: float | None = None
    status: str = ""


def rows_from_json(cls: type[R], docs: Sequence[dict[str, Any]]) -> list[R]:
    return [cls.from_json(d) for d in docs]


# ----------------------------------------------------------------------------- a campaign


@dataclass
class Evaluation:
    """Everything a campaign measured: one list of typed rows per table (one CSV file each)."""

    params: dict[str, Any]
    machine: dict[str, Any]
    started: str
    seconds: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)
    methods: list[MethodRow] = field(default_factory=list)
    attacks: list[AttackRow] = field(default_factory=list)
    trigger: list[TriggerRow] = field(default_factory=list)
    detection: list[DetectionRow] = field(default_factory=list)
    key_sizes: list[KeySizeRow] = field(default_factory=list)
    false_alarms: list[FalseAlarmRow] = field(default_factory=list)
    errors: list[ErrorRow] = field(default_factory=list)
    warnings: list[WarningRow] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    samples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)  # not in the JSON: the plots' seeds and markers

    @property
    def measured(self) -> bool:
        """True when at least one (method, attack) pair was measured."""
        return bool(self.trigger)

    @property
    def benign_flagged(self) -> int:
        return int(sum(r.flagged for r in self.false_alarms if r.flagged is not None))

    @property
    def benign_checks(self) -> int:
        return int(sum(r.markers for r in self.false_alarms if r.flagged is not None))

    @property
    def max_benign_dlogit(self) -> float | None:
        return max((r.max_abs_dlogit for r in self.false_alarms if r.max_abs_dlogit is not None), default=None)

    @property
    def key_spec(self) -> str:
        """The spec the headline tables use: top1 when measured, else the first one."""
        specs = self.params["specs"]
        return "top1" if "top1" in specs else specs[0]

    def detection_table(self, spec: str = "top1") -> dict[tuple[str, str], list[float]]:
        """(method, attack) -> detection rate at N_S = 1..MAX_NS under ``spec``."""
        out: dict[tuple[str, str], list[float]] = {}
        for r in self.detection:
            if r.spec == spec and r.rate is not None:
                out.setdefault((r.method, r.attack), [0.0] * MAX_NS)[r.ns - 1] = r.rate
        return out

    def no_functional_change(self) -> list[str]:
        """The attacks none of whose instances changed the function beyond the benign floor: their cells read ``NO_CHANGE``."""
        return list(dict.fromkeys(r.attack for r in self.detection if r.status == NO_CHANGE))

    @property
    def benign_floor(self) -> float | None:
        """The campaign's benign floor: the largest |Δlogit| the benign runtimes caused on any method's markers."""
        return max((r.benign_floor for r in self.methods if r.benign_floor is not None), default=None)

    def detection_summary(self, ns: Sequence[int] = (1, 5, 10)) -> tuple[list[str], list[str], dict[tuple[str, str], list[float]]]:
        """(methods, attacks, (method, attack) -> rates at each of ``ns``) under ``key_spec``: the headline table.

        Attacks with no functional change are listed, without rates.
        """
        table = self.detection_table(self.key_spec)
        methods = list(dict.fromkeys(r.method for r in self.detection if r.spec == self.key_spec))
        attacks = list(dict.fromkeys(r.attack for r in self.detection if r.spec == self.key_spec))
        return methods, attacks, {k: [curve[n - 1] for n in ns] for k, curve in table.items()}

    def mean_trigger(self) -> dict[tuple[str, str, str], tuple[float, float, float]]:
        """(method, attack, spec) -> (mean, min, max) trigger ratio over the attack's trials."""
        acc: dict[tuple[str, str, str], list[float]] = {}
        for r in self.trigger:
            acc.setdefault((r.method, r.attack, r.spec), []).append(r.ratio)
        return {k: (float(np.mean(v)), float(np.min(v)), float(np.max(v))) for k, v in acc.items()}

    def measured_names(self) -> tuple[list[str], list[str]]:
        """The methods (that produced markers and were measured) and the attacks that were measured, in order."""
        methods = [m.method for m in self.methods if not m.error]
        attacks = list(dict.fromkeys(r.attack for r in self.trigger))
        methods = [m for m in methods if any(r.method == m for r in self.trigger)] or methods
        return methods, attacks

    def to_json(self) -> dict[str, Any]:
        """The ``results.json`` document (``tamperprobe.evaluation/v1``; timings rounded to milliseconds)."""
        return jsonable(
            {
                "format": FORMAT,
                "params": self.params,
                "machine": self.machine,
                "started": self.started,
                "seconds": round(self.seconds, 3),
                "model": self.model,
                "methods": self.methods,
                "attacks": self.attacks,
                "trigger": self.trigger,
                "detection": self.detection,
                "key_size": self.key_sizes,
                "false_alarms": self.false_alarms,
                "false_alarm_summary": {"flagged": self.benign_flagged, "checks": self.benign_checks, "max_abs_dlogit": self.max_benign_dlogit},
                "errors": self.errors,
                "warnings": self.warnings,
                "timings": {k: round(v, 3) for k, v in self.timings.items()},
            }
        )

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Evaluation:
        """An ``Evaluation`` read back from its ``results.json`` document (without the plots' samples)."""
        if doc.get("format") != FORMAT:
            raise UsageError(f"not a campaign's results: format {doc.get('format')!r}, expected {FORMAT}")
        return cls(
            params=doc["params"],
            machine=doc["machine"],
            started=doc["started"],
            seconds=doc["seconds"],
            model=doc["model"],
            methods=rows_from_json(MethodRow, doc["methods"]),
            attacks=rows_from_json(AttackRow, doc["attacks"]),
            trigger=rows_from_json(TriggerRow, doc["trigger"]),
            detection=rows_from_json(DetectionRow, doc["detection"]),
            key_sizes=rows_from_json(KeySizeRow, doc["key_size"]),
            false_alarms=rows_from_json(FalseAlarmRow, doc["false_alarms"]),
            errors=rows_from_json(ErrorRow, doc["errors"]),
            warnings=rows_from_json(WarningRow, doc["warnings"]),
            timings=dict(doc["timings"]),
        )


# ----------------------------------------------------------------------------- the adversary harness


@dataclass
class AdversaryEvaluation:
    """Everything ``run_adversary`` measured: one list of rows per table (one CSV file each).

    ``methods`` and ``attacks`` stay dicts: their columns depend on the run (the specs measured
    on ordinary traffic, the description of a bag that could be made); every other table is typed.
    """

    params: dict[str, Any]
    machine: dict[str, Any]
    started: str
    seconds: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)
    methods: list[dict] = field(default_factory=list)
    attacks: list[dict] = field(default_factory=list)
    routers: list[RouterCostRow] = field(default_factory=list)  # costs per router and asked-for cost (mean over methods, attacks)
    flagged: list[FlaggedRow] = field(default_factory=list)  # share of each method's markers a router flags
    trigger: list[ChangedRow] = field(default_factory=list)  # markers whose answer changed (passive)
    pairs: list[PairRow] = field(default_factory=list)  # what the label-only guarantee of two-member units became
    detection: list[RoutedDetectionRow] = field(default_factory=list)
    breaking: list[BreakingRow] = field(default_factory=list)
    errors: list[ErrorRow] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    _index: dict[tuple, float] = field(default_factory=dict, repr=False)

    TABLES: ClassVar[tuple[str, ...]] = ("methods", "attacks", "routers", "flagged", "trigger", "pairs", "detection", "breaking")

    def rate(self, method: str, attack: str, spec: str, router: str, cost: float, ns: int) -> float | None:
        """One detection rate (``router="passive"``, cost 0, for no router); None when not measured."""
        if len(self._index) != len(self.detection):
            self._index = {(r.method, r.attack, r.spec, r.router, round(r.cost, 9), r.ns): r.rate for r in self.detection}
        value = self._index.get((method, attack, spec, router, round(cost, 9), ns))
        return None if value is None else float(value)

    def names(self) -> tuple[list[str], list[str], list[str]]:
        """Methods, attacks and routers that were measured, in order."""
        methods = list(dict.fromkeys(r.method for r in self.detection))
        attacks = list(dict.fromkeys(r.attack for r in self.detection))
        routers = [r for r in dict.fromkeys(r.router for r in self.detection) if r != PASSIVE]
        return methods, attacks, routers

    def to_json(self) -> dict[str, Any]:
        """The ``adversary.json`` document (``tamperprobe.adversary/v1``)."""
        return jsonable(
            {
                "format": ADVERSARY_FORMAT,
                "params": self.params,
                "machine": self.machine,
                "started": self.started,
                "seconds": round(self.seconds, 3),
                "model": self.model,
                **{name: getattr(self, name) for name in self.TABLES},
                "errors": self.errors,
                "timings": {k: round(v, 3) for k, v in self.timings.items()},
            }
        )

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> AdversaryEvaluation:
        """An ``AdversaryEvaluation`` read back from its ``adversary.json`` document."""
        if doc.get("format") != ADVERSARY_FORMAT:
            raise UsageError(f"not an adversary run's results: format {doc.get('format')!r}, expected {ADVERSARY_FORMAT}")
        return cls(
            params=doc["params"],
            machine=doc["machine"],
            started=doc["started"],
            seconds=doc["seconds"],
            model=doc["model"],
            methods=[dict(r) for r in doc["methods"]],
            attacks=[dict(r) for r in doc["attacks"]],
            routers=rows_from_json(RouterCostRow, doc["routers"]),
            flagged=rows_from_json(FlaggedRow, doc["flagged"]),
            trigger=rows_from_json(ChangedRow, doc["trigger"]),
            pairs=rows_from_json(PairRow, doc["pairs"]),
            detection=rows_from_json(RoutedDetectionRow, doc["detection"]),
            breaking=rows_from_json(BreakingRow, doc["breaking"]),
            errors=rows_from_json(ErrorRow, doc["errors"]),
            timings=dict(doc["timings"]),
        )
