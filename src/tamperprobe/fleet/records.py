"""The history writes of a fleet pass, batched: one writer thread, a few transactions instead of one per endpoint.

Every endpoint's run is recorded in the history after its verdict is out (``Session``: alarm
first, then the record). A pass over a thousand endpoints would otherwise open the history a
thousand times and commit a thousand times, each endpoint's thread waiting for the file's one
write lock while holding its concurrency slot. Here the runs go to one thread that writes
whatever has come in since its last write in one transaction (``history.record_many``).

What a crash can lose is only what the run *said* (its row in ``runs`` and ``markers``), never
what it *spent*: each run's markers were committed to the ledger (``ledger.claim``) before
anything was sent, one transaction per draw, as ever. A draw without a run reads as an
interrupted run, and its markers stay spent (fail closed).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

from .._util import one_line
from ..served import history
from ..served.session import Run, Session

BATCH = 200  # runs at most in one transaction


class Recorder:
    """``add(session, run)`` queues a run for the history; ``close()`` writes what is left and waits for it.

    ``on_problem(endpoint, text)`` hears each run that could not be written (as ``Session.record``'s
    caller would warn). A session that does not record (``record`` off) is skipped.
    """

    def __init__(self, path: str | os.PathLike | None, on_problem: Callable[[str, str], None]) -> None:
        self.path = path
        self.on_problem = on_problem
        self._queue: queue.Queue[tuple[Session, Run] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="fleet-history", daemon=True)
        self._thread.start()

    def add(self, session: Session, run: Run) -> None:
        if session.settings.record:
            self._queue.put((session, run))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        done = False
        while not done:
            first = self._queue.get()
            batch = [] if first is None else [first]
            done = first is None
            while not done and len(batch) < BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    done = True
                else:
                    batch.append(item)
            if batch:
                self._write(batch)

    def _write(self, batch: list[tuple[Session, Run]]) -> None:
        try:
            history.record_many([(run.report, s.settings.protocol or None) for s, run in batch], self.path)
        except Exception as exc:  # noqa: BLE001 - a history problem never costs a verdict: each run's endpoint is told
            problem = one_line(exc, 300) if str(exc) else type(exc).__name__
            for s, _run in batch:
                self.on_problem(s.endpoint, f"the run was not recorded in the history: {problem}")
