"""The test helpers of ``tests/_procs.py``: a forked child answers as ``subprocess`` would, and a hang cannot hang the suite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from _procs import Forked, fresh_then_fork, run_cli, run_forked


def _speak(code: str) -> int | None:
    print("out", os.getpid() != int(os.environ["PARENT_PID"]))
    print("err", file=sys.stderr)
    if code == "exit":
        sys.exit(4)
    if code == "raise":
        raise ZeroDivisionError("on purpose")
    return 3 if code == "int" else None


@pytest.mark.parametrize("code, status", [("none", 0), ("int", 3), ("exit", 4), ("raise", 1)])
def test_a_forked_function_answers_like_a_subprocess(code, status, monkeypatch):
    monkeypatch.setenv("PARENT_PID", str(os.getpid()))
    r = run_forked(_speak, code, timeout=30)
    assert r.returncode == status and r.stdout == "out True\n", (r.stdout, r.stderr)
    assert r.stderr.startswith("err\n") and (("ZeroDivisionError" in r.stderr) == (code == "raise"))


def _hang() -> None:
    time.sleep(600)


def test_a_child_that_hangs_is_killed_after_its_timeout():
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_forked(_hang, timeout=0.5)
    assert time.monotonic() - start < 10


def test_the_cli_exit_code_and_one_line_error_and_the_environment():
    r = run_cli("nosuch", timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()] and "No such command" in r.stderr
    r = run_forked(_env_value, "TP_PROBE", extra_env={"TP_PROBE": "seen"}, timeout=30)
    assert (r.returncode, r.stdout) == (0, "seen\n") and "TP_PROBE" not in os.environ


def _env_value(name: str) -> None:
    print(os.environ.get(name))


def _where() -> None:
    print(os.getcwd())


def test_a_child_runs_in_the_working_directory_it_is_given_and_the_test_process_stays(tmp_path):
    """``cwd`` moves the child only, as ``subprocess``'s does: a relative path in the child is read from there."""
    here = os.getcwd()
    (tmp_path / "sub").mkdir()
    r = run_forked(_where, cwd=tmp_path / "sub", timeout=30)
    assert (r.returncode, r.stdout) == (0, f"{tmp_path / 'sub'}\n"), r.stderr
    proc = Forked(_where, log=tmp_path / "log", cwd=tmp_path / "sub")
    assert proc.wait(timeout=30) == 0
    assert (tmp_path / "log").read_text() == f"{tmp_path / 'sub'}\n" and os.getcwd() == here


def test_a_background_child_writes_stdout_and_stderr_to_one_log_or_to_two(tmp_path, monkeypatch):
    monkeypatch.setenv("PARENT_PID", str(os.getpid()))
    assert Forked(_speak, "int", log=tmp_path / "both").wait(timeout=30) == 3
    assert sorted((tmp_path / "both").read_text().splitlines()) == ["err", "out True"]  # stdout to a file is block-buffered
    assert Forked(_speak, "exit", log=tmp_path / "out", err_log=tmp_path / "err").wait(timeout=30) == 4
    assert ((tmp_path / "out").read_text(), (tmp_path / "err").read_text()) == ("out True\n", "err\n")


def test_an_ascii_stdout_is_what_the_interpreter_would_build():
    r = run_forked(_stdout_encoding, extra_env={"PYTHONIOENCODING": "ascii"}, timeout=30)
    assert r.stdout.split() == ["ascii", "strict", "ascii", "backslashreplace"], r.stderr


def _stdout_encoding() -> None:
    print(sys.stdout.encoding, sys.stdout.errors, sys.stderr.encoding, sys.stderr.errors)


def test_a_background_child_stops_on_sigterm_whatever_the_test_process_does_with_it(tmp_path):
    """Even when the test process catches SIGTERM (a watch's latch, say) and the signal comes right after the fork:
    the child holds it until it has a fresh process's handler (a run of the suite once hung here)."""
    caught: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: caught.append(sig))
    try:
        for _ in range(5):
            proc = Forked(_hang, log=tmp_path / "log")
            try:
                proc.terminate()
                assert proc.wait(timeout=30) == -signal.SIGTERM and proc.poll() == -signal.SIGTERM
            finally:
                proc.kill()  # a child that survived must not outlive the test
                proc.wait(timeout=30)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert caught == []  # the parent's own handler never ran: the signals went to the children


def test_fresh_then_fork_children_start_from_the_prelude_alone():
    results, _ = fresh_then_fork(
        "import sys; sys.prelude_ran = True", ["import sys; print(sys.prelude_ran, 'torch' in sys.modules)", "raise SystemExit(5)"]
    )
    assert results == [{"code": 0, "stdout": "True False\n"}, {"code": 5, "stdout": ""}]
