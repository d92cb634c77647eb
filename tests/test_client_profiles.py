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
import shutil
import subprocess

import numpy as np
import pytest
import requests

from tamperprobe.outputs import OutputSpec
from tamperprobe.served.clients import make_client
from tamperprobe.served.targets import QueryFailure
from wire import (
    CLASSES,
    PROTOCOLS,
    SHAPE,
    TEMPLATE,
    TOKEN,
    Captured,
    CaptureServer,
    client_hello,
    endpoint,
    logits,
    ordinary_request,
    pool_fingerprint,
    request_shape,
    requests_script,
)


@pytest.fixture
def server():
    with CaptureServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(7).random((3, *SHAPE)).astype(np.float32)


def _tamperprobe(protocol: str, url: str, x: np.ndarray, profile: str | None, **kw) -> None:
    """Send ``x`` one input per request, in order, through tamperprobe under ``profile``."""
    template = json.dumps(TEMPLATE) if protocol == "json" else None
    client = make_client(protocol, url, model_name="m", template=template, profile=profile, retries=0, shuffle=False, classes=CLASSES, **kw)
    with client:
        answers = client.query(x, OutputSpec.parse("logits")).answers
    assert not any(isinstance(a, QueryFailure) for a in answers), [getattr(a, "reason", "") for a in answers]
    for a, z in zip(answers, logits(x)):
        np.testing.assert_allclose(a.scores, z, rtol=1e-6)


def _curl_script(protocol: str, base: str, x: np.ndarray, auth: str, tmp_path) -> None:
    """``curl -X POST -H 'Content-Type: application/json' -d @file URL`` per input, the file written by json.dump."""
    curl = shutil.which("curl")
    extra = ["-H", f"Authorization: Bearer {TOKEN}"] if auth == "bearer" else []
    if auth == "basic":
        base = base.replace("http://", "http://user:pw-Secret@")
    if protocol == "kserve":
        subprocess.run([curl, "-sf", *extra, f"{base}/v2/models/m"], check=True, capture_output=True, timeout=10)
    for xi in x:
        url, body = ordinary_request(protocol, base, xi)
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
    _tamperprobe(protocol, endpoint(protocol, base), x, profile, **kw)


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
    requests_script(protocol, server.url, x, auth)
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
            url, body = ordinary_request(protocol, server.url, xi)
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
        np.testing.assert_allclose(result.as_numpy("logits"), logits(xi[None]), rtol=1e-6)
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


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_router_that_learns_ordinary_requests_flags_none_of_tamperprobes(server, protocol, monkeypatch):
    """Learn every request shape of a python-requests client sending natural inputs (with and without a token), then run
    three verifications (markers and decoys, shuffled) under the default profile: no request has an unseen shape."""
    from tamperprobe.served.pool import Draw
    from tamperprobe.served.verify import INTACT, verify

    natural = np.random.default_rng(5).random((6, *SHAPE)).astype(np.float32)
    requests_script(protocol, server.url, natural, "none")
    requests_script(protocol, server.url, natural[:2], "bearer")
    learned = {request_shape(c) for c in server.take()}
    fp = pool_fingerprint(6, 6)
    monkeypatch.setenv("TP_PROFILE_TOKEN", TOKEN)
    template = json.dumps(TEMPLATE) if protocol == "json" else None
    for run, token in enumerate([None, None, "TP_PROFILE_TOKEN"]):
        client = make_client(protocol, endpoint(protocol, server.url), model_name="m", template=template, retries=0, classes=CLASSES, token_env=token)
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

    fp_path = save(pool_fingerprint(4, 2), tmp_path / "fp.tpf")
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


def _tamperprobe_tls(profile):
    def send(port):
        make_client("kserve", f"https://127.0.0.1:{port}/v2/models/m", profile=profile, retries=0, timeout=3, verify_tls=False).query(
            np.zeros((1, *SHAPE), np.float32), OutputSpec.parse("top1")
        )

    return send


def test_python_requests_profile_has_requests_tls_client_hello():
    ordinary = client_hello(lambda port: requests.post(f"https://127.0.0.1:{port}/x", json={}, timeout=3, verify=False))
    assert client_hello(_tamperprobe_tls(None)) == ordinary


def test_tritonclient_profile_has_tritonclients_tls_client_hello():
    import tritonclient.http as th

    ordinary = client_hello(lambda port: th.InferenceServerClient(f"127.0.0.1:{port}", ssl=True, insecure=True).get_model_metadata("m"))
    assert client_hello(_tamperprobe_tls("tritonclient")) == ordinary


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


SERVED_SPECS = ["top1", "topk:3", "top1-prob:4", "probs:3", "logits"]


@pytest.fixture(scope="module")
def reference_servers():
    """The reference server once per output spec, with a fingerprint of its model for that spec: every profile queries the same ones."""
    import contextlib

    import torch

    from tamperprobe import zoo
    from tamperprobe.data import InputSpec
    from tamperprobe.fingerprint import make_fingerprint
    from tamperprobe.models import TorchModel
    from tamperprobe.server.app import ServerThread

    torch.manual_seed(0)
    model = TorchModel(zoo.build("mlp", SHAPE).eval(), "m")
    xs = np.random.default_rng(2).random((4, *SHAPE)).astype(np.float32)
    reference = np.concatenate([model.logits(xs[i : i + 1]) for i in range(len(xs))])
    with contextlib.ExitStack() as stack:
        yield {
            spec: (
                make_fingerprint(xs, reference, InputSpec(SHAPE), {"method": "natural"}, "test", output_spec=spec),
                stack.enter_context(ServerThread(model, name="m", input_shape=SHAPE, output_spec=spec)),
            )
            for spec in SERVED_SPECS
        }


@pytest.mark.parametrize("profile", ["python-requests", "tritonclient", "curl"])
def test_every_profile_verifies_against_the_reference_server(profile, reference_servers):
    """tamperprobe serve under each profile (tritonclient's: binary tensors, binary outputs, labels and
    classification strings included): every output spec reads INTACT."""
    from tamperprobe.served.verify import INTACT, verify

    for spec in SERVED_SPECS:
        fp, srv = reference_servers[spec]
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


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_profile_expects_100_continue_on_a_large_body_as_curl_does(server, tmp_path, monkeypatch):
    """Over 1 MiB curl adds ``Expect: 100-continue`` and holds the body back (1 s when the server says nothing): so does the profile.
    curl and the profile send at the same time (each waits its second on its own connection): their requests are byte-equal."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    big = np.random.default_rng(1).random((1, 3, 140, 140)).astype(np.float32)  # about 1.1 MB of JSON

    def curl_seconds() -> float:
        t0 = time.monotonic()
        _curl_script("json", server.url, big, "none", tmp_path)
        return time.monotonic() - t0

    with ThreadPoolExecutor(1) as pool:
        curl_run = pool.submit(curl_seconds)
        t0 = time.monotonic()
        template = json.dumps(TEMPLATE)
        client = make_client("json", server.url, template=template, profile="curl", retries=0, timeout=10, shuffle=False)
        with client:
            (a,) = client.query(big, OutputSpec.parse("logits")).answers
        ours_seconds = time.monotonic() - t0
        curl_took = curl_run.result()
    assert not isinstance(a, QueryFailure), a.reason
    ordinary, ours = server.take()  # curl's and the profile's, in either order: they must not differ
    assert len(ordinary.body) > 1 << 20 and ours.header("Expect") == "100-continue"
    assert ours.raw == ordinary.raw
    assert curl_took >= 0.9 and ours_seconds >= 0.9  # both waited for a "100 Continue" that never came
