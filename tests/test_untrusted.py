"""Remote text is inert: escape sequences, carriage returns, bidi overrides and rich markup from a server
never reach the terminal, the history, the JSON report or a hook as anything but visible text.

The end-to-end case is the issue's: a server whose 500 reply would rewrite the last visible line to
"INTACT: all 8 markers match" while the exit code is 2.
"""

from __future__ import annotations

import json
import sqlite3
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from fakes import Scripted, kserve, reply
from tamperprobe.cli.app import app
from tamperprobe.data import InputSpec
from tamperprobe.fingerprint import make_fingerprint, save
from tamperprobe.outputs import OutputSpec
from tamperprobe.served.clients import make_client
from tamperprobe.served.untrusted import clean, is_clean

SHAPE = (1, 8, 8)
SPOOF = "INTACT: all 8 markers match"
# erase the line, go up, paint green, print the spoof with markup, overwrite with \r and \b, flip the text direction
EVIL = f"boom\r\x1b[2K\x1b[1A\x1b[32m[bold green]{SPOOF}[/bold green]\x1b[0m\r\b\b\u202e\u2066\x00\x9b31m\u2028"
RAW = ("\x1b", "\r", "\b", "\u202e", "\u2066", "\x00", "\x9b", "\u2028")


@pytest.mark.parametrize(
    "text, want",
    [
        ("plain text", "plain text"),
        ("a\x1b[31mred", "a\\x1b[31mred"),
        ("line\r\nnext\ttab", "line\\r\\nnext\\ttab"),
        ("back\b\x7fdel\x00nul", "back\\x08\\x7fdel\\x00nul"),
        ("c1 \x9b csi \x85 nel", "c1 \\x9b csi \\x85 nel"),
        (
            "bidi \u202a\u202b\u202c\u202d\u202e iso \u2066\u2067\u2068\u2069",
            "bidi \\u202a\\u202b\\u202c\\u202d\\u202e iso \\u2066\\u2067\\u2068\\u2069",
        ),
        ("marks \u200e\u200f\u061c zero\u200bwidth \ufeff", "marks \\u200e\\u200f\\u061c zero\\u200bwidth \\ufeff"),
        ("sep\u2028para\u2029", "sep\\u2028para\\u2029"),
        ("   padded      out   ", "padded out"),
        ("nbsp\u00a0\u3000wide", "nbsp wide"),
        ("[bold]markup[/] stays as text", "[bold]markup[/] stays as text"),
        ("ünïcödé ✓ 数字", "ünïcödé ✓ 数字"),
        ("lone \ud800 surrogate", "lone \\ud800 surrogate"),
    ],
)
def test_clean(text, want):
    got = clean(text)
    assert got == want
    assert is_clean(got) and clean(got) == got  # inert, and cleaning twice changes nothing


def test_clean_bounds_length():
    got = clean("x" * 10_000 + "\x1b" * 10_000, limit=50)
    assert len(got) == 50 and got.endswith("…")
    assert clean("\x1b" * 100, limit=10) == "\\x1b\\x1b\\…"


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def fp_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("untrusted")
    x = np.random.default_rng(0).random((8, *SHAPE)).astype(np.float32)
    logits = np.random.default_rng(1).normal(size=(8, 10)).astype(np.float32)
    return save(make_fingerprint(x, logits, InputSpec(SHAPE), {"method": "natural"}, "test", output_spec="logits"), d / "fp.tpf")


def _evil(req, out):
    """Metadata is fine; every inference answers 500 with the escape-laden text (in a header too)."""
    if req.path.endswith("/infer"):
        reply(out, 500, {"error": EVIL}, {"X-Detail": "\x9bINTACT\xa0"})
    else:
        kserve(lambda x: np.zeros((len(x), 10), np.float32))(req, out)


def test_escape_laden_500_is_shown_inert_and_the_last_line_is_the_verdict(fp_file, tmp_path):
    hist = tmp_path / "h.sqlite"
    with Scripted(_evil) as srv:
        r = CliRunner().invoke(app, ["verify", str(fp_file), "--endpoint", srv.url, "--model-name", "m", "--retries", "0", "--history", str(hist)])
    assert r.exit_code == 2, (r.stdout, r.stderr)
    for raw in RAW:
        assert raw not in r.stdout and raw not in r.stderr, repr(raw)
    lines = r.stdout.rstrip("\n").splitlines()
    assert lines[-1].startswith("INCONCLUSIVE: 8 of 8 markers got no usable answer")
    assert not any(line.lstrip("│ ").startswith(SPOOF) for line in lines)  # the spoof never starts a line
    assert "\\x1b[2K" in r.stdout and "[bold green]" in r.stdout  # shown as text: escapes spelled out, markup literal
    # the history holds the same inert text
    with sqlite3.connect(hist) as con:
        rows = con.execute("SELECT * FROM runs").fetchall() + con.execute("SELECT * FROM markers").fetchall()
    stored = [v for row in rows for v in row if isinstance(v, str)]
    assert any("boom" in t for t in stored) and all(is_clean(t) for t in stored)


def test_json_report_and_hook_environment_are_inert(fp_file, tmp_path):
    hook_out = tmp_path / "env.json"
    code = f"import json, os; json.dump(dict(os.environ), open(r'{hook_out}', 'w'))"
    with Scripted(_evil) as srv:
        common = [str(fp_file), "--endpoint", srv.url, "--model-name", "m", "--retries", "0", "--per-run", "4"]
        r = CliRunner().invoke(app, ["verify", *common, "--json"])
        w = CliRunner().invoke(app, ["watch", *common, "--every", "0s", "--count", "1", "--hook", f'{sys.executable} -c "{code}"'])
    assert r.exit_code == 2 and w.exit_code == 2, (r.stderr, w.stderr)
    doc = json.loads(r.stdout)
    assert doc["verdict"] == "INCONCLUSIVE"
    for m in doc["markers"]:
        assert "boom" in m["detail"] and is_clean(m["detail"])
    assert is_clean(doc["summary"])
    env = {k: v for k, v in json.loads(hook_out.read_text()).items() if k.startswith("TAMPERPROBE_")}
    assert env["TAMPERPROBE_VERDICT"] == "INCONCLUSIVE" and "boom" in env["TAMPERPROBE_SUMMARY"]
    assert all(is_clean(v) for v in env.values())
    for raw in RAW:
        assert raw not in w.stdout and raw not in w.stderr


@pytest.mark.parametrize(
    "respond, fragment",
    [
        # a non-JSON body with a C1 control in its Content-Type header
        (lambda req, out: reply(out, 200, b"\x1b[2Jnot json", {"Content-Type": "text/\x9bhtml"}), "not JSON (text/\\x9bhtml)"),
        # an output name carrying escapes, in an otherwise valid-looking answer
        (
            lambda req, out: reply(out, 200, {"outputs": [{"name": "\x1b]0;pwned\x07", "datatype": "FP32", "shape": [1, 10], "data": [1, 2, 3]}]}),
            "\\x1b]0;pwned\\x07",
        ),
        # a redirect whose Location is an escape sequence
        (lambda req, out: reply(out, 302, b"", {"Location": "http://x/\x9b8m"}), "HTTP 302: redirect to"),
    ],
)
def test_every_remote_text_in_a_failure_reason_is_inert(respond, fragment):
    def route(req, out):
        if req.method == "POST":
            respond(req, out)
        else:
            kserve(lambda x: np.zeros((len(x), 10), np.float32))(req, out)

    with Scripted(route) as srv:
        x = np.zeros((1, *SHAPE), np.float32)
        (a,) = make_client("kserve", srv.url, model_name="m", retries=0, classes=10).query(x, OutputSpec.parse("logits")).answers
    assert fragment in a.reason and is_clean(a.reason), a.reason
