"""Where a run's cells execute: in this process (``LocalBackend``, the default) or as Ray tasks (``RayBackend``).

A *cell* is one independent piece of a campaign: one method's bag, one attack instance. Its
randomness is seeded from the campaign's seed and the cell's coordinates alone
(``runner.make_bag``, ``runner.AttackRun.seed``), so a cell gives the same result wherever and
whenever it runs; the campaign consumes the outcomes in its own order, so its tables do not depend
on the order the cells finish in.

``LocalBackend`` runs each cell when the campaign asks for its outcome, inside the campaign's
progress and timing (``runner.Steps``), exactly as a campaign always ran. ``RayBackend`` puts the
shared inputs (model, data) into Ray's object store once, submits cells as tasks as soon as they
are planned (an attack's training does not wait for the bags), runs each with the driver's number
of torch threads (so that float results match the local run's), reports progress as tasks finish
anywhere in the cluster, lets Ray retry a task whose worker died (``max_retries``), and turns a
task that still fails into the cell's error. Ray is the ``ray`` extra; nothing here imports it
unless a ``RayBackend`` is used.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .._util import one_line
from ..errors import UsageError
from .runner import Attacked, Steps

BACKENDS = ("local", "ray")
LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode, every address the loopback one
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colours in Ray's error texts


@dataclass(frozen=True)
class Cell:
    """One unit of work: ``fn(*args, progress=...)`` (``fn`` a module-level function), its timing key and progress text."""

    key: str
    what: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Outcome:
    """What a cell gave: its value, or its error (the exception in-process, its one-line text from a worker), and its seconds."""

    value: Any = None
    error: BaseException | str | None = None
    seconds: float = 0.0


class LocalBackend:
    """Cells run in this process, one after the other, when their outcome is asked for."""

    name = "local"

    def put(self, value: Any) -> Any:
        return value

    def submit(self, cells: Sequence[Cell]) -> Sequence[Any]:
        return list(cells)

    def outcomes(self, cells: Sequence[Cell], submitted: Sequence[Any], steps: Steps) -> Iterator[Outcome]:
        """Each cell's outcome in order; the caller's work on it is timed with the cell, then the step is counted."""
        for cell in cells:
            t0 = time.monotonic()
            with steps.timed(cell.key):
                try:
                    out = Outcome(cell.fn(*cell.args, progress=steps.within(cell.what)))
                except Exception as exc:
                    out = Outcome(error=exc)
                yield Outcome(out.value, out.error, time.monotonic() - t0)
            steps.step(cell.what)

    def close(self) -> None:
        return None


def _in_worker(fn: Callable[..., Any], threads: int, *args: Any) -> Outcome:
    """A cell in a Ray worker: with the driver's torch threads, timed; an exception becomes its one-line text."""
    import torch

    torch.set_num_threads(max(1, threads))
    t0 = time.monotonic()
    try:
        value = fn(*args, progress=None)
    except Exception as exc:
        return Outcome(None, one_line(exc, with_type=True), time.monotonic() - t0)
    if isinstance(value, Attacked):
        value = replace(value, model=portable(value.model))
    return Outcome(value, None, time.monotonic() - t0)


class _ScriptCargo:
    """A torch model whose module is TorchScript, in a form pickle can carry (``torch.jit.save`` bytes); unpickled, the model."""

    def __init__(self, model: Any) -> None:
        import io

        import torch

        from .._torch import quiet

        buffer = io.BytesIO()
        with quiet():
            torch.jit.save(model.module, buffer)
        self.kind, self.data, self.source = type(model), buffer.getvalue(), model.source

    def __reduce__(self) -> tuple[Any, ...]:
        return (_load_script, (self.kind, self.data, self.source))


def _load_script(kind: Any, data: bytes, source: str) -> Any:
    import io

    import torch

    from .._torch import quiet

    with quiet():
        return kind(torch.jit.load(io.BytesIO(data)), source)


def portable(value: Any) -> Any:
    """``value`` as Ray can send it: a TorchScript model travels as its ``torch.jit.save`` bytes, anything else as it is."""
    import torch

    if isinstance(getattr(value, "module", None), torch.jit.ScriptModule):
        return _ScriptCargo(value)
    return value


class RayBackend:
    """Cells as Ray tasks on a cluster (``address``; None: a local one started here, or the one already initialised).

    A cluster this backend starts itself runs on this machine only and listens on 127.0.0.1
    (Ray's single-machine mode); to use several machines, start the cluster with ``ray start``
    and give its address.

    ``cpus_per_task`` is what each task asks of the scheduler (with ``threads`` torch threads;
    None: the driver's); ``max_retries`` how often Ray re-runs a task whose worker died.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, cpus_per_task: float = 1, threads: int | None = None, max_retries: int = 3) -> None:
        self.address = address
        self.cpus_per_task = cpus_per_task
        self.threads = threads
        self.max_retries = max_retries
        self._ray: Any = None
        self._started = False
        self._task: Any = None

    def _start(self) -> Any:
        if self._ray is None:
            from .._extras import available, missing

            if not available("ray"):
                raise missing("ray", "evaluate --backend ray")
            if self.address is None and not os.environ.get("RAY_ADDRESS") and "ray" not in sys.modules:
                os.environ.setdefault(LOOPBACK, "0")  # a cluster started here listens on 127.0.0.1 only (read when ray is imported)
            import ray

            if not ray.is_initialized():
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
                self._started = True
            self._ray = ray
            self._task = ray.remote(_in_worker)
        return self._ray

    def put(self, value: Any) -> Any:
        ray = self._start()
        try:
            return ray.put(portable(value))
        except Exception as exc:
            raise UsageError(f"the ray backend cannot send {type(value).__name__} to its workers: {one_line(exc)}") from None

    def submit(self, cells: Sequence[Cell]) -> Sequence[Any]:
        self._start()
        import torch

        threads = self.threads or torch.get_num_threads()
        task = self._task.options(num_cpus=self.cpus_per_task, max_retries=self.max_retries)
        return [task.remote(cell.fn, threads, *cell.args) for cell in cells]

    def outcomes(self, cells: Sequence[Cell], submitted: Sequence[Any], steps: Steps) -> Iterator[Outcome]:
        """Wait for every task (progress as each finishes, wherever), then give the outcomes in the cells' order."""
        ray = self._start()
        index = {ref: i for i, ref in enumerate(submitted)}
        results: list[Outcome | None] = [None] * len(cells)
        pending = list(submitted)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = index[done[0]]
            try:
                results[i] = ray.get(done[0])
            except Exception as exc:  # the task failed in Ray itself (e.g. its worker died more often than max_retries)
                results[i] = Outcome(None, _ray_error(exc, self.max_retries))
            steps.timings[cells[i].key] = results[i].seconds  # type: ignore[union-attr]
            steps.step(cells[i].what)
        for out in results:
            assert out is not None
            yield out

    def close(self) -> None:
        """Shut down the cluster this backend started (one it joined keeps running)."""
        if self._started and self._ray is not None:
            self._ray.shutdown()
        self._started, self._ray, self._task = False, None, None


def _ray_error(exc: BaseException, retries: int) -> str:
    """A task Ray could not run, as one plain line: the cause Ray wraps when it has one, no terminal colours."""
    cause = getattr(exc, "cause", None)
    text = one_line(cause if isinstance(cause, BaseException) else exc, with_type=True)
    return _ANSI.sub("", text) + f" (max_retries {retries})"


def get_backend(backend: str | LocalBackend | RayBackend | None, address: str | None = None) -> LocalBackend | RayBackend:
    """A backend by name (``local``, ``ray``) or as given; ``address`` is the Ray cluster's.

    A run closes a backend it made from a name when it ends; one given as an object is the
    caller's to close (``evaluate`` shares one between the campaign and ``--adversary``).
    """
    if backend is None or backend == "local":
        if address is not None:
            raise UsageError("--address needs --backend ray")
        return LocalBackend()
    if backend == "ray":
        return RayBackend(address)
    if isinstance(backend, (LocalBackend, RayBackend)):
        return backend
    raise UsageError(f"unknown backend {backend!r}: choose {' or '.join(BACKENDS)}")
