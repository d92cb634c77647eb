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


@pytest.mark.parametrize(
    "spec, method", [("top1", "crossed"), ("topk:3", "crossed"), ("topk:2", "crossed"), ("logits", "sensitive"), ("probs:2", "sensitive")]
)
def test_label_only_apis_get_crossed_pairs_and_score_apis_sensitive_samples(spec, method):
    choice = advice.choose_method(spec)
    assert choice.method == method
    assert choice.reason.startswith(f"{method} for {spec}: the API reveals") and "\n" not in choice.reason
    assert advice.pairing_warning(method, spec) is None


def test_a_label_and_one_rounded_probability_gets_crossed_pairs_as_measured():
    """top1-prob:2 reveals a probability, but the benchmark shows sensitive weak there (fp16 on the MLP)."""
    choice = advice.choose_method("top1-prob:2")
    rate = _bench_rate("2026-11-22-mlp", "sensitive", "fp16", "top1-prob:2")
    assert choice.method == "crossed" and f"detected fp16 in only {100 * rate:.0f} %" in choice.reason


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
    fp = create_fingerprint(model, digits[0], size=4, bag=8, seed=0, output_spec="top1", params={"rounds": 1}, select="random")
    assert fp.generator["method"] == "crossed"
    fp = create_fingerprint(model, digits[0], size=2, bag=4, seed=0, select="random", params={"steps": 2})
    assert fp.generator["method"] == "sensitive" and fp.output_spec == "logits"
    with pytest.warns(WeakPairingWarning, match="int8 in 3 %"):
        create_fingerprint(model, digits[0], method="sensitive", size=2, bag=4, output_spec="top1", params={"steps": 2}, select="random", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", WeakPairingWarning)
        create_fingerprint(model, digits[0], method="boundary", size=2, bag=4, output_spec="top1", params={"rounds": 1}, select="random", seed=0)


def test_cli_says_why_and_warns_once(trained_cnn, digits, tmp_path):
    save_model(trained_cnn, tmp_path / "m.pt", digits[1].x)
    base = ["fingerprint", str(tmp_path / "m.pt"), "--data", "digits", "--out", str(tmp_path / "f.tpf"), "--select", "random", "--no-check"]
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
