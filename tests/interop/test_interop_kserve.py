"""Interoperability with the KServe Python model server (v1 and v2 protocols), installed from the registry.

One ``kserve.ModelServer`` process (``runtimes/tp_kserve.py``: a ``kserve.Model`` subclass) serves the
intact model and two tampered copies under every output spec (model ``VARIANT-SPEC``), plus one model
that keeps KServe's default (empty) metadata. Then, under each spec:

* v2 (``/v2/models/NAME/infer``): the ``kserve`` client reads INTACT on the intact model, TAMPERED on the
  tampered ones;
* v1 (``/v1/models/NAME:predict``): the ``tfserving`` client does the same, and the ``json`` client with a
  batched template (``{"instances": ...}`` -> ``predictions``);
* the CLI (``tamperprobe verify FP --endpoint ... --protocol kserve`` and ``--protocol tfserving``)
  exits 0 and 1.

Run by ``scripts/interop-setup.sh`` (marker ``interop``); skipped where KServe is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("kserve", reason="KServe is not installed here: scripts/interop-setup.sh sets up an environment with it")

from _interop import (  # noqa: E402
    CLIENT,
    RUNTIMES,
    SPECS,
    VARIANTS,
    ServerProcess,
    cases,
    expected,
    free_port,
    model_name,
    named_paths,
    python_cli,
    start_with_retry,
)

from tamperprobe.served.clients import make_client  # noqa: E402
from tamperprobe.served.verify import INTACT, TAMPERED, verify  # noqa: E402

pytestmark = pytest.mark.interop

BARE = "bare-logits"  # a model that keeps KServe's default metadata (no inputs, no outputs)
TF_TOPK = "tf-topk-3"  # v1 predictions as a TensorFlow top_k model answers: {"classes": [3 labels], "scores": [3 probabilities]}


@pytest.fixture(scope="module")
def kserve_server(interop_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("kserve")
    models = [
        {
            "name": model_name(variant, spec),
            "model_path": str(interop_assets.models[variant]),
            "output_spec": spec,
            "input_shape": interop_assets.input_shape,
            "classes": interop_assets.fp.classes,
        }
        for spec in SPECS
        for variant in VARIANTS
    ]
    intact = {**models[0], "model_path": str(interop_assets.models["intact"])}
    models.append({**intact, "name": BARE, "output_spec": "logits", "declare_metadata": False})
    models.append({**intact, "name": TF_TOPK, "output_spec": "topk:3", "v1_layout": "tf"})

    def make() -> ServerProcess:
        port = free_port()
        config = root / "config.json"
        config.write_text(json.dumps({"http_port": port, "models": models}, indent=1))
        cmd = [sys.executable, str(RUNTIMES / "tp_kserve.py"), str(config)]
        return ServerProcess(cmd, cwd=root, log=root / "kserve.log", ready_url=f"http://127.0.0.1:{port}/v2/health/ready")

    server = start_with_retry(make)
    try:
        yield server
    finally:
        server.stop()
    assert server.proc is not None and server.proc.poll() is not None, "the KServe model server is still running"


def _url(server: ServerProcess) -> str:
    return server.ready_url.split("/v2/")[0]


def test_server_answers_both_protocols(kserve_server, record_testsuite_property):
    import httpx

    record_testsuite_property("kserve_startup_seconds", round(kserve_server.startup_seconds or 0, 2))  # into the JUnit XML

    url = _url(kserve_server)
    assert httpx.get(f"{url}/v2", timeout=5).json()["name"] == "kserve"
    names = httpx.get(f"{url}/v1/models", timeout=5).json()["models"]
    assert {model_name(v, s) for s in SPECS for v in VARIANTS} <= set(names)
    for spec in SPECS:
        assert httpx.get(f"{url}/v2/models/{model_name('intact', spec)}/ready", timeout=5).status_code == 200


@pytest.mark.parametrize(("spec", "variant"), cases())
def test_v2_kserve_client(kserve_server, interop_assets, spec, variant):
    fp = interop_assets.fp
    client = make_client("kserve", _url(kserve_server), model_name=model_name(variant, spec), classes=fp.classes, **CLIENT)
    report = verify(fp, client, spec)
    assert report.verdict == expected(variant), report.summary()


@pytest.mark.parametrize(("spec", "variant"), cases())
def test_v1_tfserving_client(kserve_server, interop_assets, spec, variant):
    fp = interop_assets.fp
    client = make_client("tfserving", _url(kserve_server), model_name=model_name(variant, spec), classes=fp.classes, **CLIENT)
    report = verify(fp, client, spec)
    assert report.verdict == expected(variant), report.summary()


@pytest.mark.parametrize(("spec", "variant"), cases())
def test_v1_json_client_batched(kserve_server, interop_assets, spec, variant):
    fp = interop_assets.fp
    template = {
        "path": f"/v1/models/{model_name(variant, spec)}:predict",
        "request": {"instances": "{{inputs}}"},
        "batch": "predictions",
        # top1 predictions are plain labels and probs:N plain probability lists (tp_outputs.v1_prediction)
        "response": {"top1": {"labels": "$"}, "probs": {"scores": "$", "scores_kind": "probs"}}.get(spec.partition(":")[0]) or named_paths(spec, "$"),
    }
    client = make_client("json", _url(kserve_server), template=template, classes=fp.classes, **{**CLIENT, "batch_size": 3})
    report = verify(fp, client, spec)
    assert report.verdict == expected(variant), report.summary()


@pytest.mark.parametrize("protocol", ["kserve", "tfserving"])
def test_batched_requests_reduce_served_logits(kserve_server, interop_assets, protocol):
    """Several markers a request, and a server that reveals logits answering every weaker spec."""
    fp = interop_assets.fp
    for spec in SPECS:
        for variant in VARIANTS:
            client = make_client(protocol, _url(kserve_server), model_name=model_name(variant, "logits"), batch_size=4, **CLIENT)
            report = verify(fp, client, spec)
            assert report.verdict == expected(variant), f"{spec} {variant}: {report.summary()}"


def test_metadata_of_a_model_with_default_types(kserve_server):
    """KServe answers the metadata of a model that does not override get_input_types with ``"inputs": []``."""
    import httpx

    meta = httpx.get(f"{_url(kserve_server)}/v2/models/{BARE}", timeout=5).json()
    assert meta["name"] == BARE and meta.get("inputs", []) == [] and meta.get("outputs", []) == []


def test_v2_kserve_client_with_default_metadata(kserve_server, interop_assets):
    report = verify(interop_assets.fp, make_client("kserve", _url(kserve_server), model_name=BARE, **CLIENT), "logits")
    assert report.verdict == INTACT, report.summary()


def test_v1_tfserving_client_with_default_metadata(kserve_server, interop_assets):
    """v1 reads no metadata: the same model verifies over v1."""
    report = verify(interop_assets.fp, make_client("tfserving", _url(kserve_server), model_name=BARE, **CLIENT), "logits")
    assert report.verdict == INTACT, report.summary()


def test_v1_tfserving_client_tensorflow_topk_layout(kserve_server, interop_assets):
    fp = interop_assets.fp
    report = verify(fp, make_client("tfserving", _url(kserve_server), model_name=TF_TOPK, classes=fp.classes, **CLIENT), "topk:3")
    assert report.verdict == INTACT, report.summary()


def test_v1_tensorflow_topk_layout_without_class_count(kserve_server, interop_assets):
    """The same answers verify when the client is not told the class count (``tamperprobe verify`` always tells it)."""
    fp = interop_assets.fp
    report = verify(fp, make_client("tfserving", _url(kserve_server), model_name=TF_TOPK, **CLIENT), "topk:3")
    assert report.verdict == INTACT, report.summary()


def test_v2_kserve_client_without_model_name(kserve_server, interop_assets):
    """KServe has no repository index (404): the client tries the model "model", which KServe does not serve."""
    report = verify(interop_assets.fp, make_client("kserve", _url(kserve_server), **CLIENT), "logits")
    assert report.verdict == "INCONCLUSIVE" and "HTTP 404" in report.summary(), report.summary()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*python_cli(), *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_cli_verify_exit_codes(kserve_server, interop_assets):
    fp, url = str(interop_assets.fp_path), _url(kserve_server)
    common = ["--timeout", "10", "--retries", "1", "--allow-repeat"]  # four runs of one 8-marker pool: protocol checks, not pooling
    ok = _cli(
        "verify", fp, "--endpoint", url, "--protocol", "kserve", "--model-name", model_name("intact", "topk:3"), "--output-spec", "topk:3", *common
    )
    assert ok.returncode == 0 and "INTACT" in ok.stdout, ok.stdout + ok.stderr
    bad = _cli(
        "verify",
        fp,
        "--endpoint",
        url,
        "--protocol",
        "kserve",
        "--model-name",
        model_name("fp16", "top1"),
        "--output-spec",
        "top1",
        "--json",
        *common,
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert json.loads(bad.stdout)["verdict"] == TAMPERED
    # v1: a model URL as the endpoint names the model
    v1 = f"{url}/v1/models/{model_name('intact', 'top1-prob:4')}:predict"
    ok1 = _cli("verify", fp, "--endpoint", v1, "--protocol", "tfserving", "--output-spec", "top1-prob:4", *common)
    assert ok1.returncode == 0 and "INTACT" in ok1.stdout, ok1.stdout + ok1.stderr
    v1bad = f"{url}/v1/models/{model_name('noise', 'top1-prob:4')}:predict"
    bad1 = _cli("verify", fp, "--endpoint", v1bad, "--protocol", "kserve-v1", "--output-spec", "top1-prob:4", *common)
    assert bad1.returncode == 1 and "TAMPERED" in bad1.stdout, bad1.stdout + bad1.stderr
