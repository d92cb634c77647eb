"""The history writes of a fleet pass, batched: one thread each for the draws and the runs, a transaction per batch.

Every endpoint's run is recorded in the history after its verdict is out (``Session``: alarm
first, then the record). A pass over a thousand endpoints would otherwise open the history a
thousand times and commit a thousand times, each endpoint's thread waiting for the file's one
write lock while holding its concurrency slot. Here the runs go to one thread that writes
whatever has come in since its last write in one transaction (``history.record_many``).

What a crash can lose is only what the run *said* (its row in ``runs`` and ``markers``), never
what it *spent*: each run's markers were committed to the ledger before anything was sent. The
draws are batched too (``Claims``), but never past that promise: a session asking for its draw
waits until the transaction holding it is committed (``ledger.claim_many``), and the draws that
arrive while one transaction is written go together in the next. A draw without a run reads as
an interrupted run, and its markers stay spent (fail closed).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .._util import one_line
from ..served import history, ledger
from ..served.session import Run, Session

BATCH = 200  # runs (or draws) at most in one transaction

T = TypeVar("T")


def _batches(q: queue.Queue[T | None]) -> Iterator[list[T]]:
    """What has come in on ``q`` since the last batch (at least one item, at most ``BATCH``), until a None arrives."""
    done = False
    while not done:
        first = q.get()
        batch = [] if first is None else [first]
        done = first is None
        while not done and len(batch) < BATCH:
            try:
                item = q.get_nowait()
            except queue.Empty:
                break
            if item is None:
                done = True
            else:
                batch.append(item)
        if batch:
            yield batch


class _BatchWorker(Generic[T]):
    """One thread that takes what is queued and hands it over in batches (``_batches``) to ``_handle``; ``close()``
    lets it finish what is queued and waits for it."""

    def __init__(self, path: str | os.PathLike | None, thread_name: str) -> None:
        self.path = path
        self._queue: queue.Queue[T | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=thread_name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        for batch in _batches(self._queue):
            self._handle(batch)

    def _handle(self, batch: list[T]) -> None:
        raise NotImplementedError


class Recorder(_BatchWorker[tuple[Session, Run]]):
    """``add(session, run)`` queues a run for the history; ``close()`` writes what is left and waits for it.

    ``on_problem(endpoint, text)`` hears each run that could not be written (as ``Session.record``'s
    caller would warn). A session that does not record (``record`` off) is skipped.
    """

    def __init__(self, path: str | os.PathLike | None, on_problem: Callable[[str, str], None]) -> None:
        self.on_problem = on_problem
        super().__init__(path, "fleet-history")

    def add(self, session: Session, run: Run) -> None:
        if session.settings.record:
            self._queue.put((session, run))

    def _handle(self, batch: list[tuple[Session, Run]]) -> None:
        try:
            history.record_many([(run.report, s.settings.protocol or None) for s, run in batch], self.path)
        except Exception as exc:  # noqa: BLE001 - a history problem never costs a verdict: each run's endpoint is told
            problem = one_line(exc, 300) if str(exc) else type(exc).__name__
            for s, _run in batch:
                self.on_problem(s.endpoint, f"the run was not recorded in the history: {problem}")


class _Pending:
    def __init__(self, claim: ledger.Claim) -> None:
        self.claim = claim
        self.done = threading.Event()
        self.result: dict[str, list[int]] | BaseException | None = None


class Claims(_BatchWorker[_Pending]):
    """``ledger.claim`` for a pass's sessions: each call returns once its draw is committed, in one transaction with the
    draws that waited alongside it (``Session(claim=...)``). ``close()`` ends the thread once the pass is over."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        super().__init__(path, "fleet-ledger")

    def __call__(
        self,
        fingerprint: str,
        choose: ledger.Chooser,
        *,
        draw: str,
        digests: ledger.Digests | None = None,
        target: str = "",
        path: str | os.PathLike | None = None,
        timeout: float = history.WRITE_TIMEOUT,
    ) -> dict[str, list[int]]:
        if path != self.path:  # not this pass's history: on its own
            return ledger.claim(fingerprint, choose, draw=draw, digests=digests, target=target, path=path, timeout=timeout)
        pending = _Pending(ledger.Claim(fingerprint, choose, draw, digests, target))
        self._queue.put(pending)
        pending.done.wait()
        if isinstance(pending.result, BaseException):
            raise pending.result
        assert pending.result is not None
        return pending.result

    def _handle(self, batch: list[_Pending]) -> None:
        results: list[dict[str, list[int]] | Exception] | list[BaseException]
        try:
            results = ledger.claim_many([p.claim for p in batch], path=self.path)
        except BaseException as exc:  # noqa: BLE001 - every waiting session hears it (a HistoryError: nothing was written)
            results = [exc] * len(batch)
        for p, result in zip(batch, results):
            p.result = result
            p.done.set()
