"""The reference server under the attacks of issue 18 (item 8), on real sockets on 127.0.0.1.

Each test is one finding: it failed on the server as it was and passes now. Timing goals (health
latency under each attack) are the load test's (``bench/load_serve.py``); here each case asserts
what happened (closed, counted, refused, answered), with short limits so that every case ends fast.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from tamperprobe import zoo
from tamperprobe.models import TorchModel
from tamperprobe.server.app import ServerThread
from tamperprobe.server.guard import Limits

SHAPE = (1, 8, 8)
HTTP = httpx.Client(timeout=5, limits=httpx.Limits(max_keepalive_connections=0))  # one TLS context for the module, not one per request
INFER = "/v2/models/model/infer"
BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, *SHAPE], "datatype": "FP32", "data": [0.5] * 64}]}).encode()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TorchModel(zoo.build("mlp", SHAPE).eval(), "m")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return d / "cert.pem", d / "key.pem"


def _connect(srv, timeout: float = 8.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=timeout)  # a safety bound: the server must act first


def _closed_by_server(s: socket.socket) -> bool:
    """Read until the server closes (True) or the socket's timeout passes (False); closes ``s``."""
    try:
        while True:
            if not s.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        s.close()


def _response(s: socket.socket) -> tuple[int, bytes]:
    """The status and raw bytes of the response the server sends on ``s`` before it closes; closes ``s``."""
    data = b""
    try:
        while True:
            got = s.recv(65536)
            if not got:
                break
            data += got
    except (ConnectionResetError, TimeoutError):
        pass
    finally:
        s.close()
    return (int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0), data


# --------------------------------------------------------------------------- TLS: counted and timed out from accept


def test_tls_connections_silent_before_the_client_hello_are_closed_at_the_header_deadline(model, certificate):
    """Before: asyncio's own 60 s handshake timeout applied, the header deadline did not."""
    limits = Limits(header_timeout=0.3)
    with ServerThread(model, input_shape=SHAPE, limits=limits, tls_cert=certificate[0], tls_key=certificate[1]) as srv:
        stalled = [_connect(srv) for _ in range(3)]
        t0 = time.monotonic()
        assert all(_closed_by_server(s) for s in stalled)
        assert time.monotonic() - t0 < 5.0
        assert httpx.get(f"{srv.url}/v2/health/ready", verify=False).status_code == 200


def test_tls_connections_in_their_handshake_count_against_the_connection_cap(model, certificate):
    """Before: a connection was counted only once its handshake ended, so stalls before it grew without bound."""
    limits = Limits(max_connections=4, header_timeout=30)
    with ServerThread(model, input_shape=SHAPE, limits=limits, tls_cert=certificate[0], tls_key=certificate[1]) as srv:
        stalled = []
        for _ in range(7):
            stalled.append(_connect(srv, timeout=3.0))
            time.sleep(0.05)  # accepted in order: the oldest is the one evicted
        time.sleep(0.3)
        assert srv.open_connections() <= 4
        assert [_closed_by_server(s) for s in stalled[:3]] == [True, True, True]  # the three oldest made room
        assert httpx.get(f"{srv.url}/v2/health/ready", verify=False).status_code == 200  # and the probe gets in
        for s in stalled[3:]:
            s.close()


# --------------------------------------------------------------------------- bodies are read before a slot is taken


class _Gate(torch.nn.Module):
    """The mlp, but a batch whose first value is 0.25 waits for ``gate`` (a request that holds its slot while it runs)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.gate = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.flatten()[0]) == 0.25:
            self.gate.wait(20)
        return self.inner(x)


def test_connections_that_send_headers_and_no_body_hold_no_inference_slot(model):
    """Before: each such connection took a slot while its body "arrived"; 2 of them locked a 2-slot server out for body_timeout."""
    limits = Limits(max_concurrent=2, queue_timeout=0.5, body_timeout=30)
    with ServerThread(model, input_shape=SHAPE, limits=limits) as srv:
        head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
        hogs = [_connect(srv) for _ in range(6)]
        for h in hogs:
            h.sendall(head + BODY[:10])
        time.sleep(0.3)
        for _ in range(3):
            r = HTTP.post(f"{srv.url}{INFER}", content=BODY, timeout=10)
            assert r.status_code == 200, r.text
        for h in hogs:
            h.close()


def test_a_body_not_sent_within_the_body_timeout_ends_the_connection(model):
    limits = Limits(body_timeout=0.3)
    with ServerThread(model, input_shape=SHAPE, limits=limits) as srv:
        s = _connect(srv)
        s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(BODY)}\r\n\r\n".encode() + BODY[:10])
        assert _closed_by_server(s)
        assert HTTP.post(f"{srv.url}{INFER}", content=BODY, timeout=10).status_code == 200


def test_requests_beyond_the_work_limit_wait_then_get_503():
    """One slot, held by a request the model is still running: the next inference waits, then gets 503 with Retry-After."""
    torch.manual_seed(0)
    gated = _Gate(zoo.build("mlp", SHAPE).eval())
    limits = Limits(max_concurrent=1, queue_timeout=0.3)
    slow = json.dumps({"inputs": [{"name": "input", "shape": [1, *SHAPE], "datatype": "FP32", "data": [0.25] * 64}]}).encode()
    with ServerThread(TorchModel(gated, "gated"), input_shape=SHAPE, limits=limits) as srv:
        first = threading.Thread(target=lambda: httpx.post(f"{srv.url}{INFER}", content=slow, timeout=20))
        first.start()
        time.sleep(0.3)
        try:
            r = HTTP.post(f"{srv.url}{INFER}", content=BODY, timeout=20)
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]
            assert HTTP.get(f"{srv.url}/v2/health/live").status_code == 200  # probes do not queue
        finally:
            gated.gate.set()
            first.join(20)
        assert HTTP.post(f"{srv.url}{INFER}", content=BODY, timeout=20).status_code == 200


def test_bodies_held_at_once_are_bounded_by_the_body_budget(model):
    """Bodies are read before a slot is taken, so the slots no longer bound their memory: the budget does (503 beyond it)."""
    limits = Limits(max_concurrent=1, body_timeout=30)
    with ServerThread(model, input_shape=SHAPE, limits=limits, max_body=4096) as srv:  # budget: 1 x 4096 bytes
        hog = _connect(srv)
        hog.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n".encode() + b" " * 3900)
        time.sleep(0.3)
        r = HTTP.post(f"{srv.url}{INFER}", content=BODY, timeout=10)
        assert r.status_code == 503 and "bodies" in r.json()["error"]
        hog.close()
        time.sleep(0.3)
        assert HTTP.post(f"{srv.url}{INFER}", content=BODY, timeout=10).status_code == 200  # the budget came back


# --------------------------------------------------------------------------- chunks, outputs, headers


def _chunked(body: bytes, size: int) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def test_a_body_of_one_byte_chunks_is_refused(model):
    """Before: a valid body sent as 1-byte chunks was read chunk by chunk (one event each) and answered 200."""
    with ServerThread(model, input_shape=SHAPE) as srv:
        head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        s = _connect(srv)
        s.sendall(head + _chunked(BODY, 1))
        status, _ = _response(s)
        assert status == 400
        s = _connect(srv)  # the same body in ordinary chunks is served
        s.sendall(head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + _chunked(BODY, 100))
        status, data = _response(s)
        assert status == 200, data


def test_a_stream_of_tiny_chunks_is_answered_before_its_end(model):
    """4096 1-byte chunks of a body that never ends: refused and closed after a bounded number of them (before: read on)."""
    with ServerThread(model, input_shape=SHAPE, limits=Limits(linger_timeout=0.5)) as srv:
        s = _connect(srv, timeout=5.0)
        s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + b"1\r\n \r\n" * 4096)
        status, _ = _response(s)
        assert status == 400


def test_an_output_requested_twice_is_refused(model):
    """Before: each repeat of an output was answered in full (a 0.25 MB request drew a response 254 times its size)."""
    with ServerThread(model, input_shape=SHAPE, output_spec="probs:3") as srv:
        req = json.loads(BODY)
        r = HTTP.post(f"{srv.url}{INFER}", json={**req, "outputs": [{"name": "probabilities"}] * 2}, timeout=10)
        assert r.status_code == 400 and "more than once" in r.json()["error"]
        r = HTTP.post(f"{srv.url}{INFER}", json={**req, "outputs": [{"name": "probabilities"}]}, timeout=10)
        assert r.status_code == 200 and len(r.json()["outputs"]) == 1


def test_a_response_over_the_cap_is_refused(model):
    x = np.full((64, *SHAPE), 0.5, np.float32)
    req = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    with ServerThread(model, input_shape=SHAPE, limits=Limits(max_response=2000)) as srv:
        r = HTTP.post(f"{srv.url}{INFER}", json=req, timeout=10)
        assert r.status_code == 400 and "limit of 2000" in r.json()["error"]
        assert HTTP.post(f"{srv.url}{INFER}", content=BODY, timeout=10).status_code == 200  # a small response still fits


@pytest.mark.parametrize("size, status", [(100_000, 400), (24_000, 400), (12_000, 200)])
def test_the_request_head_limit_holds_when_the_head_arrives_whole(model, size, status):
    """Before: h11 bounds only an incomplete head, so ~100 KB of headers sent in one piece were accepted (limit: 16 KiB)."""
    with ServerThread(model, input_shape=SHAPE) as srv:
        pad = "".join(f"X-Pad-{i}: {'a' * 990}\r\n" for i in range(size // 1000))
        s = _connect(srv)
        s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{pad}Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY)
        got, data = _response(s)
        assert got == status, data[:200]
