"""The ``tamperprobe`` command line. Exit codes: 0 INTACT (or success), 1 TAMPERED, 2 error or INCONCLUSIVE."""

from __future__ import annotations

import typer

from ._common import err_console

app = typer.Typer(
    name="tamperprobe",
    help="Prove, through its prediction API alone, that a served classifier is still the one you shipped.\n\n"
    "Exit codes: 0 INTACT / success, 1 TAMPERED, 2 usage error, runtime error or INCONCLUSIVE.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

from . import lab, owner, served  # noqa: E402

for _module in (owner, served, lab):
    _module.register(app)


def main() -> None:
    try:
        app()
    except SystemExit:
        raise
    except Exception as exc:  # last resort: never a traceback for the user
        err_console.print(f"[bold red]error:[/] internal error: {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
