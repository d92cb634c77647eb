"""watch feeds monitoring: Prometheus metrics on a port (scraped with a plain HTTP GET) and a JSON-lines event log."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tamperprobe import zoo
from tamperprobe.cli.app import app
from tamperprobe.fingerprint import make_fingerprint, save
from tamperprobe.models import TorchModel
from tamperprobe.served.clients import make_client
from tamperprobe.served.monitor import EventLog, Metrics
from tamperprobe.served.watch import watch
from tamperprobe.server.app import ServerThread

HTTP = httpx.Client(timeout=5, limits=httpx.Limits(max_keepalive_connections=0))  # one TLS context for the module, not one per request

pytest.importorskip("prometheus_client")


@pytest.fixture(scope="module")
def models(digits):
    train, test = digits
    torch.manual_seed(0)
    module = zoo.build("mlp", (1, 8, 8)).eval()
    tampered = zoo.build("mlp", (1, 8, 8)).eval()
    tampered.load_state_dict(module.state_dict())
    with torch.no_grad():
        tampered.net[-1].bias.add_(0.5)
    intact = TorchModel(module, "intact")
    x = np.ascontiguousarray(test.x[:6])
    fp = make_fingerprint(x, intact.logits(x), train.input_spec, {"method": "natural"}, intact.digest(), output_spec="logits")
    return intact, TorchModel(tampered, "tampered"), fp, train.input_spec


def _metric(port: int, name: str, **labels: str) -> float | None:
    text = HTTP.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_verdict_gauge_goes_from_intact_to_tampered_when_the_model_is_swapped(models, tmp_path):
    intact, tampered, fp, spec = models
    with ServerThread(intact, input_spec=spec) as srv:
        metrics = Metrics(0)
        log = EventLog(tmp_path / "events.jsonl")
        seen: list[str] = []
        reports = []

        def on_run(run):
            metrics.update(run, srv.url)
            log.write(run, srv.url)
            seen.append(run.report.verdict)
            reports.append(run.report)

        client = make_client("kserve", srv.url, input_spec=fp.input_spec, classes=fp.classes, timeout=5, retries=0)
        result: dict = {}
        worker = threading.Thread(
            target=lambda: result.update(r=watch(fp, client, every=0.2, on_run=on_run, record=False, allow_repeat=True)), daemon=True
        )
        worker.start()
        try:
            deadline = time.monotonic() + 30
            while _metric(metrics.port, "tamperprobe_verdict", verdict="INTACT") != 1.0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _metric(metrics.port, "tamperprobe_verdict", verdict="INTACT") == 1.0
            assert _metric(metrics.port, "tamperprobe_tampered", fingerprint=fp.id) == 0.0
            srv.swap(tampered)
            worker.join(timeout=30)
            assert not worker.is_alive() and result["r"].exit_code == 1
            assert _metric(metrics.port, "tamperprobe_tampered", fingerprint=fp.id) == 1.0
            assert _metric(metrics.port, "tamperprobe_verdict", verdict="TAMPERED") == 1.0
            assert _metric(metrics.port, "tamperprobe_verdict", verdict="INTACT") == 0.0
            # the swap may land in the middle of a run: the gauge shows that run's own count
            changed = _metric(metrics.port, "tamperprobe_markers_changed", fingerprint=fp.id)
            assert changed == float(reports[-1].mismatched) and changed >= 1
            assert _metric(metrics.port, "tamperprobe_runs_total", verdict="TAMPERED") == 1.0
        finally:
            metrics.close()
            log.close()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["verdict"] for e in events] == seen and seen[-1] == "TAMPERED" and set(seen[:-1]) == {"INTACT"}
    assert [e["run"] for e in events] == list(range(1, len(events) + 1))


def test_markers_and_decoys_are_counted_apart(models, digits, tmp_path):
    """A run mixes decoys among its markers: tamperprobe_markers counts the markers only, tamperprobe_decoys the decoys;
    changed and failed count both, as the verdict does."""
    intact, tampered, _, spec = models
    x, dx = np.ascontiguousarray(digits[1].x[:8]), np.ascontiguousarray(digits[1].x[8:16])
    fp = make_fingerprint(
        x, intact.logits(x), spec, {"method": "natural"}, intact.digest(), output_spec="logits", decoy_inputs=dx, decoy_logits=intact.logits(dx)
    )
    metrics, runs = Metrics(0), []
    try:
        for model, verdict in ((intact, "INTACT"), (tampered, "TAMPERED")):
            with ServerThread(model, input_spec=spec) as srv:
                client = make_client("kserve", srv.url, input_spec=fp.input_spec, classes=fp.classes, timeout=5, retries=0)
                result = watch(fp, client, count=1, per_run=4, decoys=0.5, history_path=tmp_path / "h.sqlite", on_run=runs.append)
                metrics.update(runs[-1], srv.url)
                report = runs[-1].report
                assert result.exit_code == report.exit_code and report.verdict == verdict
                assert [m.kind for m in report.markers].count("decoy") == 2 and len(report.markers) == 6
                key = {"fingerprint": fp.id, "endpoint": srv.url}
                assert _metric(metrics.port, "tamperprobe_markers", **key) == 4.0
                assert _metric(metrics.port, "tamperprobe_decoys", **key) == 2.0
                assert _metric(metrics.port, "tamperprobe_markers_changed", **key) == float(report.mismatched)
                assert _metric(metrics.port, "tamperprobe_markers_failed", **key) == 0.0
        assert report.mismatched >= 1 and any(m.kind == "decoy" for m in report.markers if not m.ok)  # the tampered run's decoys changed too
    finally:
        metrics.close()


def test_cli_watch_json_metrics_and_event_log(models, tmp_path):
    intact, _, fp, spec = models
    fp_path = save(fp, tmp_path / "fp.tpf")
    with ServerThread(intact, input_spec=spec) as srv:
        res = CliRunner().invoke(
            app,
            [
                "watch",
                str(fp_path),
                "--endpoint",
                srv.url,
                "--every",
                "0.1s",
                "--count",
                "2",
                "--json",
                "--per-run",
                "3",
                "--metrics-port",
                "0",
                "--event-log",
                str(tmp_path / "ev.jsonl"),
            ],
        )
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [d["run"] for d in lines] == [1, 2] and {d["verdict"] for d in lines} == {"INTACT"}
    assert "metrics at http://127.0.0.1:" in res.stderr
    assert len((tmp_path / "ev.jsonl").read_text().splitlines()) == 2


def test_verify_model_reports_the_weight_digest(models, tmp_path):
    """verify --model compares the model's weight digest with the fingerprint's and says so beside the verdict."""
    from tamperprobe.models import save_model

    intact, tampered, fp, _ = models
    fp_path = save(fp, tmp_path / "fp.tpf")
    x = np.zeros((2, 1, 8, 8), np.float32)
    for module, verdict_code, word in ((intact.module, 0, "matches"), (tampered.module, 1, "differs")):
        path = save_model(module, tmp_path / f"{word}.pt", x)
        res = CliRunner().invoke(app, ["verify", str(fp_path), "--model", str(path), "--trusted-model", "--no-history", "--json"])
        assert res.exit_code == verdict_code, res.output
        notes = json.loads(res.stdout)["notes"]
        assert any("weights digest" in n and word in n for n in notes), notes


def test_history_table_is_intact_at_80_columns(models, tmp_path):
    """Issue 12: at 80 columns the history's target column was mangled; every field must stay whole."""
    intact, _, fp, spec = models
    fp_path = save(fp, tmp_path / "fp.tpf")
    hist = tmp_path / "h.sqlite"
    with ServerThread(intact, input_spec=spec) as srv:
        url = f"{srv.url}"
        res = CliRunner().invoke(app, ["verify", str(fp_path), "--endpoint", url, "--history", str(hist)])
        assert res.exit_code == 0, res.output
    out = CliRunner(env={"COLUMNS": "80"}).invoke(app, ["history", "--history", str(hist)])
    assert out.exit_code == 0, out.output
    assert all(len(line) <= 80 for line in out.stdout.splitlines()), out.stdout
    flat = " ".join(out.stdout.split())
    port = url.rsplit(":", 1)[1]
    assert "INTACT" in flat and f"{len(fp)}" in flat and port in out.stdout.replace("\n", "").replace(" ", ""), out.stdout


def test_closed_metrics_stop_serving_and_free_their_port():
    """``Metrics.close`` wakes prometheus_client's serving thread instead of waiting out its 0.5 s poll: the thread has
    ended and the port answers nothing once close returns, whether the metrics were ever read or not."""
    for read_first in (False, True):
        metrics = Metrics(0)
        if read_first:
            assert "tamperprobe_tampered" in HTTP.get(f"http://127.0.0.1:{metrics.port}/metrics", timeout=5).text
        metrics.close()
        assert not metrics._thread.is_alive()
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", metrics.port)) != 0
