"""One verification session: a fingerprint against one target, run once (``verify``) or again and again (``watch``, a fleet).

The flow every served-side command shares lives here, once:

1. **check** (on construction, before anything is sent): the output spec and tolerance
   (``verify.comparison``; a spec weaker than the fingerprint's only with ``allow_weaker_spec``),
   what each run draws (``pool.plan``) and whether its pauses fit the target's deadline
   (``pool.check_schedule``); a run that could not be recorded is refused unless ``allow_repeat``;
2. **draw** fresh markers and decoys from the fingerprint's pool, recorded in the ledger before
   anything is sent (``pool.draw``), for a target under suspicion (``Target.suspect``: an
   endpoint, or a model file from the suspect party); a target the owner trusts gets every marker;
3. **query and compare** (``verify.verify``): the verdict; a run of which nothing can have reached
   the target (``QueryResult.sent`` False: no connection was made) returns its markers to the pool
   (``ledger.release``), anything that may have been sent stays spent;
4. **alarm** (``alarm``): ``on_run`` hears the run (a CLI prints it, an exporter updates its
   metrics), then the hook runs on TAMPERED and on the first INCONCLUSIVE run of a streak
   (``hooks``). A callback that raises costs a warning, never the hook, the record or the verdict;
5. **record** (``record``): only then is the run written to the history; a history that cannot be
   written is a warning.

``run_once`` does 2–5. A caller that has something to say between the alarm and the record (watch's
stop rules) calls ``next_run``, ``alarm`` and ``record`` itself. A session is synchronous, holds no
global state and prints nothing: what it has to say goes to ``on_run`` and ``on_warning``, so a
fleet can keep one session per endpoint and call ``run_once`` on each endpoint's schedule.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from .._util import one_line
from ..errors import UsageError
from ..fingerprint import Fingerprint
from ..outputs import OutputSpec
from . import history, ledger, pool
from .hooks import hook_environment, run_hook, wants_hook
from .targets import Target
from .verify import INCONCLUSIVE, Report, comparison, verify


@dataclass(frozen=True)
class Run:
    """One run of a session, as ``on_run`` and the hook see it."""

    number: int  # 1, 2, ... within this session
    report: Report
    time: str  # UTC ISO, seconds
    streak: int  # INCONCLUSIVE runs in a row, this one included (0 after any other verdict)


@dataclass(frozen=True)
class Settings:
    """What every run of a session does; every field is an option of ``verify`` and ``watch`` (and a fleet entry).

    ``output_spec`` and ``tolerance`` default to the fingerprint's; ``per_run``, ``decoys`` and
    ``allow_repeat`` say what a run draws (``pool.plan``, ``pool.draw``); ``limit`` the first N
    markers for a trusted target; ``record`` and ``history_path`` where runs and draws are recorded;
    ``protocol`` is recorded and shown to the hook; ``hook`` is a shell command (``hooks``).
    """

    output_spec: str | OutputSpec | None = None
    tolerance: float | None = None
    allow_weaker_spec: bool = False
    per_run: int | None = None
    decoys: float | None = None
    allow_repeat: bool = False
    limit: int | None = None
    record: bool = True
    history_path: str | os.PathLike | None = None
    protocol: str = ""
    hook: str | None = None


class Session:
    """A fingerprint against one target: checked on construction (``UsageError`` before anything is sent), then run.

    ``endpoint`` names the target to the hook and the ledger (default: ``target.name``; shown
    without secrets), ``fingerprint_file`` is shown to the hook. ``on_run`` hears each run before
    its hook and its record; ``on_warning`` hears a failing callback or hook, a history that could
    not be written and markers returned to the pool.
    """

    def __init__(
        self,
        fp: Fingerprint,
        target: Target,
        settings: Settings | None = None,
        *,
        endpoint: str | None = None,
        fingerprint_file: str | os.PathLike = "",
        on_run: Callable[[Run], None] | None = None,
        on_warning: Callable[[str], None] | None = None,
        claim: Callable[..., dict[str, list[int]]] | None = None,
    ) -> None:
        self.fp, self.target = fp, target
        self.claim = claim  # replaces ledger.claim (pool.draw): a fleet records the draws of many sessions in one transaction
        self.settings = s = settings or Settings()
        self.endpoint = endpoint or target.name
        self.fingerprint_file = str(fingerprint_file)
        self.on_run, self.on_warning = on_run, on_warning
        self.number, self.streak = 0, 0
        self.plan = self.check_settings(fp, s, suspect=target.suspect)
        if self.plan is not None:
            pool.check_schedule(target, self.plan.queries)
            if not s.record and not s.allow_repeat:
                pool.draw(fp, self.plan, record=False)  # refused, with the one-line reason
        else:
            pool.check_schedule(target, len(fp) if s.limit is None else min(s.limit, len(fp)))

    @staticmethod
    def check_settings(fp: Fingerprint, s: Settings, *, suspect: bool) -> pool.Plan | None:
        """What a session checks before it needs its target (``UsageError``), so that a caller can check it before
        building an expensive target (a sandboxed model); returns the pool plan of a suspect target (None: trusted)."""
        comparison(fp, s.output_spec, s.tolerance, allow_weaker=s.allow_weaker_spec)
        if not suspect:
            if s.per_run is not None or s.decoys is not None or s.allow_repeat:
                raise UsageError(
                    "--per-run, --decoys and --allow-repeat apply to a suspect target: a trusted model file is checked with every marker"
                )
            return None
        if s.limit is not None:
            raise UsageError(
                "--limit applies to a model file the owner trusts (--trusted-model): a suspect target gets --per-run markers from the pool"
            )
        return pool.plan(fp, s.per_run, s.decoys)

    # ------------------------------------------------------------------ the pool

    @property
    def capacity(self) -> int | None:
        """The runs the whole pool supplies (None: the target gets every marker, no pool)."""
        return None if self.plan is None else pool.capacity(self.fp, self.plan)

    def pool_status(self) -> pool.Status | None:
        """The pool's state before a series of runs; refuses (``PoolExhausted``, ``HistoryError``) one that cannot supply a run.

        None when there is no pool (a trusted target) or no ledger (``record`` off), or when the
        ledger cannot be read and ``allow_repeat`` lets the runs go on (then with a warning).
        """
        s = self.settings
        if self.plan is None or not s.record:
            return None
        try:
            state = pool.status(self.fp, self.plan, s.history_path)
        except history.HistoryError as exc:
            if not s.allow_repeat:
                raise history.HistoryError(f"cannot read the pool ledger: {exc}; nothing was sent") from None
            self.warn(f"cannot read the pool ledger ({exc}): runs draw at random without a record (--allow-repeat)")
            return None
        if state.runs_left < 1 and not s.allow_repeat:
            raise pool.PoolExhausted(f"{state.describe()}: nothing to draw; generate a larger pool or pass --allow-repeat")
        return state

    def _draw(self) -> pool.Draw | None:
        s = self.settings
        if self.plan is None:
            return None
        return pool.draw(
            self.fp, self.plan, path=s.history_path, record=s.record, allow_repeat=s.allow_repeat, target=self.endpoint, claim=self.claim
        )

    def _give_back(self, report: Report) -> Report:
        """Return the markers of a run that reached nothing to the pool (``ledger.release``); anything else stays spent."""
        if report.sent or report.draw is None:
            return report
        try:
            ledger.release(report.draw, self.settings.history_path)
        except history.HistoryError as exc:
            self.warn(f"the markers of a run that reached nothing stay spent: {exc}")
            return report
        note = f"nothing reached the target (no connection was made): this run's {report.marker_count} markers and {report.decoy_count} decoys went back to the pool"
        # a fresh draw of one run's worth gives back exactly one run; a partly repeated one, less: leave the count as it was
        left = report.runs_left + 1 if report.runs_left is not None and report.repeated == 0 else report.runs_left
        return dataclasses.replace(report, notes=[*report.notes, note], runs_left=left)

    # ------------------------------------------------------------------ a run

    def next_run(self) -> Run:
        """Draw (recorded before sending), query, compare: the next run, before its alarm and its record.

        Raises ``PoolExhausted`` or ``HistoryError`` when the pool cannot supply it (nothing sent).
        """
        s = self.settings
        drawn = self._draw()
        report = verify(self.fp, self.target, s.output_spec, tolerance=s.tolerance, limit=None if drawn is not None else s.limit, draw=drawn)
        report = self._give_back(report)
        self.number += 1
        self.streak = self.streak + 1 if report.verdict == INCONCLUSIVE else 0
        return Run(self.number, report, datetime.now(UTC).isoformat(timespec="seconds"), self.streak)

    def alarm(self, run: Run) -> None:
        """``on_run``, then the hook (TAMPERED, or the first INCONCLUSIVE of a streak): a failing one is a warning."""
        if self.on_run is not None:
            try:
                self.on_run(run)
            except Exception as exc:  # noqa: BLE001 - the hook and the record still follow
                self.warn(f"reporting run {run.number} failed: {one_line(exc, 200, with_type=True)}")
        if self.settings.hook and wants_hook(run):
            context = {"endpoint": self.endpoint, "protocol": self.settings.protocol, "fingerprint_file": self.fingerprint_file}
            problem = run_hook(self.settings.hook, hook_environment(run, **context))
            if problem:
                self.warn(problem)

    def record(self, run: Run) -> str | None:
        """Write ``run`` to the history (when recording); None, or the one-line reason it was not written."""
        if not self.settings.record:
            return None
        try:
            history.record(run.report, protocol=self.settings.protocol or None, path=self.settings.history_path)
        except Exception as exc:  # noqa: BLE001 - a history problem never costs the verdict
            return one_line(exc, 300) if str(exc) else type(exc).__name__
        return None

    def run_once(self) -> Run:
        """``next_run``, ``alarm``, then ``record`` (a failure, or an interrupt while recording, is a warning)."""
        run = self.next_run()
        self.alarm(run)
        try:
            problem = self.record(run)
        except KeyboardInterrupt:
            problem = "interrupted"
        if problem:
            self.warn(f"the run was not recorded in the history: {problem}")
        return run

    def warn(self, text: str) -> None:
        """Tell ``on_warning``; a warning that cannot be shown (a broken terminal) is dropped, never raised into the alarm."""
        if self.on_warning is not None:
            try:
                self.on_warning(text)
            except Exception:  # noqa: BLE001, S110 - a warning that cannot be shown must not stop the alarm
                pass
