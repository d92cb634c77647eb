"""What a fresh ``tamperprobe`` process does, which the test process (it has imported everything) cannot show.

* Start-up: short commands import only what they use, neither scikit-learn nor ``torch._dynamo``. scikit-learn (for
  the bundled digits, now shipped with the package) and ``torch._dynamo`` (pulled in by the first ``torch.optim``
  call) each cost about as much as ``import torch`` itself on a small machine (``bench/results/startup.md``).
* Extras: ``fingerprint`` on the digits imports no optional dependency, ONNX Runtime aside, and works without it.
* ``evaluate`` without matplotlib writes everything but its plots and says so, in one line on the process's stderr.

All cases share one fresh interpreter (``fresh_then_fork`` of ``tests/_procs.py``): it imports the command line, as a
fresh ``tamperprobe`` does before it parses its arguments, and torch with the autograd's sympy chain, which every
command below imports anyway (neither brings a module checked here, and a child holding one would fail its test);
then it forks a child per case, which runs its command and reports what it then holds. The interpreter has run no
model, so ``evaluate``'s two-thread runtime may run in its child.
"""

from __future__ import annotations

import json

import pytest

from _procs import fresh_then_fork
from tamperprobe._extras import EXTRAS
from tamperprobe.models import save_model

OPTIONAL = sorted(EXTRAS)

#: The command line, then torch (and the sympy chain its autograd imports on a backward pass with ``grad_outputs``);
#: the line after them on stderr marks where the children's output starts.
PRELUDE = """
import sys
from typer.testing import CliRunner
from tamperprobe.cli.app import app, main
import torch
import torch.fx.experimental.symbolic_shapes
print("\\0PRELUDE DONE", file=sys.stderr, flush=True)
"""

# Each command is small (few markers, one ascent step, one epoch) but takes the paths whose imports matter: the
# sensitive ascent (autograd, the written-out Adam), the crossed pairs' gradient search and coverage, the self-check's
# simulated tamperings, the benign runtimes (TorchScript, ONNX) and training.
COMMANDS = {
    "fingerprint-sensitive": ["fingerprint", "{model}", "--data", "digits", "--out", "{tmp}/x.tpf", "--size", "2", "--bag", "4", "--method"]
    + ["sensitive", "--param", "steps=1", "--seed", "0"],
    "fingerprint-boundary": ["fingerprint", "{model}", "--data", "digits", "--out", "{tmp}/y.tpf", "--size", "2", "--bag", "4"]
    + ["--output-spec", "top1", "--seed", "0"],
    "train": ["train", "cnn", "--data", "digits", "--out", "{tmp}/t.pt", "--epochs", "1"],
}

COMMAND = """
import json, sys
from tamperprobe.cli.app import app
try:
    app({argv!r}, standalone_mode=False)
    code = 0
except SystemExit as exc:
    code = exc.code
except BaseException as exc:
    code = repr(exc)
heavy = sorted(m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.") or m == "torch._dynamo")
print("RESULT " + json.dumps({{"code": code, "heavy": heavy}}))
"""

#: The cases of the extras test: the modules each child makes missing (a None entry in sys.modules: import then fails).
HIDDEN = [(), ("onnx", "onnxruntime")]

FINGERPRINT_NATURAL = """
import json, sys
for name in {hidden!r}: sys.modules[name] = None
from typer.testing import CliRunner
from tamperprobe.cli.app import app
r = CliRunner().invoke(app, ['fingerprint', {model!r}, '--data', 'digits', '--out', {out!r}, '--method', 'natural', '--select', 'random',
                             '--size', '3', '--bag', '6', '--no-check', '--json'])
assert r.exit_code == 0, r.output
print(json.dumps(json.loads(r.stdout)['benign_noise']))
print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}} & set({optional!r}))))
"""

# The child's stderr (file descriptor 2, so what the C libraries write too) goes to a file of its own.
EVALUATE_NO_MATPLOTLIB = """
import os, sys
fd = os.open({err!r}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.dup2(fd, 2)
os.close(fd)
sys.modules['matplotlib'] = None  # installed, but its import fails: as if it were not
from tamperprobe.cli.app import main
sys.argv = ['tamperprobe', *{argv!r}]
main()
"""

TINY = ["--methods", "natural", "--no-baselines", "--attacks", "noise", "--trials", "1", "--bag", "12", "--resamples", "200"]
TINY += ["--specs", "top1,logits", "--quiet"]


@pytest.fixture(scope="module")
def probed(tmp_path_factory, trained_cnn, trained_mlp, digits):
    """Every case's exit code and stdout (``{"code", "stdout"}``), from one fresh interpreter, and what it wrote on stderr
    before it forked (``prelude_err``); the folder the cases wrote into."""
    tmp = tmp_path_factory.mktemp("startup")
    cnn = save_model(trained_cnn, tmp / "cnn.pt", digits[1].x[:2])
    mlp = save_model(trained_mlp, tmp / "mlp.pt", digits[1].x[:2])
    bodies = {name: COMMAND.format(argv=[a.format(model=cnn, tmp=tmp) for a in args]) for name, args in COMMANDS.items()}
    for i, hidden in enumerate(HIDDEN):
        bodies[hidden] = FINGERPRINT_NATURAL.format(hidden=list(hidden), model=str(cnn), out=str(tmp / f"f{i}.tpf"), optional=OPTIONAL)
    argv = ["evaluate", str(mlp), "--data", "digits", "--out", str(tmp / "report"), *TINY]
    bodies["evaluate"] = EVALUATE_NO_MATPLOTLIB.format(err=str(tmp / "evaluate.err"), argv=argv)
    with pytest.MonkeyPatch.context() as mp:  # the children's history and cache: the session's, not the user's
        mp.setenv("TAMPERPROBE_HISTORY", str(tmp / "history.sqlite"))
        mp.setenv("TAMPERPROBE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        results, stderr = fresh_then_fork(PRELUDE, list(bodies.values()))
    prelude_err, done, children_err = stderr.partition("\0PRELUDE DONE\n")
    assert done, stderr
    return dict(zip(bodies, results)), {"prelude_err": prelude_err, "stderr": children_err, "tmp": tmp}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_short_commands_import_neither_sklearn_nor_dynamo(probed, command):
    results, run = probed
    assert results[command]["code"] == 0, (results[command], run["stderr"])
    (line,) = [line for line in results[command]["stdout"].splitlines() if line.startswith("RESULT ")]
    result = json.loads(line[len("RESULT ") :])
    assert result["code"] in (0, None), (result, run["stderr"])
    assert result["heavy"] == [], result["heavy"]


def test_fingerprint_on_digits_imports_no_optional_dependency(probed):
    """Nothing optional is imported, ONNX Runtime aside: fingerprint measures its tolerance under it when it is installed.

    With onnx and onnxruntime missing the command still works: the tolerance is measured under the
    other runtimes and the file names ONNX as not measured, with the extra that brings it.
    """
    results, run = probed
    runs = {}
    for hidden in HIDDEN:
        assert results[hidden]["code"] == 0, run["stderr"]
        *_, noise, imported = results[hidden]["stdout"].strip().splitlines()
        runs[hidden] = (json.loads(noise), json.loads(imported))
    noise, imported = runs[()]
    assert set(imported) <= {"onnx", "onnxruntime"} and "onnx" in noise["runtimes"]
    noise, imported = runs[("onnx", "onnxruntime")]
    assert imported == [] and "onnx" not in noise["runtimes"] and "tamperprobe[onnx]" in noise["skipped"]["onnx"]
    assert {"batch1", "torchscript"} <= set(noise["runtimes"])


def test_without_matplotlib_evaluate_writes_everything_but_plots_and_says_so(probed):
    """``evaluate`` runs without its plots (``inspect --png`` needs them: tests/test_extras.py); the process's whole stderr,
    its start-up included, is the one line that says why."""
    results, run = probed
    out, err = run["tmp"] / "report", (run["tmp"] / "evaluate.err").read_text()
    assert results["evaluate"]["code"] == 0, err
    assert run["prelude_err"] == ""  # the start-up writes nothing on stderr
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plots skipped: matplotlib is not installed"), err
    assert "pip install 'tamperprobe[plots]'" in lines[0]
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "results.json", "detection.csv", "trigger.csv"} <= names
    assert not [n for n in names if n.endswith(".png")]
    assert "No plots: matplotlib is not installed" in (out / "report.md").read_text()
    assert "no plots" in results["evaluate"]["stdout"]
    assert "plots" not in json.loads((out / "results.json").read_text())["timings"]
