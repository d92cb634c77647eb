"""The CLI contract of the core pipeline: exit codes, one-line errors, never a traceback.

The commands run in-process (typer's CliRunner); one test runs the installed ``tamperprobe``
executable to guard the contract where the user meets it.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _procs import run_cli
from tamperprobe.cli.app import app
from tamperprobe.fingerprint import make_fingerprint, save
from tamperprobe.models import TorchModel, save_model


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(tmp_path_factory, trained_cnn, digits):
    d = tmp_path_factory.mktemp("cli")
    x = digits[1].x[:12]
    intact = save_model(trained_cnn, d / "intact.pt", x)
    import copy

    tampered = copy.deepcopy(trained_cnn)
    with torch.no_grad():
        tampered.head[-1].weight.mul_(1.001)
    bad = save_model(tampered, d / "tampered.pt", x)
    m = TorchModel(trained_cnn, "m")
    fp = make_fingerprint(x, m.logits(x), digits[0].input_spec, {"method": "natural", "params": {}, "seed": 0}, m.digest())
    save(fp, d / "fp.tpf")
    np.savez(d / "data.npz", x=digits[0].x[:50], y=digits[0].y[:50])
    return d, intact, bad


def test_verify_intact_exit_0(files):
    d, intact, _ = files
    r = run("verify", d / "fp.tpf", "--model", intact)  # a model file is the suspect party's by default: a pool draw
    assert r.exit_code == 0, r.stderr
    assert "INTACT" in r.stdout and "pool:" in r.stdout


def test_verify_tampered_exit_1(files):
    d, _, bad = files
    r = run("verify", d / "fp.tpf", "--model", bad, "--trusted-model", "--no-history")
    assert r.exit_code == 1, r.stderr
    assert "TAMPERED" in r.stdout


def test_verify_json(files):
    import json

    d, _, bad = files
    r = run("verify", d / "fp.tpf", "--model", bad, "--trusted-model", "--no-history", "--json", "--output-spec", "probs:6", "--allow-weaker-spec")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["verdict"] == "TAMPERED" and doc["output_spec"] == "probs:6" and len(doc["markers"]) == 12  # trusted: every marker
    assert any("reveals less than the fingerprint's logits" in n for n in doc["notes"])


ERRORS = [
    (["verify", "{d}/missing.tpf", "--model", "{intact}"], "fingerprint not found"),
    (["verify", "{d}/data.npz", "--model", "{intact}"], "not a readable fingerprint"),
    (["verify", "{d}/fp.tpf", "--model", "{d}/data.npz"], "unknown model format"),
    (["verify", "{d}/fp.tpf"], "exactly one of --model or --endpoint"),
    (["verify", "{d}/fp.tpf", "--model", "{intact}", "--output-spec", "top7"], "bad output spec"),
    (["fingerprint", "{intact}", "--data", "{d}/nothing.npz", "--out", "{d}/x.tpf"], "data not found"),
    (["fingerprint", "{intact}", "--data", "{d}/data.npz", "--out", "{d}/x.tpf", "--size", "5", "--bag", "3"], "larger than --bag"),
    (["fingerprint", "{intact}", "--data", "{d}/data.npz", "--out", "{d}/x.tpf", "--method", "magic"], "unknown method"),
    (["inspect", "{d}/data.npz"], "not a readable fingerprint"),
]


@pytest.mark.parametrize("args, message", ERRORS)
def test_errors_are_one_line_exit_2(files, args, message):
    d, intact, _ = files
    r = run(*[a.format(d=d, intact=intact) for a in args])
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_executable_reports_errors_in_one_line_exit_2(files):
    """The installed ``tamperprobe`` command itself: an error is one line on stderr, exit code 2, no traceback.

    The first case runs the installed executable; the second the same entry point in a forked child (``tests/_procs.py``:
    a process with its own stderr and exit status, without a second ``import torch``)."""
    d, intact, _ = files
    exe = Path(sys.executable).with_name("tamperprobe")
    for i, (args, message) in enumerate((ERRORS[0], ERRORS[2])):
        argv = [a.format(d=d, intact=intact) for a in args]
        if i == 0:
            r = subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=120)
        else:
            r = run_cli(*argv, timeout=120)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert message in r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_inspect_and_png(files):
    d, _, _ = files
    r = run("inspect", d / "fp.tpf", "--png", d / "grid.png")
    assert r.exit_code == 0, r.stderr
    assert "12" in r.stdout and "natural" in r.stdout
    assert (d / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_lists_contract_commands():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("fingerprint", "verify", "inspect", "demo"):
        assert cmd in r.stdout
