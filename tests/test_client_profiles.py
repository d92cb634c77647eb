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


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_python_requests_session_profile_is_byte_equal(server, x, protocol, monkeypatch):
    """Through one ``requests.Session()``: the same bytes, on one kept-alive connection."""
    with requests.Session() as s:
        for xi in x:
            url, body = _ordinary_request(protocol, server.url, xi)
            s.post(url, json=body, timeout=5).raise_for_status()
    ordinary = server.take()
    _tamperprobe_with(protocol, server.url, x, "python-requests-session", "none", monkeypatch)
    ours = [c for c in server.take() if not c.raw.startswith(b"GET ")]  # the kserve client's metadata read: compared above
    _same(ordinary, ours)
    assert len({r.conn for r in ordinary}) == 1


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


# --------------------------------------------------------------------------- the operator's router


def _skeleton(value):
    """A JSON value's shape: keys in order, list lengths, number types, strings as they are (names, datatypes)."""
    if isinstance(value, dict):
        return ("dict", tuple((k, _skeleton(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("list", len(value), _skeleton(value[0]) if value else None)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    return type(value).__name__


def request_shape(c: Captured) -> tuple:
    """What a router can key on besides the tensor values: request line (no query), every header name in order
    and its value (but Host and lengths), the body's JSON skeleton and format (separators), the binary part's size."""
    lines = c.head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        keep = name.lower() not in ("host", "content-length", "inference-header-content-length")
        headers.append((name, value.strip() if keep else "*"))
    n = c.header("Inference-Header-Content-Length")
    text, raw = (c.body[: int(n)], c.body[int(n) :]) if n else (c.body, b"")
    body = None
    if text:
        doc = json.loads(text)
        fmt = [seps for seps in ((", ", ": "), (",", ":")) if json.dumps(doc, separators=seps).encode() == text]
        body = (_skeleton(doc), tuple(fmt), len(raw))
    return (method, target.split("?")[0], version, tuple(headers), body)


def _pool_fingerprint(markers: int, decoys: int):
    from tamperprobe.data import InputSpec
    from tamperprobe.fingerprint import make_fingerprint

    rng = np.random.default_rng(11)
    xm = rng.random((markers, *SHAPE)).astype(np.float32)
    xd = rng.random((decoys, *SHAPE)).astype(np.float32)
    return make_fingerprint(
        xm, _logits(xm), InputSpec(SHAPE), {"method": "natural"}, "test", output_spec="logits", decoy_inputs=xd, decoy_logits=_logits(xd)
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_router_that_learns_ordinary_requests_flags_none_of_tamperprobes(server, protocol, monkeypatch):
    """Learn every request shape of a python-requests client sending natural inputs (with and without a token), then run
    three verifications (markers and decoys, shuffled) under the default profile: no request has an unseen shape."""
    from tamperprobe.served.pool import Draw
    from tamperprobe.served.verify import INTACT, verify

    natural = np.random.default_rng(5).random((6, *SHAPE)).astype(np.float32)
    _requests_script(protocol, server.url, natural, "none")
    _requests_script(protocol, server.url, natural[:2], "bearer")
    learned = {request_shape(c) for c in server.take()}
    fp = _pool_fingerprint(6, 6)
    monkeypatch.setenv("TP_PROFILE_TOKEN", TOKEN)
    template = json.dumps(TEMPLATE) if protocol == "json" else None
    for run, token in enumerate([None, None, "TP_PROFILE_TOKEN"]):
        client = make_client(
            protocol, _endpoint(protocol, server.url), model_name="m", template=template, retries=0, classes=CLASSES, token_env=token
        )
        order = tuple(np.random.default_rng(run).permutation(4).tolist())
        draw = Draw((2 * run, 2 * run + 1), (2 * run, 2 * run + 1), order, "fresh")
        with client:
            report = verify(fp, client, draw=draw)
        assert report.verdict == INTACT and report.decoy_count == 2, report.summary()
    ours = server.take()
    assert len(ours) == 12 + (3 if protocol == "kserve" else 0)
    flagged = [c.raw[:300] for c in ours if request_shape(c) not in learned]
    assert flagged == []
    assert not any(b"tp-" in c.raw for c in ours)  # no request id: nothing to route on for free


def test_the_router_would_flag_a_request_in_another_shape(server, x):
    """The router is not blind: one extra key in the body, one header in another order, another float format are flagged."""
    requests.post(f"{server.url}/v1/models/m:predict", json={"instances": [x[0].tolist()]}, timeout=5)
    (base,) = server.take()
    learned = {request_shape(base)}
    requests.post(f"{server.url}/v1/models/m:predict", json={"id": "1", "instances": [x[1].tolist()]}, timeout=5)
    requests.post(f"{server.url}/v1/models/m:predict", json={"instances": [x[1].tolist()]}, headers={"Accept": "application/json"}, timeout=5)
    body = json.dumps({"instances": [x[1].tolist()]}, separators=(",", ":"))
    requests.post(f"{server.url}/v1/models/m:predict", data=body, headers={"Content-Type": "application/json"}, timeout=5)
    requests.post(f"{server.url}/v1/models/m:predict", json={"instances": [x[1].tolist()]}, timeout=5)  # the same shape
    shapes = [request_shape(c) in learned for c in server.take()]
    assert shapes == [False, False, False, True]


# --------------------------------------------------------------------------- the owner's own profile


def test_an_owner_described_profile_sends_exactly_that(server, x, tmp_path, monkeypatch):
    """Headers in the file's order with its values, compact JSON, kept alive; ``input`` spares the metadata request."""
    spec = {
        "base": "python-requests",
        "headers": [["Host", "{host}"], ["User-Agent", "shop-frontend/4.2"], ["Accept", "application/json"], ["{extra}", ""],
                    ["Content-Type", "application/json"], ["Content-Length", "{length}"]],
        "separators": [",", ":"],
        "keep_alive": True,
        "input": {"name": "pixels", "datatype": "fp32"},
    }  # fmt: skip
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(spec))
    monkeypatch.setenv("TP_PROFILE_TOKEN", TOKEN)
    _tamperprobe("kserve", f"{server.url}/v2/models/m", x, str(path), token_env="TP_PROFILE_TOKEN")
    got = server.take()
    assert len(got) == 3 and len({c.conn for c in got}) == 1  # no metadata request; one connection
    for c, xi in zip(got, x):
        body = json.dumps(
            {"inputs": [{"name": "pixels", "shape": [1, *SHAPE], "datatype": "FP32", "data": xi.ravel().tolist()}]}, separators=(",", ":")
        )
        head = (
            f"POST /v2/models/m/infer HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUser-Agent: shop-frontend/4.2\r\nAccept: application/json\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        assert c.raw == head.encode() + body.encode()


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"headers": [["User-Agent", "x"]]}, 'needs \\["Host", "\\{host\\}"\\]'),
        ({"headers": [["Host", "{host}"], ["Content-Length", "{length}"], ["X", "a{host}"]]}, "placeholder must be the whole value"),
        ({"headers": [["Host", "{host}"], ["Content-Length", "{length}"], ["Bad Name", "v"]]}, "bad header"),
        ({"headers": [["Host", "{host}"], ["host", "{host}"], ["Content-Length", "{length}"]]}, "listed twice"),
        ({"separators": [";", "="]}, "separators"),
        ({"keep_alive": "yes"}, "true or false"),
        ({"input": {"name": "x"}}, '"input" must be'),
        ({"base": "wget"}, "unknown client profile"),
        ({"colour": "red"}, "unknown key"),
    ],
)
def test_a_bad_profile_file_is_a_one_line_usage_error(tmp_path, doc, message):
    from tamperprobe.errors import UsageError
    from tamperprobe.served.clients.profiles import load_profile

    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(UsageError, match=message):
        load_profile(str(path))
    with pytest.raises(UsageError, match="unknown client profile 'nope'"):
        load_profile("nope")


def test_client_profile_option_reaches_the_client(server, tmp_path):
    """``verify --client-profile curl`` sends curl's requests."""
    from typer.testing import CliRunner

    from tamperprobe.cli.app import app
    from tamperprobe.fingerprint import save

    fp_path = save(_pool_fingerprint(4, 2), tmp_path / "fp.tpf")
    args = ["verify", str(fp_path), "--endpoint", server.url, "--protocol", "tfserving", "--model-name", "m", "--per-run", "2", "--decoys", "0"]
    r = CliRunner().invoke(app, [*args, "--history", str(tmp_path / "h.sqlite"), "--client-profile", "curl", "--allow-unsigned"])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    got = server.take()
    assert len(got) == 2 and all(c.header("User-Agent").startswith("curl/") and c.header("Accept") == "*/*" for c in got)


# --------------------------------------------------------------------------- what the profile accepts, it can read


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_every_encoding_the_profile_accepts_is_decoded_within_the_cap(encoding):
    """python-requests accepts br when brotli is installed; so must tamperprobe read it, and a bomb stays a bounded failure."""
    import gzip
    import zlib

    from fakes import Scripted, reply

    brotli = pytest.importorskip("brotli")
    compress = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress}[encoding]
    assert encoding in load_profile_accept()
    good = json.dumps({"predictions": [[0.5, 2.5, -1.0]]}).encode()
    bomb = b"[" + b" " * (8 << 20) + b"]"
    for body, expect in [(good, None), (bomb, "response larger than 1 MiB")]:
        with Scripted(lambda req, out, b=body: reply(out, 200, compress(b), {"Content-Encoding": encoding})) as srv:
            (a,) = (
                make_client("tfserving", srv.url, retries=0, classes=CLASSES)
                .query(np.zeros((1, *SHAPE), np.float32), OutputSpec.parse("logits"))
                .answers
            )
        if expect is None:
            np.testing.assert_allclose(a.scores, [0.5, 2.5, -1.0])
        else:
            assert isinstance(a, QueryFailure) and a.reason == expect, a


def load_profile_accept() -> str:
    from tamperprobe.served.clients.profiles import load_profile

    return dict(load_profile(None).headers)["Accept-Encoding"]


# --------------------------------------------------------------------------- the TLS ClientHello


def _client_hello(send) -> tuple:
    """What a TLS-terminating proxy can fingerprint (JA3 and more) in the ClientHello ``send(port)`` makes:
    version, cipher suites, every extension in order with its data (but the key share, PSK and padding, which vary)."""
    import struct

    sock = socket.create_server(("127.0.0.1", 0))
    got = {}

    def accept():
        conn, _ = sock.accept()
        conn.settimeout(5)
        data = b""
        with conn:
            while len(data) < 5 or len(data) < 5 + struct.unpack(">H", data[3:5])[0]:
                more = conn.recv(65536)
                if not more:
                    break
                data += more
        got["hello"] = data

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        send(sock.getsockname()[1])
    except Exception:  # noqa: BLE001, S110 - the server hangs up after the ClientHello: every client fails, as intended
        pass
    t.join(10)
    sock.close()
    ch = got["hello"]
    p = 9
    version = ch[p : p + 2]
    p += 34
    p += 1 + ch[p]  # session id
    n = struct.unpack(">H", ch[p : p + 2])[0]
    ciphers = ch[p + 2 : p + 2 + n]
    p += 2 + n
    p += 1 + ch[p]  # compression methods
    end = p + 2 + struct.unpack(">H", ch[p : p + 2])[0]
    p += 2
    extensions = []
    while p < end:
        kind, size = struct.unpack(">HH", ch[p : p + 4])
        extensions.append((kind, size if kind in (21, 41, 51) else ch[p + 4 : p + 4 + size]))
        p += 4 + size
    return version, ciphers, tuple(e if e[0] != 21 else (21,) for e in extensions)


def _tamperprobe_tls(profile):
    def send(port):
        make_client("kserve", f"https://127.0.0.1:{port}/v2/models/m", profile=profile, retries=0, timeout=3, verify_tls=False).query(
            np.zeros((1, *SHAPE), np.float32), OutputSpec.parse("top1")
        )

    return send


def test_python_requests_profile_has_requests_tls_client_hello():
    ordinary = _client_hello(lambda port: requests.post(f"https://127.0.0.1:{port}/x", json={}, timeout=3, verify=False))
    assert _client_hello(_tamperprobe_tls(None)) == ordinary


def test_tritonclient_profile_has_tritonclients_tls_client_hello():
    import tritonclient.http as th

    ordinary = _client_hello(lambda port: th.InferenceServerClient(f"127.0.0.1:{port}", ssl=True, insecure=True).get_model_metadata("m"))
    assert _client_hello(_tamperprobe_tls("tritonclient")) == ordinary


def test_a_header_given_again_replaces_the_profiles_in_place_and_framing_is_refused(server, x):
    """``--header User-Agent:...`` takes the profile header's place (as requests merges its headers); Host and lengths are not settable."""
    from tamperprobe.errors import UsageError

    _tamperprobe("tfserving", server.url, x[:1], None, headers=["User-Agent: shop/1.0", "X-Trace: 7"])
    (c,) = server.take()
    names = [line.split(b":")[0] for line in c.head.split(b"\r\n")[1:]]
    assert names == [b"Host", b"User-Agent", b"Accept-Encoding", b"Accept", b"Connection", b"X-Trace", b"Content-Length", b"Content-Type"]
    assert c.header("User-Agent") == "shop/1.0"
    for bad in ("Host: evil", "Content-Length: 5", "Transfer-Encoding: chunked"):
        with pytest.raises(UsageError, match="framing is the client profile's"):
            make_client("tfserving", server.url, headers=[bad])


# --------------------------------------------------------------------------- against the reference server


@pytest.mark.parametrize("profile", ["python-requests", "tritonclient", "curl"])
def test_every_profile_verifies_against_the_reference_server(profile):
    """tamperprobe serve under each profile (tritonclient's: binary tensors, binary outputs, labels and
    classification strings included): every output spec reads INTACT."""
    import torch

    from tamperprobe import zoo
    from tamperprobe.data import InputSpec
    from tamperprobe.fingerprint import make_fingerprint
    from tamperprobe.models import TorchModel
    from tamperprobe.served.verify import INTACT, verify
    from tamperprobe.server.app import ServerThread

    torch.manual_seed(0)
    model = TorchModel(zoo.build("mlp", SHAPE).eval(), "m")
    xs = np.random.default_rng(2).random((4, *SHAPE)).astype(np.float32)
    logits = np.concatenate([model.logits(xs[i : i + 1]) for i in range(len(xs))])
    for spec in ["top1", "topk:3", "top1-prob:4", "probs:3", "logits"]:
        fp = make_fingerprint(xs, logits, InputSpec(SHAPE), {"method": "natural"}, "test", output_spec=spec)
        with ServerThread(model, name="m", input_shape=SHAPE, output_spec=spec) as srv:
            client = make_client("kserve", srv.url, model_name="m", profile=profile, retries=0, classes=10)
            with client:
                report = verify(fp, client)
        assert report.verdict == INTACT, (spec, report.summary())


def test_binary_outputs_are_read_like_json_ones():
    """A Triton-style binary answer: classification strings (BYTES) and an INT64 label, each in its slice of the body."""
    import struct

    from fakes import Scripted

    entries = [b"2.5:1", b"0.5:0", b"-1:2"]
    strings = b"".join(struct.pack("<I", len(e)) + e for e in entries)
    label = np.array([[1]], "<i8").tobytes()
    outputs = [
        {"name": "label", "datatype": "INT64", "shape": [1, 1], "parameters": {"binary_data_size": len(label)}},
        {"name": "logits", "datatype": "BYTES", "shape": [1, 3], "parameters": {"binary_data_size": len(strings)}},
    ]
    head = json.dumps({"model_name": "m", "outputs": outputs}).encode()

    def respond(req, out, tail=b""):
        body = head + label + strings + tail
        out.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nInference-Header-Content-Length: %d\r\n\r\n" % (len(body), len(head)) + body)
        out.flush()

    prof = {"base": "tritonclient", "input": {"name": "input", "datatype": "FP32"}}
    x1 = np.zeros((1, *SHAPE), np.float32)
    with Scripted(respond) as srv:
        (a,) = make_client("kserve", f"{srv.url}/v2/models/m", profile=prof, retries=0).query(x1, OutputSpec.parse("topk:3")).answers
    assert a.labels == (1, 0, 2), a  # three labels: the classification strings were read (the label output has one)
    with Scripted(lambda req, out: respond(req, out, b"extra")) as srv:
        (a,) = make_client("kserve", f"{srv.url}/v2/models/m", profile=prof, retries=0).query(x1, OutputSpec.parse("top1")).answers
    assert isinstance(a, QueryFailure) and a.reason == "malformed response: 5 bytes of binary data no output claims", a
