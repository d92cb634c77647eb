"""Runtime noise floor: measure, store, derive δ, refuse a δ below it; the calibrate command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tamperprobe.errors import UsageError
from tamperprobe.models import TorchModel, save_model
from tamperprobe.owner import calibrate as cal


@pytest.fixture(scope="module")
def model(trained_cnn):
    return TorchModel(trained_cnn, "tests:cnn")


@pytest.fixture(scope="module")
def report(model, digits):
    return cal.measure_noise(model, digits[1].x[:128])


def test_measures_a_nonzero_noise_floor(report, model):
    assert set(report.runtimes) | set(report.skipped) == set(cal.DEFAULT_RUNTIMES)
    assert {"batch1", "batch64", "threads1", "threads2"} <= set(report.runtimes)
    assert "onnx" in report.runtimes and "torchscript" in report.runtimes, report.skipped
    # benign runtimes differ by float rounding only: never a label change, never more than 1e-3
    assert all(r.label_changes == 0 and 0.0 <= r.max_abs < 1e-3 for r in report.runtimes.values())
    # on this CPU at least one runtime (batch size 1 against 64, or ONNX Runtime) differs from the reference
    assert max(r.max_abs for r in report.runtimes.values()) > 0
    assert report.floor >= report.measured > 0
    assert report.model_digest == model.digest()
    assert report.samples == 128


def test_delta_from_noise_and_check_delta(report):
    floor = report.floor
    assert cal.delta_from_noise(report) == pytest.approx(10.0 * floor)
    assert cal.delta_from_noise(report, 1.0) == pytest.approx(floor)
    assert cal.delta_from_noise(2e-6, safety=5) == pytest.approx(1e-5)
    cal.check_delta(cal.delta_from_noise(report), report)
    cal.check_delta(1e-4, report)
    for bad in (floor / 2, floor, 0.0, -1.0, float("nan")):
        with pytest.raises(UsageError) as exc:
            cal.check_delta(bad, report)
        assert "\n" not in str(exc.value)
    with pytest.raises(UsageError):
        cal.delta_from_noise(report, 0.0)


def test_zero_measured_noise_still_gives_a_positive_floor():
    r = cal.NoiseReport("sha256:x", "m", 4, logit_scale=10.0, runtimes={"batch1": cal.RuntimeNoise(0.0, 0.0, 0)})
    assert r.measured == 0.0 and r.floor == pytest.approx(10.0 * np.finfo(np.float32).eps)
    with pytest.raises(UsageError):
        cal.check_delta(1e-7, r)


def test_save_and_load(report, tmp_path):
    path = cal.save_noise(report, tmp_path / "m.noise.json")
    back = cal.load_noise(path)
    assert back == report
    assert json.loads(path.read_text())["format"] == cal.FORMAT
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError):
        cal.load_noise(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something/v1"}))
    with pytest.raises(UsageError):
        cal.load_noise(tmp_path / "other.json")
    with pytest.raises(UsageError):
        cal.load_noise(tmp_path / "missing.json")


def test_runtime_names():
    assert cal.parse_runtimes(["batch1,onnx", "threads3", "batch1"]) == ("batch1", "onnx", "threads3")
    for bad in (["gpu"], ["batch0"], [""]):
        with pytest.raises(UsageError):
            cal.parse_runtimes(bad)


def test_runtime_logits_runs_every_runtime(model, digits, tmp_path):
    x = digits[1].x[:40]
    ref = model.logits(x, batch_size=64)
    for name in ("batch1", "batch7", "threads1", "threads2", "torchscript", "export", "onnx"):
        z = cal.runtime_logits(model, name, x, tmp_path)
        assert z.shape == ref.shape and z.dtype == np.float32, name
        np.testing.assert_allclose(z, ref, atol=1e-4, err_msg=name)
        assert (z.argmax(1) == ref.argmax(1)).all(), name
    with pytest.raises(UsageError):
        cal.runtime_logits(model, "onnxruntime", x, tmp_path)  # one name per runtime: onnx


def test_noise_settings_set_delta_and_tolerance(report):
    floor = report.floor
    params, tol = cal.noise_settings(report, "boundary", {}, 3e-5)
    assert tol == max(3e-5, 2 * floor)
    assert params == {"delta": max(10 * floor, 2 * tol)}
    given = {"delta": "1e-3"}
    params, _ = cal.noise_settings(report, "boundary", given, 3e-5)
    assert params == given == {"delta": "1e-3"}  # a given delta above the floor is kept; the input is not modified
    with pytest.raises(UsageError, match="noise floor"):
        cal.noise_settings(report, "boundary", {"delta": floor / 2}, 3e-5)
    with pytest.raises(UsageError, match="tolerance"):
        cal.noise_settings(report, "boundary", {"delta": 1e-3}, 1.0)
    params, tol = cal.noise_settings(report, "natural", {"replace": "true"}, 0.0)
    assert params == {"replace": "true"} and tol == 2 * floor


def test_measure_noise_draws_samples(model, digits):
    r = cal.measure_noise(model, digits[1].x, ["batch1"], samples=10, seed=3)
    assert r.samples == 10 and set(r.runtimes) == {"batch1"}
    assert cal.measure_noise(model, digits[1].x[:5], ["batch1"], samples=10).samples == 5
    with pytest.raises(UsageError):
        cal.measure_noise(model, digits[1].x, ["batch1"], samples=0)


def test_onnx_model_without_torch_module_skips_export(model, digits, tmp_path):
    path = save_model(model.module, tmp_path / "m.onnx", digits[1].x[:2])
    from tamperprobe.models import load_model

    r = cal.measure_noise(load_model(path), digits[1].x[:32], ["batch1", "onnx"])
    assert "batch1" in r.runtimes and "onnx" in r.skipped


def test_calibrate_command(model, digits, tmp_path):
    from tamperprobe.cli.app import app

    path = save_model(model.module, tmp_path / "cnn.pt", digits[1].x[:2])
    runner = CliRunner()
    res = runner.invoke(app, ["calibrate", str(path), "--data", "digits", "--samples", "64", "--runtimes", "batch1,batch7", "--runtimes", "threads1"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "cnn.pt.noise.json"
    assert out.exists() and "noise floor" in res.output
    rep = cal.load_noise(out)
    assert set(rep.runtimes) == {"batch1", "batch7", "threads1"} and rep.samples == 64
    res = runner.invoke(app, ["calibrate", str(path), "--data", "digits", "--runtimes", "gpu"])
    assert res.exit_code == 2
    # the fingerprint command refuses a boundary delta below the measured floor
    res = runner.invoke(
        app,
        [
            "fingerprint",
            str(path),
            "--data",
            "digits",
            "--out",
            str(tmp_path / "fp"),
            "--method",
            "boundary",
            "--noise",
            str(out),
            "--param",
            "delta=1e-9",
            "--size",
            "4",
            "--bag",
            "8",
        ],
    )
    assert res.exit_code == 2
    assert "noise floor" in res.output and "noise floor" in res.stderr and len(res.stderr.strip().splitlines()) == 1
