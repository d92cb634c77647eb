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
  INCONCLUSIVE or no run had completed (nothing was verified).

Runs start every ``every`` seconds (a run that takes longer delays the next one, it never
doubles up). Each run is bounded by the client's deadline (``HTTPTarget(deadline=...)``).

Each run draws fresh markers (and decoys) from the fingerprint's pool (``served.pool``),
recorded in the history before they are sent, and never re-sends one (a ``LocalTarget``, a
model file, gets every marker every run: it is not the party under suspicion). ``on_pool`` hears the
pool's state before the first run; each report carries the runs left, and a warning says when
few are left (``pool.Status.low``). When the pool cannot supply a run, the watch stops with exit
code 2 (``exhausted``) right after the run that used it up (or, should another process have
used it meanwhile, at the next draw, and nothing is sent); a pool that cannot supply the first run, or a watch
without a history (``record=False``), is refused before anything is sent, unless
``allow_repeat``. A draw that fails for another reason (the history locked or damaged) also
stops the watch with 2: without the record, the markers could not be kept from repeating.

The hook is a shell command run with these environment variables, every value made inert by
``untrusted.clean`` and the endpoint shown without credentials or query values:
``TAMPERPROBE_VERDICT``, ``TAMPERPROBE_SUMMARY``, ``TAMPERPROBE_ENDPOINT``,
``TAMPERPROBE_PROTOCOL``, ``TAMPERPROBE_FINGERPRINT`` (id), ``TAMPERPROBE_FINGERPRINT_FILE``,
``TAMPERPROBE_SIGNER`` (key id, empty when unsigned), ``TAMPERPROBE_MARKERS`` and
``TAMPERPROBE_DECOYS`` (sent in the run), ``TAMPERPROBE_MISMATCHED`` and ``TAMPERPROBE_FAILED``
(markers and decoys), ``TAMPERPROBE_RUN`` (1, 2, ... within this watch), ``TAMPERPROBE_TIME``
(UTC ISO) and ``TAMPERPROBE_RUNS_LEFT`` (runs the pool can still supply; empty when unknown). The hook runs before the history write, so it gets no
history run id. A failing hook is reported as a warning and does not stop the watch.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from .._util import one_line
from ..errors import EXIT_ERROR, EXIT_INTACT, EXIT_TAMPERED, UsageError
from ..fingerprint import Fingerprint
from ..outputs import OutputSpec
from . import history, pool
from .credentials import redact_urls_in
from .targets import LocalTarget, Target
from .untrusted import clean
from .verify import EXIT_CODES, INCONCLUSIVE, INTACT, TAMPERED, Report, comparison, verify


@dataclass(frozen=True)
class WatchRun:
    """One run of a watch, as ``on_run`` sees it."""

    number: int  # 1, 2, ... within this watch
    report: Report
    time: str  # UTC ISO, seconds
    streak: int  # INCONCLUSIVE runs in a row, this one included (0 after any other verdict)


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


def run_hook(command: str, env_vars: dict[str, str], timeout: float = 60.0) -> str | None:
    """Run the hook through the shell with ``env_vars`` added; None on success, else a one-line problem."""
    try:
        proc = subprocess.run(command, shell=True, env={**os.environ, **env_vars}, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"hook timed out after {timeout:g} s"
    except OSError as exc:
        return f"hook could not start: {one_line(exc)}"
    return None if proc.returncode == 0 else f"hook exited with status {proc.returncode}"


def hook_environment(run: WatchRun, *, endpoint: str, protocol: str, fingerprint_file: str) -> dict[str, str]:
    """The ``TAMPERPROBE_*`` variables a hook sees for ``run`` (see the module doc), secrets removed, text made inert."""
    r = run.report
    values = {
        "TAMPERPROBE_VERDICT": r.verdict,
        "TAMPERPROBE_SUMMARY": r.summary(),
        "TAMPERPROBE_ENDPOINT": redact_urls_in(endpoint),
        "TAMPERPROBE_PROTOCOL": protocol,
        "TAMPERPROBE_FINGERPRINT": r.fingerprint_id,
        "TAMPERPROBE_FINGERPRINT_FILE": fingerprint_file,
        "TAMPERPROBE_SIGNER": r.signer or "",
        "TAMPERPROBE_MARKERS": str(r.marker_count),
        "TAMPERPROBE_DECOYS": str(r.decoy_count),
        "TAMPERPROBE_MISMATCHED": str(r.mismatched),
        "TAMPERPROBE_FAILED": str(r.failed),
        "TAMPERPROBE_RUN": str(run.number),
        "TAMPERPROBE_TIME": run.time,
        "TAMPERPROBE_RUNS_LEFT": "" if r.runs_left is None else str(r.runs_left),
    }
    return {k: clean(v, 1000) for k, v in values.items()}


def _interrupted(runs: int, last: Report | None, last_time: str) -> WatchResult:
    """The result of a watch stopped by an interrupt: judged by the last complete run, never by the one in progress."""
    if last is None:
        return WatchResult(EXIT_ERROR, runs, None, "watch interrupted before any run completed: nothing verified", interrupted=True)
    reason = f"watch interrupted after {runs} complete run(s); the last complete run ({last_time}) was {last.verdict}"
    return WatchResult(EXIT_CODES[last.verdict], runs, last, reason, interrupted=True)


def watch(
    fp: Fingerprint,
    target: Target,
    *,
    every: float | str = 600.0,
    count: int = 0,
    max_inconclusive: int = 0,
    output_spec: str | OutputSpec | None = None,
    tolerance: float | None = None,
    per_run: int | None = None,
    decoys: float | None = None,
    allow_repeat: bool = False,
    hook: str | None = None,
    record: bool = True,
    history_path: str | os.PathLike | None = None,
    protocol: str = "",
    endpoint: str | None = None,
    fingerprint_file: str | os.PathLike = "",
    on_run: Callable[[WatchRun], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    on_pool: Callable[[pool.Status], None] | None = None,
) -> WatchResult:
    """Verify ``target`` against ``fp`` every ``every`` seconds (or a duration such as ``10m``) until
    a stop rule of the module doc applies; returns how it ended.

    ``output_spec`` and ``tolerance`` are ``verify``'s; ``per_run``, ``decoys`` and ``allow_repeat``
    say what each run draws (``pool.plan``, ``pool.draw``). ``protocol`` is recorded in the
    history; ``endpoint`` (default: the target's name; shown without secrets), ``protocol`` and
    ``fingerprint_file`` are passed to the hook. ``on_run`` hears about each run before its hook
    runs and before it is recorded; ``on_warning`` about notes, a failing hook, each INCONCLUSIVE
    run and a history that could not be written.
    """
    interval = history.parse_duration(every)
    if count < 0 or max_inconclusive < 0:
        raise UsageError("--count and --max-inconclusive must be >= 0")
    warn = on_warning or (lambda _text: None)
    context = {"endpoint": endpoint or target.name, "protocol": protocol, "fingerprint_file": str(fingerprint_file)}
    comparison(fp, output_spec, tolerance)  # bad options are refused before any marker is drawn
    local = isinstance(target, LocalTarget)  # not the party under suspicion: every marker, every run
    plan = pool.plan(fp, per_run, decoys)
    capacity = pool.capacity(fp, plan)
    pool.check_schedule(target, plan.queries)
    if not record and not allow_repeat and not local:
        pool.draw(fp, plan, record=False)  # refused: the same one-line reason as verify's
    state = None
    if record and not local:
        try:
            state = pool.status(fp, plan, history_path)
        except history.HistoryError as exc:
            if not allow_repeat:
                raise history.HistoryError(f"cannot read the pool ledger: {exc}; nothing was sent") from None
            warn(f"cannot read the pool ledger ({exc}): runs draw at random without a record (--allow-repeat)")
    if state is not None:
        if on_pool is not None:
            on_pool(state)
        if state.runs_left < 1 and not allow_repeat:
            raise pool.PoolExhausted(f"{state.describe()}: nothing to draw; generate a larger pool or pass --allow-repeat")
    number, streak = 0, 0
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
                drawn = (
                    None
                    if local
                    else pool.draw(fp, plan, path=history_path, record=record, allow_repeat=allow_repeat, target=str(context["endpoint"]))
                )
            except (pool.PoolExhausted, history.HistoryError) as exc:
                reason = f"watch stopped before run {number + 1}: {exc}"
                return WatchResult(EXIT_ERROR, number, last, reason, gave_up=True, exhausted=isinstance(exc, pool.PoolExhausted))
            report = verify(fp, target, output_spec, tolerance=tolerance, draw=drawn)
            number += 1
            last, last_time = report, datetime.now(UTC).isoformat(timespec="seconds")
            streak = streak + 1 if report.verdict == INCONCLUSIVE else 0
            run = WatchRun(number, report, last_time, streak)
            # 1-2: the alarm, before anything that could fail or stall
            if on_run is not None:
                on_run(run)
            for note in report.notes:
                warn(note)
            if hook and (report.verdict == TAMPERED or (report.verdict == INCONCLUSIVE and streak == 1)):
                problem = run_hook(hook, hook_environment(run, **context))
                if problem:
                    warn(problem)
            if report.verdict == INCONCLUSIVE:
                warn(f"no usable answer from the endpoint ({report.first_failure()}); still watching")
            if report.runs_left is not None and pool.is_low(report.runs_left, capacity):
                warn(f"the fingerprint's pool is running out: {report.runs_left} runs left (generate a new fingerprint before it ends)")
            # 3: the exit code
            result: WatchResult | None = None
            if report.verdict == TAMPERED:
                result = WatchResult(EXIT_TAMPERED, number, report, "TAMPERED")
            elif report.verdict == INCONCLUSIVE and max_inconclusive and streak >= max_inconclusive:
                result = WatchResult(EXIT_ERROR, number, report, f"{streak} INCONCLUSIVE runs in a row", gave_up=True)
            elif count and number >= count:
                result = WatchResult(EXIT_INTACT if report.verdict == INTACT else EXIT_ERROR, number, report, f"{number} runs done")
            elif report.runs_left == 0 and not allow_repeat:  # stop now rather than wait an interval to be refused
                reason = f"watch stopped after run {number}: the pool of fingerprint {fp.id} is used up (every marker was sent once)"
                result = WatchResult(EXIT_ERROR, number, report, reason + "; generate a new fingerprint", gave_up=True, exhausted=True)
            # 4: the record, after the alarm
            if record:
                try:
                    history.record(report, protocol=protocol or None, path=history_path)
                except Exception as exc:  # noqa: BLE001 - a history problem never costs the verdict
                    warn(f"run {number} not recorded in the history: {one_line(exc, 300)}")
            if result is not None:
                return result
    except KeyboardInterrupt:
        return _interrupted(number, last, last_time)
