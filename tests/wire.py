"""The wire, seen from a server: a raw TCP capture server, the requests an ordinary script sends, and what a router keys on.

``CaptureServer`` (127.0.0.1, bounded, stops with its context) records each request's bytes and the
connection it came on and answers every dialect validly (kserve metadata and infer, JSON or binary;
torchserve; tfserving; the JSON template below). ``requests_script`` is the ordinary client
(``requests.post(url, json=body)``), ``request_shape`` what a request-shape router can key on, and
``client_hello`` what a TLS-terminating proxy can fingerprint. Used by tests/test_client_profiles.py
and bench/request_shape_router.py.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
from dataclasses import dataclass

import numpy as np
import requests

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


def logits(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(len(x), -1).astype(np.float64)
    return np.stack([flat.sum(1), flat.mean(1), flat.max(1)], axis=1).astype(np.float32)


def answer(c: Captured) -> tuple[bytes, bytes]:
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
        z = logits(x.reshape(t["shape"]))
        out = {"name": "logits", "datatype": "FP32", "shape": list(z.shape)}
        if head.get("parameters", {}).get("binary_data_output"):  # as Triton answers tritonclient: binary outputs
            raw = z.astype("<f4").tobytes()
            text = json.dumps({"model_name": "m", "outputs": [{**out, "parameters": {"binary_data_size": len(raw)}}]}).encode()
            return f"Inference-Header-Content-Length: {len(text)}\r\n".encode(), text + raw
        return b"", json.dumps({"model_name": "m", "outputs": [{**out, "data": z.ravel().tolist()}]}).encode()
    doc = json.loads(c.body)
    if path.endswith(":predict"):
        return b"", json.dumps({"predictions": logits(np.asarray(doc["instances"], np.float32)).tolist()}).encode()
    if path.startswith("/predictions/"):
        return b"", json.dumps(logits(np.asarray([doc], np.float32))[0].tolist()).encode()
    return b"", json.dumps({"scores": logits(np.asarray([doc["image"]], np.float32))[0].tolist()}).encode()


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
                    extra, body = answer(c)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            except OSError:
                return


def endpoint(protocol: str, base: str) -> str:
    return {"kserve": f"{base}/v2/models/m", "torchserve": base, "tfserving": base, "json": base}[protocol]


def ordinary_request(protocol: str, base: str, xi: np.ndarray) -> tuple[str, dict]:
    """(URL, JSON body) an ordinary script posts for one input ``xi`` (shape without the batch axis)."""
    if protocol == "kserve":
        return f"{base}/v2/models/m/infer", {"inputs": [{"name": "input", "shape": [1, *xi.shape], "datatype": "FP32", "data": xi.ravel().tolist()}]}
    if protocol == "torchserve":
        return f"{base}/predictions/m", xi.tolist()
    if protocol == "tfserving":
        return f"{base}/v1/models/m:predict", {"instances": [xi.tolist()]}
    return f"{base}/predict", {"image": xi.tolist()}


def requests_script(protocol: str, base: str, x: np.ndarray, auth: str) -> None:
    """What the commonest scripted client does: ``requests.post(url, json=body)`` per input (a metadata GET first for kserve)."""
    headers = {"Authorization": f"Bearer {TOKEN}"} if auth == "bearer" else None
    if auth == "basic":
        base = base.replace("http://", "http://user:pw-Secret@")
    if protocol == "kserve":
        requests.get(f"{base}/v2/models/m", headers=headers, timeout=5).raise_for_status()
    for xi in x:
        url, body = ordinary_request(protocol, base, xi)
        requests.post(url, json=body, headers=headers, timeout=5).raise_for_status()


def skeleton(value):
    """A JSON value's shape: keys in order, list lengths, number types, strings as they are (names, datatypes)."""
    if isinstance(value, dict):
        return ("dict", tuple((k, skeleton(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("list", len(value), skeleton(value[0]) if value else None)
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
        body = (skeleton(doc), tuple(fmt), len(raw))
    return (method, target.split("?")[0], version, tuple(headers), body)


def pool_fingerprint(markers: int, decoys: int):
    from tamperprobe.data import InputSpec
    from tamperprobe.fingerprint import make_fingerprint

    rng = np.random.default_rng(11)
    xm = rng.random((markers, *SHAPE)).astype(np.float32)
    xd = rng.random((decoys, *SHAPE)).astype(np.float32)
    return make_fingerprint(
        xm, logits(xm), InputSpec(SHAPE), {"method": "natural"}, "test", output_spec="logits", decoy_inputs=xd, decoy_logits=logits(xd)
    )


def client_hello(send) -> tuple:
    """What a TLS-terminating proxy can fingerprint (JA3 and more) in the ClientHello ``send(port)`` makes:
    version, cipher suites, every extension in order with its data (but the key share, PSK and padding, which vary)."""
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
