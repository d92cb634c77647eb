"""The command line as a whole: one-line usage errors, --version."""

from __future__ import annotations


def test_usage_errors_are_one_line_on_stderr():
    """Issue 12: a usage error (missing argument, unknown option or command) is one line, not a boxed panel.

    The first case runs the real ``python -m tamperprobe``; the others the same entry point in a forked child
    (``tests/_procs.py``: own stderr and exit status, no second ``import torch``)."""
    import subprocess
    import sys

    from _procs import run_cli

    for i, (args, want) in enumerate(
        (
            (["fingerprint"], "Missing argument"),
            (["verify", "x.tpf", "--bogus"], "No such option: --bogus"),
            (["nosuch"], "No such command"),
        )
    ):
        if i == 0:
            proc = subprocess.run([sys.executable, "-m", "tamperprobe", *args], capture_output=True, text=True, timeout=60)
        else:
            proc = run_cli(*args, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], proc.stderr
        assert "╭" not in proc.stderr and "Traceback" not in proc.stderr


def test_version():
    from typer.testing import CliRunner

    from tamperprobe import __version__
    from tamperprobe.cli.app import app

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"tamperprobe {__version__}"


def test_no_help_text_loses_words_to_rich_markup():
    """``--help`` is rendered by rich, which reads ``[word]`` as a markup tag and drops it ("one [[endpoint]] per model"
    printed as "one [] per model"): every help text of every command, option and argument shows as written."""
    import typer.main
    from rich.markup import render

    from tamperprobe.cli.app import app

    def texts(command, path: str):
        yield path, command.help or ""
        for param in command.params:
            yield f"{path} {param.name}", getattr(param, "help", None) or ""
        for name, sub in (getattr(command, "commands", None) or {}).items():  # a group (typer's own copy of click)
            yield from texts(sub, f"{path} {name}")

    seen = list(texts(typer.main.get_command(app), "tamperprobe"))
    assert len(seen) > 100
    lost = {where: text for where, text in seen if render(text).plain != text}
    assert not lost, lost
