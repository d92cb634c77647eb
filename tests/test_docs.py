"""The documentation stays true: every command it shows runs, every default and quoted number matches.

Each fenced ``bash`` (or ``python``) block in README.md and docs/ that is preceded by a marker comment is
run, page by page, in a fresh copy of one shared workspace (a digits CNN and a signed top-1 fingerprint,
made once by the blocks marked ``setup``):

* ``<!-- run -->``: must exit 0; ``<!-- run: exit=N -->``: must exit N; ``expect=TEXT`` (after a ``;``):
  its output must contain TEXT;
* ``<!-- run: background -->``: a server, started in the background on a free port of 127.0.0.1 (which
  replaces the block's ``--port`` in every block of the page), once per distinct command for the session, as a
  forked copy of the test process (``tests/_procs.py``) running the command line through the CLI's ``main``;
* ``<!-- run: setup -->``: run once, in page order, to make the shared workspace;
* ``<!-- run: needs=MODULE -->``: the page is skipped, with the reason, when MODULE cannot be imported;
* ``<!-- file: NAME -->``: the block (``bash``, ``python`` or ``toml``) is written to NAME in the page's
  workspace before its commands run, with the background servers' ports put in as in commands;
* ``<!-- demo-command -->`` / ``<!-- test-command -->``: the README's quick start (CI runs the test
  command; ``tests/test_demo.py`` the demo); a copy elsewhere must equal the README's.

A bash block without a marker fails the test: nothing shown can go unrun. Its ``tamperprobe`` commands run
through the console script's ``main`` (in this process, or forked for ``timeout``), other commands under bash
(see ``_run``).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from _procs import Forked, cli_main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
DOC_PORTS = ("8080", "9100")
BLOCK = re.compile(r"(?:<!--\s*(?P<marker>[^>]*?)\s*-->\s*\n)?```(?P<lang>bash|python|toml)\n(?P<body>.*?)```", re.S)
QUICK_START = ("demo-command", "test-command")


@dataclass(frozen=True)
class Block:
    page: str
    lang: str
    marker: str
    body: str

    @property
    def attrs(self) -> dict[str, str]:
        """``run: exit=1; expect=TAMPERED:`` -> {"exit": "1", "expect": "TAMPERED:"}; a bare word maps to ""."""
        rest = self.marker.split(":", 1)[1] if ":" in self.marker else ""
        pairs = (part.strip().partition("=") for part in rest.split(";") if part.strip())
        return {key.strip(): value.strip() for key, _, value in pairs}

    @property
    def kind(self) -> str:
        """What the harness does with the block: setup, copy, background, or "" (run it here)."""
        return next((k for k in ("setup", "copy", "background") if k in self.attrs), "")


def pages() -> list[Path]:
    found = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    return [p for p in found if "_hooks" not in p.parts and not p.name.startswith("NOTES-")]


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(ROOT).as_posix()
    return [Block(rel, m["lang"], (m["marker"] or "").strip(), m["body"]) for m in BLOCK.finditer(text)]


def runnable(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.marker.startswith("run")]


def test_every_bash_block_is_run_or_is_the_quick_start() -> None:
    unmarked = [f"{b.page}: {b.body.splitlines()[0]}" for p in pages() for b in blocks(p) if b.lang == "bash" and not b.marker]
    assert unmarked == [], "bash blocks without a <!-- run --> marker"
    known = ("run", "file:")
    unknown = [b.marker for p in pages() for b in blocks(p) if b.marker and not b.marker.startswith(known) and b.marker not in QUICK_START]
    assert unknown == []


def test_quick_start_copies_equal_the_readme() -> None:
    readme = {b.marker: b.body for b in blocks(ROOT / "README.md") if b.marker in QUICK_START}
    assert set(readme) == set(QUICK_START)
    copies = [b for p in pages()[1:] for b in blocks(p) if b.marker in QUICK_START]
    assert copies, "the getting-started page shows the quick start"
    for b in copies:
        assert b.body == readme[b.marker], f"{b.page}: {b.marker} differs from the README's"


def test_readme_commands_are_copies_of_docs_commands_that_run() -> None:
    """The README's examples are run where the docs show them: every README command line is in a runnable docs block."""
    docs_lines = {line.strip() for p in pages()[1:] for b in runnable(p) for line in _commands(b.body)}
    readme = [b for b in blocks(ROOT / "README.md") if b.marker.startswith("run")]
    assert readme, "the README shows an owner-side and a served-side example"
    for b in readme:
        assert b.kind == "copy", f"README blocks are marked <!-- run: copy -->, not {b.marker!r}"
        for line in _commands(b.body):
            assert line.strip() in docs_lines, f"README command not run on any docs page: {line}"


def _commands(body: str) -> list[str]:
    """The command lines of a block, continuation lines joined."""
    return [line for line in body.replace("\\\n", " ").splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        XDG_CACHE_HOME=str(home / ".cache"),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",
        TAMPERPROBE_PROGRESS_INTERVAL="60",
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(home)]),
    )
    for name in ("TAMPERPROBE_HISTORY", "TAMPERPROBE_SIGNING_KEY", "TAMPERPROBE_TRUST_KEYS", "TAMPERPROBE_FINGERPRINT_KEY"):
        env.pop(name, None)
    return env


class Result:
    """What running a block gave: the exit code of its last (or first failing) command and its output."""

    def __init__(self) -> None:
        self.returncode = 0
        self.stdout = ""
        self.stderr = ""


SHELL = {"|", "||", "&&", ";", ">", ">>", "<", "&"}


def _in_process(argv: list[str] | None, code: str | None, cwd: Path, env: dict[str, str], result: Result) -> int:
    """Run ``tamperprobe ARGS`` (the console script's ``main``) or a Python snippet in this process: no interpreter
    and torch start-up per command. The environment, working directory and argv are set as a process would see them."""
    import contextlib
    import io

    from tamperprobe.cli import main

    saved_env, saved_cwd, saved_argv, saved_path = dict(os.environ), os.getcwd(), sys.argv, list(sys.path)
    out, err = io.StringIO(), io.StringIO()
    rc = 0
    try:
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        sys.path.insert(0, str(cwd))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if argv is not None:
                    sys.argv = ["tamperprobe", *argv]
                    main()
                else:
                    assert code is not None
                    exec(compile(code, str(cwd / "snippet.py"), "exec"), {"__name__": "__main__"})
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # a snippet's error: shown like a process's
                import traceback

                traceback.print_exc()
                rc = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv, sys.path[:] = saved_argv, saved_path
    result.stdout += out.getvalue()
    result.stderr += err.getvalue()
    return rc


def _with_ports(body: str, ports: dict[str, str]) -> str:
    """``body`` with each documented port (in a URL, ``--port`` or ``--metrics-port``) replaced by the one in use."""
    for old, new in ports.items():
        body = body.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}").replace(f"--port {old}", f"--port {new}")
        body = body.replace(f"--metrics-port {old}", f"--metrics-port {new}")
    return body


def _run(block: Block, cwd: Path, ports: dict[str, str], timeout: float = 300, *, workspaces: Path | None = None) -> Result:
    """Run a block as ``bash -e`` would: command by command, stopping at the first that fails.

    ``tamperprobe`` commands without shell syntax and Python blocks run in this process (the same ``main`` the
    console script calls); ``timeout --preserve-status N tamperprobe ...`` in a forked copy of it, stopped as
    ``timeout`` stops it (``_stopped_after``); anything else (pipes, redirections, other programs) runs under bash.
    ``workspaces`` holds every page workspace (see ``_fresh_cli``; default: ``cwd``).
    """
    import shlex

    body = _with_ports(block.body, ports)
    env, result = _env(cwd), Result()
    if block.lang == "python":
        result.returncode = _in_process(None, body, cwd, env, result)
        return result
    for line in _commands(body):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "export" and all("=" in w for w in words[1:]):
            env.update(dict(w.split("=", 1) for w in words[1:]))
            continue
        plain = not SHELL & set(words) and "$(" not in line and "`" not in line
        stop = _timeout(words) if plain else None
        if words[0] == "tamperprobe" and plain:
            rc = _in_process(words[1:], None, cwd, env, result)
        elif stop is not None:
            rc = _stopped_after(*stop, cwd, env, workspaces or cwd, result)
        else:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
            result.stdout, result.stderr, rc = result.stdout + done.stdout, result.stderr + done.stderr, done.returncode
        result.returncode = rc
        if rc != 0:
            break
    return result


def _timeout(words: list[str]) -> tuple[float, list[str]] | None:
    """``timeout --preserve-status SECONDS tamperprobe ARGS`` -> (SECONDS, ARGS); None for any other command."""
    if words[:2] != ["timeout", "--preserve-status"] or len(words) < 4 or words[3] != "tamperprobe" or not re.fullmatch(r"\d+(\.\d+)?", words[2]):
        return None
    return float(words[2]), words[4:]


def _stopped_after(seconds: float, argv: list[str], cwd: Path, env: dict[str, str], workspaces: Path, result: Result) -> int:
    """``timeout --preserve-status SECONDS tamperprobe ARGV`` as GNU timeout runs it, the command a forked copy of this
    process (``_fresh_cli``) instead of a fresh interpreter: SIGTERM after SECONDS, and the command's own exit status
    (128 + N when signal N ended it). A command still running 60 s after the SIGTERM is killed and fails the test
    (``timeout`` would wait for it forever)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        proc = _fork_cli(argv, cwd, env, workspaces, log=out, err_log=err)
        try:
            try:
                status = proc.wait(timeout=seconds)
            except subprocess.TimeoutExpired:
                proc.terminate()
                status = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"tamperprobe {' '.join(argv)} did not stop within 60 s of SIGTERM:\n{err.read_text(errors='replace')[-3000:]}"
            ) from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        result.stdout += out.read_text(errors="replace")
        result.stderr += err.read_text(errors="replace")
    return 128 - status if status < 0 else status


def _check(block: Block, result: Result) -> None:
    expected = int(block.attrs.get("exit", "0"))
    shown = f"{block.page}:\n{block.body}\nexit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    assert result.returncode == expected, shown
    assert "Traceback" not in result.stderr, shown
    if "expect" in block.attrs:
        assert block.attrs["expect"] in result.stdout + result.stderr, shown


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared starting point of every page: the ``setup`` blocks of all pages, run once in page order."""
    base = tmp_path_factory.mktemp("docs-base")
    for path in pages():
        for block in runnable(path):
            if block.kind == "setup":
                _check(block, _run(block, base, {}, workspaces=base.parent))
    assert (base / "model.pt").is_file() and (base / "model.tpf").is_file()
    return base


def _wait_for(port: str, server: Forked, log: Path, deadline: float = 90) -> None:
    """Until the server listens on 127.0.0.1:``port``; a server that exits first or never listens fails the test, its log shown."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode} before listening:\n{log.read_text(errors='replace')[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", int(port))) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listened on 127.0.0.1:{port} within {deadline} s:\n{log.read_text(errors='replace')[-3000:]}")


def _fresh_cli(argv: list[str], pythonpath: list[str], workspaces: Path) -> None:
    """In a forked child: ``tamperprobe ARGV`` as the console script runs it in a fresh interpreter, whose import path
    starts with ``$PYTHONPATH`` and which has imported nothing from a page workspace (a factory module is read from its own
    working directory, not taken from what this process imported for another page: everything under ``workspaces``)."""
    sys.path[:0] = pythonpath
    inside = str(workspaces) + os.sep
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name != "__main__" and isinstance(file, str) and file.startswith(inside):
            del sys.modules[name]
    cli_main(*argv)


def _fork_cli(argv: list[str], cwd: Path, env: dict[str, str], workspaces: Path, log: Path, err_log: Path | None = None) -> Forked:
    """``tamperprobe ARGV`` in the background, in a forked copy of this process (``tests/_procs.py``: no fresh ``import
    torch``) with the environment and working directory a subprocess would have; its output into ``log`` (and ``err_log``)."""
    pythonpath = env["PYTHONPATH"].split(os.pathsep)
    return Forked(_fresh_cli, argv, pythonpath, workspaces.resolve(), log=log, err_log=err_log, env=env, cwd=cwd)


PAGES_WITH_COMMANDS = [p for p in pages() if any(b.kind not in ("setup", "copy") for b in runnable(p))]


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str, Path], str]]:
    """The background blocks' servers, one per distinct command, started on a free port in the workspace of the
    first page that shows the command (every page starts from the same files) and stopped at the end of the
    session; the fixture maps (command, page workspace) to the port.

    A server is a forked copy of this process (``_fork_cli``) running the command's argv through the console script's
    ``main``, listening on a real socket of 127.0.0.1. What every ``serve`` imports (the server module, uvicorn) is
    imported here once, before the first fork, instead of once in each child."""
    import contextlib
    import shlex

    started: dict[str, str] = {}
    processes: list[Forked] = []

    def start(body: str, cwd: Path) -> str:
        if body not in started:
            port = re.search(r"--port (\d+)", body)
            assert port is not None, "a background block names its --port"
            free = str(_free_port())
            words = shlex.split(body.strip().replace(f"--port {port.group(1)}", f"--port {free}"))
            assert words[0] == "tamperprobe" and not SHELL & set(words), f"a background block is one tamperprobe command: {body}"
            if words[1] == "serve":
                with contextlib.suppress(ImportError):  # a missing server extra: the server's own error says so
                    importlib.import_module("uvicorn")
                    importlib.import_module("tamperprobe.server.app")
            log = cwd / f"server-{len(processes)}.log"
            processes.append(_fork_cli(words[1:], cwd, _env(cwd), tmp_path_factory.getbasetemp(), log=log))
            _wait_for(free, processes[-1], log)
            started[body] = free
        return started[body]

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.parametrize("path", PAGES_WITH_COMMANDS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_commands_run(path: Path, workspace: Path, servers: Callable[[str, Path], str], tmp_path: Path) -> None:
    todo = [b for b in runnable(path) if b.kind not in ("setup", "copy")]
    for block in todo:
        module = block.attrs.get("needs")
        if module:
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"{module} is not installed")
    cwd = tmp_path / "ws"
    shutil.copytree(workspace, cwd, symlinks=True, ignore=shutil.ignore_patterns("server-*.log"))
    files = [b for b in blocks(path) if b.marker.startswith("file:")]
    for block in files:  # before any server starts: a served factory module may be one
        (cwd / block.marker.split(":", 1)[1].strip()).write_text(block.body, encoding="utf-8")
    ports = {p: str(_free_port()) for p in DOC_PORTS}
    for block in todo:
        if block.kind == "background":
            port = re.search(r"--port (\d+)", block.body)
            assert port is not None
            ports[port.group(1)] = servers(block.body, cwd)
            for file in files:  # again, with the server's port in the URLs
                (cwd / file.marker.split(":", 1)[1].strip()).write_text(_with_ports(file.body, ports), encoding="utf-8")
        else:
            _check(block, _run(block, cwd, ports, workspaces=workspace.parent))


def test_a_server_that_fails_to_start_fails_the_test_with_its_log(servers: Callable[[str, Path], str], tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match=r"(?s)exited with 2 before listening:\n.*error: model file not found: nosuch\.pt"):
        servers("tamperprobe serve nosuch.pt --port 8080", tmp_path)


# --- facts: the defaults table, the quoted numbers, the metric names --------------------------------------------------


def _table_after(path: Path, marker: str) -> list[list[str]]:
    text = path.read_text(encoding="utf-8")
    start = text.index(f"<!-- {marker} -->")
    rows: list[list[str]] = []
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[2:]  # header and rule


def test_defaults_table_matches_choose_method() -> None:
    from tamperprobe.owner import advice

    rows = _table_after(DOCS / "methods.md", "defaults-table")
    specs = [row[0].strip("`") for row in rows]
    assert specs == ["top1", "topk:3", "topk:5", "top1-prob:2", "probs:1", "probs:2", "logits"]
    preferred = sorted({m for order in advice.PREFERENCE.values() for m in order})
    for spec, (_, method, worst, weak) in zip(specs, rows):
        assert method.strip("`") == advice.choose_method(spec).method, spec
        measured = advice.worst_rate(method.strip("`"), spec)
        if measured is None:
            assert "not in those campaigns" in worst, spec
        else:
            assert worst == advice._pct(measured[0]), spec
        quoted = dict(re.findall(r"`(\w+)` \((\S+ \d+ % on \w+)\)", weak))
        expected = {}
        for m in preferred:
            misses = advice.misses(m, spec)
            if misses:
                expected[m] = f"{misses[0].attack} {advice._pct(misses[0].rate)} on {advice._model_name(misses[0])}"
        assert quoted == expected, spec


NUMBER = re.compile(r"\d+(?:[.,]\d+)*(?:e-?\d+)?")


def _quotes() -> list[tuple[str, str, str]]:
    out = []
    for path in pages():
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"<!-- quote: (\S+) -->\n(.*?)(?:\n\n|\Z)", text, re.S):
            out.append((path.relative_to(ROOT).as_posix(), m[1], m[2]))
    return out


def test_quoted_numbers_occur_in_their_result_file() -> None:
    quotes = _quotes()
    assert len(quotes) >= 5
    for page, source, paragraph in quotes:
        result = (ROOT / source).read_text(encoding="utf-8")
        have = set(NUMBER.findall(result))
        missing = [n for n in NUMBER.findall(paragraph) if n not in have]
        assert missing == [], f"{page}: numbers not in {source}: {missing}"


def test_metrics_table_names_the_exported_metrics() -> None:
    source = (ROOT / "src" / "tamperprobe" / "served" / "monitor.py").read_text(encoding="utf-8")
    exported = set(re.findall(r'prom\.\w+\(\s*"(tamperprobe_\w+)"', source))
    exported = {f"{n}_total" if f'Counter("{n}"' in source else n for n in exported}
    page = (DOCS / "guide" / "monitoring.md").read_text(encoding="utf-8")
    shown = set(re.findall(r"`(tamperprobe_[a-z_]+)", page.split("## Prometheus", 1)[1].split("```yaml", 1)[0]))
    assert shown == exported


def test_moved_docstrings_stay_short_and_without_numbers() -> None:
    """The design essays live in docs/design; the three module docstrings keep what and why, no measurements."""
    for rel in ("evaluation/campaign.py", "owner/sensitivity.py", "served/clients/http.py"):
        doc = ast.get_docstring(ast.parse((ROOT / "src" / "tamperprobe" / rel).read_text(encoding="utf-8"))) or ""
        assert len(doc.splitlines()) <= 25, rel
        assert not re.search(r"\d+(\.\d+)?\s*(s|ms|%|minutes?)\b", doc), rel


def test_cli_reference_is_rendered_from_the_app() -> None:
    """The build hook renders every command and option of the typer app: the reference cannot miss a new one."""
    import typer.main

    from tamperprobe.cli.app import app

    spec = importlib.util.spec_from_file_location("docs_hooks_generated", DOCS / "_hooks" / "generated.py")
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    page = hook.render_cli()
    group: Any = typer.main.get_command(app)
    commands = hook._commands(group)
    assert "fleet check" in dict(commands), "sub-commands of a group are rendered too"
    for name, command in commands:
        section = page.split(f"## `{name}`\n", 1)[1].split("\n## `", 1)[0]
        for param in command.params:
            for opt in param.opts if param.param_type_name == "option" else []:
                assert f"`{opt}" in section or f", {opt}" in section, f"{name} {opt}"


def test_fleet_page_names_every_field_of_the_fleet_file() -> None:
    """The fleet page lists every field a fleet file may hold: a new field cannot go undocumented."""
    from tamperprobe.fleet import config

    page = (DOCS / "guide" / "fleet.md").read_text(encoding="utf-8")
    shown = set(re.findall(r"`([a-z_]+)`", page))
    assert set(config.ENDPOINT_FIELDS) - shown == set()
    assert set(config.SETTINGS_FIELDS) - shown == set()
