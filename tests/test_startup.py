"""Start-up: short commands import only what they use (no scikit-learn, no ``torch._dynamo``).

scikit-learn (for the bundled digits, now shipped with the package) and ``torch._dynamo`` (pulled
in by the first ``torch.optim`` call) each cost about as much as ``import torch`` itself on a small
machine (``bench/results/startup.md``). Each command runs in a child forked from a fresh interpreter
that has imported only the command line (what a fresh ``tamperprobe`` holds before it parses its
arguments), and the child then lists the modules it holds.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tamperprobe.models import save_model

# One fresh interpreter imports the command line, then forks a child per command: each child starts from exactly
# what ``tamperprobe`` holds before it parses its arguments, as a fresh ``tamperprobe`` process would, without paying
# ``import torch`` again; it runs its command and reports its exit code and the heavy modules it then holds.
PROBE = """
import json, os, sys
from tamperprobe.cli.app import app
for argv in json.loads(sys.argv[1]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            app(argv, standalone_mode=False)
            code = 0
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:
            code = repr(exc)
        heavy = sorted(m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.") or m == "torch._dynamo")
        sys.stdout.flush()
        os.write(w, json.dumps({"code": code, "heavy": heavy}).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    print("RESULT " + (answer or json.dumps({"code": "the child died", "heavy": []})))
"""

COMMANDS = {
    "fingerprint-sensitive": ["fingerprint", "{model}", "--data", "digits", "--out", "{tmp}/x.tpf", "--size", "8", "--method", "sensitive"]
    + ["--param", "steps=3", "--seed", "0"],
    "fingerprint-boundary": [
        "fingerprint",
        "{model}",
        "--data",
        "digits",
        "--out",
        "{tmp}/y.tpf",
        "--size",
        "4",
        "--output-spec",
        "top1",
        "--seed",
        "0",
    ],
    "train": ["train", "cnn", "--data", "digits", "--out", "{tmp}/t.pt", "--epochs", "1"],
}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, trained_cnn, digits):
    return save_model(trained_cnn, tmp_path_factory.mktemp("startup") / "model.pt", digits[1].x[:2])


@pytest.fixture(scope="module")
def probed(model_file, tmp_path_factory):
    """Each command's exit code and heavy modules, from one probe run (see PROBE)."""
    tmp = tmp_path_factory.mktemp("startup-out")
    argvs = [[a.format(model=model_file, tmp=tmp) for a in args] for args in COMMANDS.values()]
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    results = [json.loads(line[len("RESULT ") :]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(COMMANDS), (r.stdout, r.stderr)
    return dict(zip(COMMANDS, results)), r.stderr


@pytest.mark.parametrize("command", list(COMMANDS))
def test_short_commands_import_neither_sklearn_nor_dynamo(probed, command):
    results, stderr = probed
    assert results[command]["code"] in (0, None), (results[command], stderr)
    assert results[command]["heavy"] == [], results[command]["heavy"]
