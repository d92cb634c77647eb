"""Pieces every CLI command shares: consoles, error reporting, progress, JSON output."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, Callable, Iterator, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from .._util import Progress, one_line

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``message`` as one line to stderr (its first line, made inert and markup-escaped) and exit with ``code``."""
    from ..served.untrusted import clean

    err_console.print(f"[bold red]error:[/] {escape(clean(one_line(message, 2000), 2000))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Turn tamperprobe errors (and a few expected others) into one line and exit code 2."""
    from ..errors import TamperprobeError

    try:
        yield
    except typer.Exit:
        raise
    except TamperprobeError as exc:
        fail(one_line(exc, 2000), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 2)
    except ModuleNotFoundError as exc:  # an optional dependency: name the extra that installs it
        from .._extras import missing_extra

        known = missing_extra(exc)
        if known is None:
            raise
        fail(str(known), known.exit_code)
    except (OSError, MemoryError) as exc:
        fail(one_line(exc, 2000, with_type=True), 2)


PROGRESS_INTERVAL = 5.0  # seconds between two plain progress lines (stderr not a terminal)


def format_duration(seconds: float) -> str:
    """``12 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class ProgressLines:
    """Progress as plain lines for logs (CI, ``| tee``): the first update, then at most one line every
    ``interval`` seconds, and the last state when the phase ends (``finish``).

    ``generating boundary markers: 40/100 (40 %), 12 s elapsed, ETA 18 s``. The ETA extrapolates the
    rate since the current total was set (a step with another total starts a new sub-phase).
    """

    def __init__(
        self,
        description: str,
        write: Callable[[str], None],
        interval: float = PROGRESS_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.description = description
        self.write = write
        self.interval = interval
        self.clock = clock
        self.start = clock()
        self.state: tuple[int, int, str] | None = None
        self.shown: tuple[int, int, str] | None = None
        self.last_line: float | None = None
        self.phase: tuple[float, int, int] = (self.start, 0, 0)  # (time, done, total) when the current total was set

    def __call__(self, done: int, total: int, what: str = "") -> None:
        now = self.clock()
        if self.state is None or total != self.state[1] or done < self.state[0]:
            self.phase = (now, done, total)
        self.state = (int(done), int(total), what)
        if self.last_line is None or now - self.last_line >= self.interval:
            self._emit(now)

    def finish(self) -> None:
        if self.state is not None and self.state != self.shown:
            self._emit(self.clock())

    def line(self, now: float) -> str:
        assert self.state is not None
        done, total, what = self.state
        head = f"{self.description}: {done}/{total} ({100 * done // total} %)" if total > 0 else f"{self.description}: {done}"
        parts = [head + (f" {what}" if what else ""), f"{format_duration(now - self.start)} elapsed"]
        t0, d0, _ = self.phase
        if total > 0 and done >= total:
            parts.append("done")
        elif total > 0 and done > d0 and now > t0:
            rate = (done - d0) / (now - t0)
            parts.append(f"ETA {format_duration((total - done) / rate)}")
        return ", ".join(parts)

    def _emit(self, now: float) -> None:
        self.write(self.line(now))
        self.shown = self.state
        self.last_line = now


def _progress_interval() -> float:
    try:
        value = float(os.environ.get("TAMPERPROBE_PROGRESS_INTERVAL", PROGRESS_INTERVAL))
    except ValueError:
        return PROGRESS_INTERVAL
    return value if value >= 0 and math.isfinite(value) else PROGRESS_INTERVAL


@contextlib.contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Progress]:
    """Progress of one long phase on stderr, driven by ``update(done, total[, what])`` callbacks (``_util.Progress``).

    On a terminal: a bar with elapsed time and ETA, removed when the phase ends. Otherwise (CI logs,
    ``| tee``, a pipe): plain lines (``ProgressLines``), at most one every ``$TAMPERPROBE_PROGRESS_INTERVAL``
    seconds (default 5) plus the final state. Nothing ever goes to stdout.
    """
    if not enabled:
        yield lambda done, total, what="": None
        return
    if not err_console.is_terminal:
        lines = ProgressLines(description, lambda text: err_console.print(text, highlight=False, soft_wrap=True, markup=False), _progress_interval())
        yield lines
        lines.finish()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    with Bar(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as prog:
        task = prog.add_task(escape(description), total=None)

        def update(done: int, total: int, what: str = "") -> None:
            shown = escape(f"{description}: {what}" if what else description)
            prog.update(task, completed=done, total=total, description=shown)

        yield update


# ------------------------------------------------------------------ JSON output


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars and arrays, paths and tuples made plain, and NaN / infinities as null."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def print_json(data: Any) -> None:
    """Print ``data`` as JSON on stdout: the only thing a command prints there with ``--json``."""
    typer.echo(json.dumps(jsonable(data), indent=2, allow_nan=False))
