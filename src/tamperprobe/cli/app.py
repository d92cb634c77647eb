"""The ``tamperprobe`` command line. Exit codes: 0 INTACT (or success), 1 TAMPERED, 2 error or INCONCLUSIVE."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import typer
import typer.core
from rich.markup import escape

try:  # typer >= 0.20 carries its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

from .. import __version__
from ._common import err_console


class OneLineErrors(typer.core.TyperGroup):
    """Usage errors as one line on stderr (``error: ...``), not click's or rich's multi-line panels."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, windows_expand_args=windows_expand_args, **extra)
        except click_exceptions.ClickException as exc:
            message = exc.format_message()
            if message:  # (asking for nothing prints the help and no error)
                where = f" (see {exc.ctx.command_path} --help)" if isinstance(exc, click_exceptions.UsageError) and exc.ctx is not None else ""
                err_console.print(f"[bold red]error:[/] {escape(message + where)}", highlight=False, soft_wrap=True)
            if not standalone_mode:
                raise
            sys.exit(exc.exit_code)
        except typer.Exit as exc:
            if not standalone_mode:
                raise
            sys.exit(exc.exit_code)
        except typer.Abort:
            err_console.print("[bold red]error:[/] aborted", highlight=False)
            if not standalone_mode:
                raise
            sys.exit(2)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="tamperprobe",
    cls=OneLineErrors,
    help="Prove, through its prediction API alone, that a served classifier is still the one you shipped.\n\n"
    "Exit codes: 0 INTACT / success, 1 TAMPERED, 2 usage error, runtime error or INCONCLUSIVE, 3 fingerprint not authentic.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    if value:
        print(f"tamperprobe {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Prove, through its prediction API alone, that a served classifier is still the one you shipped."""


from . import fleet, keys, lab, owner, served  # noqa: E402

for _module in (owner, served, lab, keys, fleet):
    _module.register(app)


def main() -> None:
    try:
        app()
    except SystemExit:
        raise
    except Exception as exc:  # last resort: never a traceback for the user
        err_console.print(f"[bold red]error:[/] internal error: {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
