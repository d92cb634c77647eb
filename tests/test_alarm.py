"""The alarm comes first: a broken history never costs the verdict, the hook or the exit code; Ctrl-C is a clean stop.

(A broken history does stop fresh pool draws, which need it to record what was sent: those
runs are refused before anything is sent, tests/test_pool.py; with --allow-repeat they go on.)

Real components: the reference server on 127.0.0.1, real SQLite files (locked by another
connection, damaged, a folder in their place, under a file or an unwritable folder), the CLI
in-process, hooks as real shell commands, real signals.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import threading

import numpy as np
import pytest
from typer.testing import CliRunner

from fakes import Scripted, confident_mlp, kserve, reply
from tamperprobe.cli.app import app
from tamperprobe.data import InputSpec
from tamperprobe.fingerprint import make_fingerprint, save
from tamperprobe.served import history, ledger
from tamperprobe.server.app import ServerThread

SHAPE = (1, 8, 8)


_model = confident_mlp


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("alarm")
    intact, tampered = _model(0), _model(1)
    x = np.random.default_rng(0).random((6, *SHAPE)).astype(np.float32)
    logits = np.concatenate([intact.logits(x[i : i + 1]) for i in range(len(x))])
    fp = make_fingerprint(x, logits, InputSpec(SHAPE), {"method": "natural"}, "test", output_spec="logits")
    return {"dir": d, "fp": save(fp, d / "fp.tpf"), "intact": intact, "tampered": tampered}


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _hook(out):
    """A hook that appends its TAMPERPROBE_* environment to ``out`` as one JSON line."""
    code = f"import json, os; open(r'{out}', 'a').write(json.dumps({{k: v for k, v in os.environ.items() if k.startswith('TAMPERPROBE_')}}) + '\\n')"
    return f'{sys.executable} -c "{code}"'


def _broken_history(kind, tmp_path, monkeypatch):
    """A history path that cannot be written, and what keeps it broken (a held lock)."""
    if kind == "locked":
        # The lock is held for the whole run, so every write fails however long it waits: 0.2 s here, not
        # WRITE_TIMEOUT's 2 s (test_a_locked_history_waits_a_bounded_time is the test of that wait).
        for write in (ledger.claim, history.record):
            monkeypatch.setitem(write.__kwdefaults__, "timeout", 0.2)
        path = tmp_path / "locked.sqlite"
        history.runs(path)  # creates the schema
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        return path, holder
    if kind == "corrupt":
        path = tmp_path / "corrupt.sqlite"
        path.write_bytes(b"this is not a database, it only has the name of one" * 100)
        return path, None
    if kind == "directory":
        path = tmp_path / "history-dir"
        path.mkdir()
        return path, None
    if kind == "parent is a file":
        (tmp_path / "plain-file").write_text("x")
        return tmp_path / "plain-file" / "history.sqlite", None
    if kind == "unwritable folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into any folder")
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        return folder / "sub" / "history.sqlite", None
    raise AssertionError(kind)


KINDS = ["locked", "corrupt", "directory", "parent is a file", "unwritable folder"]


@pytest.mark.parametrize("kind", KINDS)
def test_verify_tampered_with_broken_history_prints_and_exits_1(world, tmp_path, monkeypatch, kind):
    path, holder = _broken_history(kind, tmp_path, monkeypatch)
    try:
        with ServerThread(world["tampered"], name="m", input_shape=SHAPE) as srv:
            r = run("verify", world["fp"], "--endpoint", srv.url, "--model-name", "m", "--retries", "0", "--history", path, "--allow-repeat")
    finally:
        if holder is not None:
            holder.close()
    assert r.exit_code == 1, (r.stdout, r.stderr)
    assert r.stdout.strip().splitlines()[-1].startswith("TAMPERED: ")
    (warning,) = r.stderr.strip().splitlines()  # one line, and only a warning
    assert warning.startswith("warning: the run was not recorded in the history") and "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_watch_tampered_with_broken_history_runs_the_hook_and_exits_1(world, tmp_path, monkeypatch, kind):
    path, holder = _broken_history(kind, tmp_path, monkeypatch)
    hook_out = tmp_path / "hook.jsonl"
    try:
        with ServerThread(world["tampered"], name="m", input_shape=SHAPE) as srv:
            args = [
                "watch",
                world["fp"],
                "--endpoint",
                srv.url,
                "--model-name",
                "m",
                "--every",
                "0s",
                "--count",
                "3",
                "--retries",
                "0",
                "--allow-repeat",
            ]
            r = run(*args, "--history", path, "--hook", _hook(hook_out))
    finally:
        if holder is not None:
            holder.close()
    assert r.exit_code == 1, (r.stdout, r.stderr)
    assert "TAMPERED" in r.stdout.strip().splitlines()[-1]
    (env,) = [json.loads(line) for line in hook_out.read_text().splitlines()]
    assert env["TAMPERPROBE_VERDICT"] == "TAMPERED" and env["TAMPERPROBE_RUN"] == "1"
    assert "run 1 not recorded in the history" in r.stderr


def test_verify_records_after_printing_when_the_history_works(world, tmp_path):
    path = tmp_path / "ok.sqlite"
    with ServerThread(world["intact"], name="m", input_shape=SHAPE) as srv:
        r = run("verify", world["fp"], "--endpoint", srv.url, "--model-name", "m", "--history", path)
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    (row,) = history.runs(path)
    assert row["verdict"] == "INTACT" and row["signer"]


def test_a_locked_history_waits_a_bounded_time(tmp_path):
    """The write gives up after its busy timeout (``history.WRITE_TIMEOUT``), with a HistoryError naming the lock."""
    path = tmp_path / "h.sqlite"
    history.runs(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    from tamperprobe.outputs import Answer
    from tamperprobe.served.verify import MarkerResult, Report

    report = Report("INTACT", "t", "top1", "f" * 16, [MarkerResult(0, Answer(labels=(1,)), Answer(labels=(1,)), True)], 0.1, 3e-5)
    try:
        with pytest.raises(history.HistoryError, match="locked"):
            history.record(report, path=path, timeout=0.2)
    finally:
        holder.close()
    assert history.record(report, path=path) >= 1  # and works once the lock is gone


# --------------------------------------------------------------------------- Ctrl-C and SIGTERM on watch


def _signal_main_thread(signum):
    """``signum`` to the main thread itself: a blocking read there returns EINTR and the handler runs at once.
    (``os.kill`` lets the kernel pick any thread, often this server thread; the main thread then only sees the signal
    after its read returns, and a full suite once saw the interrupt land a run later than the test expects.)"""
    signal.pthread_kill(threading.main_thread().ident, signum)


def _interrupting_server(model, signum, at_request):
    """An OIP server answering with ``model`` that sends ``signum`` to this process when the ``at_request``-th
    inference request arrives (so the signal lands while a run is in progress, deterministically)."""
    answer = kserve(model.logits)
    seen = []

    def respond(req, out):
        if req.path.endswith("/infer"):
            seen.append(req)
            if len(seen) == at_request:
                _signal_main_thread(signum)
        answer(req, out)

    return Scripted(respond)


def test_ctrl_c_after_an_intact_run_is_a_clean_stop_exit_0(world, tmp_path):
    hist = tmp_path / "h.sqlite"
    with _interrupting_server(world["intact"], signal.SIGINT, at_request=5) as srv:  # at run 2's second marker
        args = ["--every", "0s", "--retries", "0", "--history", hist, "--per-run", "3"]
        r = run("watch", world["fp"], "--endpoint", srv.url, "--model-name", "m", *args)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    lines = r.stdout.strip().splitlines()
    assert sum("INTACT: all 3 markers match" in line for line in lines) == 1  # run 1 only: the interrupted run 2 is never reported
    assert lines[-1].startswith("stopped: watch interrupted after 1 complete run(s)") and lines[-1].endswith("was INTACT")
    assert [row["verdict"] for row in history.runs(hist)] == ["INTACT"]
    assert "Traceback" not in r.stderr and "error" not in r.stderr


def test_an_interrupt_a_finalizer_swallowed_still_stops_the_watch_after_that_run(world, tmp_path):
    """Python runs a signal handler wherever the main thread is; raised inside a finalizer, the KeyboardInterrupt is lost.
    Simulated: at run 2's first marker the SIGINT handler runs and its exception is swallowed. The latch still stops
    the watch when run 2 ends; run 2 completed, so it is reported and recorded (a TAMPERED one must never be dropped)."""
    seen = []
    answer = kserve(world["intact"].logits)

    def respond(req, out):
        if req.path.endswith("/infer"):
            seen.append(req)
            if len(seen) == 3:
                try:
                    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
                except KeyboardInterrupt:
                    pass  # what a finalizer does with it
        answer(req, out)

    hist = tmp_path / "h.sqlite"
    with Scripted(respond) as srv:
        args = ["--every", "0s", "--retries", "0", "--history", hist, "--per-run", "2", "--count", "5"]
        r = run("watch", world["fp"], "--endpoint", srv.url, "--model-name", "m", *args)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    lines = r.stdout.strip().splitlines()
    assert sum("INTACT: all 2 markers match" in line for line in lines) == 2  # runs 1 and 2; no run 3
    assert lines[-1].startswith("stopped: watch interrupted after 2 complete run(s)"), lines
    assert len(seen) == 4 and [row["verdict"] for row in history.runs(hist)] == ["INTACT"] * 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back


def test_a_tampered_run_during_which_an_interrupt_was_swallowed_still_alarms_and_exits_1(world, tmp_path):
    """The latch never drops a completed verdict: the tampered model's run alarms, is recorded, and the exit is 1."""
    answer = kserve(world["tampered"].logits)

    def respond(req, out):
        if req.path.endswith("/infer") and not getattr(respond, "fired", False):
            respond.fired = True
            try:
                signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
            except KeyboardInterrupt:
                pass  # lost, as in a finalizer
        answer(req, out)

    hist = tmp_path / "h.sqlite"
    with Scripted(respond) as srv:
        args = ["--every", "0s", "--retries", "0", "--history", hist, "--per-run", "2", "--hold-tampered"]
        r = run("watch", world["fp"], "--endpoint", srv.url, "--model-name", "m", *args)
    assert r.exit_code == 1, (r.stdout, r.stderr)
    assert "TAMPERED" in r.stdout and [row["verdict"] for row in history.runs(hist)] == ["TAMPERED"]


def test_only_the_first_interrupt_raises_the_others_are_latched():
    """`timeout` sends SIGTERM to the command and then to its process group: the second one must not break the clean
    stop the first began (a docs run saw "error: interrupted", exit 2). Both handlers are put back on exit."""
    from tamperprobe.served.watch import interrupted, interrupts

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with interrupts():
        handler = signal.getsignal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGINT) is handler and not interrupted()
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGTERM, None)
        handler(signal.SIGTERM, None)  # latched, not raised
        handler(signal.SIGINT, None)
        assert interrupted()
    assert not interrupted() and {s: signal.getsignal(s) for s in before} == before


def test_sigterm_before_any_run_completes_exits_2_nothing_verified(world, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with _interrupting_server(world["intact"], signal.SIGTERM, at_request=2) as srv:
        r = run("watch", world["fp"], "--endpoint", srv.url, "--model-name", "m", "--every", "0s", "--retries", "0", "--per-run", "3")
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert r.stdout.strip().splitlines()[-1] == "stopped: watch interrupted before any run completed: nothing verified"
    assert "INTACT" not in r.stdout
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back


def test_ctrl_c_after_an_inconclusive_run_exits_2(world, tmp_path):
    """Run 1 fails (HTTP 500 on each of its 3 markers), run 2 is interrupted: the last complete verdict is INCONCLUSIVE, exit 2."""
    calls = []

    def respond(req, out):
        if req.path.endswith("/infer"):
            calls.append(req)
            if len(calls) == 4:  # run 2's first marker
                os.kill(os.getpid(), signal.SIGINT)
            reply(out, 500, {"error": "down"})
        else:
            kserve(world["intact"].logits)(req, out)

    with Scripted(respond) as srv:
        r = run("watch", world["fp"], "--endpoint", srv.url, "--model-name", "m", "--every", "0s", "--retries", "0", "--per-run", "3")
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert r.stdout.strip().splitlines()[-1].endswith("was INCONCLUSIVE")
