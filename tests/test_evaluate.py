"""The evaluation harness: vectorised comparison, resampling protocol, key size, campaign and report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tamperprobe.attacks.base import Attack
from tamperprobe.evaluation import run_evaluation, write_report
from tamperprobe.evaluation.protocol import MAX_NS, detection_curve, exact_random_detection, selection_orders
from tamperprobe.evaluation.results import NO_CHANGE
from tamperprobe.models import TorchModel
from tamperprobe.outputs import OutputSpec, compare_many
from tamperprobe.owner.budget import key_size_or_none as key_size  # the key size the evaluation reports

TOL = 3e-5
SPECS = [
    "top1",
    "topk:2",
    "topk:3",
    "topk:5",
    "top1-prob:1",
    "top1-prob:2",
    "top1-prob:3",
    "probs:1",
    "probs:2",
    "probs:3",
    "logits",
]


# ----------------------------------------------------------------------------- vectorised compare


def _cases(rng: np.random.Generator, classes: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Expected/observed logit pairs: noise at and around the tolerance, near-ties, permutations, NaN."""
    z = rng.normal(size=(n, classes)) * rng.choice([0.1, 1.0, 3.0, 20.0], size=(n, 1))
    o = z.copy()
    kind = rng.integers(0, 6, size=n)
    for i in range(n):
        top = int(np.argmax(z[i]))
        other = (top + 1 + int(rng.integers(classes - 1))) % classes
        if kind[i] == 0:  # noise of a size around the tolerance
            o[i] = z[i] + rng.normal(size=classes) * rng.choice([0.0, 1e-7, TOL / 3, TOL, 3 * TOL, 1e-3, 0.3])
        elif kind[i] == 1:  # expected near-tie between the top two, observed either way
            z[i, other] = z[i, top] + rng.choice([0.0, -TOL / 2, TOL / 2, -TOL, TOL, -2 * TOL, 2 * TOL, -1e-7])
            o[i] = z[i]
            if rng.random() < 0.5:
                o[i, top], o[i, other] = z[i, other], z[i, top]
            o[i] += rng.normal(size=classes) * rng.choice([0.0, 1e-6, TOL / 2])
        elif kind[i] == 2:  # a permutation of the expected logits
            o[i] = rng.permutation(z[i])
        elif kind[i] == 3:  # an ordinary tampering
            o[i] = z[i] + rng.normal(size=classes) * 0.05
        elif kind[i] == 4:  # rounding in float32, as a served model would
            o[i] = z[i].astype(np.float32).astype(np.float64)
        else:  # broken answers
            o[i, int(rng.integers(classes))] = rng.choice([np.nan, np.inf, -np.inf])
    return z, o


def _rounding_boundary_cases(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes whose probabilities sit on (or within a hair of) a rounding boundary (k + 0.5)·10^-N."""
    zs, os_ = [], []
    for _ in range(n):
        decimals = int(rng.integers(0, 4))
        scale = 10.0**decimals
        b = (int(rng.integers(0, int(scale))) + 0.5) / scale
        b = min(max(b, 1e-6), 1 - 1e-6)
        d = math.log(b / (1 - b))
        z = np.array([0.0, d]) + rng.choice([0.0, 1e-12, -1e-12, 1e-9, TOL / 2, -TOL / 2, 2 * TOL])
        o = z + rng.choice([0.0, 1e-12, -1e-12, 1e-8, -1e-8, TOL / 2, -TOL / 2, 2 * TOL, -2 * TOL], size=2)
        zs.append(z)
        os_.append(o)
    return np.array(zs), np.array(os_)


def test_compare_many_equals_scalar_compare():
    rng = np.random.default_rng(0)
    sets = [_cases(rng, c, 300) for c in (2, 3, 5, 10)] + [_rounding_boundary_cases(rng, 600)]
    sets += [(z.astype(np.float32), o.astype(np.float32)) for z, o in sets[:2]]
    checked = mismatched = 0
    for z, o in sets:
        for text in SPECS:
            spec = OutputSpec.parse(text)
            if spec.label_count > z.shape[1]:
                continue
            fast = compare_many(spec, z, o, TOL)
            with np.errstate(invalid="ignore", over="ignore"):
                slow = np.array([spec.compare(z[i], spec.reveal(o[i]), TOL).ok for i in range(len(z))])
            np.testing.assert_array_equal(fast, slow, err_msg=f"{text}, {z.shape[1]} classes")
            checked += len(z)
            mismatched += int((~slow).sum())
    assert checked > 20_000
    assert 0.1 * checked < mismatched < 0.9 * checked  # both outcomes well represented


def test_compare_many_rejects_shape_mismatch():
    from tamperprobe.errors import UsageError

    with pytest.raises(UsageError):
        compare_many("top1", np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(UsageError):
        compare_many("topk:5", np.zeros((3, 4)), np.zeros((3, 4)))


# ----------------------------------------------------------------------------- key size


@pytest.mark.parametrize(
    "p, c, s",
    [
        (0.5, 0.9, 4),
        (0.5, 0.99, 7),
        (0.5, 0.999, 10),
        (0.1, 0.9, 22),
        (0.1, 0.99, 44),
        (0.01, 0.9, 230),
        (0.5, 0.75, 3),
        (1.0, 0.999, 1),
        (0.9, 0.9, 2),
    ],
)
def test_key_size_known_values(p, c, s):
    assert key_size(p, c) == s
    # the defining inequality: s is the smallest integer above log(1-c)/log(1-p)
    if p < 1:
        bound = math.log(1 - c) / math.log(1 - p)
        assert s > bound - 1e-9 and s - 1 <= bound + 1e-9


def test_key_size_never_for_p_zero():
    assert key_size(0.0, 0.9) is None


# ----------------------------------------------------------------------------- resampling protocol


def test_detection_curve_is_the_share_of_selections_with_a_changed_marker():
    rng = np.random.default_rng(1)
    n, m, resamples = 60, 5, 4000
    changed = np.zeros(n, dtype=bool)
    changed[rng.choice(n, m, replace=False)] = True
    orders = selection_orders(n, MAX_NS, resamples, rng)
    curve = detection_curve(changed, orders)
    for ns in range(1, MAX_NS + 1):
        none_changed = np.mean([not changed[orders[r, :ns]].any() for r in range(resamples)])
        assert curve[ns - 1] == pytest.approx(1.0 - none_changed, abs=1e-12)
        # each prefix is a uniform ns-subset: the exact hypergeometric value within sampling error
        exact = exact_random_detection(n, m, ns)
        assert abs(curve[ns - 1] - exact) <= 4.5 * math.sqrt(exact * (1 - exact) / resamples) + 1e-9
    assert np.all(np.diff(curve) >= 0)


def test_detection_curve_with_pairs_takes_whole_groups():
    rng = np.random.default_rng(2)
    units = 30
    unit_changed = np.zeros(units, dtype=bool)
    unit_changed[:6] = True
    orders = selection_orders(units, MAX_NS // 2, 3000, rng)
    curve = detection_curve(unit_changed, orders, group_size=2)
    assert curve[0] == 0.0  # one query cannot hold a whole pair
    assert curve[1] == curve[2] and curve[3] == curve[4]  # floor(N_S / 2) pairs
    assert abs(curve[9] - exact_random_detection(units, 6, 5)) < 0.04


# ----------------------------------------------------------------------------- campaign


@pytest.fixture(scope="module")
def loaded_mlp(trained_mlp):
    return TorchModel(trained_mlp, "digits-mlp")


@pytest.fixture(scope="module")
def digits_all():
    from tamperprobe.data import load_data

    return load_data("digits")


CAMPAIGN = dict(
    methods=["natural", "noise", "rotation", "nope"],
    attacks=["noise", "prune", "nope"],
    trials=2,
    bag=40,
    select="random",
    resamples=2000,
    seed=3,
    baselines=False,
    attack_params={"noise": {"fraction": 0.2, "sigma": 0.05}, "prune": {"ratio": 0.3}},
)


@pytest.fixture(scope="module")
def campaign(loaded_mlp, digits_all):
    return run_evaluation(loaded_mlp, digits_all, **CAMPAIGN)


def test_campaign_records_failures_and_continues(campaign):
    ev = campaign
    assert ev.measured
    failed = {(e["stage"], e["name"].split("#")[0]) for e in ev.errors}
    assert ("method", "nope") in failed and ("attack", "nope") in failed
    assert {m["method"] for m in ev.methods if not m["error"]} == {"natural", "noise", "rotation"}
    runs = [(a["attack"], a["trial"]) for a in ev.attacks if not a["error"]]
    assert runs == [("noise", 0), ("noise", 1), ("prune", 0)]  # prune is deterministic: one instance
    assert all(a["acc_before"] is not None and a["acc_after"] is not None for a in ev.attacks if not a["error"])


def test_detection_is_monotone_and_matches_combinatorics(campaign):
    ev = campaign
    curves = {}
    for r in ev.detection:
        curves.setdefault((r["method"], r["attack"], r["spec"]), [0.0] * MAX_NS)[r["ns"] - 1] = r["rate"]
    assert len(curves) == 3 * 2 * 7
    some_positive = False
    for (method, attack, spec), curve in curves.items():
        assert np.all(np.diff(curve) >= 0), (method, attack, spec)
        trials = [t for t in ev.trigger if (t["method"], t["attack"], t["spec"]) == (method, attack, spec)]
        for ns in (1, 3, 10):
            exact = float(np.mean([exact_random_detection(t["markers"], t["changed"], ns) for t in trials]))
            assert abs(curve[ns - 1] - exact) <= 4.5 * math.sqrt(0.25 / ev.params["resamples"]), (method, attack, spec, ns)
        some_positive |= curve[-1] > 0
    assert some_positive
    logits_rows = [t for t in ev.trigger if t["spec"] == "logits" and t["attack"] == "noise"]
    assert all(t["ratio"] > 0.5 for t in logits_rows)  # noise on 20% of the weights moves nearly every logit


def test_key_size_rows_follow_the_formula(campaign):
    for r in campaign.key_sizes:
        assert r["s"] == key_size(r["p"], r["c"])


def test_no_false_alarms_under_benign_runtimes(campaign):
    ev = campaign
    rows = ev.false_alarms
    assert {r["runtime"] for r in rows} == {"batch1", "batch64", "threads1", "threads2", "torchscript", "onnx"}
    assert all(r["error"] is None for r in rows)
    assert ev.benign_flagged == 0
    assert ev.benign_checks == 3 * 40 * 6 * 7
    assert max(r["max_abs_dlogit"] for r in rows) < 1e-4


def test_campaign_is_deterministic_for_a_seed(campaign, loaded_mlp, digits_all):
    again = run_evaluation(loaded_mlp, digits_all, **CAMPAIGN)
    # every table of the report is written from these rows (timings live apart)
    for table in ("methods", "attacks", "trigger", "detection", "key_sizes", "false_alarms", "errors"):
        assert getattr(again, table) == getattr(campaign, table), table
    other = run_evaluation(loaded_mlp, digits_all, **{**CAMPAIGN, "seed": 4, "runtimes": []})
    assert other.trigger != campaign.trigger


@pytest.fixture(scope="module")
def report_with_plots(campaign, tmp_path_factory):
    """The campaign's report with its plots, written once (matplotlib is most of the work) and read by the tests below."""
    folder = tmp_path_factory.mktemp("report")
    return folder, write_report(campaign, folder)


def test_write_report_writes_the_promised_files(campaign, report_with_plots):
    tmp_path, paths = report_with_plots
    names = {p.name for p in paths}
    assert {"report.md", "results.json", "detection.csv", "trigger.csv", "key_size.csv", "false_alarms.csv"} <= names
    assert {"detection.png", "trigger.png", "markers.png"} <= names
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["params"]["seed"] == 3 and data["machine"]["nproc"] >= 1 and data["started"]
    assert data["false_alarm_summary"]["flagged"] == 0
    assert len(data["detection"]) == len(campaign.detection)
    md = (tmp_path / "report.md").read_text()
    assert "Detection rate vs N_S (top1)" in md and "False alarms" in md and "nope" in md
    assert data["timings"]["plots"] > 0 and "| plots |" in md


def test_write_report_without_plots_writes_the_same_tables(campaign, report_with_plots, tmp_path):
    folder, paths = report_with_plots
    with_plots = {p.name for p in paths}
    without = {p.name for p in write_report(campaign, tmp_path / "b", plots=False)}
    assert without == {n for n in with_plots if not n.endswith(".png")} and not list((tmp_path / "b").glob("*.png"))
    for name in without - {"report.md", "results.json"}:
        assert (folder / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert "No plots: plots were not asked for" in (tmp_path / "b" / "report.md").read_text()


def test_marker_mosaic_holds_every_seed_and_marker(campaign):
    from tamperprobe.evaluation.plots import marker_mosaic

    mosaic, rows = marker_mosaic(campaign, gap=2)
    assert [label for _, label in rows] == [f"{m}: {part}" for m in campaign.samples for part in ("seeds", "markers")]
    lo, hi = campaign.params["data"]["low"], campaign.params["data"]["high"]
    first = campaign.samples["natural"]
    h, w = first["inputs"].shape[-2:]
    tile = mosaic[2 : 2 + h, 2 : 2 + w, 0]  # the first seed, top left
    assert np.allclose(tile, np.clip((first["seeds"][0, 0] - lo) / (hi - lo), 0, 1), atol=1e-6)
    top = int(rows[1][0] - h / 2)  # the first marker, in the next row
    assert np.allclose(mosaic[top : top + h, 2 : 2 + w, 1], np.clip((first["inputs"][0, 0] - lo) / (hi - lo), 0, 1), atol=1e-6)


def test_manc_protocol_with_boundary_pairs(loaded_mlp, digits_all):
    ev = run_evaluation(
        loaded_mlp,
        digits_all,
        methods=["boundary", "natural"],
        attacks=["prune"],
        specs=["top1"],
        bag=20,
        select="manc",
        resamples=500,
        seed=0,
        baselines=False,
        runtimes=["batch1"],
        attack_params={"prune": {"ratio": 0.3}},
    )
    assert not [e for e in ev.errors if e["stage"] != "method"], ev.errors
    rows = {m["method"]: m for m in ev.methods}
    curves = ev.detection_table("top1")
    if not rows["boundary"]["error"]:
        assert rows["boundary"]["group_size"] == 2 and rows["boundary"]["selection"] == "manc"
        curve = curves[("boundary", "prune")]
        assert curve[0] == 0.0 and curve[1] == curve[2]  # pairs are picked whole
        assert np.all(np.diff(curve) >= 0)
    assert rows["natural"]["selection"] == "manc"
    assert np.all(np.diff(curves[("natural", "prune")]) >= 0)


def test_cli_exits_2_when_nothing_can_be_measured(trained_mlp, digits, tmp_path):
    from typer.testing import CliRunner

    from tamperprobe.cli.app import app
    from tamperprobe.models import save_model

    onnx_path = save_model(trained_mlp, tmp_path / "m.onnx", digits[0].x[:2])  # no weights in PyTorch form: no attack can run
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(onnx_path),
            "--data",
            "digits",
            "--out",
            str(out),
            "--methods",
            "natural",
            "--no-baselines",
            "--attacks",
            "prune",
            "--bag",
            "10",
            "--resamples",
            "100",
            "--quiet",
        ],
    )
    assert result.exit_code == 2, result.output
    assert (out / "report.md").exists()
    assert "Nothing could be measured" in (out / "report.md").read_text()


def test_attacks_get_a_bounded_seeded_share_of_the_train_part_and_report_what_attack_run_measures(campaign, loaded_mlp, digits_all):
    from tamperprobe.attacks import get_attack
    from tamperprobe.evaluation.runner import attacker_data

    p = campaign.params
    train, test = digits_all.split(p["test_fraction"], seed=p["seed"])
    part = attacker_data(train, p["attack_samples"], p["seed"])
    assert p["attack_samples"] == 1000 and p["data"]["attack"] == len(part) == 1000 < len(train)
    rows = {tuple(r) for r in train.x.reshape(len(train), -1).round(6)}
    assert all(tuple(r) in rows for r in part.x.reshape(len(part), -1).round(6))  # a subset of the train part
    assert np.array_equal(attacker_data(train, 1000, p["seed"]).x, part.x) and not np.array_equal(attacker_data(train, 1000, p["seed"] + 1).x, part.x)
    assert attacker_data(train, None, 0) is train and attacker_data(train, len(train) + 5, 0) is train
    # the campaign measures the intact accuracy once; every attack row holds what Attack.run measures itself
    row = next(a for a in campaign.attacks if a["attack"] == "noise" and a["trial"] == 1)
    result = get_attack("noise", CAMPAIGN["attack_params"]["noise"]).run(loaded_mlp.module, part, seed=row["seed"], eval_data=test)
    assert (result.acc_before, result.acc_after) == (row["acc_before"], row["acc_after"])


def test_attacks_train_on_attack_data_when_given(loaded_mlp, digits_all):
    """``attack_data`` replaces the training part as the attacker's data (and is recorded); markers still come from the training part."""
    from tamperprobe.data import Dataset

    attacker = Dataset(digits_all.x[:60], None, "attacker-unlabelled", digits_all.low, digits_all.high)
    common = dict(methods=["natural"], attacks=["finetune"], specs=["top1"], bag=10, resamples=100, trials=1, baselines=False, runtimes=[])
    ev = run_evaluation(loaded_mlp, digits_all, attack_data=attacker, **common)
    assert ev.params["attack_data"] == {"name": "attacker-unlabelled", "size": 60}
    assert [e["stage"] for e in ev.errors] == ["attack"] and "attacker-unlabelled has no labels" in ev.errors[0]["error"]
    assert ev.methods[0]["markers"] == 10  # the owner's markers were generated as before
    plain = run_evaluation(loaded_mlp, digits_all, **common)
    assert not plain.errors and plain.params["attack_data"]["size"] == plain.params["data"]["attack"] and plain.attacks[0]["acc_after"] is not None


def test_results_json_reads_back_into_the_same_typed_rows(campaign):
    from tamperprobe.evaluation.results import Evaluation, MethodRow, TriggerRow

    doc = json.loads(json.dumps(campaign.to_json()))
    again = Evaluation.from_json(doc)
    assert again.to_json() == doc
    assert again.trigger == campaign.trigger and again.detection == campaign.detection and again.key_sizes == campaign.key_sizes
    assert all(isinstance(r, MethodRow) for r in again.methods) and all(isinstance(r, TriggerRow) for r in again.trigger)
    (failed,) = [m for m in doc["methods"] if m["error"]]
    assert failed["method"] == "nope" and "selection" not in failed and "tolerance" not in failed  # not measured: absent, as before
    with pytest.raises(Exception, match="not a campaign's results"):
        Evaluation.from_json({**doc, "format": "other"})
    with pytest.raises(Exception, match="unknown column"):
        TriggerRow.from_json({**doc["trigger"][0], "extra": 1})


# ----------------------------------------------------------------------------- attacks below the benign floor


class Nudge(Attack):
    """Scale one weight by (1 + 1e-6): a tampering whose logit change stays far below any benign runtime's."""

    name = "nudge"

    def apply(self, model, ctx):
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] *= 1 + 1e-6
        return model


@pytest.fixture(scope="module")
def below_floor(loaded_mlp, digits_all):
    return run_evaluation(
        loaded_mlp,
        digits_all,
        methods=["natural", "boundary"],
        attacks=[Nudge(), "fp16"],
        specs=["top1", "logits"],
        bag=30,
        resamples=500,
        select="random",
        baselines=False,
        runtimes=("batch1", "onnx"),
    )


def test_an_attack_below_the_benign_floor_reads_no_functional_change(below_floor):
    ev = below_floor
    nudge, fp16 = ev.attacks
    floor = max(m.benign_floor for m in ev.methods)
    assert ev.benign_floor == floor and floor >= ev.max_benign_dlogit > 0  # the floor is what the benign runtimes moved
    assert nudge.changed == 1 and nudge.benign_floor == fp16.benign_floor == floor
    assert max(nudge.max_abs_dlogit, nudge.max_abs_dlogit_test) <= floor and nudge.functional_change is False
    assert min(fp16.max_abs_dlogit, fp16.max_abs_dlogit_test) > floor and fp16.functional_change is True
    assert ev.no_functional_change() == ["nudge"]
    rows = {(r.method, r.attack, r.spec, r.ns): r for r in ev.detection}
    assert len(rows) == 2 * 2 * 2 * MAX_NS
    for r in rows.values():
        if r.attack == "nudge":
            assert (r.status, r.rate, r.min_trial) == (NO_CHANGE, None, None)
        else:
            assert r.status == "measured" and 0.0 <= r.rate <= 1.0
    assert all((k.status, k.s, k.empirical_ns) == (NO_CHANGE, None, None) for k in ev.key_sizes if k.attack == "nudge")
    assert ("natural", "nudge") not in ev.detection_table("top1") and ("natural", "fp16") in ev.detection_table("top1")
    methods, attacks, rates = ev.detection_summary()
    assert attacks == ["nudge", "fp16"] and set(rates) == {(m, "fp16") for m in methods}


def test_the_report_and_results_json_say_no_functional_change(below_floor, tmp_path):
    write_report(below_floor, tmp_path, plots=False)
    doc = json.loads((tmp_path / "results.json").read_text())
    nudge = [d for d in doc["detection"] if d["attack"] == "nudge"]
    assert nudge and all(d["rate"] is None and d["status"] == NO_CHANGE for d in nudge)
    (row,) = [a for a in doc["attacks"] if a["attack"] == "nudge"]
    assert row["functional_change"] is False and row["max_abs_dlogit"] <= row["benign_floor"]
    md = (tmp_path / "report.md").read_text()
    assert "| nudge | every method | no functional change |" in md
    assert f"below the benign floor {below_floor.benign_floor:.3g}" in md
    header, *lines = (tmp_path / "detection.csv").read_text().splitlines()
    assert header.endswith(",status") and all(line.endswith(",no functional change") for line in lines if line.split(",")[1] == "nudge")


def test_the_cli_summary_says_no_change_for_attacks_below_the_floor(below_floor, tmp_path):
    from rich.console import Console

    from tamperprobe.cli.lab import _summary_json, detection_tables

    summary = _summary_json(below_floor, tmp_path, [])
    assert all(per["nudge"] == NO_CHANGE and len(per["fp16"]) == 3 for per in summary["detection"].values())
    methods, attacks, rates = below_floor.detection_summary()
    console = Console(width=200, record=True)
    for table in detection_tables(methods, attacks, rates, 200, below_floor.no_functional_change()):
        console.print(table)
    nudge_line = next(line for line in console.export_text().splitlines() if "nudge" in line)
    assert nudge_line.count("no change") == len(methods)
