"""The deployment examples under deploy/ stay true: each parses, its fleet file is valid, its command line is one the
CLI accepts, and every metric the dashboard and the alert rules query is one the exporter serves."""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path

import pytest

from tamperprobe.fleet import config

yaml = pytest.importorskip("yaml")
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def served_metrics() -> set[str]:
    """Every sample name the exporter serves (a histogram's _bucket/_sum/_count and a counter's _total included)."""
    pytest.importorskip("prometheus_client")
    from tamperprobe.served.monitor import Metrics

    m = Metrics(0)
    try:
        names = set()
        for family in m.registry.collect():
            names.add(family.name)
            names.update({f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count", "_created")})
        return names
    finally:
        m.close()


def queried_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\b(tamperprobe_[a-z_]+)\b", expr))


def check_fleet_command(argv: list[str]) -> None:
    """``argv`` (after the program name) parses as a real ``tamperprobe`` command line, without running it."""
    import typer

    from tamperprobe.cli.app import app

    command = typer.main.get_command(app)  # typer may carry its own copy of click: use the command's own context class
    assert argv[:2] == ["fleet", "watch"], argv
    group = command.get_command(command.context_class(command), "fleet")  # type: ignore[attr-defined]
    assert group is not None
    watch = group.get_command(group.context_class(group), "watch")
    assert watch is not None
    ctx = watch.make_context("watch", argv[2:], resilient_parsing=False)
    assert ctx.params["metrics_port"] == 9108


def test_kubernetes_example() -> None:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "tamperprobe-fleet.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "Secret", "Deployment", "Service"}
    fleet = config.parse(__import__("tomllib").loads(kinds["ConfigMap"]["data"]["fleet.toml"]), Path("/etc/tamperprobe/fleet.toml"))
    assert [e.name for e in fleet.endpoints] == ["digits-eu", "digits-us"]
    secret_keys = set(kinds["Secret"]["stringData"])
    assert {e.token_env for e in fleet.endpoints} <= secret_keys  # every token the fleet file names is in the Secret
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    check_fleet_command(container["command"][1:])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for e in fleet.endpoints:
        assert any(str(e.fingerprint).startswith(m) for m in mounts), e.fingerprint
    ann = kinds["Service"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "9108"


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(DEPLOY / "systemd" / "tamperprobe-fleet.service")
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[0].endswith("/tamperprobe")
    check_fleet_command(argv[1:])
    assert unit["Service"]["KillSignal"] == "SIGTERM"


def test_dashboard_and_alerts_query_only_served_metrics() -> None:
    served = served_metrics()
    dash = json.loads((DEPLOY / "grafana" / "tamperprobe-fleet.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "tamperprobe-alerts.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    queried = set().union(*(queried_metrics(e) for e in exprs))
    assert queried, "no metric queried"
    assert queried <= served, f"not served: {sorted(queried - served)}"
    # the rule the README recommends is in the alert file
    assert any("tamperprobe_tampered" in r["expr"] and "== 1" in r["expr"] for g in rules["groups"] for r in g["rules"])
