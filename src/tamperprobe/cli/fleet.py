"""CLI commands of a fleet: ``fleet check`` (one pass) and ``fleet watch`` (every endpoint on its own schedule).

Each body wires options to ``tamperprobe.fleet``; the fleet file holds everything per endpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape

from ._common import console, err_console, handled
from ._options import HistoryOption, JsonOption

if TYPE_CHECKING:
    from ..fleet.check import Outcome

FleetFileArgument = Annotated[
    Path, typer.Argument(help="The fleet file (TOML): a defaults table and one endpoint table (an array of tables) per served model.")
]
ConcurrencyOption = Annotated[Optional[int], typer.Option("--concurrency", help="Endpoints verified at once (default: the file's, else 32).")]
NoHistoryOption = Annotated[bool, typer.Option("--no-history", help="Do not record in the history (draws refused unless allow_repeat).")]

_COLOURS = {"INTACT": "green", "TAMPERED": "bold red", "NOT AUTHENTIC": "bold magenta"}

fleet_app = typer.Typer(help="Verify every endpoint of a fleet file from one process.", no_args_is_help=True)


def _shown(text: object, limit: int = 300) -> str:
    from ..served.untrusted import clean

    return escape(clean(text, limit))


def _line(o: Outcome) -> str:
    colour = _COLOURS.get(o.verdict, "yellow")
    detail = "" if o.verdict == "INTACT" else f"  {_shown(o.summary())}"
    return f"[{colour}]{o.verdict:<13}[/] {_shown(o.endpoint, 128):<24} {o.seconds:6.2f} s{detail}"


@fleet_app.command("check")
def check_cmd(
    fleet_file: FleetFileArgument,
    concurrency: ConcurrencyOption = None,
    history_path: HistoryOption = None,
    no_history: NoHistoryOption = False,
    as_json: JsonOption = False,
) -> None:
    """One pass over every endpoint of FLEET_FILE, concurrently; a line (or with --json an object) per endpoint.

    Exit 1 if any endpoint is TAMPERED, else 3 if any fingerprint is not authentic or not the one
    its entry expects, else 2 if any is INCONCLUSIVE or could not be checked, else 0. Nothing is
    sent when the file has an error (exit 2, naming the file, the entry and the field).
    """
    with handled():
        from ..errors import UsageError
        from ..fleet import check, config

        fleet = config.load(fleet_file)
        if concurrency is not None and concurrency < 1:
            raise UsageError("--concurrency must be at least 1")
        outcomes = check.check(
            fleet,
            concurrency=concurrency,
            record=not no_history,
            history_path=history_path,
            on_outcome=None if as_json else lambda o: console.print(_line(o), highlight=False, soft_wrap=True),
            on_warning=lambda name, text: err_console.print(
                f"[yellow]warning:[/] {_shown(name, 128)}: {_shown(text)}", highlight=False, soft_wrap=True
            ),
        )
        code = check.worst_exit(outcomes)
        if as_json:
            print(json.dumps([o.to_json() for o in outcomes], sort_keys=True))
        else:
            counts = {v: sum(o.verdict == v for o in outcomes) for v in ("INTACT", "TAMPERED", "INCONCLUSIVE", "NOT AUTHENTIC", "ERROR")}
            shown = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
            console.print(f"{len(outcomes)} endpoints: {shown}", highlight=False)
    raise typer.Exit(code)


@fleet_app.command("watch")
def watch_cmd(
    fleet_file: FleetFileArgument,
    concurrency: ConcurrencyOption = None,
    history_path: HistoryOption = None,
    no_history: NoHistoryOption = False,
    metrics_port: Annotated[
        Optional[int], typer.Option("--metrics-port", help="Serve Prometheus metrics of every endpoint on this port (/metrics; 0: a free one).")
    ] = None,
    metrics_host: Annotated[str, typer.Option("--metrics-host", help="Address of the metrics server.")] = "127.0.0.1",
    event_log: Annotated[Optional[Path], typer.Option("--event-log", help="Append one JSON object per run to this file.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Watch every endpoint of FLEET_FILE on its own schedule, until SIGTERM or Ctrl-C.

    Each run prints a line (or JSON), updates the metrics (labelled by endpoint name and
    fingerprint) and the event log, runs the entry's hook, then is recorded. An endpoint that reads
    TAMPERED is held: its metrics stay at tamperprobe_tampered 1 and it is not run again, while the
    others go on. SIGHUP, or a change of the file, reloads it (unchanged entries keep their state).
    On stop: exit 1 if any endpoint read TAMPERED, 2 if any last run was INCONCLUSIVE (or none
    completed), else 0.
    """
    with handled():
        from ..errors import UsageError
        from ..fleet import config
        from ..fleet.watch import FleetWatch
        from ..served.watch import interrupted, interrupts
        from .verifying import _run_reporter

        fleet = config.load(fleet_file)
        if concurrency is not None and concurrency < 1:
            raise UsageError("--concurrency must be at least 1")
        reporter = _run_reporter("fleet", metrics_port, metrics_host, event_log or fleet.settings.event_log, as_json)
        warn = lambda name, text: err_console.print(f"[yellow]warning:[/] {_shown(name, 128)}: {_shown(text)}", highlight=False, soft_wrap=True)  # noqa: E731
        with interrupts(), reporter:
            fw = FleetWatch(
                fleet,
                record=not no_history,
                history_path=history_path,
                concurrency=concurrency,
                on_run=lambda e, run: reporter(run, e.name),
                on_warning=warn,
            )
            with _sighup(fw.reload):
                try:
                    code = fw.run(until=interrupted)  # an interrupt a finalizer swallowed still stops it
                except KeyboardInterrupt:
                    fw.stop()
                    code = fw.exit_code()
        console.print(f"stopped: {len(fw.watched)} endpoints, exit {code}", highlight=False)
    raise typer.Exit(code)


@contextmanager
def _sighup(reload: Callable[[], object]) -> Iterator[None]:
    """SIGHUP reloads the fleet file (in the main thread, between two scheduler steps)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
        yield
        return
    previous = signal.signal(signal.SIGHUP, lambda _s, _f: reload())
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


def register(app: typer.Typer) -> None:
    app.add_typer(fleet_app, name="fleet")
