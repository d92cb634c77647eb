"""Re-verify a target on a schedule, record every run, and raise the alarm (``tamperprobe watch``).

What ``watch`` does after each run:

* TAMPERED: runs the hook (if any) and stops at once, exit code 1;
* INCONCLUSIVE (the endpoint did not answer usably): warns, runs the hook on the first
  INCONCLUSIVE run of a streak, and keeps watching; with ``max_inconclusive`` M it stops with
  exit code 2 after M INCONCLUSIVE runs in a row;
* after ``count`` runs (0: never) it stops with 0 if the last run was INTACT and 2 if it was
  INCONCLUSIVE.

Runs start every ``every`` seconds (a run that takes longer delays the next one, it never
doubles up). Each run is recorded in the history unless ``record=False``.

The hook is a shell command run with these environment variables: ``TAMPERPROBE_VERDICT``,
``TAMPERPROBE_SUMMARY``, ``TAMPERPROBE_ENDPOINT``, ``TAMPERPROBE_PROTOCOL``,
``TAMPERPROBE_FINGERPRINT`` (id), ``TAMPERPROBE_FINGERPRINT_FILE``, ``TAMPERPROBE_MARKERS``,
``TAMPERPROBE_MISMATCHED``, ``TAMPERPROBE_FAILED``, ``TAMPERPROBE_RUN_ID`` (history run id, empty
when not recorded), ``TAMPERPROBE_RUN`` (1, 2, ... within this watch) and ``TAMPERPROBE_TIME``
(UTC ISO). A failing hook is reported as a warning and does not stop the watch.
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
from . import history
from .targets import Target
from .verify import INCONCLUSIVE, INTACT, TAMPERED, Report, verify


@dataclass(frozen=True)
class WatchRun:
    """One run of a watch, as ``on_run`` sees it."""

    number: int  # 1, 2, ... within this watch
    report: Report
    run_id: int | None  # the history's, None when not recorded
    time: str  # UTC ISO, seconds
    streak: int  # INCONCLUSIVE runs in a row, this one included (0 after any other verdict)


@dataclass(frozen=True)
class WatchResult:
    """How a watch ended: its exit code, the last report, and why it stopped.

    ``gave_up`` is set when ``max_inconclusive`` INCONCLUSIVE runs in a row stopped it (an error, not a verdict).
    """

    exit_code: int
    runs: int
    last: Report
    reason: str
    gave_up: bool = False


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
    """The ``TAMPERPROBE_*`` variables a hook sees for ``run`` (see the module doc)."""
    r = run.report
    return {
        "TAMPERPROBE_VERDICT": r.verdict,
        "TAMPERPROBE_SUMMARY": r.summary(),
        "TAMPERPROBE_ENDPOINT": endpoint,
        "TAMPERPROBE_PROTOCOL": protocol,
        "TAMPERPROBE_FINGERPRINT": r.fingerprint_id,
        "TAMPERPROBE_FINGERPRINT_FILE": fingerprint_file,
        "TAMPERPROBE_MARKERS": str(len(r.markers)),
        "TAMPERPROBE_MISMATCHED": str(r.mismatched),
        "TAMPERPROBE_FAILED": str(r.failed),
        "TAMPERPROBE_RUN_ID": "" if run.run_id is None else str(run.run_id),
        "TAMPERPROBE_RUN": str(run.number),
        "TAMPERPROBE_TIME": run.time,
    }


def watch(
    fp: Fingerprint,
    target: Target,
    *,
    every: float | str = 600.0,
    count: int = 0,
    max_inconclusive: int = 0,
    output_spec: str | OutputSpec | None = None,
    tolerance: float | None = None,
    limit: int | None = None,
    hook: str | None = None,
    record: bool = True,
    history_path: str | os.PathLike | None = None,
    protocol: str = "",
    endpoint: str | None = None,
    fingerprint_file: str | os.PathLike = "",
    on_run: Callable[[WatchRun], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> WatchResult:
    """Verify ``target`` against ``fp`` every ``every`` seconds (or a duration such as ``10m``) until
    a stop rule of the module doc applies; returns how it ended.

    ``output_spec``, ``tolerance`` and ``limit`` are ``verify``'s. ``protocol`` is recorded in the
    history; ``endpoint`` (default: the target's name), ``protocol`` and ``fingerprint_file`` are
    passed to the hook. ``on_run`` hears about each run before its hook runs, ``on_warning`` about
    a failing hook and each INCONCLUSIVE run.
    """
    interval = history.parse_duration(every)
    if count < 0 or max_inconclusive < 0:
        raise UsageError("--count and --max-inconclusive must be >= 0")
    context = {"endpoint": endpoint or target.name, "protocol": protocol, "fingerprint_file": str(fingerprint_file)}
    number, streak = 0, 0
    next_start = time.monotonic()
    while True:
        pause = next_start - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        next_start = max(next_start + interval, time.monotonic())
        report = verify(fp, target, output_spec, tolerance=tolerance, limit=limit)
        number += 1
        run_id = history.record(report, protocol=protocol or None, path=history_path) if record else None
        streak = streak + 1 if report.verdict == INCONCLUSIVE else 0
        run = WatchRun(number, report, run_id, datetime.now(UTC).isoformat(timespec="seconds"), streak)
        if on_run is not None:
            on_run(run)
        if hook and (report.verdict == TAMPERED or (report.verdict == INCONCLUSIVE and streak == 1)):
            problem = run_hook(hook, hook_environment(run, **context))
            if problem and on_warning is not None:
                on_warning(problem)
        if report.verdict == TAMPERED:
            return WatchResult(EXIT_TAMPERED, number, report, "TAMPERED")
        if report.verdict == INCONCLUSIVE:
            if on_warning is not None:
                on_warning("no usable answer from the endpoint; still watching")
            if max_inconclusive and streak >= max_inconclusive:
                return WatchResult(EXIT_ERROR, number, report, f"{streak} INCONCLUSIVE runs in a row", gave_up=True)
        if count and number >= count:
            return WatchResult(EXIT_INTACT if report.verdict == INTACT else EXIT_ERROR, number, report, f"{number} runs done")
