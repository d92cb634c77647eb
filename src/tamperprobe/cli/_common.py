"""Pieces every CLI command shares: consoles, error reporting, progress bars."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from .._util import Progress, one_line

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``message`` as one line to stderr (its first line, as plain text) and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {escape(one_line(message, 2000))}", highlight=False, soft_wrap=True)
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
    except (OSError, MemoryError) as exc:
        fail(one_line(exc, 2000, with_type=True), 2)


@contextlib.contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Progress]:
    """A rich progress bar driven by ``update(done, total[, what])`` callbacks (``_util.Progress``)."""
    if not enabled or not sys.stderr.isatty() and not console.is_terminal:
        yield lambda done, total, what="": None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as prog:
        task = prog.add_task(description, total=None)

        def update(done: int, total: int, what: str = "") -> None:
            prog.update(task, completed=done, total=total, description=f"{description}: {what}" if what else description)

        yield update
