"""End to end over HTTP: fingerprint a trained model, serve it, verify INTACT, tamper, TAMPERED, stop, INCONCLUSIVE.

Also the CLI: ``verify --endpoint`` exit codes, ``watch`` and ``history`` in-process, and ``serve``
in a process of its own (forked from the test's).
"""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from _procs import Forked, cli_main
from fakes import free_port, wait_ready
from tamperprobe import zoo
from tamperprobe.cli.app import app
from tamperprobe.data import load_data
from tamperprobe.fingerprint import make_fingerprint, save
from tamperprobe.models import TorchModel, load_model, save_model
from tamperprobe.served import history
from tamperprobe.served.clients import make_client
from tamperprobe.served.targets import LocalTarget
from tamperprobe.served.verify import INCONCLUSIVE, INTACT, TAMPERED, verify
from tamperprobe.served.watch import watch
from tamperprobe.server.app import ServerThread
from tamperprobe.train import fit


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    ds = load_data("digits")
    train, test = ds.split(0.3, seed=0)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: one thread is fastest, and steadier on a busy machine
    try:
        module = fit(zoo.build("mlp", (1, 8, 8)), train.x, train.y, epochs=2, lr=3e-3, seed=0)
    finally:
        torch.set_num_threads(threads)
    intact = TorchModel(module, "intact")
    x = test.x[:16]
    fp = make_fingerprint(
        x, intact.logits(x), train.input_spec, {"method": "natural", "params": {}, "seed": 0}, intact.digest(), output_spec="logits"
    )
    fp_path = save(fp, d / "fp.tpf")
    tampered = copy.deepcopy(module)
    with torch.no_grad():
        last = tampered.net[-1]
        last.weight.add_(torch.randn(last.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    intact_path = save_model(module, d / "intact.pt", x)
    tampered_path = save_model(tampered, d / "tampered.pt", x)
    return {"dir": d, "fp": fp, "fp_path": fp_path, "intact": intact_path, "tampered": tampered_path, "input_spec": train.input_spec}


def _client(url, **kw):
    return make_client("kserve", url, model_name="digits", timeout=3.0, retries=1, backoff=0.05, seed=0, **kw)


def test_intact_tampered_stopped(setup):
    fp = setup["fp"]
    srv = ServerThread(load_model(setup["intact"]), name="digits", input_spec=setup["input_spec"])
    with srv:
        for spec in ("logits", "probs:4", "top1"):
            report = verify(fp, _client(srv.url, classes=fp.classes), spec)
            assert report.verdict == INTACT, report.summary()
            assert all(m.latency and m.latency > 0 for m in report.markers)
        srv.swap(load_model(setup["tampered"]))
        report = verify(fp, _client(srv.url), "logits")
        assert report.verdict == TAMPERED and report.mismatched > 0, report.summary()
        # the same answers seen through a server that reveals only probabilities
    with ServerThread(load_model(setup["tampered"]), name="digits", input_spec=setup["input_spec"], output_spec="probs:4") as srv2:
        assert verify(fp, _client(srv2.url), "probs:4").verdict == TAMPERED
    t = time.monotonic()
    report = verify(fp, _client(srv.url), "logits")  # srv is stopped
    assert report.verdict == INCONCLUSIVE and report.failed == len(fp)
    assert report.markers[0].failure.startswith("connection refused")
    assert time.monotonic() - t < 5


# --------------------------------------------------------------------------- CLI


def run(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


@pytest.fixture()
def served(setup):
    with ServerThread(load_model(setup["intact"]), name="digits", input_spec=setup["input_spec"], token="tok") as srv:
        yield srv


def test_cli_verify_endpoint_exit_codes_and_history(setup, served, tmp_path):
    hist = tmp_path / "h.sqlite"
    env = {"TP_TOKEN": "tok"}
    common = [
        "--endpoint",
        served.url,
        "--protocol",
        "kserve",
        "--model-name",
        "digits",
        "--token-env",
        "TP_TOKEN",
        "--timeout",
        "3",
        "--retries",
        "0",
        "--history",
        hist,
        "--per-run",
        "4",
    ]
    r = run("verify", setup["fp_path"], *common, env=env)
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "INTACT" in r.stdout
    served.swap(load_model(setup["tampered"]))
    r = run("verify", setup["fp_path"], *common, env=env)
    assert r.exit_code == 1 and "TAMPERED" in r.stdout
    r = run("verify", setup["fp_path"], *common)  # no token in the environment
    assert r.exit_code == 2 and "TP_TOKEN" in r.stderr and "Traceback" not in r.stderr
    r = run("verify", setup["fp_path"], *[a if a != "TP_TOKEN" else "TP_WRONG" for a in common], env={"TP_WRONG": "nope"})
    assert r.exit_code == 2 and "INCONCLUSIVE" in r.stdout and "401" in r.stdout
    r = run("history", "--history", hist, "--json")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["verdict"] for row in rows] == [INCONCLUSIVE, TAMPERED, INTACT]
    r = run("history", "--history", hist, "--verdict", "tampered")
    assert r.exit_code == 0 and "TAMPERED" in r.stdout
    r = run("history", "--history", hist, "--run", str(rows[1]["id"]), "--json")
    assert r.exit_code == 0 and any(m["status"] == "MISMATCH" for m in json.loads(r.stdout))


def test_cli_watch(setup, served, tmp_path):
    hist = tmp_path / "w.sqlite"
    hook_out = tmp_path / "hook.txt"
    hook = f"{sys.executable} -c \"import os; open(r'{hook_out}', 'a').write(os.environ['TAMPERPROBE_VERDICT'] + ' ' + os.environ['TAMPERPROBE_MISMATCHED'] + '\\n')\""
    common = [
        "--endpoint",
        served.url,
        "--model-name",
        "digits",
        "--token-env",
        "TP_TOKEN",
        "--every",
        "0s",
        "--history",
        hist,
        "--timeout",
        "3",
        "--retries",
        "0",
        "--hook",
        hook,
        "--per-run",
        "2",
    ]
    r = run("watch", setup["fp_path"], *common, "--count", "2", env={"TP_TOKEN": "tok"})
    assert r.exit_code == 0, r.stdout + r.stderr
    assert r.stdout.count("INTACT") == 2 and not hook_out.exists()
    served.swap(load_model(setup["tampered"]))
    r = run("watch", setup["fp_path"], *common, "--count", "5", env={"TP_TOKEN": "tok"})
    assert r.exit_code == 1 and "TAMPERED" in r.stdout
    assert hook_out.read_text().startswith("TAMPERED ")
    assert len(json.loads(run("history", "--history", hist, "--json").stdout)) == 3  # stopped at the first TAMPERED
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = run(
        "watch",
        setup["fp_path"],
        "--endpoint",
        dead,
        "--every",
        "0s",
        "--count",
        "3",
        "--max-inconclusive",
        "2",
        "--retries",
        "0",
        "--history",
        hist,
        "--per-run",
        "2",
        "--hook",
        hook,
    )
    assert r.exit_code == 2 and r.stdout.count("INCONCLUSIVE") == 2
    assert hook_out.read_text().splitlines()[-1].startswith("INCONCLUSIVE")  # once, at the start of the streak
    assert hook_out.read_text().count("INCONCLUSIVE") == 1
    r = run("watch", setup["fp_path"], "--endpoint", dead, "--every", "soon")
    assert r.exit_code == 2 and "bad duration" in r.stderr


def test_cli_serve_subprocess(setup, tmp_path):
    """``serve`` in a process of its own answers ``verify --endpoint`` INTACT; a TorchScript file without a shape is refused."""
    port = free_port()
    args = ["serve", str(setup["intact"]), "--port", str(port), "--name", "digits", "--fingerprint", str(setup["fp_path"]), "--output-spec", "top1"]
    # a process of its own, forked from this one (tests/_procs.py); test_server_guard runs the installed executable's serve
    log = tmp_path / "serve.log"
    proc = Forked(cli_main, *args, log=log)
    try:
        import httpx

        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=1) as client:  # one client for the polls: each new one costs tens of ms of CPU
            wait_ready(client, url, lambda: None if proc.poll() is None else log.read_text(), 30)
        r = run("verify", setup["fp_path"], "--endpoint", url, "--model-name", "digits", "--output-spec", "top1", "--allow-weaker-spec")
        assert r.exit_code == 0, r.stdout + r.stderr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()
    r = CliRunner().invoke(app, ["serve", str(setup["intact"]), "--port", "0"])  # TorchScript without a shape
    assert r.exit_code == 2 and "--input-shape" in r.output


def test_watch_library_stop_rules(setup, tmp_path):
    """The watch loop without the CLI: --count stops INTACT runs with 0, the first TAMPERED stops with 1."""
    fp, runs = setup["fp"], []
    result = watch(
        fp, LocalTarget(setup["intact"], trusted=True), every=0, count=2, history_path=tmp_path / "h.sqlite", protocol="local", on_run=runs.append
    )
    assert (result.exit_code, result.runs, result.last.verdict, result.gave_up) == (0, 2, INTACT, False)
    assert [r.number for r in runs] == [1, 2] and len(history.runs(tmp_path / "h.sqlite")) == 2
    # an owner's own copy (trusted) gets every marker and needs no ledger; a model file from anyone else draws from the pool
    result = watch(fp, LocalTarget(setup["tampered"], trusted=True), every="0s", count=5, record=False, on_run=runs.append)
    assert (result.exit_code, result.runs, result.last.verdict) == (1, 1, TAMPERED) and runs[-1].number == 1
