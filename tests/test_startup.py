"""Start-up: short commands import only what they use (no scikit-learn, no ``torch._dynamo``).

scikit-learn (for the bundled digits, now shipped with the package) and ``torch._dynamo`` (pulled
in by the first ``torch.optim`` call) each cost about as much as ``import torch`` itself on a small
machine (``bench/results/startup.md``). Each command runs in a fresh interpreter, which then lists
the modules it holds.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tamperprobe.models import save_model

PROBE = """
import json, sys
from tamperprobe.cli.app import app
try:
    app(sys.argv[1:], standalone_mode=False)
    code = 0
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.") or m == "torch._dynamo")
print(json.dumps({"code": code, "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, trained_cnn, digits):
    return save_model(trained_cnn, tmp_path_factory.mktemp("startup") / "model.pt", digits[1].x[:2])


@pytest.mark.parametrize(
    "args",
    [
        [
            "fingerprint",
            "{model}",
            "--data",
            "digits",
            "--out",
            "{tmp}/x.tpf",
            "--size",
            "8",
            "--method",
            "sensitive",
            "--param",
            "steps=3",
            "--seed",
            "0",
        ],
        ["fingerprint", "{model}", "--data", "digits", "--out", "{tmp}/y.tpf", "--size", "4", "--output-spec", "top1", "--seed", "0"],
        ["train", "cnn", "--data", "digits", "--out", "{tmp}/t.pt", "--epochs", "1"],
    ],
    ids=["fingerprint-sensitive", "fingerprint-boundary", "train"],
)
def test_short_commands_import_neither_sklearn_nor_dynamo(model_file, tmp_path, args):
    argv = [a.format(model=model_file, tmp=tmp_path) for a in args]
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["code"] in (0, None), r.stderr
    assert result["heavy"] == [], result["heavy"]
