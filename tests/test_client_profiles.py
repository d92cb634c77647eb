"""Client profiles, by the bytes on the wire: tamperprobe's requests equal the real client's.

A raw TCP server on 127.0.0.1 records every request's bytes (and the connection it came on) and
answers each dialect validly. For every protocol the real library sends the same tensor as an
ordinary script would (python-requests, tritonclient.http, curl in a subprocess), tamperprobe sends
it under the matching profile, and the captured bytes must be equal: same server, so even the
Host port is the same, and the same tensor, so nothing needs normalising. Connections are compared
too (a new one per request for requests.post and curl, one kept alive for tritonclient).

The router test plays the operator: learn the shape of ordinary requests (method, path, header
names, order and values, body keys and format) from a python-requests client sending natural
inputs, flag every other shape, and check that no request of a whole verification run (markers
and decoys) is flagged.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass

import numpy as np
import pytest
import requests

from tamperprobe.outputs import OutputSpec
from tamperprobe.served.clients import make_client
from tamperprobe.served.clients.profiles import load_profile
from tamperprobe.served.targets import QueryFailure

SHAPE = (1, 4, 4)
CLASSES = 3
TOKEN = "tok-Secret-12345"
PROTOCOLS = ["kserve", "torchserve", "tfserving", "json"]
TEMPLATE = {"path": "/predict", "request": {"image": "{{input}}"}, "response": {"scores": "scores"}}


@dataclass
class Captured:
    conn: int
    raw: bytes

    @property
    def head(self) -> bytes:
        return self.raw.split(b"\r\n\r\n", 1)[0]

    @property
    def body(self) -> bytes:
        return self.raw.split(b"\r\n\r\n", 1)[1]

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            k, _, v = line.decode("latin-1").partition(":")
            if k.strip().lower() == name.lower():
                return v.strip()
        return None


def _logits(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(len(x), -1).astype(np.float64)
    return np.stack([flat.sum(1), flat.mean(1), flat.max(1)], axis=1).astype(np.float32)


def _answer(c: Captured) -> tuple[bytes, bytes]:
    """(extra headers, body) of a valid answer to the captured request, in its dialect."""
    line = c.head.split(b"\r\n", 1)[0].decode()
    method, target = line.split(" ")[:2]
    path = target.split("?")[0]
    if method == "GET":
        meta = {"name": "m", "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *SHAPE]}]}
        meta["outputs"] = [{"name": "logits", "datatype": "FP32", "shape": [-1, CLASSES]}]
        return b"", json.dumps(meta).encode()
    if path.endswith("/infer"):
        n = c.header("Inference-Header-Content-Length")
        head = json.loads(c.body[: int(n)] if n else c.body)
        t = head["inputs"][0]
        x = np.frombuffer(c.body[int(n) :], np.float32) if n else np.asarray(t["data"], np.float32)
        z = _logits(x.reshape(t["shape"]))
        out = {"name": "logits", "datatype": "FP32", "shape": list(z.shape)}
        if head.get("parameters", {}).get("binary_data_output"):  # as Triton answers tritonclient: binary outputs
            raw = z.astype("<f4").tobytes()
            text = json.dumps({"model_name": "m", "outputs": [{**out, "parameters": {"binary_data_size": len(raw)}}]}).encode()
            return f"Inference-Header-Content-Length: {len(text)}\r\n".encode(), text + raw
        return b"", json.dumps({"model_name": "m", "outputs": [{**out, "data": z.ravel().tolist()}]}).encode()
    doc = json.loads(c.body)
    if path.endswith(":predict"):
        return b"", json.dumps({"predictions": _logits(np.asarray(doc["instances"], np.float32)).tolist()}).encode()
    if path.startswith("/predictions/"):
        return b"", json.dumps(_logits(np.asarray([doc], np.float32))[0].tolist()).encode()
    return b"", json.dumps({"scores": _logits(np.asarray([doc["image"]], np.float32))[0].tolist()}).encode()


class CaptureServer:
    """A raw TCP server on 127.0.0.1: records each request's bytes and its connection, answers validly."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[Captured] = []
        self.connections = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def __enter__(self) -> CaptureServer:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.sock.close()

    def take(self) -> list[Captured]:
        with self._lock:
            out, self.requests = self.requests, []
        return out

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with self._lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(5)
        buf = b""
        with conn:
            try:
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
                    n = int(m.group(1)) if m else 0
                    while len(buf) < n:
                        buf += conn.recv(65536)
                    c = Captured(number, head + b"\r\n\r\n" + buf[:n])
                    buf = buf[n:]
                    with self._lock:
                        self.requests.append(c)
                    extra, body = _answer(c)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            except OSError:
                return


@pytest.fixture
def server():
    with CaptureServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(7).random((3, *SHAPE)).astype(np.float32)


def _endpoint(protocol: str, base: str) -> str:
    return {"kserve": f"{base}/v2/models/m", "torchserve": base, "tfserving": base, "json": base}[protocol]


def _tamperprobe(protocol: str, url: str, x: np.ndarray, profile: str | None, **kw) -> None:
    """Send ``x`` one input per request, in order, through tamperprobe under ``profile``."""
    template = json.dumps(TEMPLATE) if protocol == "json" else None
    client = make_client(protocol, url, model_name="m", template=template, profile=profile, retries=0, shuffle=False, classes=CLASSES, **kw)
    with client:
        answers = client.query(x, OutputSpec.parse("logits")).answers
    assert not any(isinstance(a, QueryFailure) for a in answers), [getattr(a, "reason", "") for a in answers]
    for a, z in zip(answers, _logits(x)):
        np.testing.assert_allclose(a.scores, z, rtol=1e-6)


def _ordinary_request(protocol: str, base: str, xi: np.ndarray) -> tuple[str, dict]:
    """(URL, JSON body) an ordinary script posts for one input ``xi`` (shape without the batch axis)."""
    if protocol == "kserve":
        return f"{base}/v2/models/m/infer", {"inputs": [{"name": "input", "shape": [1, *xi.shape], "datatype": "FP32", "data": xi.ravel().tolist()}]}
    if protocol == "torchserve":
        return f"{base}/predictions/m", xi.tolist()
    if protocol == "tfserving":
        return f"{base}/v1/models/m:predict", {"instances": [xi.tolist()]}
    return f"{base}/predict", {"image": xi.tolist()}


def _requests_script(protocol: str, base: str, x: np.ndarray, auth: str) -> None:
    """What the commonest scripted client does: ``requests.post(url, json=body)`` per input (a metadata GET first for kserve)."""
    headers = {"Authorization": f"Bearer {TOKEN}"} if auth == "bearer" else None
    if auth == "basic":
        base = base.replace("http://", "http://user:pw-Secret@")
    if protocol == "kserve":
        requests.get(f"{base}/v2/models/m", headers=headers, timeout=5).raise_for_status()
    for xi in x:
        url, body = _ordinary_request(protocol, base, xi)
        requests.post(url, json=body, headers=headers, timeout=5).raise_for_status()


def _curl_script(protocol: str, base: str, x: np.ndarray, auth: str, tmp_path) -> None:
    """``curl -X POST -H 'Content-Type: application/json' -d @file URL`` per input, the file written by json.dump."""
    curl = shutil.which("curl")
    extra = ["-H", f"Authorization: Bearer {TOKEN}"] if auth == "bearer" else []
    if auth == "basic":
        base = base.replace("http://", "http://user:pw-Secret@")
    if protocol == "kserve":
        subprocess.run([curl, "-sf", *extra, f"{base}/v2/models/m"], check=True, capture_output=True, timeout=10)
    for xi in x:
        url, body = _ordinary_request(protocol, base, xi)
        path = tmp_path / "body.json"
        with open(path, "w") as f:
            json.dump(body, f)
        cmd = [curl, "-sf", "-X", "POST", "-H", "Content-Type: application/json", *extra, "-d", f"@{path}", url]
        subprocess.run(cmd, check=True, capture_output=True, timeout=10)


def _tamperprobe_with(protocol: str, base: str, x: np.ndarray, profile: str, auth: str, monkeypatch) -> None:
    kw = {}
    if auth == "bearer":
        monkeypatch.setenv("TP_PROFILE_TOKEN", TOKEN)
        kw["token_env"] = "TP_PROFILE_TOKEN"
    if auth == "basic":
        base = base.replace("http://", "http://user:pw-Secret@")
    _tamperprobe(protocol, _endpoint(protocol, base), x, profile, **kw)


def _same(ordinary: list[Captured], ours: list[Captured]) -> None:
    assert len(ours) == len(ordinary)
    for a, b in zip(ordinary, ours):
        assert b.raw == a.raw, f"\nordinary: {a.raw[:600]!r}\nours:     {b.raw[:600]!r}"
    assert _connections(ours) == _connections(ordinary)  # the same requests share a connection


def _connections(reqs: list[Captured]) -> list[int]:
    """Which requests share a connection: each request's connection, numbered in order of first use."""
    first: dict[int, int] = {}
    return [first.setdefault(r.conn, len(first)) for r in reqs]


@pytest.mark.parametrize("auth", ["none", "bearer", "basic"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_python_requests_profile_is_byte_equal(server, x, protocol, auth, monkeypatch):
    _requests_script(protocol, server.url, x, auth)
    ordinary = server.take()
    _tamperprobe_with(protocol, server.url, x, None, auth, monkeypatch)  # the default profile
    _same(ordinary, server.take())
    assert ordinary[-1].header("User-Agent") == requests.utils.default_user_agent()  # tracks the installed requests
    assert len({r.conn for r in ordinary}) == len(ordinary)  # requests.post: a new connection each time


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("auth", ["none", "bearer", "basic"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_curl_profile_is_byte_equal(server, x, protocol, auth, monkeypatch, tmp_path):
    _curl_script(protocol, server.url, x, auth, tmp_path)
    ordinary = server.take()
    _tamperprobe_with(protocol, server.url, x, "curl", auth, monkeypatch)
    _same(ordinary, server.take())


@pytest.mark.parametrize("auth", ["none", "bearer", "basic"])
def test_tritonclient_profile_is_byte_equal(server, x, auth, monkeypatch):
    """``infer`` with tritonclient's defaults: binary tensors both ways, one kept-alive connection."""
    import tritonclient.http as th
    from tritonclient.http.auth import BasicAuth

    client = th.InferenceServerClient(server.url.removeprefix("http://"))
    headers = {"Authorization": f"Bearer {TOKEN}"} if auth == "bearer" else None
    if auth == "basic":
        client.register_plugin(BasicAuth("user", "pw-Secret"))
    client.get_model_metadata("m", headers=headers)
    for xi in x:
        inp = th.InferInput("input", [1, *xi.shape], "FP32")
        inp.set_data_from_numpy(xi[None])
        result = client.infer("m", [inp], headers=dict(headers) if headers else None)
        np.testing.assert_allclose(result.as_numpy("logits"), _logits(xi[None]), rtol=1e-6)
    client.close()
    ordinary = server.take()
    _tamperprobe_with("kserve", server.url, x, "tritonclient", auth, monkeypatch)
    _same(ordinary, server.take())
    assert len({r.conn for r in ordinary}) == 1


def test_tritonclient_profile_speaks_kserve_only():
    from tamperprobe.errors import UsageError

    with pytest.raises(UsageError, match="speaks --protocol kserve only"):
        make_client("tfserving", "http://127.0.0.1:9", profile="tritonclient")
