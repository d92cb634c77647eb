"""The reference server under abuse: timeouts, a connection cap, a work queue, authentication before routing,
no redirects, TLS. Real sockets on 127.0.0.1; short limits so that every case ends quickly.

Timing goals (health latency under load, memory) are the load test's (``bench/load_serve.py``);
here each case asserts what happened (closed, refused, 503), never how fast.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fakes import free_port, wait_ready
from tamperprobe import zoo
from tamperprobe.cli.app import app
from tamperprobe.data import InputSpec
from tamperprobe.fingerprint import make_fingerprint, save
from tamperprobe.models import TorchModel, save_model
from tamperprobe.outputs import OutputSpec
from tamperprobe.served.clients import make_client
from tamperprobe.served.targets import QueryFailure
from tamperprobe.server.app import ServerThread
from tamperprobe.server.guard import Limits

SHAPE = (1, 8, 8)
HTTP = httpx.Client(timeout=5, limits=httpx.Limits(max_keepalive_connections=0))  # one TLS context for the module, not one per request
BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, *SHAPE], "datatype": "FP32", "data": [0.5] * 64}]}).encode()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TorchModel(zoo.build("mlp", SHAPE).eval(), "m")


def _connect(srv) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=20)  # a safety bound only: the server must act first
    return s


def _closed_by_server(s: socket.socket) -> bool:
    """Read until the server closes the connection (True) or the safety timeout passes (False)."""
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


def _request(path, body=b"", method="POST", extra="") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


FAST = Limits(header_timeout=0.3, body_timeout=0.3, idle_timeout=1)  # idle_timeout is uvicorn's, whole seconds


@pytest.mark.parametrize(
    "case, send",
    [
        ("silent connection", b""),
        ("headers never finished", b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"),
        ("body never finished", _request("/v2/models/model/infer", BODY)[:-10]),
    ],
)
def test_slow_clients_are_disconnected(model, case, send):
    with ServerThread(model, input_shape=SHAPE, limits=FAST) as srv:
        s = _connect(srv)
        s.sendall(send)
        assert _closed_by_server(s), case
        assert HTTP.get(f"{srv.url}/v2/health/live").status_code == 200


def test_idle_keep_alive_connections_are_closed(model):
    with ServerThread(model, input_shape=SHAPE, limits=FAST) as srv:
        s = _connect(srv)
        s.sendall(_request("/v2/health/live", method="GET"))
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        assert _closed_by_server(s)


def test_a_flood_of_idle_connections_cannot_lock_out_a_probe(model):
    """Beyond max_connections the oldest connection waiting for a request is closed, so new ones get in."""
    with ServerThread(model, input_shape=SHAPE, limits=Limits(max_connections=4, header_timeout=30)) as srv:
        idle = []
        for _ in range(6):
            idle.append(_connect(srv))
            time.sleep(0.05)  # let the server accept them in order
        with httpx.Client(timeout=20) as client:
            for _ in range(3):
                assert client.get(f"{srv.url}/v2/health/ready").status_code == 200
        closed = [_closed_by_server(s) for s in idle[:2]]  # the two oldest were evicted by the 5th and 6th
        assert all(closed)
        for s in idle[2:]:
            s.close()


def test_no_redirect_and_no_host_echo(model):
    evil_host = "evil.example:666"
    with ServerThread(model, input_shape=SHAPE) as srv, ServerThread(model, input_shape=SHAPE, token="tok") as guarded:
        for server, auth in ((srv, {}), (guarded, {}), (guarded, {"Authorization": "Bearer tok"})):
            for method, path in (("GET", "/v2/models/model/"), ("POST", "/v2/models/model/infer/"), ("GET", "/v2/health/live/"), ("GET", "/v2/")):
                r = HTTP.request(method, server.url + path, headers={"Host": evil_host, **auth}, content=BODY if method == "POST" else None)
                assert r.status_code in (401, 404), (path, r.status_code)
                assert "location" not in r.headers and "evil" not in r.text
                if server is guarded and not auth:
                    assert r.status_code == 401  # authentication comes before routing: unknown paths reveal nothing
        assert "server" not in HTTP.get(srv.url + "/v2/health/live").headers  # no software banner


def test_json_heavy_in_containers_is_refused_before_parsing(model):
    with ServerThread(model, input_shape=SHAPE, max_batch=4) as srv:
        body = b'{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5]}], "pad": [' + b"[]," * 5000 + b"[]]}"
        r = HTTP.post(f"{srv.url}/v2/models/model/infer", content=body)
        assert r.status_code == 400 and "lists and objects" in r.json()["error"]


class _ThreadRecorder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.threads: list[str] = []

    def forward(self, x):
        self.threads.append(threading.current_thread().name)
        return self.inner(x)


def test_requests_are_processed_on_worker_threads_not_the_event_loop(model):
    rec = _ThreadRecorder(model.module)
    with ServerThread(TorchModel(rec, "rec"), input_shape=SHAPE) as srv:
        rec.threads.clear()  # the start-up probe ran in this thread
        assert HTTP.post(f"{srv.url}/v2/models/model/infer", content=BODY).status_code == 200
    assert rec.threads and all(t.startswith("tamperprobe-infer") for t in rec.threads)


class _Held(torch.nn.Module):
    """The mlp, but every batch waits for ``gate`` first (``entered`` says one has arrived)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.entered = threading.Event()
        self.gate = threading.Event()

    def forward(self, x):
        self.entered.set()
        assert self.gate.wait(20)
        return self.inner(x)


def test_stopping_lets_a_running_request_finish_and_refuses_new_ones(model):
    """``ServerThread.stop`` stops at once when nothing runs (``server/_stopping.py``), yet a request the model is still
    running gets its answer, an idle kept-alive connection is closed, and stop returns only after both."""
    held = _Held(model.module)
    held.gate.set()  # the start-up probe passes
    srv = ServerThread(TorchModel(held, "held"), input_shape=SHAPE).start()
    idle = _connect(srv)
    idle.sendall(_request("/v2/health/live", method="GET"))
    assert idle.recv(65536).startswith(b"HTTP/1.1 200")
    held.entered.clear()
    held.gate.clear()
    answer: dict = {}
    running = threading.Thread(target=lambda: answer.update(r=httpx.post(f"{srv.url}/v2/models/model/infer", content=BODY, timeout=20)))
    running.start()
    assert held.entered.wait(20)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    assert _closed_by_server(idle)  # the idle connection is closed while the running request goes on
    assert stopper.is_alive()  # stop waits for the running request
    held.gate.set()
    running.join(20)
    stopper.join(20)
    assert not stopper.is_alive() and answer["r"].status_code == 200
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", srv.port)) != 0  # and nothing answers any more


def test_bad_limits_are_usage_errors():
    from tamperprobe.errors import UsageError

    for bad in ({"max_connections": 0}, {"header_timeout": float("nan")}, {"body_timeout": -1}, {"queue_timeout": float("inf")}):
        with pytest.raises(UsageError):
            Limits(**bad)


# --------------------------------------------------------------------------- lingering close

LARGE = 6 << 20  # more than the socket buffers of 127.0.0.1 hold (about 4 MB here), less than Limits().linger_bytes


def _send_then_read(s: socket.socket, data: bytes) -> bytes:
    """What common clients do: send the whole request, then read. The response's status line (b"" if it closed without one)."""
    s.sendall(data)
    got = b""
    while b"\r\n" not in got:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got.split(b"\r\n", 1)[0]


def test_a_body_over_the_cap_gets_its_413_not_a_connection_reset(model):
    """The 413 goes out before the body is read; closing then would reset the connection while the client still sends.
    Without the lingering close, every one of these sends failed with ConnectionResetError."""
    with ServerThread(model, input_shape=SHAPE, max_body=4096) as srv:
        request = _request("/v2/models/model/infer", b"x" * LARGE, extra="Content-Type: application/json\r\n")
        for i in range(50):
            with _connect(srv) as s:
                assert _send_then_read(s, request).startswith(b"HTTP/1.1 413 "), i
        assert HTTP.post(f"{srv.url}/v2/models/model/infer", content=BODY).status_code == 200


@pytest.mark.parametrize(
    "case, token, request_bytes, status",
    [
        ("401 before the body", "tok", _request("/v2/models/model/infer", b"x" * LARGE), b"401"),
        ("h11's 400 for headers over the cap", None, b"POST /v2/models/model/infer HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * LARGE, b"400"),
        (
            "h11's 400 for a malformed chunked body",
            None,
            b"POST /v2/models/model/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{}{}\r\nzz\r\n" + b"x" * LARGE,
            b"400",
        ),
    ],
)
def test_every_answer_before_the_request_is_read_reaches_the_client(model, case, token, request_bytes, status):
    with ServerThread(model, input_shape=SHAPE, token=token) as srv:
        for i in range(10):
            with _connect(srv) as s:
                assert _send_then_read(s, request_bytes).startswith(b"HTTP/1.1 " + status + b" "), (case, i)
        assert HTTP.get(f"{srv.url}/v2/health/live").status_code == 200


def test_lingering_is_bounded_in_time_and_in_bytes(model):
    """A client that goes on sending after its 413 (slowly, or as fast as it can) is cut off by the server."""
    head = _request("/v2/models/model/infer", b"x" * 5000)[:-5000].replace(b"5000", b"999999999")  # declares far more than it sends
    with ServerThread(model, input_shape=SHAPE, max_body=4096, limits=Limits(linger_timeout=0.3)) as srv:
        s = _connect(srv)  # slowly: closed after linger_timeout
        s.sendall(head + b"x" * 1000)
        started = time.monotonic()
        assert s.recv(65536).startswith(b"HTTP/1.1 413 ")
        try:
            while time.monotonic() - started < 15:  # the safety bound only: linger_timeout is 0.3 s
                s.sendall(b"x")
                time.sleep(0.05)
        except OSError:
            pass
        assert time.monotonic() - started < 15 and _closed_by_server(s)
    with ServerThread(model, input_shape=SHAPE, max_body=4096, limits=Limits(linger_timeout=60)) as srv:
        s = _connect(srv)  # fast: closed after linger_bytes
        sent, chunk = 0, b"x" * (1 << 20)
        s.sendall(head)
        with pytest.raises(OSError):
            while sent < 256 << 20:  # the safety bound only: linger_bytes is 8 MiB, the socket buffers hold a few more
                s.sendall(chunk)
                sent += len(chunk)
        s.close()


def test_a_lingering_connection_is_evicted_like_an_idle_one(model):
    """Beyond max_connections, a connection that has had its answer and lingers is closed first, as one waiting for a request."""
    limits = Limits(max_connections=2, header_timeout=30, linger_timeout=60)
    with ServerThread(model, input_shape=SHAPE, max_body=4096, limits=limits) as srv:
        lingering = _connect(srv)
        lingering.sendall(_request("/v2/models/model/infer", b"x" * 5000)[:-10])  # over the cap, and the body never ends
        assert lingering.recv(65536).startswith(b"HTTP/1.1 413 ")
        others = [_connect(srv)]
        time.sleep(0.05)  # accepted in this order
        others.append(_connect(srv))
        assert _closed_by_server(lingering)
        for s in others:
            s.close()


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (and its key), made here with the cryptography package."""
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
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return d / "cert.pem", d / "key.pem"


def _fp(model, d):
    x = np.random.default_rng(0).random((3, *SHAPE)).astype(np.float32)
    logits = np.concatenate([model.logits(x[i : i + 1]) for i in range(len(x))])
    return save(make_fingerprint(x, logits, InputSpec(SHAPE), {"method": "natural"}, "test", output_spec="logits"), d / "fp.tpf")


def test_tls_with_a_self_signed_certificate(model, certificate, tmp_path):
    cert, key = certificate
    fp_path = _fp(model, tmp_path)
    with ServerThread(model, name="m", input_shape=SHAPE, tls_cert=cert, tls_key=key) as srv:
        assert srv.url.startswith("https://")
        common = ["verify", str(fp_path), "--endpoint", srv.url, "--model-name", "m", "--retries", "0", "--per-run", "1"]
        ok = CliRunner().invoke(app, [*common, "--ca-cert", str(cert)])
        assert ok.exit_code == 0, ok.stdout + ok.stderr
        untrusted = CliRunner().invoke(app, common)  # the system's CAs do not know this certificate
        assert untrusted.exit_code == 2 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stdout
        assert CliRunner().invoke(app, [*common, "--insecure"]).exit_code == 0
        both = CliRunner().invoke(app, [*common, "--insecure", "--ca-cert", str(cert)])
        assert both.exit_code == 2 and "not both" in both.stderr
        plain = make_client("kserve", srv.url.replace("https", "http"), model_name="m", retries=0)
        (a,) = plain.query(np.zeros((1, *SHAPE), np.float32), OutputSpec.parse("top1")).answers
        assert isinstance(a, QueryFailure)  # plain HTTP to a TLS port gets no answer


def test_a_body_over_the_cap_gets_its_413_over_tls_too(model, certificate):
    """TLS has no half-close: the server keeps reading and discarding the rest of the body instead."""
    cert, key = certificate
    ctx = ssl.create_default_context(cafile=str(cert))
    with ServerThread(model, input_shape=SHAPE, max_body=4096, tls_cert=cert, tls_key=key) as srv:
        request = _request("/v2/models/model/infer", b"x" * LARGE)
        for i in range(10):
            with ctx.wrap_socket(_connect(srv), server_hostname="127.0.0.1") as s:
                assert _send_then_read(s, request).startswith(b"HTTP/1.1 413 "), i


def test_serve_command_with_tls_token_file_and_limits(model, certificate, tmp_path):
    """``serve`` as a process, configured only from files and options: TLS, a token from a file, the hardening options."""
    cert, key = certificate
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    pt = save_model(model.module, tmp_path / "m.pt", np.zeros((2, *SHAPE), np.float32))
    port = free_port()
    args = [sys.executable, "-m", "tamperprobe", "serve", str(pt), "--input-shape", "1,8,8", "--port", str(port), "--token-file", str(token)]
    args += ["--tls-cert", str(cert), "--tls-key", str(key), "--max-connections", "50", "--max-concurrent", "4", "--header-timeout", "5"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ctx = ssl.create_default_context(cafile=str(cert))
    try:
        url = f"https://127.0.0.1:{port}"
        with httpx.Client(verify=ctx, timeout=5) as client:
            wait_ready(client, url, lambda: None if proc.poll() is None else (proc.stderr.read() if proc.stderr else ""), 60, poll=0.05)
            assert client.post(f"{url}/v2/models/model/infer", content=BODY).status_code == 401
            r = client.post(f"{url}/v2/models/model/infer", content=BODY, headers={"Authorization": "Bearer s3cret-token"})
            assert r.status_code == 200 and r.json()["outputs"][0]["name"] == "logits"
    finally:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            out, err = proc.communicate()
    assert f"https://127.0.0.1:{port}/v2/models/model/infer (token required)" in out
    assert "s3cret-token" not in out + err


def test_serve_tls_options_come_in_pairs(model, tmp_path):
    r = CliRunner().invoke(app, ["serve", "m.pt", "--tls-cert", str(tmp_path / "c.pem")])
    assert r.exit_code == 2 and "--tls-cert and --tls-key" in r.stderr
