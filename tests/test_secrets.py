"""Secrets stay secret: no credential in any output, report, history row or hook variable; tokens never on argv.

The servers echo back everything they received (path with query string, every header) in their
error messages, the way a careless API does; none of it may come back out of tamperprobe.
"""

from __future__ import annotations

import json
import sqlite3
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fakes import Scripted, kserve, reply
from tamperprobe import zoo
from tamperprobe.cli.app import app
from tamperprobe.data import InputSpec
from tamperprobe.errors import UsageError
from tamperprobe.fingerprint import make_fingerprint, save
from tamperprobe.models import TorchModel
from tamperprobe.outputs import OutputSpec
from tamperprobe.served.clients import make_client
from tamperprobe.served.credentials import read_token, redact_url, redact_urls_in
from tamperprobe.served.untrusted import env_text
from tamperprobe.served.verify import verify
from tamperprobe.server.app import ServerThread

SHAPE = (1, 8, 8)
PASSWORD, API_KEY, TOKEN, HEADER_KEY = "pw-Secret-1", "ApiKey-Secret-2", "Token-Secret-3", "Header-Secret-4"
SECRETS = (PASSWORD, API_KEY, TOKEN, HEADER_KEY)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://user:pw@host:8080/v2/models/m", "http://host:8080/v2/models/m"),
        ("https://host/predict?api_key=abc&model=x", "https://host/predict?api_key=***&model=***"),
        ("http://u@host/p?flag", "http://host/p?***"),  # a bare query word may be the key itself
        ("http://host/p#frag-secret", "http://host/p"),
        ("http://[::1]:9/x?k=v", "http://[::1]:9/x?k=***"),
        ("http://host:99999/", "(unparsable URL)"),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_redact_urls_in_text():
    text = "failed at kserve:http://a:b@h:1/v2?token=zz, then https://h2/x?k=1 too"
    assert redact_urls_in(text) == "failed at kserve:http://h:1/v2?token=*** then https://h2/x?k=*** too"  # the comma may be the secret's


def test_tokens_from_env_or_file_never_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("TP_GOOD", "  s3cr3t-123\n")
    monkeypatch.setenv("TP_EMPTY", "")
    monkeypatch.setenv("TP_SPACES", "   ")
    good, empty, twoline = tmp_path / "good", tmp_path / "empty", tmp_path / "twoline"
    good.write_text("s3cr3t-456\n")
    empty.write_text("\n")
    twoline.write_text("s3cr3t\nother\n")
    assert read_token("TP_GOOD") == "s3cr3t-123" and read_token(token_file=good) == "s3cr3t-456" and read_token() is None
    for kw, match in [
        ({"token_env": "TP_EMPTY"}, "is empty"),
        ({"token_env": "TP_SPACES"}, "is empty"),
        ({"token_env": "TP_UNSET_XYZ"}, "not set"),
        ({"token_file": empty}, "is empty"),
        ({"token_file": twoline}, "one word"),
        ({"token_file": tmp_path / "missing"}, "cannot read token file"),
        ({"token_env": "TP_GOOD", "token_file": good}, "not both"),
    ]:
        with pytest.raises(UsageError, match=match) as info:
            read_token(**kw)
        assert "s3cr3t" not in str(info.value)  # a refused token is never echoed


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("secrets")
    torch.manual_seed(0)
    module = zoo.build("mlp", SHAPE)
    model = TorchModel(module.eval(), "m")
    x = np.random.default_rng(0).random((4, *SHAPE)).astype(np.float32)
    logits = np.concatenate([model.logits(x[i : i + 1]) for i in range(len(x))])
    fp = make_fingerprint(x, logits, InputSpec(SHAPE), {"method": "natural"}, "test", output_spec="logits")
    return {"dir": d, "fp": fp, "fp_path": save(fp, d / "fp.tpf"), "model": model}


def _echo(req, out):
    """A JSON API that refuses everything and tells the caller exactly what it sent (path, query, every header)."""
    reply(out, 500, {"error": f"denied {req.method} {req.path} with headers {json.dumps(req.headers)}"})


def _assert_no_secret(*texts):
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, (secret, text[:2000])


def _everything_stored(path):
    with sqlite3.connect(path) as con:
        rows = [*con.execute("SELECT * FROM runs"), *con.execute("SELECT * FROM markers"), *con.execute("SELECT * FROM drawn")]
    return json.dumps([[str(v) for v in row] for row in rows])


@pytest.mark.parametrize("credentials", ["url", "token"])
def test_no_credential_in_output_report_history_or_hook(world, tmp_path, credentials, monkeypatch):
    template = json.dumps({"path": "/predict", "request": {"x": "{{input}}"}, "response": {"scores": "scores"}})
    hist, hook_out = tmp_path / "h.sqlite", tmp_path / "hook.json"
    hook = f"{sys.executable} -c \"import json, os; json.dump(dict(os.environ), open(r'{hook_out}', 'w'))\""
    monkeypatch.setenv("TP_SECRET_TOKEN", TOKEN)
    with Scripted(_echo) as srv:
        host = srv.url.removeprefix("http://")
        if credentials == "url":
            endpoint, auth = f"http://user:{PASSWORD}@{host}/?api_key={API_KEY}", []
        else:
            endpoint, auth = f"http://{host}/?api_key={API_KEY}", ["--token-env", "TP_SECRET_TOKEN", "--header", f"X-Api-Key:{HEADER_KEY}"]
        common = [str(world["fp_path"]), "--endpoint", endpoint, "--protocol", "json", "--template", template, "--retries", "0", *auth]
        common += ["--per-run", "1", "--history", str(hist)]
        v = CliRunner().invoke(app, ["verify", *common])
        j = CliRunner().invoke(app, ["verify", *common, "--json"])
        w = CliRunner().invoke(app, ["watch", *common, "--every", "0s", "--count", "1", "--hook", hook])
        h = CliRunner().invoke(app, ["history", "--history", str(hist), "--json"])
        received = json.dumps([(r.path, r.headers) for r in srv.requests])
    assert v.exit_code == 2 and j.exit_code == 2 and w.exit_code == 2 and h.exit_code == 0, (v.stdout, v.stderr, w.stderr)
    # the secrets did reach the server ...
    assert API_KEY in received and (TOKEN in received if credentials == "token" else "Basic " in received)
    # ... and nothing that tamperprobe printed, stored or handed on contains them
    env = {k: v for k, v in json.loads(hook_out.read_text()).items() if k.startswith("TAMPERPROBE_")}
    _assert_no_secret(v.stdout, v.stderr, j.stdout, j.stderr, w.stdout, w.stderr, h.stdout, _everything_stored(hist), json.dumps(env))
    assert "denied POST /predict?api_key=***" in json.loads(j.stdout)["markers"][0]["detail"]  # the echo is there, redacted
    assert env["TAMPERPROBE_ENDPOINT"] in (f"http://{host}/?api_key=***", env_text(f"http://{host}/?api_key=***"))
    assert json.loads(j.stdout)["target"] == f"json:http://{host}/predict?api_key=***"
    if credentials == "token":
        assert "--header X-Api-Key puts a secret on the command line" in v.stderr
    else:
        assert "the --endpoint URL holds credentials" in v.stderr


def test_query_string_of_a_kserve_url_is_sent_but_never_named(world):
    with Scripted(kserve(world["model"].logits)) as srv:
        client = make_client("kserve", f"{srv.url}/v2/models/m?api_key={API_KEY}", retries=0, seed=0, classes=10)
        assert client.model_name == "m" and client.name == f"kserve:{srv.url}?api_key=***"
        report = verify(world["fp"], client)
        assert report.verdict == "INTACT", report.summary()
        assert all(r.path.endswith(f"?api_key={API_KEY}") for r in srv.requests)
    _assert_no_secret(report.target, json.dumps(report.to_json()))


def test_token_file_and_empty_tokens_on_the_command_line(world, tmp_path, monkeypatch):
    token_file, empty_file = tmp_path / "token", tmp_path / "empty"
    token_file.write_text(TOKEN + "\n")
    empty_file.write_text("")
    monkeypatch.setenv("TP_EMPTY", "")
    with ServerThread(world["model"], name="m", input_shape=SHAPE, token=TOKEN) as srv:
        common = ["verify", str(world["fp_path"]), "--endpoint", srv.url, "--model-name", "m", "--retries", "0", "--per-run", "1"]
        ok = CliRunner().invoke(app, [*common, "--token-file", str(token_file)])
        assert ok.exit_code == 0, ok.stderr
        for extra, message in [
            (["--token-file", str(empty_file)], "is empty: refusing an empty token"),
            (["--token-env", "TP_EMPTY"], "is empty: refusing an empty token"),
            (["--token-env", "TP_EMPTY", "--token-file", str(token_file)], "not both"),
        ]:
            r = CliRunner().invoke(app, [*common, *extra])
            assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        denied = CliRunner().invoke(app, common)  # no token: the server says 401, the run is INCONCLUSIVE
        assert denied.exit_code == 2 and "401" in denied.stdout


def test_serve_takes_no_token_on_the_command_line(tmp_path, monkeypatch):
    r = CliRunner().invoke(app, ["serve", "whatever.pt", "--token", TOKEN])
    assert r.exit_code == 2 and "--token-env" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert TOKEN not in r.stderr
    monkeypatch.setenv("TP_EMPTY", "")
    r = CliRunner().invoke(app, ["serve", "whatever.pt", "--token-env", "TP_EMPTY"])
    assert r.exit_code == 2 and "refusing an empty token" in r.stderr


def test_a_credential_in_a_failure_reason_is_masked(world, monkeypatch):
    """A server that echoes the bearer token in its error: the reason keeps the message and hides the token."""
    monkeypatch.setenv("TP_T", TOKEN)
    with Scripted(lambda req, out: reply(out, 403, {"error": f"token {req.headers.get('authorization')} revoked"})) as srv:
        c = make_client("tfserving", srv.url, token_env="TP_T", retries=0)
        (a,) = c.query(np.zeros((1, *SHAPE), np.float32), OutputSpec.parse("top1")).answers
    assert a.reason == "HTTP 403: token Bearer *** revoked"


# --------------------------------------------------------------------------- redaction by structure (issue 18.7)

NASTY = [  # (endpoint, its secrets): credentials with the characters a pattern over the text stops at
    ("http://user:pw'Quote-Secret-7@h:1/v2/models/m", ["pw'Quote-Secret-7", "Quote-Secret-7"]),
    ('http://user:pw"Dq-Secret-8@h:1/x', ['pw"Dq-Secret-8', "Dq-Secret-8"]),
    ("http://user:pw Space-Secret-9@h:1/x", ["Space-Secret-9"]),
    ("http://user:pw<Lt>Secret-10@h:1/x", ["Secret-10"]),
    ('http://h:1/predict?api_key=Key"Secret-11&model=m', ['Key"Secret-11', "Secret-11"]),
    ("http://h:1/predict?api_key=Key'Secret-12", ["Secret-12"]),
    ("http://h:1/predict?api_key=Key Secret-13", ["Secret-13"]),
    ("http://h:1/p?Bare-Secret-14", ["Bare-Secret-14"]),
    ("http://h:1/p#Frag'Secret-15", ["Secret-15"]),
    ("https://Token-As-User-16@h/v2", ["Token-As-User-16"]),
]


@pytest.mark.parametrize("endpoint, secrets", NASTY)
def test_an_endpoint_is_redacted_by_its_structure(endpoint, secrets):
    """Whatever characters a credential holds, the endpoint as shown (hook, event log, metric label, ledger) keeps none of it."""
    shown = redact_urls_in(endpoint)
    assert not any(s in shown for s in secrets), shown
    assert shown.startswith(("http://h:1/", "https://h/")), shown  # and still names the endpoint
    embedded = redact_urls_in(f"run 3 against kserve:{endpoint} failed")
    if "Key Secret-13" not in endpoint:  # in free text a raw space ends a query value (the client masks its own secrets first)
        assert not any(s in embedded for s in secrets), embedded


def test_userinfo_in_free_text_is_masked():
    text = "upstream user:Pass-Secret-17@10.0.0.2 refused; see https://docs.example/x?sig=Sig-Secret-18 (mail admin@example.com)"
    shown = redact_urls_in(text)
    assert "Pass-Secret-17" not in shown and "Sig-Secret-18" not in shown, shown
    assert shown.startswith("upstream ***@10.0.0.2 refused; see https://docs.example/x?sig=***"), shown


def test_a_nasty_endpoint_reaches_no_hook_event_metric_or_ledger(world, tmp_path):
    """watch against an endpoint whose password holds a quote and whose query value holds a double quote and a space."""
    import prometheus_client

    from tamperprobe.served.monitor import Metrics
    from tamperprobe.served.targets import LocalTarget
    from tamperprobe.served.watch import WatchRun

    password, key = "pw'Nasty-Secret-19", 'k"Nasty Secret-20'
    hist, hook_out, events = tmp_path / "h.sqlite", tmp_path / "hook.json", tmp_path / "events.jsonl"
    hook = f"{sys.executable} -c \"import json, os; json.dump(dict(os.environ), open(r'{hook_out}', 'w'))\""
    template = json.dumps({"path": "/predict", "request": {"x": "{{input}}"}, "response": {"scores": "scores"}})
    with Scripted(_echo) as srv:
        host = srv.url.removeprefix("http://")
        endpoint = f"http://user:{password}@{host}/?api_key={key}"
        args = ["watch", str(world["fp_path"]), "--endpoint", endpoint, "--protocol", "json", "--template", template, "--retries", "0"]
        args += ["--per-run", "1", "--history", str(hist), "--every", "0s", "--count", "1", "--hook", hook, "--event-log", str(events)]
        w = CliRunner().invoke(app, args)
    assert w.exit_code == 2, (w.stdout, w.stderr)
    env = {k: v for k, v in json.loads(hook_out.read_text()).items() if k.startswith("TAMPERPROBE_")}
    metrics = Metrics(0)  # the metric labels: what Metrics.update makes of the same endpoint
    try:
        metrics.update(WatchRun(1, verify(world["fp"], LocalTarget(world["model"])), "t", 0), endpoint)
        exposition = prometheus_client.generate_latest(metrics.registry).decode()
    finally:
        metrics.close()
    stored, texts = _everything_stored(hist), [w.stdout, w.stderr, json.dumps(env), events.read_text(), exposition]
    for secret in (password, key, "Nasty-Secret-19", "Nasty Secret-20", "Nasty%20Secret-20"):
        for text in [*texts, stored]:
            assert secret not in text, (secret, text[:1500])
    assert env["TAMPERPROBE_ENDPOINT"] in (f"http://{host}/?api_key=***", env_text(f"http://{host}/?api_key=***"))


def test_server_text_in_the_hook_environment_holds_nothing_a_shell_acts_on(world, tmp_path):
    """A server whose error is shell syntax: the hook's TAMPERPROBE_SUMMARY carries it only as safe characters."""
    from tamperprobe.served.untrusted import ENV_SAFE

    hook_out = tmp_path / "hook.json"
    hook = f"{sys.executable} -c \"import json, os; json.dump(dict(os.environ), open(r'{hook_out}', 'w'))\""
    template = json.dumps({"path": "/predict", "request": {"x": "{{input}}"}, "response": {"scores": "scores"}})
    with Scripted(lambda req, out: reply(out, 500, {"error": "$(touch pwned) `id` *; a|b & c > d"})) as srv:
        args = ["watch", str(world["fp_path"]), "--endpoint", srv.url, "--protocol", "json", "--template", template, "--retries", "0"]
        w = CliRunner().invoke(app, [*args, "--per-run", "1", "--no-history", "--allow-repeat", "--every", "0s", "--count", "1", "--hook", hook])
    assert w.exit_code == 2, (w.stdout, w.stderr)
    summary = json.loads(hook_out.read_text())["TAMPERPROBE_SUMMARY"]
    assert "touch pwned" in summary and set(summary) <= ENV_SAFE, summary


@pytest.mark.parametrize("echo", ["header", "decoded"])
@pytest.mark.parametrize("credentials", ["basic", "token-as-user"])
def test_credentials_a_server_echoes_are_masked(echo, credentials):
    """A server that echoes the Authorization header (or the credentials it decoded from it): the reason hides them."""
    import base64

    user, password = ("user", "Basic-Secret-21") if credentials == "basic" else ("Token-User-Secret-22", "")
    pair = f"{user}:{password}"
    encoded = base64.b64encode(pair.encode()).decode()

    def respond(req, out):
        said = (
            req.headers.get("authorization")
            if echo == "header"
            else "credentials " + base64.b64decode(req.headers["authorization"].split()[1]).decode()
        )
        reply(out, 401, {"error": f"{said} rejected"})

    with Scripted(respond) as srv:
        url = srv.url.replace("http://", f"http://{user}:{password}@" if password else f"http://{user}@")
        c = make_client("tfserving", url, retries=0)
        (a,) = c.query(np.zeros((1, *SHAPE), np.float32), OutputSpec.parse("top1")).answers
        assert srv.requests[0].headers["authorization"] == f"Basic {encoded}"  # the credentials did go out
    for secret in (encoded, password or user):
        assert secret not in a.reason, a.reason
    assert a.reason.startswith("HTTP 401: "), a.reason


def test_env_text_keeps_only_characters_no_shell_acts_on():
    from tamperprobe.served.untrusted import ENV_SAFE, env_text

    text = "INCONCLUSIVE; marker 3: HTTP 500: $(touch /tmp/x) `id` *.py ?; \"q\" 'q' a|b&c>d<e {f} [g] ~h #i !j \\k\x1b[31m\u202e…"
    shown = env_text(text)
    assert set(shown) <= ENV_SAFE, shown
    assert shown.startswith("INCONCLUSIVE_ marker 3: HTTP 500: __touch /tmp/x_ _id_ _.py _")
    assert env_text("http://h:1/v2?k=***") == "http://h:1/v2_k=___" and len(env_text("a" * 5000, 100)) <= 100
