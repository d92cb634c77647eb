"""The Open Inference Protocol server, checked over real HTTP with the official tritonclient and raw requests."""

from __future__ import annotations

import json
import socket

import httpx
import numpy as np
import pytest
import torch

from tamperprobe import zoo
from tamperprobe.errors import ModelLoadError, UsageError
from tamperprobe.models import TorchModel, load_model, save_model
from tamperprobe.outputs import OutputSpec
from tamperprobe.server.app import ServerThread
from tamperprobe.server.holder import infer_input_spec

SHAPE = (1, 8, 8)
HTTP = httpx.Client(timeout=10)  # one client: no TLS context set up per request


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    torch.manual_seed(0)
    module = zoo.build("mlp", SHAPE)
    with torch.no_grad():
        module.net[-1].weight.mul_(20.0)  # spread the logits so rankings are clear
    d = tmp_path_factory.mktemp("models")
    x = np.random.default_rng(0).random((4, *SHAPE)).astype(np.float32)
    return {"pt": save_model(module, d / "m.pt", x), "onnx": save_model(module, d / "m.onnx", x), "module": module}


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).random((5, *SHAPE)).astype(np.float32)


def _local(path, x):
    m = load_model(path)
    return np.concatenate([m.logits(x[i : i + 1]) for i in range(len(x))])


@pytest.mark.parametrize("kind", ["pt", "onnx"])
def test_tritonclient_conformance(model_files, x, kind):
    import tritonclient.http as th

    path = model_files[kind]
    want = _local(path, x)
    with ServerThread(path, name="digits", input_shape=SHAPE) as srv:
        c = th.InferenceServerClient(srv.url.removeprefix("http://"))
        assert c.is_server_live() and c.is_server_ready()
        assert c.is_model_ready("digits") and not c.is_model_ready("other")
        meta = c.get_server_metadata()
        assert "classification" in meta["extensions"] and meta["name"] and meta["version"]
        md = c.get_model_metadata("digits")
        assert md["name"] == "digits" and md["versions"] == ["1"]
        assert md["platform"] == ("onnxruntime_onnx" if kind == "onnx" else "pytorch_libtorch")
        assert md["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert md["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
        assert c.get_model_metadata("digits", model_version="1")["name"] == "digits"

        for binary in (True, False):
            inp = th.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            res = c.infer("digits", [inp], request_id="req-7", outputs=[th.InferRequestedOutput("logits", binary_data=binary)])
            assert res.get_response()["id"] == "req-7"
            np.testing.assert_allclose(res.as_numpy("logits"), want, atol=1e-5)
        res = c.infer("digits", [inp])  # no outputs named: all outputs, binary
        np.testing.assert_allclose(res.as_numpy("logits"), want, atol=1e-5)

        for binary in (True, False):
            out = th.InferRequestedOutput("logits", binary_data=binary, class_count=3)
            res = c.infer("digits", [inp], outputs=[out])
            cls = res.as_numpy("logits")
            assert cls.shape == (len(x), 3)
            for row, z in zip(cls, want):
                entries = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in row]
                assert [int(i) for _, i in entries] == list(np.argsort(-z, kind="stable")[:3])
                np.testing.assert_allclose([float(s) for s, _ in entries], np.sort(z)[::-1][:3], atol=1e-5)


def test_tritonclient_probs_classification(model_files, x):
    import tritonclient.http as th

    path = model_files["onnx"]
    want = _local(path, x)
    with ServerThread(path, name="m", output_spec="probs:4") as srv:  # ONNX: input shape inferred
        c = th.InferenceServerClient(srv.url.removeprefix("http://"))
        inp = th.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = c.infer("m", [inp], outputs=[th.InferRequestedOutput("probabilities", class_count=2)])
        spec = OutputSpec.parse("probs:4")
        for row, z in zip(res.as_numpy("probabilities"), want):
            ref = spec.reveal(z)
            for e, c_ in zip(row, np.argsort(-z, kind="stable")[:2]):
                score, idx = e.decode().split(":")
                assert int(idx) == c_ and float(score) == ref.scores[c_]


@pytest.mark.parametrize(
    "spec, layout",
    [
        ("top1", [("label", "INT64", 1)]),
        ("topk:3", [("labels", "INT64", 3)]),
        ("top1-prob:4", [("label", "INT64", 1), ("probability", "FP64", 1)]),
        ("probs:3", [("probabilities", "FP64", 10)]),
        ("logits", [("logits", "FP32", 10)]),
    ],
)
def test_output_mapping(model_files, x, spec, layout):
    path = model_files["pt"]
    want = _local(path, x)
    s = OutputSpec.parse(spec)
    with ServerThread(path, input_shape="1,8,8", output_spec=spec) as srv:
        md = HTTP.get(f"{srv.url}/v2/models/model").json()
        assert [(o["name"], o["datatype"], o["shape"]) for o in md["outputs"]] == [(n, d, [-1, k]) for n, d, k in layout]
        body = {"inputs": [{"name": "input", "shape": [len(x), 1, 8, 8], "datatype": "FP32", "data": x.tolist()}]}
        r = HTTP.post(f"{srv.url}/v2/models/model/infer", json=body)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert "id" not in doc and doc["model_name"] == "model"
        outs = {o["name"]: o for o in doc["outputs"]}
        assert [(o["name"], o["datatype"], o["shape"]) for o in doc["outputs"]] == [(n, d, [len(x), k]) for n, d, k in layout]
        for i, z in enumerate(want):
            ref = s.reveal(z)
            if ref.labels is not None:
                name = layout[0][0]
                k = layout[0][2]
                assert tuple(outs[name]["data"][i * k : (i + 1) * k]) == ref.labels
            if ref.scores is not None:
                name = layout[-1][0]
                k = layout[-1][2]
                got = outs[name]["data"][i * k : (i + 1) * k]
                if spec == "logits":
                    np.testing.assert_allclose(got, ref.scores, atol=1e-5)
                else:
                    assert tuple(got) == ref.scores


def _raw_post(url: str, path: str, payload: bytes, headers: dict | None = None) -> tuple[int, dict]:
    """POST with http.client so we control Content-Length and chunking exactly."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request("POST", path, body=payload, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def _body(**over):
    t = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}
    t.update(over)
    return {"inputs": [t]}


BAD = [
    ("malformed JSON", b'{"inputs": [', None),
    ("not an object", b"[1, 2]", None),
    ("no inputs", json.dumps({"inputs": []}).encode(), None),
    ("two inputs", json.dumps({"inputs": _body()["inputs"] * 2}).encode(), None),
    ("wrong input name", json.dumps(_body(name="x")).encode(), None),
    ("BYTES datatype", json.dumps(_body(datatype="BYTES", data=["a"] * 64)).encode(), None),
    ("BOOL datatype", json.dumps(_body(datatype="BOOL", data=[True] * 64)).encode(), None),
    ("unknown datatype", json.dumps(_body(datatype="FLOAT")).encode(), None),
    ("wrong shape", json.dumps(_body(shape=[1, 1, 8, 7], data=[0.5] * 56)).encode(), None),
    ("no batch axis", json.dumps(_body(shape=[1, 8, 8])).encode(), None),
    ("data count", json.dumps(_body(data=[0.5] * 63)).encode(), None),
    ("batch over cap", json.dumps(_body(shape=[5, 1, 8, 8], data=[0.5] * 320)).encode(), None),
    ("batch zero", json.dumps(_body(shape=[0, 1, 8, 8], data=[])).encode(), None),
    ("ragged data", json.dumps(_body(data=[[0.5] * 32, [0.5] * 31])).encode(), None),
    ("strings in data", json.dumps(_body(data=["0.5"] * 64)).encode(), None),
    ("NaN", json.dumps(_body(data=[float("nan")] + [0.5] * 63)).encode(), None),
    ("Infinity", json.dumps(_body(data=[float("inf")] + [0.5] * 63)).encode(), None),
    ("FP32 overflow", json.dumps(_body(data=[1e300] + [0.5] * 63)).encode(), None),
    ("non-integer INT32", json.dumps(_body(datatype="INT32")).encode(), None),
    ("UINT8 out of range", json.dumps(_body(datatype="UINT8", data=[300] * 64)).encode(), None),
    ("unknown output", json.dumps({**_body(), "outputs": [{"name": "probs"}]}).encode(), None),
    ("classification too large", json.dumps({**_body(), "outputs": [{"name": "logits", "parameters": {"classification": 11}}]}).encode(), None),
    (
        "binary size mismatch",
        json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": 256}}]}).encode()
        + b"\0" * 100,
        "hdr",
    ),
]


@pytest.fixture(scope="module")
def bad_input_server(model_files):
    """One server for every bad input: each case must leave it serving, so later cases meet a server that took the earlier ones."""
    with ServerThread(model_files["pt"], input_shape=SHAPE, max_batch=4) as srv:
        yield srv


@pytest.mark.parametrize("case, payload, extra", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gives_400(bad_input_server, case, payload, extra):
    srv = bad_input_server
    headers = {"Content-Type": "application/json"}
    if extra == "hdr":
        headers["Inference-Header-Content-Length"] = str(payload.index(b"}]}") + 3)
    status, doc = _raw_post(srv.url, "/v2/models/model/infer", payload, headers)
    assert status == 400, (case, doc)
    assert isinstance(doc.get("error"), str) and doc["error"]
    # still serving
    assert HTTP.post(f"{srv.url}/v2/models/model/infer", json=_body()).status_code == 200


def test_body_cap_by_content_length_and_by_actual_size(model_files):
    """http.client sends the whole body before it reads: the 413 must survive the rest of the body arriving after it
    (the server's lingering close, tests/test_server_guard.py), with the body declared and with a chunked one."""
    import http.client

    with ServerThread(model_files["pt"], input_shape=SHAPE, max_body=4096) as srv:
        big = json.dumps(_body(data=[0.123456789] * 64, pad="x" * (6 << 20))).encode()  # more than the socket buffers hold
        status, doc = _raw_post(srv.url, "/v2/models/model/infer", big, {"Content-Type": "application/json"})
        assert status == 413 and "exceeds" in doc["error"]
        # chunked: no Content-Length, so the server must count what arrives. The first chunk crosses the cap and
        # 6 MiB more follow: the server answers, then reads and discards the rest before it closes
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request(
            "POST",
            "/v2/models/model/infer",
            body=iter([big[:5000]] + [big[i : i + 65536] for i in range(5000, len(big), 65536)]),
            headers={"Content-Type": "application/json"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        assert resp.status == 413 and "exceeds" in json.loads(resp.read())["error"]
        conn.close()
        assert HTTP.post(f"{srv.url}/v2/models/model/infer", json=_body()).status_code == 200


def test_integer_and_nested_inputs_are_converted(model_files):
    m = load_model(model_files["pt"])
    img = np.arange(64, dtype=np.uint8).reshape(1, 1, 8, 8)
    want = m.logits(img.astype(np.float32))
    with ServerThread(m, input_shape=SHAPE) as srv:
        for dt in ("UINT8", "INT64", "FP64"):
            r = HTTP.post(f"{srv.url}/v2/models/model/infer", json=_body(datatype=dt, data=img.tolist()))
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["outputs"][0]["data"], want[0], atol=1e-5)


def test_unknown_model_version_and_path_give_404(model_files):
    with ServerThread(model_files["pt"], name="a", input_shape=SHAPE) as srv:
        for method, path in [
            ("GET", "/v2/models/b"),
            ("GET", "/v2/models/a/versions/2"),
            ("POST", "/v2/models/b/infer"),
            ("GET", "/v2/models/b/ready"),
            ("GET", "/nope"),
        ]:
            r = HTTP.request(method, srv.url + path, json=_body() if method == "POST" else None)
            assert r.status_code == 404 and r.json()["error"], path


def test_token_required_except_health(model_files, x):
    import tritonclient.http as th

    with ServerThread(model_files["pt"], input_shape=SHAPE, token="s3cret") as srv:
        assert HTTP.get(f"{srv.url}/v2/health/live").status_code == 200
        assert HTTP.get(f"{srv.url}/v2/health/ready").status_code == 200
        for method, path in [
            ("GET", "/v2"),
            ("GET", "/v2/models/model"),
            ("GET", "/v2/models/model/ready"),
            ("POST", "/v2/models/model/infer"),
            ("POST", "/v2/repository/index"),
        ]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = HTTP.request(method, srv.url + path, json=_body(), headers=headers)
                assert r.status_code == 401 and r.json()["error"], (path, headers)
            r = HTTP.request(method, srv.url + path, json=_body(), headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200, path
        c = th.InferenceServerClient(srv.url.removeprefix("http://"))
        inp = th.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = c.infer("model", [inp], headers={"Authorization": "Bearer s3cret"})
        assert res.as_numpy("logits").shape == (len(x), 10)


def test_swap_changes_answers_and_checks_classes(model_files, x):
    m1 = load_model(model_files["pt"])
    torch.manual_seed(5)
    other = zoo.build("mlp", SHAPE)
    m2 = TorchModel(other.eval(), "other")
    with ServerThread(m1, input_shape=SHAPE) as srv:
        body = {"inputs": [{"name": "input", "shape": [len(x), 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}]}
        a = HTTP.post(f"{srv.url}/v2/models/model/infer", json=body).json()["outputs"][0]["data"]
        old = srv.swap(m2)
        assert old is m1 and srv.holder.generation == 1
        b = HTTP.post(f"{srv.url}/v2/models/model/infer", json=body).json()["outputs"][0]["data"]
        assert not np.allclose(a, b)
        five = TorchModel(zoo.build("mlp", SHAPE, classes=5).eval(), "five")
        with pytest.raises(UsageError):
            srv.swap(five)


class _NaNModel(torch.nn.Module):
    def forward(self, x):
        return torch.full((x.shape[0], 10), float("nan"))


def test_model_producing_nan_is_a_500_not_a_crash():
    m = TorchModel(_NaNModel(), "nan")
    with ServerThread(m, input_shape=SHAPE) as srv:
        r = HTTP.post(f"{srv.url}/v2/models/model/infer", json=_body())
        assert r.status_code == 500 and "NaN" in r.json()["error"]
        assert HTTP.get(f"{srv.url}/v2/health/live").status_code == 200


def test_input_spec_inference(model_files, tmp_path):
    onnx = load_model(model_files["onnx"])
    assert infer_input_spec(onnx).shape == SHAPE
    ts = load_model(model_files["pt"])
    with pytest.raises(UsageError, match="--input-shape"):
        infer_input_spec(ts)
    assert infer_input_spec(ts, "1x8x8").shape == SHAPE
    with pytest.raises(UsageError):
        infer_input_spec(ts, "1,a,8")
    from tamperprobe.data import InputSpec
    from tamperprobe.fingerprint import make_fingerprint, save

    fp = make_fingerprint(np.zeros((2, *SHAPE), np.float32), np.zeros((2, 10), np.float32), InputSpec(SHAPE), {"method": "natural"}, "d")
    save(fp, tmp_path / "fp.tpfp")
    assert infer_input_spec(ts, fingerprint=tmp_path / "fp.tpfp").shape == SHAPE
    with pytest.raises(ModelLoadError):
        ServerThread(ts, input_shape=(1, 9, 9))  # the model does not run on that shape


def test_server_thread_port_and_stop(model_files):
    srv = ServerThread(model_files["pt"], input_shape=SHAPE)
    with srv:
        port = srv.port
        assert srv.url == f"http://127.0.0.1:{port}"
        assert HTTP.get(f"{srv.url}/v2/health/ready").status_code == 200
    with socket.socket() as s:  # the port is released and nothing answers
        assert s.connect_ex(("127.0.0.1", port)) != 0
