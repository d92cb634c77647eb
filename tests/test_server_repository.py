"""``tamperprobe serve --model-repository DIR`` (issue 19, item 5): many models from one process.

A ``serve`` process of its own (forked from the test's: ``tests/_procs.py``) on 127.0.0.1 serves a repository of several models (TorchScript, ONNX,
two byte-identical files under two names, a tampered copy, one never asked for); each answers at
its own URL with the logits of its own file, an ordinary KServe v2 client (tritonclient) finds and
queries them, models load on first use and identical files share one loaded instance.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _procs import Forked, cli_main
from tamperprobe import zoo
from tamperprobe.cli.app import app
from tamperprobe.errors import UsageError
from tamperprobe.models import load_model, save_model
from tamperprobe.server.repository import Repository, read_config

SHAPE = (1, 8, 8)
HTTP = httpx.Client(timeout=5, limits=httpx.Limits(max_keepalive_connections=0))  # one TLS context for the module, not one per request


def _module(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return zoo.build("mlp", SHAPE).eval()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("repo")
    x = np.zeros((2, *SHAPE), np.float32)
    original = _module(0)
    save_model(original, d / "digits" / "model.pt", x)
    (d / "digits" / "config.toml").write_text('output_spec = "logits"\ninput_shape = [1, 8, 8]\nmax_batch = 8\n')
    shutil.copytree(d / "digits", d / "digits-eu")  # the same bytes under a second name
    (d / "digits-eu" / "config.toml").write_text('output_spec = "top1"\ninput_shape = [1, 8, 8]\n')
    tampered = _module(0)
    with torch.no_grad():
        tampered.net[-1].bias.add_(0.5)
    save_model(tampered, d / "digits-tampered" / "model.pt", x)
    (d / "digits-tampered" / "config.toml").write_text("input_shape = [1, 8, 8]\n")
    save_model(_module(1), d / "onnx-model" / "model.onnx", x)  # its input shape comes from the file
    save_model(_module(2), d / "never-asked" / "model.pt", x)
    (d / "never-asked" / "config.toml").write_text("input_shape = [1, 8, 8]\n")
    return d


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("log") / "serve.log"
    args = ["serve", "--model-repository", str(repo), "--port", str(port), "--output-spec", "logits"]
    proc = Forked(cli_main, *args, log=log, env=dict(os.environ, OMP_NUM_THREADS="1"))  # a process of its own, forked from this one
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if HTTP.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, log.read_text()
            time.sleep(0.02)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _infer(url: str, name: str, x: np.ndarray) -> dict:
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = HTTP.post(f"{url}/v2/models/{name}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}


def test_startup_line_reports_the_models_and_memory_and_loads_none(server):
    url, log = server
    text = log.read_text()
    assert "serving 5 models from" in text and "0 loaded, the others on first use" in text and "MiB" in text
    index = HTTP.post(f"{url}/v2/repository/index", timeout=10).json()
    assert sorted(e["name"] for e in index) == ["digits", "digits-eu", "digits-tampered", "never-asked", "onnx-model"]


def test_each_model_answers_at_its_own_url_with_its_own_file(server, repo):
    url, _ = server
    x = np.random.default_rng(0).random((3, *SHAPE)).astype(np.float32)
    for name in ("digits", "digits-tampered", "onnx-model"):
        path = next(p for p in (repo / name).iterdir() if p.name.startswith("model."))
        expected = load_model(path).logits(x)
        got = _infer(url, name, x)["logits"]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    original, tampered = _infer(url, "digits", x)["logits"], _infer(url, "digits-tampered", x)["logits"]
    assert not np.allclose(original, tampered)  # the tampered model is served as itself, not as the original
    labels = _infer(url, "digits-eu", x)["label"]  # the same file under its own config: top1
    assert labels.ravel().tolist() == original.argmax(1).tolist()


def test_identical_files_share_one_loaded_instance_and_unused_models_stay_unloaded(server):
    url, log = server
    x = np.zeros((1, *SHAPE), np.float32)
    _infer(url, "digits", x)
    _infer(url, "digits-eu", x)
    text = log.read_text()
    assert "model 'digits': loaded model.pt" in text
    assert "model 'digits-eu'" not in text  # the same bytes: no second load
    states = {e["name"]: e for e in HTTP.post(f"{url}/v2/repository/index", timeout=10).json()}
    assert states["digits"]["state"] == states["digits-eu"]["state"] == "READY"
    assert states["never-asked"]["state"] == "UNAVAILABLE" and "not loaded" in states["never-asked"]["reason"]


def test_config_limits_and_unknown_names(server):
    url, _ = server
    x = np.zeros((9, *SHAPE), np.float32)  # digits has max_batch 8
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    assert HTTP.post(f"{url}/v2/models/digits/infer", json=body, timeout=10).status_code == 400
    assert HTTP.post(f"{url}/v2/models/digits-tampered/infer", json=body, timeout=10).status_code == 200  # the default, 64
    assert HTTP.post(f"{url}/v2/models/nope/infer", json=body, timeout=10).status_code == 404
    assert HTTP.get(f"{url}/v2/models/nope", timeout=10).status_code == 404
    meta = HTTP.get(f"{url}/v2/models/digits-eu", timeout=10).json()
    assert meta["name"] == "digits-eu" and [o["name"] for o in meta["outputs"]] == ["label"]


def test_an_ordinary_kserve_v2_client_finds_and_queries_each_model(server, repo):
    import tritonclient.http as tc

    url, _ = server
    client = tc.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_ready()
    names = {m["name"] for m in client.get_model_repository_index()}
    assert {"digits", "onnx-model"} <= names
    x = np.random.default_rng(1).random((2, *SHAPE)).astype(np.float32)
    for name in ("digits", "onnx-model"):
        assert client.is_model_ready(name)
        meta = client.get_model_metadata(name)
        assert meta["inputs"][0]["shape"] == [-1, *SHAPE]
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = client.infer(name, [inp]).as_numpy("logits")
        path = next(p for p in (repo / name).iterdir() if p.name.startswith("model."))
        np.testing.assert_allclose(got, load_model(path).logits(x), rtol=1e-5, atol=1e-6)
    client.unload_model("digits")
    assert {m["name"]: m["state"] for m in client.get_model_repository_index()}["digits"] == "UNAVAILABLE"
    client.load_model("digits")
    assert client.is_model_ready("digits")
    client.close()


# --------------------------------------------------------------------------- bad repositories: one line, exit 2


@pytest.mark.parametrize(
    "config, message",
    [
        ('output_spec = "logits"\ncolour = "red"\n', "unknown key 'colour'"),
        ("max_batch = 0\n", "bad max_batch 0"),
        ('input_shape = "1,8,8"\n', "bad input_shape"),
        ('output_spec = "bogus"\n', "bad output_spec"),
        ("output_spec = \n", "not valid TOML"),
    ],
)
def test_a_bad_config_is_one_line_naming_file_and_key_exit_2(tmp_path, config, message):
    save_model(_module(0), tmp_path / "m" / "model.pt", np.zeros((2, *SHAPE), np.float32))
    (tmp_path / "m" / "config.toml").write_text(config)
    result = CliRunner().invoke(app, ["serve", "--model-repository", str(tmp_path), "--port", "0"])
    assert result.exit_code == 2, result.output
    out = result.output.strip()
    assert len(out.splitlines()) == 1 and message in out and "config.toml" in out, out


@pytest.mark.parametrize("layout", ["empty", "no-model", "two-models", "bad-name"])
def test_a_repository_that_breaks_the_layout_is_refused(tmp_path, layout):
    x = np.zeros((2, *SHAPE), np.float32)
    if layout == "no-model":
        (tmp_path / "m").mkdir()
    elif layout == "two-models":
        save_model(_module(0), tmp_path / "m" / "model.pt", x)
        (tmp_path / "m" / "model.onnx").write_bytes(b"x")
    elif layout == "bad-name":
        save_model(_module(0), tmp_path / "-m" / "model.pt", x)
    result = CliRunner().invoke(app, ["serve", "--model-repository", str(tmp_path), "--port", "0"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output


def test_eager_loading_fails_at_start_on_a_broken_model(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.pt").write_bytes(b"not a model")
    (tmp_path / "broken" / "config.toml").write_text("input_shape = [1, 8, 8]\n")
    result = CliRunner().invoke(app, ["serve", "--model-repository", str(tmp_path), "--eager", "--port", "0"])
    assert result.exit_code == 2 and "broken" in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_a_model_argument_and_a_repository_exclude_each_other(tmp_path):
    result = CliRunner().invoke(app, ["serve", "m.pt", "--model-repository", str(tmp_path)])
    assert result.exit_code == 2 and "one of them" in result.output
    result = CliRunner().invoke(app, ["serve", "--eager", "m.pt"])
    assert result.exit_code == 2 and "--model-repository" in result.output


def test_many_names_of_one_file_hold_one_model(tmp_path):
    """What the fleet benchmark needs: 300 names, 2 distinct files -> 2 loaded models, and nothing loaded before use."""
    x = np.zeros((2, *SHAPE), np.float32)
    save_model(_module(0), tmp_path / "a-0" / "model.pt", x)
    save_model(_module(1), tmp_path / "b-0" / "model.pt", x)
    for i in range(1, 150):
        shutil.copytree(tmp_path / "a-0", tmp_path / f"a-{i}")
        shutil.copytree(tmp_path / "b-0", tmp_path / f"b-{i}")
    repo = Repository(tmp_path, input_shape=SHAPE)
    assert len(repo.names()) == 300 and all(repo.loaded(n) is None for n in repo.names())
    served = [repo.get(n) for n in repo.names()]
    assert len({id(s.holder.model) for s in served}) == 2
    assert {repo.get("a-7").holder.model.logits(x[:1]).tobytes()} == {repo.get(f"a-{i}").holder.model.logits(x[:1]).tobytes() for i in range(150)}


def test_read_config_accepts_the_known_keys(tmp_path):
    p = tmp_path / "config.toml"
    p.write_text('output_spec = "topk:3"\ninput_shape = [3, 32, 32]\nmax_batch = 4\n')
    cfg = read_config(p)
    assert str(cfg["output_spec"]) == "topk:3" and cfg["input_shape"] == (3, 32, 32) and cfg["max_batch"] == 4
    p.write_text("max_batch = true\n")
    with pytest.raises(UsageError, match="max_batch"):
        read_config(p)
