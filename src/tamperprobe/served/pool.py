"""Which markers and decoys one verification run sends: a fresh draw from the fingerprint's pool, never a repeat.

Why. The party serving the model sees every request. If a run re-sends markers it has sent
before, the operator can keep every request it has seen and answer a repeat with the original
model: in ``bench/results/adaptive-operator.md`` such an exact-repeat cache defeats every
fingerprint from the second run on, at no cost on ordinary traffic; with fresh markers every
run it changes nothing. So a fingerprint is a *pool*, and each run draws what it sends:

* **Units.** Markers that share a group id (the two halves of a boundary pair) form one unit,
  drawn whole: both halves go in the same run (``owner.selection.units_of``). ``per_run``
  counts markers and must be a whole number of units.
* **Never twice.** A marker or decoy is drawn at most once, whatever the endpoint (the same
  operator may serve several) and whatever fingerprint holds it: the ledger (``ledger.claim``)
  remembers every query by its content, so a fingerprint regenerated with an old seed cannot
  send old markers again under its new id. What was used is read and the new draw written in one
  write transaction, so two processes sharing a history file never draw the same marker, and the
  draw is committed (and read back) **before** anything is sent, so a crash or an interrupted run
  wastes markers rather than re-sending them.
* **Unpredictable.** The units, the decoys and the sending order are chosen with the operating
  system's CSPRNG (``secrets.SystemRandom``), never with a seed the operator could learn.
* **Refused, not reused.** When the pool cannot supply a run, the draw raises
  ``PoolExhausted`` (exit 2) and nothing is sent. ``allow_repeat`` is the explicit escape hatch:
  fresh units first, then already-sent ones, with a note on every run (recorded in the history).
  Without a ledger (``record=False``, or one that cannot be opened) a draw is refused unless
  ``allow_repeat``: then it is drawn at random, unrecorded, and says so.
* **Decoys** (natural inputs with the intact model's answers, stored in the fingerprint) are
  drawn the same way from their own pool, ``decoys`` per marker, and shuffled in among the
  markers, so a run's size and order do not tell how many of its queries are markers.

A local model file is not the party under suspicion: ``everything`` sends every marker, as
before. ``check_schedule`` refuses a run whose pauses (``--delay``, ``--spread``) cannot fit in
the client's deadline before any marker is drawn.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..fingerprint import Fingerprint
from ..owner.selection import units_of
from . import ledger

DEFAULT_PER_RUN = 10  # markers per run when neither the caller nor the fingerprint says
KINDS = ("marker", "decoy")


class PoolExhausted(UsageError):
    """The fingerprint's pool cannot supply another run without re-sending markers (exit 2; nothing was sent)."""


@dataclass(frozen=True)
class Plan:
    """What every run of a verification draws: ``markers`` (whole units of ``unit`` markers) and ``decoys``."""

    markers: int
    decoys: int
    unit: int

    @property
    def queries(self) -> int:
        return self.markers + self.decoys


@dataclass(frozen=True)
class Status:
    """How much of a fingerprint's pool is used, and how many runs of ``plan`` it can still supply."""

    fingerprint: str
    plan: Plan
    markers: int
    units: int
    decoys: int
    used_markers: int
    used_decoys: int
    runs_left: int
    runs_total: int

    def describe(self) -> str:
        """One line: ``pool of fingerprint F: 12 of 2880 markers and 12 of 2880 decoys used; 717 runs of 4 + 4 decoys left``."""
        used = f"{self.used_markers} of {self.markers} markers"
        if self.decoys:
            used += f" and {self.used_decoys} of {self.decoys} decoys"
        per = f"{self.plan.markers} markers" + (f" + {self.plan.decoys} decoys" if self.plan.decoys else "")
        return f"pool of fingerprint {self.fingerprint}: {used} used; {self.runs_left} runs of {per} left"

    @property
    def low(self) -> bool:
        return is_low(self.runs_left, self.runs_total)


def is_low(runs_left: int, runs_total: int) -> bool:
    """Few runs left: at most 3, or at most a tenth of what the whole pool supplies."""
    return runs_left <= max(3, runs_total // 10)


@dataclass(frozen=True)
class Draw:
    """The inputs of one run: fingerprint indices of ``markers`` and ``decoys``, and the sending order.

    ``order`` is a permutation of ``range(len(markers) + len(decoys))`` over the markers followed
    by the decoys; ``items()`` lists ``(kind, index)`` in that order. ``mode`` is ``fresh``,
    ``repeat`` or ``all``; ``repeated`` counts markers and decoys sent before (None: unknown, no
    ledger); ``notes`` go into the report (and so on every run's warnings and into the history).
    """

    markers: tuple[int, ...]
    decoys: tuple[int, ...]
    order: tuple[int, ...]
    mode: str
    repeated: int | None = 0
    draw_id: str | None = None
    runs_left: int | None = None
    notes: tuple[str, ...] = ()

    def items(self) -> list[tuple[str, int]]:
        every = [("marker", i) for i in self.markers] + [("decoy", j) for j in self.decoys]
        return [every[k] for k in self.order]


def _units(fp: Fingerprint) -> tuple[list[list[int]], int]:
    """The marker indices of each unit, and the unit size (every unit must have the same)."""
    unit_of, n_units, sizes = units_of(fp.groups, len(fp))
    if n_units and not (sizes == sizes[0]).all():
        raise UsageError("the fingerprint groups its markers in units of different sizes: a pool draw needs units of one size")
    members: list[list[int]] = [[] for _ in range(n_units)]
    for i, u in enumerate(unit_of):
        members[int(u)].append(i)
    return members, int(sizes[0]) if n_units else 1


def plan(fp: Fingerprint, per_run: int | None = None, decoys: float | None = None) -> Plan:
    """Markers and decoys per run: ``per_run`` markers (default the fingerprint's ``per_run``, else
    ``DEFAULT_PER_RUN`` or the whole pool if smaller, in whole units) and ``round(decoys × markers)``
    decoys. By default one decoy per marker, or fewer when the fingerprint holds too few decoys to
    last as long as its markers (none when it holds none): the decoys then never end the pool early."""
    _, unit = _units(fp)
    what = "unit" if unit == 1 else ("pair" if unit == 2 else f"group of {unit}")
    if per_run is None:
        per_run = fp.per_run if fp.per_run is not None else min(DEFAULT_PER_RUN, len(fp))
        per_run = max(unit, per_run - per_run % unit)
    elif isinstance(per_run, bool) or int(per_run) != per_run or per_run < 1:
        raise UsageError(f"--per-run must be a whole number >= 1, got {per_run!r}")
    per_run = int(per_run)
    if per_run % unit:
        raise UsageError(f"--per-run {per_run} is not a whole number of {what}s of {unit} markers (both halves of a pair go in one run)")
    if per_run > len(fp):
        raise UsageError(f"--per-run {per_run} is more than the {len(fp)} markers the fingerprint holds")
    if decoys is None:  # one per marker, but never so many that the decoys run out before the markers
        marker_runs = (len(fp) // unit) // (per_run // unit)
        n_decoys = min(per_run, fp.decoys // max(1, marker_runs))
        return Plan(per_run, n_decoys, unit)
    ratio = decoys
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 0:
        raise UsageError(f"--decoys must be a finite ratio >= 0 (decoys per marker), got {decoys!r}")
    n_decoys = int(round(ratio * per_run))
    if n_decoys and not fp.decoys:
        raise UsageError("the fingerprint holds no decoys: generate one with `tamperprobe fingerprint --decoys N`, or pass --decoys 0")
    if n_decoys > fp.decoys:
        raise UsageError(f"--decoys {ratio:g} asks for {n_decoys} decoys a run; the fingerprint holds {fp.decoys}")
    return Plan(per_run, n_decoys, unit)


def _runs(free_units: int, free_decoys: int, p: Plan) -> int:
    runs = free_units // (p.markers // p.unit)
    return min(runs, free_decoys // p.decoys) if p.decoys else runs


def capacity(fp: Fingerprint, p: Plan) -> int:
    """The runs of ``p`` the whole pool supplies."""
    members, _ = _units(fp)
    return _runs(len(members), fp.decoys, p)


def _free_units(members: list[list[int]], used: set[int]) -> list[int]:
    """Units none of whose markers was drawn (a unit touched in any way counts as used)."""
    return [u for u, m in enumerate(members) if not any(i in used for i in m)]


def status(fp: Fingerprint, p: Plan, path: str | os.PathLike | None = None) -> Status:
    """The pool's use as recorded in the history at ``path`` (read only; an absent history: nothing used)."""
    members, _ = _units(fp)
    used = ledger.drawn(fp.id, path, _digests(fp))
    free_units = _free_units(members, used.get("marker", set()))
    free_decoys = fp.decoys - len(used.get("decoy", set()))
    return Status(
        fp.id,
        p,
        len(fp),
        len(members),
        fp.decoys,
        len(fp) - sum(len(members[u]) for u in free_units),
        fp.decoys - free_decoys,
        _runs(len(free_units), free_decoys, p),
        capacity(fp, p),
    )


def _digests(fp: Fingerprint) -> dict[str, list[str]]:
    """The content digest of every marker and decoy (``ledger.content_digest``): what the ledger knows a query by."""
    return ledger.digests_of({kind: fp.queries(kind)[0] for kind in KINDS})


def _exhausted(fp: Fingerprint, p: Plan, free_units: int, free_decoys: int, unit_count: int) -> PoolExhausted:
    per_unit = p.markers // p.unit
    if free_units < per_unit:
        left = f"{free_units * p.unit} of its {unit_count * p.unit} markers are unused and this run needs {p.markers}"
    else:
        left = f"{free_decoys} of its {fp.decoys} decoys are unused and this run needs {p.decoys} (--decoys 0 runs without)"
    return PoolExhausted(
        f"the pool of fingerprint {fp.id} is used up: {left}; nothing was sent. Generate a new fingerprint with a fresh seed "
        "(tamperprobe fingerprint --size N, never with the seed of an old one: its markers would be the old ones, which are never sent "
        "again), or pass --allow-repeat to re-send markers an operator may have kept"
    )


def _chooser(fp: Fingerprint, p: Plan, members: list[list[int]], allow_repeat: bool, rand: Any, counts: dict[str, int]) -> Any:
    """The function that picks a run's markers and decoys given what the ledger says was used (``ledger.claim``'s ``choose``);
    it fills ``counts`` with the free units and decoys left and the queries repeated."""
    per_unit = p.markers // p.unit

    def choose(used: dict[str, set[int]]) -> dict[str, list[int]]:
        free_u = _free_units(members, used.get("marker", set()))
        used_d = used.get("decoy", set())
        free_d = [j for j in range(fp.decoys) if j not in used_d]
        short_u, short_d = max(0, per_unit - len(free_u)), max(0, p.decoys - len(free_d))
        if (short_u or short_d) and not allow_repeat:
            raise _exhausted(fp, p, len(free_u), len(free_d), len(members))
        units = rand.sample(free_u, per_unit - short_u)
        decoys = rand.sample(free_d, p.decoys - short_d)
        if short_u:  # allow_repeat: fill up with units sent before
            fresh = set(free_u)
            units += rand.sample([u for u in range(len(members)) if u not in fresh], short_u)
        if short_d:
            decoys += rand.sample(sorted(used_d & set(range(fp.decoys))), short_d)
        counts.update(units=len(free_u) - (per_unit - short_u), decoys=len(free_d) - (p.decoys - short_d))
        counts["repeated"] = short_u * p.unit + short_d
        return {"marker": sorted(i for u in units for i in members[u]), "decoy": sorted(decoys)}

    return choose


def draw(
    fp: Fingerprint,
    p: Plan,
    *,
    path: str | os.PathLike | None = None,
    record: bool = True,
    allow_repeat: bool = False,
    target: str = "",
    rng: Any = None,
    claim: Any = None,
) -> Draw:
    """Draw one run's markers and decoys, recorded as used in the history at ``path`` before it returns.

    Raises ``PoolExhausted`` when the unused part of the pool cannot supply ``p`` (unless
    ``allow_repeat``), ``UsageError`` when there is no ledger (``record=False``) and
    ``HistoryError`` when the ledger cannot be read or written (both unless ``allow_repeat``, which
    then draws at random without a record and says so in the draw's notes). ``rng`` (tests only)
    replaces the CSPRNG; it needs ``sample``. ``claim`` replaces ``ledger.claim`` by a function of
    the same signature and promise (committed before it returns): a fleet's batch of claims.
    """
    rand = rng if rng is not None else secrets.SystemRandom()
    members, _ = _units(fp)
    counts = {"units": 0, "decoys": 0, "repeated": 0}
    choose = _chooser(fp, p, members, allow_repeat, rand, counts)
    draw_id = secrets.token_hex(8)
    notes: list[str] = []
    kept = record
    if not record and not allow_repeat:
        raise UsageError(
            "without a history (--no-history) nothing records which markers were sent, so they would be sent again: "
            "keep the history, or pass --allow-repeat to accept that"
        )
    chosen: dict[str, list[int]] | None = None
    if record:
        try:
            chosen = (claim or ledger.claim)(fp.id, choose, draw=draw_id, digests=_digests(fp), target=target, path=path)
        except ledger.HistoryError as exc:
            if not allow_repeat:
                raise ledger.HistoryError(f"cannot draw fresh markers: {exc}; nothing was sent") from None
            notes.append(f"the pool ledger could not be used ({exc}): markers drawn at random without a record, any of them may repeat")
            kept = False
    if chosen is None:
        chosen = choose({})
        if not notes:
            notes.append("--allow-repeat without a history: markers drawn at random without a record, any of them may have been sent before")
    mode = "fresh"
    if allow_repeat:
        mode = "repeat"
        if kept:
            r = counts["repeated"]
            notes.append(
                f"--allow-repeat: {r} of this run's {p.queries} queries were sent before (an operator who keeps past queries recognises those)"
                if r
                else "--allow-repeat: this run's markers are fresh, but the pool no longer refuses to repeat them"
            )
    n = len(chosen["marker"]) + len(chosen["decoy"])
    order = tuple(rand.sample(range(n), n))
    return Draw(
        tuple(chosen["marker"]),
        tuple(chosen["decoy"]),
        order,
        mode,
        repeated=counts["repeated"] if kept else None,
        draw_id=draw_id if kept else None,
        runs_left=_runs(counts["units"], counts["decoys"], p) if kept else None,
        notes=tuple(notes),
    )


def everything(fp: Fingerprint, limit: int | None = None) -> Draw:
    """Every marker (or the first ``limit``), in order, no decoys: what a local model file is checked with."""
    n = len(fp) if limit is None else min(int(limit), len(fp))
    return Draw(tuple(range(max(0, n))), (), tuple(range(max(0, n))), "all")


def check_schedule(target: Any, n: int) -> None:
    """Refuse (``UsageError``) a run of ``n`` queries whose pauses alone would not end within the target's deadline.

    ``target`` declares both (``targets.Target``: ``deadline``, ``pauses(n)``).
    """
    deadline = target.deadline
    wait = float(target.pauses(n))
    if deadline is not None and wait > 0 and wait >= float(deadline):
        raise UsageError(
            f"--delay/--spread would spend {wait:g} s pausing between the {n} queries of a run, "
            f"not within the --deadline of {float(deadline):g} s: raise --deadline or shorten the pauses"
        )


__all__: Sequence[str] = (
    "DEFAULT_PER_RUN",
    "Draw",
    "Plan",
    "PoolExhausted",
    "Status",
    "capacity",
    "check_schedule",
    "is_low",
    "draw",
    "everything",
    "plan",
    "status",
)
