"""Feed the monitoring people already run: Prometheus metrics and a JSON-lines event log for ``watch``.

``Metrics`` serves, on its own HTTP port (``/metrics``, Prometheus text format, via
``prometheus_client``; the ``[metrics]`` extra), the state of every fingerprint × endpoint that
a watch checks, labelled ``fingerprint`` (id) and ``endpoint`` (shown without credentials):

==========================================  ===============================================================
``tamperprobe_verdict``                     1 for the last run's verdict, 0 for the others (label ``verdict``:
                                            INTACT, TAMPERED, INCONCLUSIVE)
``tamperprobe_tampered``                    1 when the last run was TAMPERED, else 0 (the one to alert on)
``tamperprobe_markers_changed``             markers and decoys whose answer changed in the last run
``tamperprobe_markers_failed``              markers and decoys that got no usable answer in the last run
``tamperprobe_markers``                     markers sent in the last run (decoys not counted)
``tamperprobe_decoys``                      decoys (natural inputs with known answers) sent among them
``tamperprobe_pool_runs_left``              runs of fresh markers the fingerprint's pool can still supply
``tamperprobe_run_seconds``                 how long the last run took
``tamperprobe_last_run_timestamp_seconds``  when the last run ended (Unix time)
``tamperprobe_runs_total``                  runs so far (label ``verdict``)
``tamperprobe_request_latency_seconds``     a histogram of per-request latencies
==========================================  ===============================================================

``EventLog`` appends one JSON object per run to a file (``Report.to_json`` plus the run number,
the time and the endpoint), flushed at once, for log shippers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .._extras import require
from .credentials import redact_urls_in
from .verify import INCONCLUSIVE, INTACT, TAMPERED
from .watch import WatchRun

VERDICTS = (INTACT, TAMPERED, INCONCLUSIVE)


class Metrics:
    """Prometheus gauges and counters for watch runs, served on ``host:port`` until ``close()``."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        prom = require("prometheus_client", "metrics")
        self.registry = prom.CollectorRegistry()
        labels = ["fingerprint", "endpoint"]
        r = self.registry
        self.verdict = prom.Gauge("tamperprobe_verdict", "1 for the last run's verdict, 0 for the others", [*labels, "verdict"], registry=r)
        self.tampered = prom.Gauge("tamperprobe_tampered", "1 when the last run was TAMPERED", labels, registry=r)
        self.changed = prom.Gauge("tamperprobe_markers_changed", "markers and decoys whose answer changed in the last run", labels, registry=r)
        self.failed = prom.Gauge("tamperprobe_markers_failed", "markers and decoys without a usable answer in the last run", labels, registry=r)
        self.markers = prom.Gauge("tamperprobe_markers", "markers sent in the last run (decoys not counted)", labels, registry=r)
        self.decoys = prom.Gauge("tamperprobe_decoys", "decoys (natural inputs with known answers) sent in the last run", labels, registry=r)
        self.runs_left = prom.Gauge("tamperprobe_pool_runs_left", "runs of fresh markers the fingerprint's pool can still supply", labels, registry=r)
        self.seconds = prom.Gauge("tamperprobe_run_seconds", "duration of the last run", labels, registry=r)
        self.when = prom.Gauge("tamperprobe_last_run_timestamp_seconds", "end of the last run (Unix time)", labels, registry=r)
        self.runs = prom.Counter("tamperprobe_runs", "verification runs", [*labels, "verdict"], registry=r)
        self.latency = prom.Histogram("tamperprobe_request_latency_seconds", "latency of each prediction request", labels, registry=r)
        self._server, self._thread = prom.start_http_server(port, addr=host, registry=r)
        self.port = int(self._server.server_address[1])

    def update(self, run: WatchRun, endpoint: str) -> None:
        """Record ``run`` of the fingerprint against ``endpoint``."""
        import time

        r = run.report
        key = {"fingerprint": r.fingerprint_id, "endpoint": redact_urls_in(endpoint)}
        for v in VERDICTS:
            self.verdict.labels(**key, verdict=v).set(1.0 if r.verdict == v else 0.0)
        self.tampered.labels(**key).set(1.0 if r.verdict == TAMPERED else 0.0)
        self.changed.labels(**key).set(r.mismatched)
        self.failed.labels(**key).set(r.failed)
        self.markers.labels(**key).set(r.marker_count)
        self.decoys.labels(**key).set(r.decoy_count)
        if r.runs_left is not None:
            self.runs_left.labels(**key).set(r.runs_left)
        self.seconds.labels(**key).set(r.seconds)
        self.when.labels(**key).set(time.time())
        self.runs.labels(**key, verdict=r.verdict).inc()
        for m in r.markers:
            if m.latency is not None:
                self.latency.labels(**key).observe(m.latency)

    def close(self) -> None:
        """Stop serving. ``prometheus_client``'s thread looks at its stop flag only when its ``select`` returns, every
        0.5 s when nobody asks for the metrics: a connection to the port wakes it, so closing takes no such wait."""
        import socket
        import threading

        stopper = threading.Thread(target=self._server.shutdown, name="tamperprobe-metrics-stop", daemon=True)
        stopper.start()
        address = self._server.server_address[:2]
        while stopper.is_alive():
            try:
                socket.create_connection(address, timeout=1).close()
            except OSError:
                pass
            stopper.join(0.01)
        self._server.server_close()


class EventLog:
    """One JSON object per run, appended to ``path`` and flushed (a log shipper can follow the file)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the watch's lifetime

    def write(self, run: WatchRun, endpoint: str) -> None:
        event: dict[str, Any] = {"run": run.number, "time": run.time, "endpoint": redact_urls_in(endpoint), **run.report.to_json()}
        self._file.write(json.dumps(event, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
