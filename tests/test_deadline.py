"""An overall deadline per run: a dripping server or a huge Retry-After ends the run INCONCLUSIVE with a clear reason.

Real servers on 127.0.0.1. The dripping server sends one byte every 0.05 s and stops after a
bounded number of bytes (finishing a valid answer), so without a deadline the run would end
INTACT after 6 s instead of INCONCLUSIVE: the tests assert verdicts and reasons, not times.
Deadlines and timeouts are 0.3 s: a sixth of a dripped answer's time, six of its gaps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fakes import Scripted, drip, reply
from tamperprobe.cli.app import app
from tamperprobe.data import InputSpec
from tamperprobe.fingerprint import make_fingerprint, save
from tamperprobe.outputs import OutputSpec
from tamperprobe.served.clients import make_client
from tamperprobe.served.verify import INCONCLUSIVE, INTACT, verify

SHAPE = (1, 8, 8)
LOGITS = np.arange(10, dtype=np.float32)  # every marker's expected logits


@pytest.fixture(scope="module")
def fp_path(tmp_path_factory):
    x = np.random.default_rng(0).random((3, *SHAPE)).astype(np.float32)
    fp = make_fingerprint(x, np.tile(LOGITS, (3, 1)), InputSpec(SHAPE), {"method": "natural"}, "test", output_spec="logits")
    return save(fp, tmp_path_factory.mktemp("deadline") / "fp.tpf")


def _answer(n: int = 1) -> bytes:
    return json.dumps({"predictions": [LOGITS.tolist()] * n}).encode()


def _dripping(where: str):
    """A TF-Serving endpoint whose correct answer arrives one byte every 0.05 s (headers and body, or the body only)."""

    def respond(req, out):
        body = _answer(len(req.json()["instances"]))
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        if where == "headers":
            drip(out, head[:120], 0.05)  # 6 s at most, then the rest at once
            out.write(head[120:] + body)
        else:
            out.write(head)
            drip(out, body[:120], 0.05)
            out.write(body[120:])
        out.flush()

    return Scripted(respond)


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_dripping_server_cannot_stretch_a_run_past_the_deadline(fp_path, where):
    with _dripping(where) as srv:
        r = CliRunner().invoke(
            app, ["verify", str(fp_path), "--endpoint", srv.url, "--protocol", "tfserving", "--deadline", "300ms", "--timeout", "60"]
        )
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert r.stdout.strip().splitlines()[-1].startswith("INCONCLUSIVE: 3 of 3 markers got no usable answer")
    assert "deadline of 0.3 s reached" in r.stdout


def test_the_timeout_bounds_a_whole_attempt_not_each_read():
    """Without a deadline, a dripped answer is still cut at ``timeout`` per attempt (every read gets only the time left)."""
    with _dripping("body") as srv:
        c = make_client("tfserving", srv.url, timeout=0.3, retries=0, deadline=None)
        (a,) = c.query(np.zeros((1, *SHAPE), np.float32), OutputSpec.parse("logits")).answers
    assert a.reason == "timed out after 0.3 s"


@pytest.mark.parametrize("retry_after", ["100000", "Wed, 21 Oct 2099 07:28:00 GMT"])
def test_a_huge_retry_after_ends_the_run_at_once(fp_path, retry_after):
    with Scripted(lambda req, out: reply(out, 503, {"error": "come back later"}, {"Retry-After": retry_after})) as srv:
        r = CliRunner().invoke(app, ["verify", str(fp_path), "--endpoint", srv.url, "--protocol", "tfserving", "--retries", "5"])
        requests = len(srv.requests)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert "HTTP 503: come back later (the server asks to retry after" in r.stdout
    assert requests == 3  # one per marker: no retry the server asked not to make


def test_retry_after_longer_than_the_deadline_is_not_waited_for():
    calls = []

    def respond(req, out):
        calls.append(req)
        if len(calls) == 1:
            reply(out, 429, {"error": "slow down"}, {"Retry-After": "5"})
        else:
            reply(out, 200, _answer())

    with Scripted(respond) as srv:
        c = make_client("tfserving", srv.url, retries=3, deadline=2.0, max_retry_after=30)
        (a,) = c.query(np.zeros((1, *SHAPE), np.float32), OutputSpec.parse("logits")).answers
    assert a.reason == "HTTP 429: slow down (the server asks to retry after 5 s, beyond the run's deadline)"
    assert len(calls) == 1


def test_a_short_retry_after_inside_the_deadline_is_honoured(fp_path):
    calls = []

    def respond(req, out):
        calls.append(req)
        if len(calls) == 1:
            reply(out, 503, {"error": "warming up"}, {"Retry-After": "1"})
        else:
            reply(out, 200, _answer(len(req.json()["instances"])))

    from tamperprobe.fingerprint import load

    with Scripted(respond) as srv:
        report = verify(load(fp_path), make_client("tfserving", srv.url, retries=2, deadline=30.0))
    assert report.verdict == INTACT and len(calls) == 4


def test_watch_applies_the_deadline_to_every_run(fp_path):
    with _dripping("headers") as srv:
        r = CliRunner().invoke(
            app,
            ["watch", str(fp_path), "--endpoint", srv.url, "--protocol", "tfserving", "--deadline", "300ms", "--every", "0s", "--count", "2"]
            + ["--timeout", "60", "--per-run", "1"],
        )
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert r.stdout.count(INCONCLUSIVE) == 2 and r.stderr.count("deadline of 0.3 s reached") == 2


def test_bad_deadlines_are_usage_errors(fp_path):
    for value in ("0", "-1s", "soon"):
        r = CliRunner().invoke(app, ["verify", str(fp_path), "--endpoint", "http://127.0.0.1:9", "--deadline", value, "--no-history"])
        assert r.exit_code == 2 and ("deadline" in r.stderr or "duration" in r.stderr) and len(r.stderr.strip().splitlines()) == 1
