"""``tamperprobe evaluate`` on the command line: plots optional, ``--adversary``, options checked before the work.

``evaluate`` without matplotlib (a process whose import of it fails) is tested in tests/test_startup.py."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tamperprobe.cli.app import app
from tamperprobe.evaluation.adversary import SWEEP
from tamperprobe.evaluation.routers import router_names
from tamperprobe.models import save_model

TINY = [
    "--methods",
    "natural",
    "--no-baselines",
    "--attacks",
    "noise",
    "--trials",
    "1",
    "--bag",
    "12",
    "--resamples",
    "200",
    "--specs",
    "top1,logits",
]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, trained_mlp, digits):
    return save_model(trained_mlp, tmp_path_factory.mktemp("eval-cli") / "m.pt", digits[1].x[:2])


def run(*args: object):
    return CliRunner().invoke(app, ["evaluate", *map(str, args)])


def test_plots_by_default_and_none_with_no_plots(model_file, tmp_path):
    r = run(model_file, "--data", "digits", "--out", tmp_path / "with", *TINY, "--quiet")
    assert r.exit_code == 0, r.output
    pngs = sorted(p.name for p in (tmp_path / "with").glob("*.png"))
    assert pngs == ["detection.png", "markers.png", "trigger.png"]
    for name in pngs:
        assert (tmp_path / "with" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{name}]({name})" in (tmp_path / "with" / "report.md").read_text()
    assert json.loads((tmp_path / "with" / "results.json").read_text())["timings"]["plots"] > 0
    assert "3 PNG plots" in r.stdout

    r = run(model_file, "--data", "digits", "--out", tmp_path / "without", *TINY, "--no-plots", "--quiet")
    assert r.exit_code == 0, r.output
    assert not list((tmp_path / "without").glob("*.png")) and "plots skipped" not in r.stderr
    assert "No plots: plots were not asked for (--no-plots)" in (tmp_path / "without" / "report.md").read_text()
    # the tables do not depend on the plots
    for table in ("detection.csv", "trigger.csv", "attacks.csv"):
        assert (tmp_path / "with" / table).read_text() == (tmp_path / "without" / table).read_text()


def test_progress_names_each_phase_on_stderr(model_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TAMPERPROBE_PROGRESS_INTERVAL", "0")  # every update is a line (stderr is not a terminal here)
    r = run(model_file, "--data", "digits", "--out", tmp_path / "rep", *TINY)
    assert r.exit_code == 0, r.output
    err = r.stderr
    for phase in (
        "loading the model",
        "loading the data",
        "markers: natural",
        "selections: natural",
        "benign runtime: onnx",
        "attack: noise #0",
        "querying the markers",
    ):
        assert phase in err, phase
    assert "writing the report" in err and "detection.png" in err
    assert "evaluate" not in r.stdout.split("detection rate")[0]  # progress never goes to stdout
    quiet = run(model_file, "--data", "digits", "--out", tmp_path / "quiet", *TINY, "--quiet", "--no-plots")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_adversary_runs_with_the_campaign_settings_and_writes_its_report(model_file, tmp_path):
    out = tmp_path / "rep"
    r = run(
        model_file,
        "--data",
        "digits",
        "--out",
        out,
        *TINY,
        "--no-plots",
        "--quiet",
        "--json",
        "--adversary",
        "exact-repeat,margin-original",
        "--adversary-costs",
        "0.2,0.05",
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["adversary"]["routers"] == ["exact-repeat", "margin-original"] and summary["adversary"]["costs"] == [0.05, 0.2]
    assert summary["adversary"]["measured"] and summary["adversary"]["errors"] == []
    folder = out / "adversary"
    assert {"adversary.md", "adversary.json", "detection.csv", "routers.csv"} <= {p.name for p in folder.iterdir()}
    adv = json.loads((folder / "adversary.json").read_text())
    campaign = json.loads((out / "results.json").read_text())
    p, q = adv["params"], campaign["params"]
    assert p["routers"] == ["exact-repeat", "margin-original"]
    assert {0.05, 0.2} | set(SWEEP) == set(p["costs"])
    assert (p["methods"], p["attacks"], p["specs"], p["bag"], p["seed"]) == (q["methods"], q["attacks"], q["specs"], q["bag"], q["seed"])
    assert p["attack_data"]["size"] == q["data"]["attack"] and p["data"]["size"] == q["data"]["train"]
    assert sum(p["traffic"].values()) == q["data"]["test"]  # the operator's traffic is the held-out part, the owner's seeds are not in it
    # same bags, same attack instances: the markers whose answer changed are the campaign's
    changed = {(t["method"], t["attack"], t["trial"], t["spec"]): t["changed"] for t in campaign["trigger"]}
    assert adv["trigger"] and all(changed[(t["method"], t["attack"], t["trial"], t["spec"])] == t["changed"] for t in adv["trigger"])
    routed = {(d["router"], d["cost"]) for d in adv["detection"]}
    assert {("exact-repeat", 0.05), ("margin-original", 0.2), ("passive", 0.0)} <= routed
    md = (folder / "adversary.md").read_text()
    assert "exact-repeat" in md and "margin-original" in md


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--adversary", "nope,exact-repeat"], f"unknown router(s) nope: choose from {', '.join(router_names())}"),
        (["--adversary", ","], "--adversary needs 'all' or router names"),
        (["--adversary", "all", "--adversary-costs", "0.1,1.5"], "bad --adversary-costs '0.1,1.5': shares of ordinary traffic in [0, 1]"),
        (["--adversary", "all", "--adversary-costs", "cheap"], "bad --adversary-costs 'cheap'"),
        (["--adversary-costs", "0.1"], "--adversary-costs needs --adversary"),
        (["--attack-samples", "-1"], "--attack-samples must be at least 0"),
        (["--backend", "spark"], "unknown backend 'spark': choose local or ray"),
        (["--address", "127.0.0.1:6379"], "--address needs --backend ray"),
    ],
)
def test_bad_adversary_options_are_one_line_errors_before_any_work(model_file, tmp_path, options, message):
    out = tmp_path / "rep"
    r = run(model_file, "--data", "digits", "--out", out, *TINY, "--quiet", *options)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.output and not out.exists()
