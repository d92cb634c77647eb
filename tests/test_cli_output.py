"""What the commands print: --json on stdout and nothing else, progress on stderr, tables intact at 80 columns,
--model-arg on every command that loads a model."""

import json
import re
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

from tamperprobe.cli._common import ProgressLines, format_duration
from tamperprobe.cli.app import app
from tamperprobe.models import save_model

NARROW = {"COLUMNS": "80"}


def run(*args, env=None):
    return CliRunner(env=env).invoke(app, [str(a) for a in args])


def assert_fits(text: str, width: int = 80) -> None:
    too_wide = [line for line in text.splitlines() if len(line) > width and not line.startswith(("wrote", "method ", "warning"))]
    assert not too_wide, too_wide
    assert "…" not in text


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, trained_cnn, digits):
    return save_model(trained_cnn, tmp_path_factory.mktemp("out") / "m.pt", digits[1].x)


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    """A module on sys.path with a factory that takes arguments (like timm.create_model)."""
    import sys

    folder = tmp_path_factory.mktemp("factory")
    (folder / "tp_test_factory.py").write_text(
        textwrap.dedent(
            """
            import torch
            from tamperprobe import zoo

            def make(arch="mlp", side=8, classes=10, seed=0):
                torch.manual_seed(seed)
                return zoo.build(arch, (1, side, side), classes).eval()
            """
        )
    )
    sys.path.insert(0, str(folder))
    yield "tp_test_factory:make"
    sys.path.remove(str(folder))
    sys.modules.pop("tp_test_factory", None)


# ----------------------------------------------------------------------------- fingerprint


@pytest.fixture(scope="module")
def fingerprint_json(model_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp") / "f.tpf"
    args = ["fingerprint", model_file, "--data", "digits", "--out", out, "--method", "natural", "--select", "random", "--size", "5", "--bag", "20"]
    return out, args, run(*args, "--json", env={**NARROW, "TAMPERPROBE_PROGRESS_INTERVAL": "0"})


def test_fingerprint_json_is_all_of_stdout(fingerprint_json):
    out, _, r = fingerprint_json
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    from tamperprobe.fingerprint import load

    fp = load(out)
    assert d["file"] == str(out) and d["id"] == fp.id and d["markers"] == 5 == d["query_budget"]
    assert d["method"] == "natural" and d["method_reason"] is None and d["output_spec"] == "logits"
    assert d["signing"].startswith("signed with key") and d["warnings"] == []
    assert [row["attack"] for row in d["self_check"]] == ["int8", "fp16", "floor", "noise", "noise", "noise"]
    assert all(0 <= row["p"] <= 1 and isinstance(row["detected"], bool) for row in d["self_check"])


def test_fingerprint_progress_goes_to_stderr_as_lines_when_piped(fingerprint_json):
    _, _, r = fingerprint_json
    lines = r.stderr.splitlines()
    gen = [line for line in lines if line.startswith("generating natural markers: ")]
    check = [line for line in lines if line.startswith("self-check: simulated tamperings: ")]
    assert gen and check, r.stderr
    assert re.fullmatch(r"generating natural markers: 20/20 \(100 %\), \d+ s elapsed, done", gen[-1]), gen
    assert check[-1].endswith("done") and "6/6 (100 %)" in check[-1]
    assert "elapsed" not in r.stdout and "generating" not in r.stdout


def test_fingerprint_self_check_table_is_intact_at_80_columns(fingerprint_json):
    out, args, rj = fingerprint_json
    r = run(*args, env=NARROW)
    assert r.exit_code == 0, r.output
    assert_fits(r.stdout)
    for row in json.loads(rj.stdout)["self_check"]:
        assert f"{row['attack']} (seed {row['seed']})" in r.stdout
        assert f"{row['p']:.2f}" in r.stdout and f"{row['confidence_per_run']:.4f}" in r.stdout


def test_fingerprint_with_model_arg_factory(factory, tmp_path):
    from tamperprobe.fingerprint import load
    from tamperprobe.models import TorchModel
    from tamperprobe.zoo import build

    out = tmp_path / "f.tpf"
    r = run(
        "fingerprint", factory, "--model-arg", "arch=cnn", "--model-arg", "seed=3", "--data", "digits", "--out", out,
        "--method", "natural", "--size", "3", "--bag", "6", "--no-check",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    import torch

    torch.manual_seed(3)
    assert load(out).model_digest == TorchModel(build("cnn", (1, 8, 8)).eval()).digest()
    r = run("fingerprint", factory, "--model-arg", "nope=1", "--data", "digits", "--out", out, "--no-check")
    assert r.exit_code == 2 and "--model-arg" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- inspect


def test_inspect_json_and_whole_digest_at_80_columns(fingerprint_json):
    out, _, _ = fingerprint_json
    from tamperprobe.fingerprint import load

    fp = load(out)
    r = run("inspect", out, env=NARROW)
    assert r.exit_code == 0, r.output
    assert fp.model_digest in r.stdout and fp.id in r.stdout and "…" not in r.stdout
    r = run("inspect", out, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["model_digest"] == fp.model_digest and d["id"] == fp.id and d["markers"] == len(fp)
    assert d["generator"]["method"] == "natural" and d["signature"]["verified"] is True
    assert sum(d["markers_per_label"]) == len(fp) and d["input"]["shape"] == [1, 8, 8]


# ----------------------------------------------------------------------------- calibrate


def test_calibrate_json_progress_and_table(factory, tmp_path):
    args = ["calibrate", factory, "--model-arg", "seed=1", "--data", "digits", "--runtimes", "batch1,threads1", "--samples", "64"]
    r = run(*args, "--out", tmp_path / "n.json", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["format"] == "tamperprobe.noise/v1" and set(d["runtimes"]) == {"batch1", "threads1"}
    assert d["file"] == str(tmp_path / "n.json") and d["suggested_delta"] == pytest.approx(10 * d["floor"])
    assert "calibrating runtimes: 2/2 (100 %)" in r.stderr
    r = run(*args, "--out", tmp_path / "n.json", env=NARROW)
    assert r.exit_code == 0, r.output
    assert_fits(r.stdout)
    for name, row in d["runtimes"].items():
        shown = re.escape(f"{row['max_abs']:.3g}")
        assert re.search(rf"{name}\s+│\s+{shown}\s+│", r.stdout), r.stdout


# ----------------------------------------------------------------------------- train, attack


def test_train_json_and_progress(tmp_path):
    r = run("train", "perceptron", "--data", "digits", "--epochs", "2", "--out", tmp_path / "p.pt", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["architecture"] == "perceptron" and d["file"] == str(tmp_path / "p.pt") and 0 <= d["test_accuracy"] <= 1
    assert re.search(r"^training perceptron: \d+/\d+ \(100 %\) epoch 2/2, \d+ s elapsed, done$", r.stderr, re.M), r.stderr


def test_attack_json_progress_and_model_arg(factory, tmp_path):
    r = run(
        "attack", factory, "--model-arg", "seed=2", "--kind", "finetune", "--data", "digits", "--out", tmp_path / "a.safetensors",
        "--param", "n=64", "--param", "epochs=2", "--json", env={"TAMPERPROBE_PROGRESS_INTERVAL": "0"},
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["attack"] == "finetune" and d["params"]["epochs"] == 2 and d["params"]["seed"] == 0
    assert 0 <= d["accuracy_before"] <= 1 and 0 <= d["accuracy_after"] <= 1 and d["success"] is None and d["changed_weights"] > 0
    assert "attack finetune: " in r.stderr and "training, epoch" in r.stderr and r.stderr.rstrip().endswith("done")


# ----------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def evaluation(factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    args = [
        "evaluate", factory, "--model-arg", "seed=4", "--data", "digits", "--out", out, "--methods", "natural,grid",
        "--attacks", "prune,noise", "--bag", "10", "--resamples", "100", "--trials", "1", "--specs", "top1,logits", "--select", "random",
    ]  # fmt: skip
    return out, args, run(*args, env=NARROW)


def test_evaluate_summary_keeps_every_number_at_80_columns(evaluation):
    out, _, r = evaluation
    assert r.exit_code == 0, r.output
    assert_fits(r.stdout)
    rows = json.loads((out / "results.json").read_text())["detection"]
    rates = {(x["method"], x["attack"], x["ns"]): x["rate"] for x in rows if x["spec"] == "top1"}
    methods = {m for m, _, _ in rates}
    assert len(methods) == 5  # natural, grid and the three baselines: wider than 80 columns in one table
    for method, attack in {(m, a) for m, a, _ in rates}:
        cell = "/".join(f"{rates[(method, attack, n)]:.2f}" for n in (1, 5, 10))
        assert re.search(rf"{attack}\s+│(.*│)?\s+{re.escape(cell)}\s+│", r.stdout), (method, attack, cell)
    assert "evaluate: " in r.stderr and "done" in r.stderr


def test_evaluate_json(factory, tmp_path):
    r = run(
        "evaluate", factory, "--model-arg", "seed=4", "--data", "digits", "--out", tmp_path, "--methods", "natural,grid", "--no-baselines",
        "--attacks", "prune", "--bag", "10", "--resamples", "100", "--specs", "top1", "--select", "random", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["output"] == str(tmp_path) and d["spec"] == "top1" and d["ns"] == [1, 5, 10] and d["measured"] is True
    assert set(d["detection"]) == {"natural", "grid"} and set(d["detection"]["grid"]) == {"prune"}
    assert len(d["detection"]["grid"]["prune"]) == 3 and all(0 <= x <= 1 for x in d["detection"]["grid"]["prune"])
    assert d["false_alarms"]["flagged"] == 0 and d["false_alarms"]["checks"] > 0 and d["errors"] == []
    assert "evaluate: " in r.stderr and "{" not in r.stderr


# ----------------------------------------------------------------------------- progress lines


def test_progress_lines_are_periodic_with_eta_and_a_final_line():
    now = [0.0]
    lines: list[str] = []
    p = ProgressLines("generating boundary markers", lines.append, interval=5.0, clock=lambda: now[0])
    for step in range(1, 101):
        now[0] = step * 0.3  # 30 s in all: a line at most every 5 s
        p(step, 100)
    p.finish()
    assert lines[0] == "generating boundary markers: 1/100 (1 %), 0 s elapsed"
    assert 6 <= len(lines) <= 8 and lines[-1] == "generating boundary markers: 100/100 (100 %), 30 s elapsed, done"
    assert any(line.startswith("generating boundary markers: 18/100 (18 %), 5 s elapsed, ETA 25 s") for line in lines), lines
    p.finish()  # the final state is written once
    assert lines.count(lines[-1]) == 1


def test_progress_eta_restarts_with_a_new_total_and_durations_read_well():
    now = [0.0]
    lines: list[str] = []
    p = ProgressLines("attack trojan", lines.append, interval=0.0, clock=lambda: now[0])
    p(0, 1, "measuring accuracy")
    now[0] = 10.0
    p(1, 40, "training, epoch 1/2")
    now[0] = 20.0
    p(11, 40, "training, epoch 1/2")
    assert lines[-1] == "attack trojan: 11/40 (27 %) training, epoch 1/2, 20 s elapsed, ETA 29 s"
    assert [format_duration(s) for s in (0.4, 59, 61, 3725)] == ["0 s", "59 s", "1 min 01 s", "1 h 02 min"]


def test_numbers_in_json_are_plain_and_finite():
    from tamperprobe.cli._common import jsonable

    data = jsonable({"a": np.float32(0.5), "b": float("nan"), "c": np.arange(2), "d": (1, np.int64(2))})
    assert json.dumps(data, allow_nan=False) == '{"a": 0.5, "b": null, "c": [0, 1], "d": [1, 2]}'
