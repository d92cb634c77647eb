"""The verification session (``served.session``) and the verdicts it reaches, as verify and watch drive it.

Real parts throughout: the reference server and scripted HTTP servers on 127.0.0.1, real SQLite
histories, the CLI in-process, in forked children (``tests/_procs.py``) and as a real subprocess (for the
encoding and signal tests), hooks as
real shell commands, the Prometheus exporter scraped over HTTP.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from _procs import run_cli
from fakes import Scripted, confident_mlp, free_port, kserve, reply
from tamperprobe.cli.app import app
from tamperprobe.data import InputSpec
from tamperprobe.errors import UsageError
from tamperprobe.fingerprint import load, make_fingerprint, save
from tamperprobe.models import save_model
from tamperprobe.served import history, ledger
from tamperprobe.served.targets import QueryResult
from tamperprobe.server.app import ServerThread

SHAPE = (1, 8, 8)
HTTP = httpx.Client(timeout=5, limits=httpx.Limits(max_keepalive_connections=0))  # one TLS context for the module, not one per request
N = 20  # markers in the pool


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("session")
    intact, tampered = confident_mlp(0), confident_mlp(1)
    x = np.random.default_rng(0).random((N, *SHAPE)).astype(np.float32)
    fp = make_fingerprint(x, intact.logits(x), InputSpec(SHAPE), {"method": "natural"}, intact.digest(), output_spec="logits")
    files = {f"{name}_file": save_model(m.module, d / f"{name}.pt", x[:2]) for name, m in (("intact", intact), ("tampered", tampered))}
    return {"dir": d, "fp": fp, "fp_path": save(fp, d / "fp.tpf"), "intact": intact, "tampered": tampered, **files}


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _hook(out):
    code = f"import json, os; open(r'{out}', 'a').write(json.dumps({{k: v for k, v in os.environ.items() if k.startswith('TAMPERPROBE_')}}) + '\\n')"
    return f'{sys.executable} -c "{code}"'


def _cli(*args):
    """The real executable, as a service manager starts it."""
    return [sys.executable, "-m", "tamperprobe", *[str(a) for a in args]]


# --------------------------------------------------------------------------- a proven mismatch is TAMPERED


def _half_broken(model):
    """Every other inference request fails with 500, the others answer with ``model``: proven changes and failures in one run."""
    answer, seen = kserve(model.logits), []

    def respond(req, out):
        if req.path.endswith("/infer"):
            seen.append(req)
            if len(seen) % 2:
                return reply(out, 500, {"error": "overloaded"})
        answer(req, out)

    return Scripted(respond)


def test_a_proven_mismatch_is_tampered_even_when_other_queries_failed(world, tmp_path):
    hist = tmp_path / "h.sqlite"
    with _half_broken(world["tampered"]) as srv:
        common = ["--endpoint", srv.url, "--model-name", "m", "--retries", "0", "--per-run", "4", "--history", hist]
        r = run("verify", world["fp_path"], *common)
        j = run("verify", world["fp_path"], *common, "--json")
    assert r.exit_code == 1, (r.stdout, r.stderr)
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("TAMPERED: 2 of 4 markers changed under logits (2 more got no usable answer)"), last
    doc = json.loads(j.stdout)
    assert j.exit_code == 1 and doc["verdict"] == "TAMPERED"
    assert sorted(m["status"] for m in doc["markers"]) == ["MISMATCH", "MISMATCH", "failed", "failed"]  # the report lists both
    assert "overloaded" in doc["summary"]  # and names the first failure
    assert [row["verdict"] for row in history.runs(hist)] == ["TAMPERED", "TAMPERED"]


def test_watch_raises_the_alarm_on_a_proven_mismatch_among_failures(world, tmp_path):
    hook_out, events = tmp_path / "hook.jsonl", tmp_path / "events.jsonl"
    with _half_broken(world["tampered"]) as srv:
        args = ["--endpoint", srv.url, "--model-name", "m", "--retries", "0", "--per-run", "4", "--every", "0s", "--count", "3"]
        r = run("watch", world["fp_path"], *args, "--history", tmp_path / "h.sqlite", "--hook", _hook(hook_out), "--event-log", events)
    assert r.exit_code == 1, (r.stdout, r.stderr)  # the first run stops the watch
    (env,) = [json.loads(line) for line in hook_out.read_text().splitlines()]
    assert env["TAMPERPROBE_VERDICT"] == "TAMPERED" and env["TAMPERPROBE_MISMATCHED"] == "2" and env["TAMPERPROBE_FAILED"] == "2"
    (event,) = [json.loads(line) for line in events.read_text().splitlines()]
    assert event["verdict"] == "TAMPERED"


# --------------------------------------------------------------------------- output specs


@pytest.mark.parametrize("spec", ["probs:0", "top1-prob:0"])
def test_zero_decimal_specs_are_refused_in_one_line(world, spec):
    r = run("verify", world["fp_path"], "--model", world["intact_file"], "--trusted-model", "--no-history", "--output-spec", spec)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert "0 decimals prove nothing" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_weaker_spec_needs_the_flag_and_is_warned_about_on_every_run(world, tmp_path):
    with ServerThread(world["intact"], name="m", input_shape=SHAPE) as srv:
        common = ["--endpoint", srv.url, "--model-name", "m", "--output-spec", "top1", "--history", tmp_path / "h.sqlite", "--per-run", "2"]
        refused = run("verify", world["fp_path"], *common)
        accepted = run("verify", world["fp_path"], *common, "--allow-weaker-spec")
        watched = run("watch", world["fp_path"], *common, "--allow-weaker-spec", "--every", "0s", "--count", "2")
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "--allow-weaker-spec" in refused.stderr and "reveals less than the fingerprint's logits" in refused.stderr
    assert "weaker --output-spec" not in refused.stderr
    assert accepted.exit_code == 0, accepted.stderr
    assert "note: verified under top1, which reveals less than the fingerprint's logits" in accepted.stdout
    assert watched.exit_code == 0, watched.stderr
    assert watched.stderr.count("verified under top1, which reveals less") == 2  # every run
    assert any("reveals less" in (row["notes"] or "") for row in history.runs(tmp_path / "h.sqlite"))


def test_no_error_message_suggests_a_weaker_spec():
    import tamperprobe

    files = list(Path(tamperprobe.__file__).parent.rglob("*.py"))
    offending = [p.name for p in files if re.search(r"(with|use|pass) a weaker", p.read_text(encoding="utf-8"))]
    assert len(files) > 50 and offending == []


# --------------------------------------------------------------------------- the alarm cannot be lost to the terminal


def _env(**extra):
    env = {**os.environ, **extra}
    env.pop("TAMPERPROBE_HISTORY", None)
    return env


@pytest.mark.parametrize("encoding, how", [("ascii", "subprocess"), ("ascii:strict", "forked")])
def test_a_tampered_run_on_a_stdout_that_cannot_encode_still_alarms_exits_1_and_is_recorded(world, tmp_path, encoding, how):
    """Once in the real executable (the interpreter sets up its ascii stdout itself), once in a forked child whose
    streams ``tests/_procs.py`` sets up the same way from PYTHONIOENCODING."""
    hist = tmp_path / "h.sqlite"
    with ServerThread(world["tampered"], name="m", input_shape=SHAPE) as srv:
        args = ["verify", world["fp_path"], "--endpoint", srv.url, "--model-name", "m", "--retries", "0", "--history", hist]
        if how == "subprocess":
            proc = subprocess.run(_cli(*args), capture_output=True, env=_env(PYTHONIOENCODING=encoding), timeout=120)
            out, err = proc.stdout.decode("ascii", "replace"), proc.stderr.decode(errors="replace")
        else:
            proc = run_cli(*args, env=_env(PYTHONIOENCODING=encoding), timeout=120)
            out, err = proc.stdout, proc.stderr
    assert proc.returncode == 1, (out, err)
    assert "TAMPERED: " in out and "Traceback" not in err
    assert [row["verdict"] for row in history.runs(hist)] == ["TAMPERED"]


def test_watch_on_an_ascii_stdout_alarms_runs_the_hook_and_records(world, tmp_path):
    hist, hook_out = tmp_path / "h.sqlite", tmp_path / "hook.jsonl"
    with ServerThread(world["tampered"], name="m", input_shape=SHAPE) as srv:
        args = ["watch", world["fp_path"], "--endpoint", srv.url, "--model-name", "m", "--retries", "0", "--history", hist, "--every", "0s"]
        proc = run_cli(*args, "--hook", _hook(hook_out), env=_env(PYTHONIOENCODING="ascii"), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "TAMPERED" in proc.stdout and "Traceback" not in proc.stderr
    assert json.loads(hook_out.read_text())["TAMPERPROBE_VERDICT"] == "TAMPERED"
    assert [row["verdict"] for row in history.runs(hist)] == ["TAMPERED"]


# --------------------------------------------------------------------------- every altered signed file exits 3


def _flipped(raw: bytes, where: int) -> bytes:
    return raw[:where] + bytes([raw[where] ^ 0x01]) + raw[where + 1 :]


def test_every_altered_signed_file_exits_3(world, tmp_path):
    raw = world["fp_path"].read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    places = {
        "length prefix": 0,
        "header bracket": 8,
        "output spec in the header": raw.index(b"logits"),
        "checksum in the header": raw.index(b'sha256\\": \\"') + 14,
        "tensor data": header_end + 5,
        "last byte": len(raw) - 1,
    }
    for what, where in places.items():
        p = tmp_path / f"{what.replace(' ', '-')}.tpf"
        p.write_bytes(_flipped(raw, where))
        r = run("inspect", p)
        assert r.exit_code == 3, (what, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    # a file that is no fingerprint at all, and an unsigned damaged one, are damage: exit 2
    (tmp_path / "x.npz").write_bytes(b"PK\x03\x04 not a fingerprint")
    assert run("inspect", tmp_path / "x.npz").exit_code == 2
    unsigned = save(world["fp"], tmp_path / "unsigned.tpf", sign_key=None)
    u = unsigned.read_bytes()
    (tmp_path / "u.tpf").write_bytes(_flipped(u, len(u) - 1))
    assert run("inspect", tmp_path / "u.tpf", "--allow-unsigned").exit_code == 2


# --------------------------------------------------------------------------- watch --hold-tampered


def _metric(port: int, name: str) -> float | None:
    for line in HTTP.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_hold_tampered_keeps_the_metric_at_1_until_sigterm(world, tmp_path):
    pytest.importorskip("prometheus_client")
    with ServerThread(world["tampered"], name="m", input_shape=SHAPE) as srv:
        args = _cli("watch", world["fp_path"], "--endpoint", srv.url, "--model-name", "m", "--retries", "0", "--every", "0s")
        proc = subprocess.Popen(
            [*args, "--history", tmp_path / "h.sqlite", "--metrics-port", "0", "--hold-tampered"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(line.decode(errors="replace") for line in proc.stderr), daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 60
            port = None
            while port is None and time.monotonic() < deadline and proc.poll() is None:
                port = next((int(m.group(1)) for line in lines if (m := re.search(r"metrics at http://127.0.0.1:(\d+)/metrics", line))), None)
                time.sleep(0.05)
            assert port is not None, lines
            while _metric(port, "tamperprobe_tampered") != 1.0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _metric(port, "tamperprobe_tampered") == 1.0
            time.sleep(1.0)  # without the option the watch would have exited 0.2 s after the verdict
            assert proc.poll() is None and _metric(port, "tamperprobe_tampered") == 1.0
            assert any("holding" in line for line in lines)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert b"held until interrupted" in proc.stdout.read()


# --------------------------------------------------------------------------- markers of a run that reached nothing go back


def test_markers_of_a_run_that_reached_nothing_go_back_to_the_pool(world, tmp_path):
    hist = tmp_path / "h.sqlite"
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: every attempt is refused before a connection
    r = run("verify", world["fp_path"], "--endpoint", dead, "--model-name", "m", "--retries", "1", "--per-run", "4", "--history", hist)
    assert r.exit_code == 2 and "went back to the pool" in r.stdout, (r.stdout, r.stderr)
    assert ledger.pool_usage(hist) == []  # nothing spent
    (row,) = history.runs(hist)
    assert row["verdict"] == "INCONCLUSIVE"
    # a server that answered (even with an error) may have seen the markers: they stay spent
    with Scripted(lambda req, out: reply(out, 503, {"error": "down"})) as srv:
        r = run("verify", world["fp_path"], "--endpoint", srv.url, "--model-name", "m", "--retries", "0", "--per-run", "4", "--history", hist)
    assert r.exit_code == 2 and "went back" not in r.stdout
    (usage,) = ledger.pool_usage(hist)
    assert usage["markers"] == 4


def test_a_watch_through_an_outage_spends_no_markers(world, tmp_path):
    hist = tmp_path / "h.sqlite"
    dead = f"http://127.0.0.1:{free_port()}"
    r = run(
        "watch",
        world["fp_path"],
        "--endpoint",
        dead,
        "--model-name",
        "m",
        "--retries",
        "0",
        "--per-run",
        "4",
        "--every",
        "0s",
        "--count",
        "6",
        "--history",
        hist,
    )
    assert r.exit_code == 2 and r.stdout.count("INCONCLUSIVE") == 6  # 6 runs from a pool of 5: none of them spent anything
    assert ledger.pool_usage(hist) == []


# --------------------------------------------------------------------------- the session as a library object


class _Plain:
    """A target that is no class of tamperprobe's: the session relies on what the protocol declares only."""

    name = "plain:test"
    deadline = None

    def __init__(self, model, suspect: bool) -> None:
        self.model, self.suspect, self.sizes = model, suspect, []

    def pauses(self, n: int) -> float:
        return 0.0

    def weights_digest(self) -> str | None:
        return None

    def query(self, inputs, spec):
        self.sizes.append(len(inputs))
        return QueryResult.of([spec.reveal(z) for z in self.model.logits(np.asarray(inputs))])


def test_a_session_draws_for_a_suspect_target_and_sends_everything_to_a_trusted_one(world, tmp_path):
    from tamperprobe.served.session import Session, Settings

    fp, hist = world["fp"], tmp_path / "h.sqlite"
    suspect = _Plain(world["intact"], suspect=True)
    runs = []
    session = Session(fp, suspect, Settings(per_run=4, history_path=hist), on_run=runs.append)
    first, second = session.run_once(), session.run_once()
    assert suspect.sizes == [4, 4] and [r.number for r in runs] == [1, 2] and first.report.verdict == "INTACT"
    assert second.report.runs_left == N // 4 - 2 and ledger.pool_usage(hist)[0]["markers"] == 8
    trusted = _Plain(world["tampered"], suspect=False)
    report = Session(fp, trusted, Settings(record=False)).run_once().report
    assert trusted.sizes == [N] and report.verdict == "TAMPERED" and report.pool == "all"


def test_a_failing_reporter_costs_a_warning_not_the_hook_or_the_record(world, tmp_path):
    from tamperprobe.served.session import Session, Settings

    hook_out, hist, warnings = tmp_path / "hook.jsonl", tmp_path / "h.sqlite", []

    def broken(run):
        raise UnicodeEncodeError("ascii", "·", 0, 1, "cannot encode")

    settings = Settings(per_run=2, history_path=hist, hook=_hook(hook_out), protocol="test")
    run_ = Session(world["fp"], _Plain(world["tampered"], True), settings, on_run=broken, on_warning=warnings.append).run_once()
    assert run_.report.verdict == "TAMPERED"
    assert json.loads(hook_out.read_text())["TAMPERPROBE_VERDICT"] == "TAMPERED"
    assert [row["verdict"] for row in history.runs(hist)] == ["TAMPERED"]
    assert len(warnings) == 1 and warnings[0].startswith("reporting run 1 failed: UnicodeEncodeError")


def test_a_session_checks_everything_before_sending(world):
    from tamperprobe.served.session import Session, Settings

    target = _Plain(world["intact"], suspect=True)
    for settings, message in (
        (Settings(output_spec="top1"), "--allow-weaker-spec"),
        (Settings(output_spec="probs:0"), "0 decimals"),
        (Settings(record=False), "--no-history"),
        (Settings(limit=3), "--limit applies to a model file the owner trusts"),
    ):
        with pytest.raises(UsageError, match=message):
            Session(world["fp"], target, settings)
    with pytest.raises(UsageError, match="apply to a suspect target"):
        Session(world["fp"], _Plain(world["intact"], suspect=False), Settings(per_run=2))
    assert target.sizes == []


# --------------------------------------------------------------------------- verify --model: the suspect party's file unless trusted


def test_a_suspect_model_file_is_not_started_before_the_options_are_checked(world, tmp_path, monkeypatch):
    """Bad options are refused before the sandboxed child (seconds of CPU) is started for the suspect's file."""
    from tamperprobe import _sandbox

    started = []
    monkeypatch.setattr(_sandbox.SandboxedModel, "__init__", lambda self, *a, **k: started.append(a) or (_ for _ in ()).throw(AssertionError))
    for args, message in (
        (["--output-spec", "probs:0"], "decimals"),
        (["--limit", "3"], "--limit applies to a model file the owner trusts"),
        (["--per-run", "0"], "--per-run"),
    ):
        e = run("verify", world["fp_path"], "--model", world["intact_file"], *args, "--history", tmp_path / "h.sqlite")
        assert e.exit_code == 2 and message in e.stderr and len(e.stderr.strip().splitlines()) == 1, (args, e.stderr)
    assert started == []


def test_a_model_file_draws_from_the_pool_unless_the_owner_trusts_it(world, tmp_path):
    hist = tmp_path / "h.sqlite"
    r = run("verify", world["fp_path"], "--model", world["intact_file"], "--history", hist, "--per-run", "4", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["markers"]) == 4 and doc["pool"] == "fresh" and doc["runs_left"] == N // 4 - 1
    assert ledger.pool_usage(hist)[0]["markers"] == 4
    t = run("verify", world["fp_path"], "--model", world["tampered_file"], "--trusted-model", "--no-history", "--json")
    assert t.exit_code == 1 and len(json.loads(t.stdout)["markers"]) == N and json.loads(t.stdout)["pool"] == "all"
    for args, message in (
        (["--model", world["intact_file"], "--trusted-model", "--per-run", "2"], "apply to a suspect target"),
        (["--endpoint", "http://127.0.0.1:9", "--trusted-model"], "--trusted-model applies to --model"),
        (["--model", world["intact_file"], "--limit", "3"], "--limit applies to a model file the owner trusts"),
    ):
        e = run("verify", world["fp_path"], *args, "--history", hist)
        assert e.exit_code == 2 and message in e.stderr, (args, e.stderr)
    assert load(world["fp_path"]).id == world["fp"].id
