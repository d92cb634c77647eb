"""mkdocs hook: the pages that are generated at build time rather than committed.

* ``reference/cli.md``: the command-line reference, rendered from the typer app's click command
  tree (``typer.main.get_command``), so it always matches ``tamperprobe COMMAND --help``.
* ``benchmarks/results/**``: the committed benchmark results (``bench/results``), copied into the
  site as they are, so the docs link to the result files themselves instead of quoting copies.
* ``deployment/files/**``: the deployment examples (``deploy/``), copied as they are for download; the
  deployment page shows them with ``pymdownx.snippets`` from the same files.

Nothing here touches the network; the site is built from the work tree alone.
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
CLI_PAGE = "reference/cli.md"
RESULTS_PREFIX = "benchmarks/results"
DEPLOY = ROOT / "deploy"
DEPLOY_PREFIX = "deployment/files"


def _inline(text: str) -> str:
    """Help text as Markdown text: HTML and Markdown's emphasis and link characters made literal."""
    text = html.escape(text, quote=False)
    return re.sub(r"([\\`*_\[\]])", r"\\\1", text)


def _paragraphs(text: str) -> str:
    """click help text (paragraphs split by blank lines, lines wrapped by hand) as Markdown paragraphs."""
    paras = [" ".join(line.strip() for line in block.splitlines()) for block in re.split(r"\n\s*\n", text.strip())]
    return "\n\n".join(_inline(p.replace("\b", "").strip()) for p in paras if p.strip())


def _param_line(param: Any, ctx: Any) -> str:
    """One option or argument as ``--name <type>``: its help, as ``--help`` shows them."""
    record = param.get_help_record(ctx)
    if record is None:
        return f"- `{', '.join(param.opts)}`"
    names, help_text = record
    return f"- `{names}`" + (f": {_inline(' '.join(help_text.split()))}" if help_text else "")


def _commands(group: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every visible command as (its name after ``tamperprobe``, the click command), sub-commands of a group
    (``fleet check``) in their group's place, in the app's order."""
    out: list[tuple[str, Any]] = []
    for name, command in group.commands.items():
        if command.hidden:
            continue
        full = f"{prefix}{name}"
        sub = getattr(command, "commands", None)
        out += _commands(command, full + " ") if sub else [(full, command)]
    return out


def render_cli() -> str:
    """The whole command line as one Markdown page: the group's help, then every command's."""
    import typer.main

    from tamperprobe.cli.app import app

    group: Any = typer.main.get_command(app)  # a click group (typer's own copy of click)
    ctx = group.make_context("tamperprobe", [], resilient_parsing=True)
    out = [
        "# Command line",
        "",
        "Generated at build time from the command-line app (`tamperprobe.cli.app`), so it matches",
        "`tamperprobe COMMAND --help` of this version. Every command exits with **0** INTACT or success,",
        "**1** TAMPERED, **2** usage error, runtime error or INCONCLUSIVE, **3** the fingerprint is not authentic.",
        "",
        _paragraphs(group.help or ""),
        "",
    ]
    for name, command in _commands(group):
        sub = command.make_context(name.split()[-1], [], parent=ctx, resilient_parsing=True)
        usage = " ".join(["tamperprobe", name, *command.collect_usage_pieces(sub)])
        out += [f"## `{name}`", "", f"```text\n{usage}\n```", "", _paragraphs(command.help or ""), ""]
        params = [p for p in command.get_params(sub) if not getattr(p, "hidden", False) and p.name != "help"]
        arguments = [p for p in params if p.param_type_name == "argument"]
        options = [p for p in params if p.param_type_name != "argument"]
        if arguments:
            out += ["**Arguments**", "", *(_param_line(p, sub) for p in arguments), ""]
        if options:
            out += ["**Options**", "", *(_param_line(p, sub) for p in options), ""]
    return "\n".join(out) + "\n"


def on_config(config: Any) -> Any:
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)  # the work tree's package, whatever is installed
    return config


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, CLI_PAGE, content=render_cli()))
    for path in sorted(RESULTS.rglob("*")):
        if path.is_file():
            uri = f"{RESULTS_PREFIX}/{path.relative_to(RESULTS).as_posix()}"
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            uri = f"{DEPLOY_PREFIX}/{path.relative_to(DEPLOY).as_posix()}"
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


_REPO_LINK = re.compile(r"\]\((bench/results/[^)\s]+)\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """A result page that links to ``bench/results/…`` by its repository path gets the link relative to itself."""
    uri = page.file.src_uri
    if not uri.startswith(RESULTS_PREFIX + "/"):
        return markdown
    here = Path(uri).parent

    def relative(match: re.Match[str]) -> str:
        target = Path(RESULTS_PREFIX) / Path(match.group(1)).relative_to("bench/results")
        return f"]({Path(*(['..'] * len(here.parts))).joinpath(target).as_posix()})"

    return _REPO_LINK.sub(relative, markdown)
