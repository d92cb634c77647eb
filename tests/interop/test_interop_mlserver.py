"""Interoperability with MLServer (Open Inference Protocol), a real server installed from the registry.

One MLServer process (``mlserver start``) serves, with the custom runtime ``runtimes/tp_mlserver.py``,
the intact model and two tampered copies under every output spec (model ``VARIANT-SPEC``), plus one
model that declares no input metadata. Then:

* the ``kserve`` client reads INTACT on the intact model and TAMPERED on the tampered ones, under each spec;
* the ``json`` client does the same through a template for MLServer's ``/v2/models/NAME/infer``, and
  through a template for a custom REST endpoint of the runtime (MLServer's ``custom_handler``);
* the CLI (``tamperprobe verify FP --endpoint ... --protocol kserve``) exits 0 and 1.

Run by ``scripts/interop-setup.sh`` (marker ``interop``); skipped where MLServer is not installed.
"""

from __future__ import annotations

import json
import subprocess

import pytest

pytest.importorskip("mlserver", reason="MLServer is not installed here: scripts/interop-setup.sh sets up an environment with it")

from _interop import (  # noqa: E402
    CLIENT,
    SPECS,
    VARIANTS,
    ServerProcess,
    cases,
    expected,
    free_port,
    model_name,
    named_paths,
    oip_template,
    python_cli,
    runtime_module,
    start_with_retry,
)

from tamperprobe.served.clients import make_client  # noqa: E402
from tamperprobe.served.verify import INTACT, TAMPERED, verify  # noqa: E402

pytestmark = pytest.mark.interop

BARE = "bare-logits"  # a model whose settings declare no inputs or outputs


def _write_repository(root, assets) -> None:
    shape = assets.input_shape
    models = [(model_name(v, s), v, s, True) for s in SPECS for v in VARIANTS] + [(BARE, "intact", "logits", False)]
    for name, variant, spec, declare in models:
        settings: dict = {
            "name": name,
            "implementation": "tp_mlserver.TorchScriptClassifier",
            "parameters": {"extra": {"model_path": str(assets.models[variant]), "output_spec": spec, "input_shape": shape}},
        }
        if declare:
            settings["inputs"] = [{"name": "input", "datatype": "FP32", "shape": [-1, *shape]}]
            settings["outputs"] = runtime_module("tp_outputs").output_metadata(spec, assets.fp.classes)
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "model-settings.json").write_text(json.dumps(settings, indent=1))


@pytest.fixture(scope="module")
def mlserver(interop_assets, tmp_path_factory):
    import sys
    from pathlib import Path

    root = tmp_path_factory.mktemp("mlserver")
    repo = root / "models"
    _write_repository(repo, interop_assets)
    exe = Path(sys.executable).with_name("mlserver")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from mlserver.cli import main; main()"]

    def make() -> ServerProcess:
        http, grpc = free_port(), free_port()
        settings = {
            "host": "127.0.0.1",
            "http_port": http,
            "grpc_port": grpc,
            "metrics_endpoint": None,  # no metrics server (its own port)
            "parallel_workers": 0,  # models in the server process: no worker pool to start or leave behind
            "debug": False,
            "model_repository_root": str(repo),
        }
        (repo / "settings.json").write_text(json.dumps(settings))
        return ServerProcess([*cmd, "start", str(repo)], cwd=root, log=root / "mlserver.log", ready_url=f"http://127.0.0.1:{http}/v2/health/ready")

    server = start_with_retry(make)
    try:
        yield server
    finally:
        server.stop()
    assert server.proc is not None and server.proc.poll() is not None, "MLServer is still running"


def _url(server: ServerProcess) -> str:
    return server.ready_url.split("/v2/")[0]


def test_server_version_and_models_ready(mlserver, record_testsuite_property):
    import httpx

    record_testsuite_property("mlserver_startup_seconds", round(mlserver.startup_seconds or 0, 2))  # into the JUnit XML

    doc = httpx.get(f"{_url(mlserver)}/v2", timeout=5).json()
    assert doc["name"] == "mlserver" and doc["version"]
    for spec in SPECS:
        for variant in VARIANTS:
            assert httpx.get(f"{_url(mlserver)}/v2/models/{model_name(variant, spec)}/ready", timeout=5).status_code == 200


@pytest.mark.parametrize(("spec", "variant"), cases())
def test_kserve_client(mlserver, interop_assets, spec, variant):
    fp = interop_assets.fp
    client = make_client("kserve", _url(mlserver), model_name=model_name(variant, spec), classes=fp.classes, **CLIENT)
    report = verify(fp, client, spec)
    assert report.verdict == expected(variant), report.summary()


@pytest.mark.parametrize("spec", SPECS)
def test_kserve_client_reduces_served_logits(mlserver, interop_assets, spec):
    """A server that reveals logits answers every weaker spec (batched requests this time)."""
    fp = interop_assets.fp
    for variant in VARIANTS:
        client = make_client("kserve", _url(mlserver), model_name=model_name(variant, "logits"), batch_size=4, **CLIENT)
        report = verify(fp, client, spec)
        assert report.verdict == expected(variant), f"{variant}: {report.summary()}"


@pytest.mark.parametrize(("spec", "variant"), cases())
def test_json_client_on_infer_endpoint(mlserver, interop_assets, spec, variant):
    fp = interop_assets.fp
    template = oip_template(f"/v2/models/{model_name(variant, spec)}/infer", spec, interop_assets.input_shape)
    client = make_client("json", _url(mlserver), template=template, classes=fp.classes, **CLIENT)
    report = verify(fp, client, spec)
    assert report.verdict == expected(variant), report.summary()


@pytest.mark.parametrize(("spec", "variant"), cases())
def test_json_client_on_custom_endpoint(mlserver, interop_assets, spec, variant):
    fp = interop_assets.fp
    template = {
        "path": f"/tp/{model_name(variant, spec)}/predict",
        "request": {"image": "{{input}}"},
        "response": named_paths(spec, "result"),
    }
    client = make_client("json", _url(mlserver), template=template, classes=fp.classes, **CLIENT)
    report = verify(fp, client, spec)
    assert report.verdict == expected(variant), report.summary()


def test_metadata_of_a_model_without_declared_inputs(mlserver):
    """MLServer answers the metadata of a model whose settings declare no inputs with ``"inputs": []``."""
    import httpx

    meta = httpx.get(f"{_url(mlserver)}/v2/models/{BARE}", timeout=5).json()
    assert meta["name"] == BARE and meta.get("inputs", []) == [] and meta.get("outputs", []) == []


def test_kserve_client_without_declared_metadata(mlserver, interop_assets):
    fp = interop_assets.fp
    report = verify(fp, make_client("kserve", _url(mlserver), model_name=BARE, **CLIENT), "logits")
    assert report.verdict == INTACT, report.summary()


def test_kserve_client_without_model_name_lists_the_models(mlserver, interop_assets):
    """Without a model name the client asks MLServer's repository index, finds many models and asks for one."""
    report = verify(interop_assets.fp, make_client("kserve", _url(mlserver), **CLIENT), "logits")
    assert report.verdict == "INCONCLUSIVE" and "give --model-name" in report.summary(), report.summary()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*python_cli(), *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_cli_verify_exit_codes(mlserver, interop_assets):
    base = ["verify", str(interop_assets.fp_path), "--endpoint", _url(mlserver), "--protocol", "kserve", "--timeout", "10", "--retries", "1"]
    base.append("--allow-repeat")  # three runs of one 8-marker pool: protocol checks, not pooling
    ok = _cli(*base, "--model-name", model_name("intact", "top1"), "--output-spec", "top1")
    assert ok.returncode == 0 and "INTACT" in ok.stdout, ok.stdout + ok.stderr
    bad = _cli(*base, "--model-name", model_name("noise", "probs:4"), "--output-spec", "probs:4", "--json")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert json.loads(bad.stdout)["verdict"] == TAMPERED
    # a model URL as the endpoint names the model; the protocol's alias "mlserver" is accepted
    url = f"{_url(mlserver)}/v2/models/{model_name('fp16', 'logits')}"
    fp16 = _cli("verify", str(interop_assets.fp_path), "--endpoint", url, "--protocol", "mlserver", "--output-spec", "logits", "--allow-repeat")
    assert fp16.returncode == 1 and "TAMPERED" in fp16.stdout, fp16.stdout + fp16.stderr
