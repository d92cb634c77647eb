"""A fleet from one process: real servers on 127.0.0.1 (intact, tampered, dead), a real history, the real CLI."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fakes import free_port
from tamperprobe import zoo
from tamperprobe.cli.app import app
from tamperprobe.fingerprint import make_fingerprint, save
from tamperprobe.fleet import config
from tamperprobe.fleet.watch import FleetWatch
from tamperprobe.models import TorchModel
from tamperprobe.server.app import ServerThread

HTTP = httpx.Client(timeout=5, limits=httpx.Limits(max_keepalive_connections=0))  # one TLS context for the module, not one per request


@pytest.fixture(scope="module")
def world(digits, tmp_path_factory):
    """An intact and a tampered MLP, two signed fingerprints of the intact one (the second for another deployment)."""
    from tamperprobe import signing

    train, test = digits
    torch.manual_seed(0)
    module = zoo.build("mlp", (1, 8, 8)).eval()
    tampered = zoo.build("mlp", (1, 8, 8)).eval()
    tampered.load_state_dict(module.state_dict())
    with torch.no_grad():
        tampered.net[-1].bias.add_(0.5)
    intact = TorchModel(module, "intact")
    root = tmp_path_factory.mktemp("fleet")
    key = root / "owner.key"
    signing.generate_keypair(key)
    private = signing.load_private_key(key)
    paths = []
    for i, rows in enumerate((slice(0, 120), slice(120, 140))):
        x = np.ascontiguousarray(test.x[rows])
        fp = make_fingerprint(x, intact.logits(x), train.input_spec, {"method": "natural", "n": i}, intact.digest(), output_spec="logits")
        save(fp, root / f"fp{i}.tpf", sign_key=private)
        paths.append(root / f"fp{i}.tpf")
    from tamperprobe.fingerprint import load

    trust = signing.Trust.from_sources([key.with_suffix(".pub")])
    ids = [load(p, trust=trust).id for p in paths]
    return {"intact": intact, "tampered": TorchModel(tampered, "tampered"), "spec": train.input_spec, "root": root, "fps": paths, "ids": ids}


def fleet_file(world, tmp_path: Path, urls: dict[str, str], extra: str = "", **per: str) -> Path:
    lines = [
        "[defaults]",
        'protocol = "kserve"',
        "per_run = 2",
        "decoys = 0",
        "timeout = 2",
        "retries = 0",
        'deadline = "20s"',
        f'trust_keys = ["{world["root"] / "owner.pub"}"]',
        extra,
    ]
    for name, url in urls.items():
        own = per.get(name, "")
        fp = "" if "fingerprint =" in own else f'fingerprint = "{world["fps"][0]}"'
        lines += ["", "[[endpoint]]", f'name = "{name}"', f'url = "{url}"', fp, own]
    p = tmp_path / "fleet.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_fleet_check_verifies_every_endpoint_and_exits_with_the_worst(world, tmp_path, monkeypatch):
    from tamperprobe import fingerprint

    dead = f"http://127.0.0.1:{free_port()}"
    with ServerThread(world["intact"], input_spec=world["spec"]) as a, ServerThread(world["intact"], input_spec=world["spec"]) as b:
        with ServerThread(world["tampered"], input_spec=world["spec"]) as t:
            urls = {"eu": a.url, "us": b.url, "bad": t.url, "dead": dead, "swapped": b.url}
            per = {"eu": f'expect = "{world["ids"][0]}"', "swapped": f'fingerprint = "{world["fps"][1]}"\nexpect = "{world["ids"][0]}"'}
            path = fleet_file(world, tmp_path, urls, **per)
            loads = []
            real_load = fingerprint.load
            monkeypatch.setattr(fingerprint, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
            hist = tmp_path / "h.sqlite"
            r = CliRunner().invoke(app, ["fleet", "check", str(path), "--json", "--history", str(hist)])
    assert r.exit_code == 1, r.output  # a TAMPERED endpoint is the worst
    rows = {o["endpoint"]: o for o in json.loads(r.stdout)}
    assert list(rows) == ["eu", "us", "bad", "dead", "swapped"]
    assert {k: v["verdict"] for k, v in rows.items()} == {
        "eu": "INTACT",
        "us": "INTACT",
        "bad": "TAMPERED",
        "dead": "INCONCLUSIVE",
        "swapped": "NOT AUTHENTIC",
    }
    assert rows["swapped"]["exit_code"] == 3 and "not the one expected" in rows["swapped"]["problem"]
    assert sorted(map(str, loads)) == sorted(map(str, world["fps"]))  # each file read once for the whole pass
    # endpoints that share a fingerprint share its pool: no marker went to two of them
    from tamperprobe.served import history

    runs = history.runs(hist, limit=10)
    assert sorted(run["target"].split("/v2/")[0] for run in runs) == sorted(f"kserve:{urls[n]}" for n in ("eu", "us", "bad", "dead"))  # not "swapped"
    # the dead run reached nothing and gave its markers back to the ledger (another endpoint may have drawn them since):
    # its record names them, but they were never sent, so only the runs that reached a server count here
    sent = [set(m["index"] for m in history.markers(run["id"], path=hist)) for run in runs if dead not in run["target"]]
    flat = [i for s in sent for i in s]
    assert len(flat) == len(set(flat)) == 6


def test_fleet_check_bad_file_sends_nothing(world, tmp_path):
    path = fleet_file(world, tmp_path, {"eu": "http://127.0.0.1:9/v2/models/m"}, extra="evrey = 3")
    r = CliRunner().invoke(app, ["fleet", "check", str(path)])
    assert r.exit_code == 2 and "unknown field 'evrey'" in r.output and "[defaults]" in r.output


def _metric(port: int, name: str, **labels: str) -> float | None:
    text = HTTP.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_fleet_watch_holds_a_tampered_endpoint_and_keeps_the_others_on_schedule(world, tmp_path):
    pytest.importorskip("prometheus_client")
    from tamperprobe.served.monitor import Metrics

    hook_out = tmp_path / "hook.txt"
    with ServerThread(world["intact"], input_spec=world["spec"]) as a, ServerThread(world["intact"], input_spec=world["spec"]) as b:
        with ServerThread(world["intact"], input_spec=world["spec"]) as c:
            hook = f'hook = "echo $TAMPERPROBE_ENDPOINT $TAMPERPROBE_VERDICT >> {hook_out}"'
            path = fleet_file(world, tmp_path, {"a": a.url, "b": b.url, "c": c.url}, extra=f"every = 0.25\n{hook}")
            fleet = config.load(path)
            metrics = Metrics(0)
            runs: dict[str, list[str]] = {"a": [], "b": [], "c": []}

            def on_run(e, run):
                runs[e.name].append(run.report.verdict)
                metrics.update(run, e.name)

            fw = FleetWatch(fleet, history_path=tmp_path / "h.sqlite", on_run=on_run)
            result: dict = {}
            worker = threading.Thread(target=lambda: result.update(code=fw.run(poll=0.2)), daemon=True)
            worker.start()
            try:
                deadline = time.monotonic() + 30
                while min(len(v) for v in runs.values()) < 2 and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert all(v[:2] == ["INTACT", "INTACT"] for v in runs.values()), runs
                b.swap(world["tampered"])  # tamper b, kill c
                c.stop()
                while ("TAMPERED" not in runs["b"] or "INCONCLUSIVE" not in runs["c"]) and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert runs["b"][-1] == "TAMPERED" and runs["c"][-1] == "INCONCLUSIVE", runs
                held, a_before = len(runs["b"]), len(runs["a"])
                time.sleep(1.0)  # four runs' time
                assert len(runs["b"]) == held  # held: not run again
                assert len(runs["a"]) >= a_before + 2  # the others keep their schedule
                assert set(runs["a"]) == {"INTACT"}
                assert _metric(metrics.port, "tamperprobe_tampered", endpoint="b") == 1.0
                assert _metric(metrics.port, "tamperprobe_tampered", endpoint="a") == 0.0
                assert _metric(metrics.port, "tamperprobe_verdict", endpoint="c", verdict="INCONCLUSIVE") == 1.0
            finally:
                fw.stop()
                worker.join(timeout=30)
                metrics.close()
    assert result["code"] == 1
    lines = hook_out.read_text().splitlines()
    assert "b TAMPERED" in lines and "c INCONCLUSIVE" in lines and not any(line.startswith("a ") for line in lines)


def test_fleet_watch_reload_keeps_unchanged_entries_and_refuses_a_broken_file(world, tmp_path):
    warnings: list[str] = []
    path = fleet_file(world, tmp_path, {"a": "http://127.0.0.1:9/x", "b": "http://127.0.0.1:9/y"}, extra="every = 3600")
    fw = FleetWatch(config.load(path), history_path=tmp_path / "h.sqlite", on_warning=lambda n, t: warnings.append(t))
    before = dict(fw.watched)
    path.write_text(path.read_text().replace("http://127.0.0.1:9/y", "http://127.0.0.1:9/z"))
    assert fw.reload()
    assert fw.watched["a"] is before["a"] and fw.watched["b"] is not before["b"]
    assert fw.watched["b"].entry.url.endswith("/z")
    path.write_text("[[endpoint]]\nname = 3\n")
    assert not fw.reload() and any("reload refused" in w for w in warnings)
    assert set(fw.watched) == {"a", "b"}
