"""Small real HTTP servers on 127.0.0.1 for the served-side tests, scripted byte by byte when needed.

``Scripted(respond)`` accepts connections on a thread each, reads one request at a time
(request line, headers, a Content-Length body) and calls ``respond(request, out)``, which writes
whatever it likes to ``out`` (a socket file): a normal reply with ``reply``, bytes dripped one
at a time, or nothing. Every request is kept in ``requests``. ``kserve(model_logits)`` answers
the Open Inference Protocol calls the ``kserve`` client makes (metadata and ``/infer``, logits).
Everything here is bounded: reads time out, drips stop after a fixed number of bytes.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def reply(out: BinaryIO, status: int, payload: Any = b"", headers: dict[str, str] | None = None) -> None:
    """Write one complete HTTP/1.1 response (JSON unless ``payload`` is bytes)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
    if not any(k.lower() == "content-type" for k in headers or {}):
        head += "Content-Type: application/json\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    out.write(head.encode("latin-1") + b"\r\n" + body)
    out.flush()


def drip(out: BinaryIO, data: bytes, every: float) -> None:
    """Write ``data`` one byte at a time, ``every`` seconds apart; stops quietly when the client hangs up."""
    try:
        for i in range(len(data)):
            out.write(data[i : i + 1])
            out.flush()
            time.sleep(every)
    except OSError:
        pass


class Scripted:
    """A threaded HTTP/1.1 server on 127.0.0.1 answering with ``respond(request, out)``."""

    def __init__(self, respond: Callable[[Request, BinaryIO], None]) -> None:
        self.respond = respond
        self.requests: list[Request] = []
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 30  # a silent client cannot hold a test thread forever

            def handle(self) -> None:
                while True:
                    try:
                        req = self._read()
                    except (OSError, ValueError):
                        return
                    if req is None:
                        return
                    outer.requests.append(req)
                    try:
                        outer.respond(req, self.wfile)
                    except OSError:
                        return

            def _read(self) -> Request | None:
                line = self.rfile.readline(65536)
                if not line.strip():
                    return None
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while True:
                    h = self.rfile.readline(65536).decode("latin-1")
                    if h in ("\r\n", "\n", ""):
                        break
                    k, _, v = h.partition(":")
                    headers[k.strip().lower()] = v.strip()
                n = int(headers.get("content-length") or 0)
                return Request(method, path, headers, self.rfile.read(n) if n else b"")

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> Scripted:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, suffix: str) -> int:
        return sum(1 for r in self.requests if r.path.split("?")[0].endswith(suffix))


def kserve(logits: Callable[[np.ndarray], np.ndarray], name: str = "m", shape: tuple[int, ...] = (1, 8, 8), classes: int = 10) -> Callable:
    """A ``respond`` for ``Scripted`` speaking enough of the Open Inference Protocol for the kserve client."""

    def respond(req: Request, out: BinaryIO) -> None:
        path = req.path.split("?")[0]
        if req.method == "GET" and path == f"/v2/models/{name}":
            meta = {
                "name": name,
                "versions": ["1"],
                "platform": "fake",
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *shape]}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, classes]}],
            }
            reply(out, 200, meta)
        elif req.method == "POST" and path == f"/v2/models/{name}/infer":
            doc = req.json()
            t = doc["inputs"][0]
            z = logits(np.asarray(t["data"], np.float32).reshape(t["shape"]))
            out_doc = {"id": doc.get("id"), "outputs": [{"name": "logits", "datatype": "FP32", "shape": list(z.shape), "data": z.ravel().tolist()}]}
            reply(out, 200, out_doc)
        else:
            reply(out, 404, {"error": "not found"})

    return respond


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(client: Any, url: str, ended: Callable[[], str | None], seconds: float, poll: float = 0.02) -> None:
    """Poll ``url``'s ``/v2/health/ready`` with ``client`` (an ``httpx.Client``) until it answers 200; fail with what
    ``ended()`` says (a process's output) once the server process has ended, or after ``seconds``."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            if client.get(f"{url}/v2/health/ready").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        why = ended()
        assert why is None, why
        assert time.monotonic() < deadline, "serve did not start"
        time.sleep(poll)


def confident_mlp(seed: int, shape: tuple[int, ...] = (1, 8, 8)) -> Any:
    """A small untrained MLP whose last layer is scaled up, so its answers are confident (well-separated logits)."""
    import torch

    from tamperprobe import zoo
    from tamperprobe.models import TorchModel

    torch.manual_seed(seed)
    module = zoo.build("mlp", shape)
    with torch.no_grad():
        module.net[-1].weight.mul_(20.0)
    return TorchModel(module.eval(), f"mlp-{seed}")
