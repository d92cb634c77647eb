"""Processes for the tests, without a fresh ``import torch`` each: forked copies of the test process.

A real ``python -m tamperprobe`` first imports torch, which costs more CPU than most commands under test;
a ``fork`` of the test process, which has imported everything already, costs almost nothing. The forked
child still is a process of its own: it gets fresh file descriptors 0, 1 and 2 (stdin from /dev/null,
stdout and stderr into pipes the parent reads, or into a log file), its own ``sys.stdout`` /
``sys.stderr`` built as the interpreter builds them (``PYTHONIOENCODING`` honoured), the environment the
caller gives, its own signal handlers and its own exit status (``sys.exit`` inside the CLI becomes the
process's status), and a hang is ended by a kill after ``timeout`` instead of hanging the suite.

* ``run_cli`` / ``run_forked``: the CLI (or any function) to completion, answered as ``subprocess.run``
  answers; ``Forked``: one in the background (a server), a ``Popen``-like handle.
* ``fresh_then_fork``: for the tests of what a fresh interpreter imports, one fresh interpreter runs a
  prelude (importing what ``tamperprobe`` holds before it parses its arguments) and forks a child per case.

The child runs torch on one thread unless its command sets more, and no command run in a child forked
from the test process may: GNU OpenMP, which torch uses, hangs in a child that uses several threads when
the process it was forked from had used several (``evaluate`` measures a two-thread runtime, so the
test of ``evaluate`` without matplotlib keeps a fresh interpreter). ``fresh_then_fork`` forks from an
interpreter that has run no model, so its children may use any number.

What a forked child does not give is a *fresh* interpreter: whatever the test process imported or
changed is in the child too. Tests about what a fresh interpreter imports use ``fresh_then_fork``; the
installed executable itself still runs as a real subprocess in ``tests/test_cli_core.py``,
``tests/test_cli_app.py``, ``tests/test_session.py`` (encoding, SIGTERM) and ``tests/test_remote_e2e.py`` (serve).
"""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from tamperprobe.cli.app import main as _tamperprobe_main  # imported once here, not again in every child

_HELD = {signal.SIGINT, signal.SIGTERM}


def _fork() -> int:
    """``os.fork()`` with SIGINT and SIGTERM held until the child has a fresh process's handlers for them: a signal sent
    right after the fork would otherwise run the test process's handlers (a latch, say) in the child."""
    sys.stdout.flush()
    sys.stderr.flush()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    pid = os.fork()
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return pid


def cli_main(*args: str) -> Any:
    """The installed entry point (``tamperprobe.cli.app.main``) with ``args`` as its command line."""
    sys.argv = ["tamperprobe", *args]
    _tamperprobe_main()


def _child(
    fn: Callable[..., Any], args: tuple[Any, ...], env: Mapping[str, str] | None, out: int, err: int, cwd: str | os.PathLike | None = None
) -> int:
    """Runs in the forked child: rewire fds 0-2 and the std streams as an interpreter would, move to ``cwd``, then ``fn(*args)``."""
    code: Any = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd in (null, out, err):
            os.close(fd)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        if "torch" in sys.modules:  # one thread unless the command asks for more (see the module doc)
            sys.modules["torch"].set_num_threads(1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)  # held since the fork (see _fork): now a fresh process's handlers take them
        encoding, _, errors = (os.environ.get("PYTHONIOENCODING") or "utf-8").partition(":")
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding=encoding)
        sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding=encoding, errors=errors or "strict")
        sys.stderr = sys.__stderr__ = io.TextIOWrapper(
            io.FileIO(2, "w", closefd=False), encoding=encoding, errors=errors or "backslashreplace", line_buffering=True
        )
        try:
            code = fn(*args)
        except SystemExit as exc:
            code = exc.code
    except BaseException:  # noqa: BLE001 - an uncaught exception: the interpreter's traceback and status 1
        import traceback

        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a stream that cannot flush (ascii) loses its tail, as in a real interpreter
            pass
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    sys.stderr.flush()
    return 1


def run_forked(
    fn: Callable[..., Any],
    *args: Any,
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess[str]:
    """``fn(*args)`` in a forked child; its stdout and stderr as text and its exit status as ``returncode``.

    The status is what ``fn`` returns or passes to ``sys.exit`` (None: 0), 1 after an uncaught exception
    (its traceback on stderr), or minus a signal's number. ``env`` replaces the environment, ``extra_env``
    adds to it; ``cwd`` is the child's working directory (the test process's stays where it is). A child still
    running after ``timeout`` seconds is killed and ``subprocess.TimeoutExpired`` raised, as ``subprocess.run`` does.
    """
    name = [getattr(fn, "__name__", "fn"), *map(str, args)]
    if extra_env is not None:
        env = {**(os.environ if env is None else env), **extra_env}
    pipes = [os.pipe(), os.pipe()]  # pipes, as subprocess uses: a child under RLIMIT_FSIZE=0 can still write to them
    pid = _fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            for r, _ in pipes:
                os.close(r)
            status = _child(fn, args, env, pipes[0][1], pipes[1][1], cwd)
        finally:
            os._exit(status)
    for _, w in pipes:
        os.close(w)
    chunks: dict[int, list[bytes]] = {r: [] for r, _ in pipes}
    deadline = time.monotonic() + timeout
    try:
        open_fds = list(chunks)
        while open_fds:
            left = deadline - time.monotonic()
            ready = select.select(open_fds, [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(name, timeout)
            for fd in ready:
                data = os.read(fd, 1 << 16)
                if data:
                    chunks[fd].append(data)
                else:
                    open_fds.remove(fd)
    finally:
        for fd in chunks:
            os.close(fd)
    status = os.waitpid(pid, 0)[1]  # both pipes closed: the child has ended (or closed them and ends now)
    out, err = (b"".join(chunks[r]).decode("utf-8", "replace") for r, _ in pipes)
    return subprocess.CompletedProcess(name, os.waitstatus_to_exitcode(status), out, err)


def run_cli(
    *args: Any, timeout: float = 120, env: Mapping[str, str] | None = None, extra_env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``tamperprobe ARGS`` in a forked child (see the module doc), as ``subprocess.run(..., capture_output=True, text=True)`` answers."""
    result = run_forked(cli_main, *map(str, args), timeout=timeout, env=env, extra_env=extra_env)
    result.args = ["tamperprobe", *map(str, args)]
    return result


def cli_argv(*args: Any) -> list[str]:
    """The real command line for ``args``, for the tests that keep a real subprocess."""
    return [sys.executable, "-m", "tamperprobe", *map(str, args)]


_FORK_EACH = """
import io, json, os, sys, traceback
exec(sys.argv[1], {"__name__": "__prelude__"})
results = []
for body in json.loads(sys.argv[2]):
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(w, 1)
        os.close(w)
        sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
        code = 0
        try:
            exec(body, {"__name__": "__child__"})
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode("utf-8", "replace")
    results.append({"code": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), "stdout": out})
print("\\0RESULTS" + json.dumps(results))
"""


def fresh_then_fork(prelude: str, bodies: list[str], *, timeout: float = 300) -> tuple[list[dict[str, Any]], str]:
    """One fresh interpreter runs ``prelude``, then forks a child per body (each starting from the prelude's state).

    For the tests of what a fresh ``tamperprobe`` imports: the prelude imports what the command line holds before
    it parses its arguments, and each child then holds exactly what its body added, without paying ``import torch``
    once per body. Returns each body's exit code and stdout (``{"code", "stdout"}``), and the interpreter's stderr
    (where the children's stderr goes too).
    """
    proc = subprocess.run([sys.executable, "-c", _FORK_EACH, prelude, json.dumps(bodies)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or "\0RESULTS" not in proc.stdout:
        raise AssertionError(f"the probe interpreter failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.rsplit("\0RESULTS", 1)[1]), proc.stderr


class Forked:
    """A forked child running ``fn(*args)`` in the background, its stdout and stderr into ``log`` (a Popen-like handle).

    ``err_log`` gives stderr a file of its own (as ``Popen(stdout=..., stderr=...)`` with two files).

    For a server a test starts and stops: ``poll``, ``terminate`` (SIGTERM), ``kill`` and ``wait(timeout)`` behave as
    ``subprocess.Popen``'s do; the child's own exit status is what ``fn`` returns (see ``run_forked``). ``env`` and ``cwd``
    are the child's environment and working directory, as ``Popen``'s are.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *args: Any,
        log: str | os.PathLike,
        err_log: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> None:
        self.args = [getattr(fn, "__name__", "fn"), *map(str, args)]
        self.returncode: int | None = None
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        err = os.open(err_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if err_log is not None else os.dup(out)
        pid = _fork()
        if pid == 0:  # pragma: no cover - the child
            status = 1
            try:
                status = _child(fn, args, env, out, err, cwd)
            finally:
                os._exit(status)
        os.close(out)
        os.close(err)
        self.pid = pid

    def poll(self) -> int | None:
        if self.returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            pidfd = os.pidfd_open(self.pid)
            try:
                if not select.select([pidfd], [], [], timeout)[0]:
                    raise subprocess.TimeoutExpired(self.args, timeout or 0)
            finally:
                os.close(pidfd)
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
