"""Every endpoint of a fleet on its own schedule (``tamperprobe fleet watch``).

One process watches the whole fleet: each endpoint is a ``served.session.Session`` run every
``every`` seconds, its first run at a random offset within its first interval (so a thousand
endpoints do not start together) and each later one jittered by up to 5 % of ``every``; at most
``concurrency`` runs are in flight at once, at most ``per_endpoint_connections`` of them to one server
address (``check.Slots``), and a run that takes longer than ``every`` delays that endpoint's next run,
never another endpoint's. Each run opens a new connection per request (``verify``'s default profile,
``python-requests``) unless its entry names a ``client_profile``: a run every hour or so would
otherwise leave a kept-alive connection idle between runs.

What ``watch`` guarantees per endpoint holds here per endpoint: the alarm first (``on_run`` —
metrics, event log, printed line — then the hook, then the history), fresh markers from the
pool (endpoints that share a fingerprint share its pool and its ledger), and never INTACT for a
run that did not complete. Then:

* **TAMPERED holds.** An endpoint that reads TAMPERED is not run again: its metrics keep
  ``tamperprobe_tampered`` at 1 until someone acts (restart the watch, or edit the fleet file —
  a changed entry is a new deployment), while every other endpoint keeps its schedule.
* **INCONCLUSIVE** keeps watching (with a warning on the first of a streak); with
  ``max_inconclusive`` M the endpoint is given up after M in a row (warned, exit 2 at the end).
* **A used-up pool** stops that endpoint (warned), not the fleet.
* **Reload**: ``reload()`` (SIGHUP, or the fleet file changing on disk) reads the file again; an
  entry that is unchanged keeps its session, schedule and streak; a changed or new one gets a new
  session; a removed one is dropped. A file with an error is a warning and the old one stays.
* **Stop** (SIGTERM, Ctrl-C: ``stop()``): no new run starts; runs in flight are abandoned (their
  markers stay spent, their verdict is never reported). The exit code: 1 if any endpoint read
  TAMPERED, else 2 if any endpoint's last run was INCONCLUSIVE or none completed, else 0.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .._util import one_line
from ..errors import EXIT_ERROR, EXIT_INTACT, EXIT_TAMPERED, TamperprobeError
from ..served.session import Run, Session
from ..served.verify import INCONCLUSIVE, INTACT, TAMPERED
from . import config
from .check import Slots, _Fingerprints, expect_problem, make_session, session_settings

JITTER = 0.05  # of ``every``, each way


@dataclass
class _Watched:
    """One endpoint's state across runs (kept over a reload while its entry is unchanged)."""

    entry: config.Endpoint
    session: Session | None
    next_at: float
    busy: bool = False
    held: bool = False  # TAMPERED: not run again
    stopped: str = ""  # why this endpoint is no longer run (given up, pool used up, cannot be checked)
    last: str | None = None  # the last complete run's verdict
    runs: int = 0


class FleetWatch:
    """Watch ``fleet`` until ``stop()``; ``run()`` returns the exit code (see the module doc)."""

    def __init__(
        self,
        fleet: config.Fleet,
        *,
        record: bool = True,
        history_path: str | Path | None = None,
        concurrency: int | None = None,
        on_run: Callable[[config.Endpoint, Run], None] | None = None,
        on_warning: Callable[[str, str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.fleet = fleet
        self.record, self.history_path = record, history_path if history_path is not None else fleet.settings.history
        self.workers = max(1, concurrency or fleet.settings.concurrency)
        self.on_run_cb, self.on_warning_cb = on_run, on_warning
        self.rng = rng or random.SystemRandom()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._jobs: queue.Queue[_Watched | None] = queue.Queue()
        self._file_state = self._stat()
        self._slots = Slots(fleet.settings.per_endpoint_connections)
        self.watched: dict[str, _Watched] = {}
        self._apply(fleet, first=True)

    # ------------------------------------------------------------------ set-up and reload

    def _stat(self) -> tuple[float, int] | None:
        try:
            st = Path(self.fleet.path).stat()
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def _warn(self, name: str, text: str) -> None:
        if self.on_warning_cb is not None:
            with self._lock:
                try:
                    self.on_warning_cb(name, text)
                except Exception:  # noqa: BLE001, S110 - a warning that cannot be shown must not stop the fleet
                    pass

    def _session(self, e: config.Endpoint, fingerprints: _Fingerprints) -> tuple[Session | None, str]:
        def on_run(run: Run) -> None:
            if self.on_run_cb is not None:
                with self._lock:
                    self.on_run_cb(e, run)

        try:
            fp = fingerprints.get(e)
            problem = expect_problem(fp, e.expect)
            if problem:
                return None, problem
            settings = session_settings(e, record=self.record, history_path=self.history_path)
            return make_session(e, fp, settings, on_run, lambda text: self._warn(e.name, text)), ""
        except TamperprobeError as exc:
            return None, one_line(exc, 300)

    def _apply(self, fleet: config.Fleet, *, first: bool = False) -> None:
        fingerprints = _Fingerprints()
        now = time.monotonic()
        fresh: dict[str, _Watched] = {}
        for e in fleet.endpoints:
            old = self.watched.get(e.name)
            if old is not None and old.entry == e:
                fresh[e.name] = old
                continue
            session, problem = self._session(e, fingerprints)
            offset = self.rng.uniform(0, e.every) if first or old is None else 0.0
            w = _Watched(e, session, now + offset, stopped=problem)
            if problem:
                self._warn(e.name, f"not watched: {problem}")
            fresh[e.name] = w
        with self._lock:
            self.fleet, self.watched = fleet, fresh
        self._wake.set()

    def reload(self) -> bool:
        """Read the fleet file again (see the module doc); False, with a warning, when it has an error."""
        self._file_state = self._stat()
        try:
            fleet = config.load(self.fleet.path)
        except TamperprobeError as exc:
            self._warn("fleet", f"reload refused, still watching the old file: {one_line(exc, 400)}")
            return False
        self._apply(fleet)
        return True

    # ------------------------------------------------------------------ running

    def _work(self) -> None:
        while True:
            w = self._jobs.get()
            if w is None:
                return
            try:
                self._run(w)
            finally:
                with self._lock:
                    w.busy = False
                self._wake.set()

    def _run(self, w: _Watched) -> None:
        e, session = w.entry, w.session
        assert session is not None
        start = time.monotonic()
        try:
            with self._slots.held(e.url):  # before the draw: waiting for a slot spends no marker
                run = session.next_run()
        except TamperprobeError as exc:  # the pool cannot supply a run (used up, or the ledger unreadable): this endpoint stops
            with self._lock:
                w.stopped = one_line(exc, 300)
            self._warn(e.name, f"stopped: {w.stopped}")
            return
        except Exception as exc:  # noqa: BLE001 - one endpoint's bug must not stop the fleet
            with self._lock:
                w.stopped = f"internal error: {one_line(exc, 300, with_type=True)}"
            self._warn(e.name, f"stopped: {w.stopped}")
            return
        if self._stop.is_set():
            return  # abandoned: never reported (its markers stay spent)
        session.alarm(run)
        problem = session.record(run)
        if problem:
            self._warn(e.name, f"run {run.number} not recorded in the history: {problem}")
        verdict = run.report.verdict
        with self._lock:
            w.runs += 1
            w.last = verdict
            w.held = verdict == TAMPERED
            if verdict == INCONCLUSIVE and e.max_inconclusive and run.streak >= e.max_inconclusive:
                w.stopped = f"{run.streak} INCONCLUSIVE runs in a row: given up"
            jitter = self.rng.uniform(-JITTER, JITTER) * e.every
            w.next_at = max(start + e.every + jitter, time.monotonic())
        if verdict == INCONCLUSIVE and run.streak == 1:
            self._warn(e.name, f"no usable answer ({run.report.first_failure()}); still watching")
        if w.stopped:
            self._warn(e.name, w.stopped)

    def _due(self, now: float) -> list[_Watched]:
        with self._lock:
            ready = [w for w in self.watched.values() if w.session is not None and not (w.busy or w.held or w.stopped) and w.next_at <= now]
            for w in ready:
                w.busy = True
            return ready

    def _next_wake(self) -> float:
        with self._lock:
            times = [w.next_at for w in self.watched.values() if w.session is not None and not (w.busy or w.held or w.stopped)]
        return min(times, default=time.monotonic() + 1.0)

    def run(self, *, poll: float = 1.0, until: Callable[[], bool] | None = None) -> int:
        """Watch until ``stop()`` (or ``until()`` is true); the exit code. Checks the fleet file for changes every ``poll`` s."""
        threads = [threading.Thread(target=self._work, name=f"fleet-{i}", daemon=True) for i in range(self.workers)]
        for t in threads:
            t.start()
        last_poll = time.monotonic()
        try:
            while not self._stop.is_set() and not (until is not None and until()):
                now = time.monotonic()
                for w in sorted(self._due(now), key=lambda w: w.next_at):
                    self._jobs.put(w)
                if now - last_poll >= poll:
                    last_poll = now
                    if self._stat() != self._file_state:
                        self.reload()
                self._wake.clear()
                self._wake.wait(max(0.0, min(self._next_wake() - time.monotonic(), poll)))
        finally:
            self._stop.set()
            for _ in threads:
                self._jobs.put(None)
        return self.exit_code()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def exit_code(self) -> int:
        with self._lock:
            states = list(self.watched.values())
        if any(w.held for w in states):
            return EXIT_TAMPERED
        if states and all(w.last == INTACT for w in states):
            return EXIT_INTACT
        return EXIT_ERROR
