"""The method follows the API: the default method per output spec, and warnings backed by the benchmark tables."""

import csv
import importlib.util
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tamperprobe.cli.app import app
from tamperprobe.models import TorchModel, save_model
from tamperprobe.owner import advice
from tamperprobe.owner.generate import WeakPairingWarning, create_fingerprint

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# the method choice and its warnings do not depend on the tolerance: a given one skips the benign-noise measurement
# (test_tolerance.py checks the measurement)
GIVEN_TOLERANCE = {"tolerance": 3e-5}


def _bench_rate(run: str, method: str, attack: str, spec: str, ns: int = 10) -> float:
    with open(RESULTS / run / "detection.csv") as f:
        for row in csv.DictReader(f):
            if (row["method"], row["attack"], row["spec"], int(row["ns"])) == (method, attack, spec, ns):
                return float(row["rate"])
    raise KeyError((run, method, attack, spec, ns))


@pytest.mark.skipif(not (RESULTS / "2026-11-22-cnn" / "results.json").exists(), reason="benchmark results not in this checkout")
def test_shipped_table_is_what_the_benchmark_results_give():
    spec = importlib.util.spec_from_file_location("method_advice", REPO / "bench" / "method_advice.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = (REPO / "src" / "tamperprobe" / "owner" / advice.TABLE).read_text()
    assert shipped == module.render(module.build()), "run python bench/method_advice.py"


@pytest.mark.parametrize("spec, method", [("top1", "crossed"), ("topk:3", "crossed"), ("topk:2", "crossed")])
def test_label_only_apis_get_crossed_pairs(spec, method):
    choice = advice.choose_method(spec)
    assert choice.method == method
    assert choice.reason.startswith(f"{method} for {spec}: the API reveals") and "\n" not in choice.reason
    assert advice.pairing_warning(method, spec) is None


def _routed_rows(spec: str) -> dict[str, advice.Routed]:
    return {r.method: r for r in advice.routed_ranking(spec)}


@pytest.mark.skipif(advice.routed_table() is None, reason="no routed benchmark table")
def test_logits_get_the_method_that_keeps_every_attack_with_every_router():
    """Under logits natural (and 8-bit matched) markers keep >= 99 % detection of every attack on both models with every
    router at 5 % cost; sensitive samples do not (the learned router flags them): the default is natural."""
    rows = _routed_rows("logits")
    assert rows["natural"].holds and rows["natural"].detectable == 13 and rows["matched"].holds
    assert not rows["sensitive"].holds and rows["sensitive"].passive == rows["sensitive"].detectable
    choice = advice.choose_method("logits")
    assert choice.method == "natural" and "kept >= 99 % detection of all 13 detectable attacks" in choice.reason


@pytest.mark.skipif(advice.routed_table() is None, reason="no routed benchmark table")
@pytest.mark.parametrize("spec", ["probs:1", "probs:2", "probs:4", "top1-prob:2", "top1-prob:1"])
def test_rounded_scores_state_the_line_when_no_method_keeps_every_attack(spec):
    """No method measured at its defaults keeps every attack with every router at 5 % under rounded probabilities:
    the choice is the one that keeps the most, and its reason says that no method kept them all, with the numbers."""
    rows = _routed_rows(spec)
    assert not any(r.holds for r in rows.values() if r.method in ("sensitive", "natural", "badv"))
    choice = advice.choose_method(spec)
    chosen = rows[choice.method]
    defaults = [r for r in rows.values() if r.method in ("sensitive", "natural", "badv")]
    assert chosen.kept == max(r.kept for r in defaults)
    assert f"no method kept every attack with every router at 5 % cost; {choice.method} kept {chosen.kept} of {chosen.detectable}" in choice.reason
    assert "without a router" in choice.reason  # what the passive benchmark would have preferred


def test_sensitive_under_top1_warns_with_the_measured_int8_rate():
    text = advice.pairing_warning("sensitive", "top1")
    rate = _bench_rate("2026-11-22-cnn", "sensitive", "int8", "top1")
    assert rate < 0.05
    assert text is not None and f"int8 in {100 * rate:.0f} %" in text and "bench/results/2026-11-22-cnn" in text
    assert "--method crossed" in text
    # an unmeasured spec is judged by the nearest measured one of its kind, and says so
    assert "(measured under topk:5)" in (advice.pairing_warning("sensitive", "topk:9") or "")


def test_library_default_follows_the_spec_and_warns_about_weak_pairs(trained_cnn, digits):
    model = TorchModel(trained_cnn, "cnn")
    given = GIVEN_TOLERANCE
    fp = create_fingerprint(model, digits[0], size=4, bag=8, seed=0, output_spec="top1", params={"rounds": 1}, select="random", **given)
    assert fp.generator["method"] == "crossed"
    fp = create_fingerprint(model, digits[0], size=2, bag=4, seed=0, select="random", **given)
    assert fp.generator["method"] == advice.choose_method("logits").method and fp.output_spec == "logits"
    with pytest.warns(WeakPairingWarning, match="int8 in 3 %"):
        create_fingerprint(
            model, digits[0], method="sensitive", size=2, bag=4, output_spec="top1", params={"steps": 2}, select="random", seed=0, **given
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", WeakPairingWarning)
        create_fingerprint(
            model, digits[0], method="boundary", size=2, bag=4, output_spec="top1", params={"rounds": 1}, select="random", seed=0, **given
        )


def test_cli_says_why_and_warns_once(trained_cnn, digits, tmp_path):
    save_model(trained_cnn, tmp_path / "m.pt", digits[1].x)
    base = [
        "fingerprint",
        str(tmp_path / "m.pt"),
        "--data",
        "digits",
        "--out",
        str(tmp_path / "f.tpf"),
        "--select",
        "random",
        "--no-check",
        "--seed",
        "0",
        "--tolerance",
        str(GIVEN_TOLERANCE["tolerance"]),
    ]
    r = CliRunner().invoke(app, [*base, "--output-spec", "top1", "--size", "4", "--bag", "8", "--param", "rounds=1"])
    assert r.exit_code == 0, r.output
    why = [line for line in r.stdout.splitlines() if line.startswith("method ")]
    assert len(why) == 1 and why[0].startswith("method crossed for top1: the API reveals labels only")
    assert "crossed" in r.stdout.split("wrote", 1)[1]
    r = CliRunner().invoke(app, [*base, "--output-spec", "top1", "--method", "sensitive", "--size", "2", "--bag", "4", "--param", "steps=2"])
    assert r.exit_code == 0, r.output
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "sensitive markers are weak under top1" in warned[0] and "int8 in 3 %" in warned[0]
    assert not any(line.startswith("method ") for line in r.stdout.splitlines())  # the user chose: no reason printed


# ----------------------------------------------------------------------------- score specs under routers


def _routed(rates: dict[str, dict[str, tuple[list, list]]], attacks=("a", "b", "c")) -> dict:
    run = {"model": "m", "attacks": list(attacks), "routers": ["r"]}
    run["rates"] = {spec: {m: {"passive": p, "routed": r} for m, (p, r) in block.items()} for spec, block in rates.items()}
    return {"format": "tamperprobe.benchmark-routed/v1", "queries": 10, "cost": 0.05, "target": 0.99, "runs": {"x": run}}


def test_routed_ranking_counts_only_attacks_some_method_detects_and_the_worst_router():
    data = _routed(
        {
            "logits": {
                "sensitive": ([1.0, 1.0, 0.2], [0.0, 1.0, 0.1]),  # loses "a" to a router
                "matched": ([1.0, 1.0, 0.3], [1.0, 0.995, 0.3]),  # keeps a and b; c is detectable by nobody
                "natural": ([0.5, 1.0, 0.1], [0.5, 1.0, 0.1]),
            }
        }
    )
    ranking = advice.routed_ranking("logits", data)
    # ties on kept go to the method that detects more without a router
    assert [(r.method, r.kept, r.detectable, r.passive) for r in ranking] == [("matched", 2, 2, 2), ("sensitive", 1, 2, 2), ("natural", 1, 2, 1)]
    assert ranking[0].holds and not ranking[1].holds and ranking[1].lowest == 0.0
    assert advice.routed_ranking("probs:3", data) == []  # no spec of its kind measured
    assert [r.spec for r in advice.routed_ranking("logits", data)] == ["logits"] * 3


def test_a_method_without_rows_is_not_strong_by_default():
    """The gap: crossed has no rows in the passive table; it is chosen for labels by an explicit rule, never for scores by it."""
    assert not advice._has_rows("crossed", "probs:1")
    assert advice._has_rows("sensitive", "probs:1")
    assert advice.choose_method("top1").method == "crossed"


@pytest.mark.skipif(
    not (RESULTS / "adaptive-operator" / "mnist-scores" / "adversary.json").exists(), reason="adaptive-operator score results not in this checkout"
)
def test_shipped_routed_table_is_what_the_adaptive_operator_results_give():
    spec = importlib.util.spec_from_file_location("adaptive_operator_scores", REPO / "bench" / "adaptive_operator_scores.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    docs = {name: doc for name in module.SETTINGS if (doc := module.load(name)) is not None}
    built = module.render(module.routed_table(docs, {name: module.summarise(doc) for name, doc in docs.items()}))
    shipped = (REPO / "src" / "tamperprobe" / "owner" / advice.ROUTED).read_text()
    assert shipped == built, "run python bench/adaptive_operator_scores.py"
