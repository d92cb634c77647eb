"""Re-verify a target on a schedule, raise the alarm, then record (``tamperprobe watch``).

The alarm comes first. After each run, in this order:

1. ``on_run`` hears the verdict (the CLI prints it), then the notes (an unsigned fingerprint is
   warned about on every run);
2. the hook runs on TAMPERED and on the first INCONCLUSIVE run of a streak;
3. the exit code is decided (see below);
4. only then is the run written to the history. A history that is locked, damaged or cannot be
   written costs a warning (``on_warning``), never the verdict, the hook or the exit code, and a
   lock is waited for at most ``history.WRITE_TIMEOUT`` seconds.

Stop rules:

* TAMPERED: stops at once, exit code 1 (after the hook);
* INCONCLUSIVE (the endpoint did not answer usably): warns with the first failure and keeps
  watching; with ``max_inconclusive`` M it stops with exit code 2 after M INCONCLUSIVE runs in a
  row;
* after ``count`` runs (0: never) it stops with 0 if the last run was INTACT and 2 if it was
  INCONCLUSIVE;
* an interrupt (Ctrl-C, or SIGTERM where the CLI maps it to one) is a clean stop, not an error:
  the run in progress is dropped (never reported, never INTACT) and the exit code is the last
  *complete* run's: 0 if it was INTACT, 1 if TAMPERED (its alarm was raised already), 2 if it was
  INCONCLUSIVE or no run had completed (nothing was verified). An interrupt Python delivered late (lost in a
  finalizer, see ``interrupts``) stops the watch after the run it arrived in, which completed and counts.

With ``hold_tampered``, a TAMPERED watch does not return after its alarm: it stays (``on_hold`` hears
it once) so that whatever serves its state (the metrics' ``tamperprobe_tampered == 1``) stays visible to
a scraper until someone acts, and ends with exit code 1 on an interrupt (SIGTERM or Ctrl-C).

Runs start every ``every`` seconds (a run that takes longer delays the next one, it never
doubles up). Each run is bounded by the client's deadline (``HTTPTarget(deadline=...)``).

Each run draws fresh markers (and decoys) from the fingerprint's pool (``served.pool``),
recorded in the history before they are sent, and never re-sends one (a target the owner trusts,
``Target.suspect`` False, gets every marker every run). The markers of a run that reached nothing (no
connection was made) go back to the pool; anything that may have been sent stays spent. ``on_pool`` hears the
pool's state before the first run; each report carries the runs left, and a warning says when
few are left (``pool.Status.low``). When the pool cannot supply a run, the watch stops with exit
code 2 (``exhausted``) right after the run that used it up (or, should another process have
used it meanwhile, at the next draw, and nothing is sent); a pool that cannot supply the first run, or a watch
without a history (``record=False``), is refused before anything is sent, unless
``allow_repeat``. A draw that fails for another reason (the history locked or damaged) also
stops the watch with 2: without the record, the markers could not be kept from repeating.

The hook (``hooks``: its environment is documented there) runs on TAMPERED and on the first
INCONCLUSIVE run of a streak, before the history write. A failing hook is reported as a warning and
does not stop the watch. Every run goes through a ``session.Session``, the flow ``verify`` shares.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import _params
from .._util import parse_duration
from ..errors import EXIT_ERROR, EXIT_INTACT, EXIT_TAMPERED
from ..fingerprint import Fingerprint
from ..outputs import OutputSpec
from . import history, pool
from .hooks import hook_environment, run_hook  # noqa: F401 - their home before hooks.py; kept importable from here
from .session import Run, Session, Settings
from .targets import Target
from .verify import EXIT_CODES, INCONCLUSIVE, INTACT, TAMPERED, Report

WatchRun = Run  # one run of a watch, as ``on_run`` sees it (the session's run)

HOLD_POLL = 0.2  # seconds between two looks at the clock while a TAMPERED watch holds its state

_latched: list[int] = []  # interrupts received under ``interrupts()`` and not yet acted on


@contextmanager
def interrupts() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` (a service manager stopping a watch is a clean stop, as Ctrl-C),
    and are also latched until a watch acts on them.

    Python runs a signal handler wherever the main thread happens to be; when that is inside an object's finalizer
    (a garbage collection at the wrong moment), the ``KeyboardInterrupt`` is printed as ignored and lost. The
    watch looks at the latch after each run, so such an interrupt still stops it once the run it arrived in has
    completed; that run counts (its alarm, record and verdict stand: a TAMPERED one is never dropped for being
    interrupted late). Only the first signal raises: a second one (``timeout`` sends SIGTERM to the
    command and then to its process group) is latched and cannot break the clean stop the first one began.
    Outside the main thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def interrupt(signum: int, _frame: Any) -> None:
        nonlocal raised
        _latched.append(signum)
        if not raised:
            raised = True
            raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _latched.clear()


def interrupted() -> bool:
    """Whether an interrupt was latched and not yet acted on (a loop that waits can stop on it)."""
    return bool(_latched)


def _raise_latched() -> None:
    """Raise the interrupt a finalizer swallowed, if any."""
    if _latched:
        raise KeyboardInterrupt


@dataclass(frozen=True)
class Schedule(_params.Settings):
    """When a watch runs and when it stops: a run every ``every`` seconds, at most ``count`` runs (0: no limit),
    and a stop after ``max_inconclusive`` INCONCLUSIVE runs in a row (0: never). Checked when built."""

    every: float = 600.0
    count: int = 0
    max_inconclusive: int = 0

    constraints: ClassVar[dict[str, Any]] = {
        "every": _params.Interval(0, None),
        "count": _params.Interval(0, None, integer=True),
        "max_inconclusive": _params.Interval(0, None, integer=True),
    }
    labels: ClassVar[dict[str, str]] = {"every": "--every", "count": "--count", "max_inconclusive": "--max-inconclusive"}


@dataclass(frozen=True)
class WatchResult:
    """How a watch ended: its exit code, the last complete report (None if none completed), and why it stopped.

    ``gave_up`` is set when ``max_inconclusive`` INCONCLUSIVE runs in a row stopped it (an error, not a
    verdict), or when the pool could not supply the next run (``exhausted`` too); ``interrupted``
    when an interrupt stopped it (a clean stop: see the module doc).
    """

    exit_code: int
    runs: int
    last: Report | None
    reason: str
    gave_up: bool = False
    interrupted: bool = False
    exhausted: bool = False


def _interrupted(runs: int, last: Report | None, last_time: str) -> WatchResult:
    """The result of a watch stopped by an interrupt: judged by the last complete run, never by the one in progress."""
    if last is None:
        return WatchResult(EXIT_ERROR, runs, None, "watch interrupted before any run completed: nothing verified", interrupted=True)
    reason = f"watch interrupted after {runs} complete run(s); the last complete run ({last_time}) was {last.verdict}"
    return WatchResult(EXIT_CODES[last.verdict], runs, last, reason, interrupted=True)


def _stop_rule(run: Run, *, count: int, max_inconclusive: int, allow_repeat: bool, fp_id: str) -> WatchResult | None:
    """The result that ends the watch after ``run`` (the module doc's stop rules), or None to go on."""
    report, number = run.report, run.number
    if report.verdict == TAMPERED:
        return WatchResult(EXIT_TAMPERED, number, report, "TAMPERED")
    if report.verdict == INCONCLUSIVE and max_inconclusive and run.streak >= max_inconclusive:
        return WatchResult(EXIT_ERROR, number, report, f"{run.streak} INCONCLUSIVE runs in a row", gave_up=True)
    if count and number >= count:
        return WatchResult(EXIT_INTACT if report.verdict == INTACT else EXIT_ERROR, number, report, f"{number} runs done")
    if report.runs_left == 0 and not allow_repeat:  # stop now rather than wait an interval to be refused
        reason = f"watch stopped after run {number}: the pool of fingerprint {fp_id} is used up (every marker was sent once)"
        return WatchResult(EXIT_ERROR, number, report, reason + "; generate a new fingerprint", gave_up=True, exhausted=True)
    return None


def _warn_after_alarm(session: Session, run: Run, capacity: int | None) -> None:
    """The watch's warnings between a run's alarm and its record: an INCONCLUSIVE run it goes on after, a pool running out."""
    report = run.report
    if report.verdict == INCONCLUSIVE:
        session.warn(f"no usable answer from the endpoint ({report.first_failure()}); still watching")
    if report.runs_left is not None and capacity is not None and pool.is_low(report.runs_left, capacity):
        session.warn(f"the fingerprint's pool is running out: {report.runs_left} runs left (generate a new fingerprint before it ends)")


def _hold(result: WatchResult, on_hold: Callable[[WatchResult], None] | None) -> WatchResult:
    """Stay after a TAMPERED verdict until an interrupt, so that its state stays visible; then exit 1 all the same."""
    if on_hold is not None:
        on_hold(result)
    try:
        while True:
            _raise_latched()
            time.sleep(HOLD_POLL)
    except KeyboardInterrupt:
        _latched.clear()
        return dataclasses.replace(result, reason=f"{result.reason}; held until interrupted", interrupted=True)


def watch(
    fp: Fingerprint,
    target: Target,
    *,
    every: float | str = 600.0,
    count: int = 0,
    max_inconclusive: int = 0,
    output_spec: str | OutputSpec | None = None,
    tolerance: float | None = None,
    allow_weaker_spec: bool = False,
    per_run: int | None = None,
    decoys: float | None = None,
    allow_repeat: bool = False,
    hook: str | None = None,
    record: bool = True,
    history_path: str | os.PathLike | None = None,
    protocol: str = "",
    endpoint: str | None = None,
    fingerprint_file: str | os.PathLike = "",
    hold_tampered: bool = False,
    on_run: Callable[[WatchRun], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    on_pool: Callable[[pool.Status], None] | None = None,
    on_hold: Callable[[WatchResult], None] | None = None,
) -> WatchResult:
    """Verify ``target`` against ``fp`` every ``every`` seconds (or a duration such as ``10m``) until
    a stop rule of the module doc applies; returns how it ended.

    The settings are a ``session.Settings``'s (``output_spec`` … ``hook``); ``endpoint`` (default: the
    target's name; shown without secrets), ``protocol`` and ``fingerprint_file`` are passed to the hook.
    ``on_run`` hears about each run before its hook runs and before it is recorded; ``on_warning``
    about notes, a failing hook, each INCONCLUSIVE run and a history that could not be written;
    ``on_hold`` that a TAMPERED watch holds (``hold_tampered``).
    """
    schedule = Schedule(parse_duration(every), count, max_inconclusive)
    interval, count, max_inconclusive = schedule.every, schedule.count, schedule.max_inconclusive
    settings = Settings(output_spec, tolerance, allow_weaker_spec, per_run, decoys, allow_repeat, None, record, history_path, protocol, hook)

    def reported(run: Run) -> None:
        if on_run is not None:
            on_run(run)
        for note in run.report.notes:
            session.warn(note)  # through the session, which never lets a failing warning stop the watch

    session = Session(fp, target, settings, endpoint=endpoint, fingerprint_file=fingerprint_file, on_run=reported, on_warning=on_warning)
    state = session.pool_status()
    if state is not None and on_pool is not None:
        on_pool(state)
    capacity = session.capacity
    last: Report | None = None
    last_time = ""
    next_start = time.monotonic()
    try:
        while True:
            pause = next_start - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            next_start = max(next_start + interval, time.monotonic())
            try:
                run = session.next_run()
            except (pool.PoolExhausted, history.HistoryError) as exc:
                reason = f"watch stopped before run {session.number + 1}: {exc}"
                return WatchResult(EXIT_ERROR, session.number, last, reason, gave_up=True, exhausted=isinstance(exc, pool.PoolExhausted))
            report = run.report
            last, last_time = report, run.time
            session.alarm(run)  # 1-2: the alarm, before anything that could fail or stall
            _warn_after_alarm(session, run, capacity)
            result = _stop_rule(run, count=count, max_inconclusive=max_inconclusive, allow_repeat=allow_repeat, fp_id=fp.id)  # 3
            problem = session.record(run)  # 4: the record, after the alarm
            if problem:
                session.warn(f"run {run.number} not recorded in the history: {problem}")
            if result is not None:
                return _hold(result, on_hold) if hold_tampered and result.exit_code == EXIT_TAMPERED else result
            _raise_latched()  # an interrupt a finalizer swallowed during this run, which completed: it counts, then the stop
    except KeyboardInterrupt:
        _latched.clear()
        return _interrupted(session.number, last, last_time)
