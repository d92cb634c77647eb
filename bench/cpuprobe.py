"""Where the test suite's CPU goes: a pytest plugin that records each test's CPU, and a report over its records.

Wall time on these shared 2 cores swings with the load; CPU seconds swing much less, so a change to the suite is
judged by the CPU it saves (and by the waiting it removes: wall minus CPU). For each test the plugin records the
worker's own CPU (``time.process_time``), the CPU of the child processes reaped during the test
(``RUSAGE_CHILDREN``: CLI subprocesses, sandbox children, servers) and the wall time, setup and teardown included.
A child reaped later (a server of a module fixture, Ray's workers) is counted against the test during which it
ends, so per-module totals are right and per-test figures for children are not always.

    CPUPROBE_DIR=/tmp/probe PYTHONPATH=bench python -m pytest -p cpuprobe tests/... (-n 0 for one process)
    python bench/cpuprobe.py /tmp/probe [--top 40] [--module-times tests/module-times.json]

``--module-times`` writes each module's wall seconds, which ``tests/conftest.py`` reads to hand the longest modules
to the xdist workers first.

Each process (xdist worker or the controller) writes ``rows-<worker>.json`` into ``$CPUPROBE_DIR`` at its end.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import time
from pathlib import Path

import pytest

_rows: list[dict] = []


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # type: ignore[no-untyped-def]
    kids0, self0, wall0 = _children_cpu(), time.process_time(), time.perf_counter()
    yield
    _rows.append(
        {
            "id": item.nodeid,
            "self": time.process_time() - self0,
            "kids": _children_cpu() - kids0,
            "wall": time.perf_counter() - wall0,
        }
    )


def pytest_sessionfinish(session):  # type: ignore[no-untyped-def]
    folder = Path(os.environ.get("CPUPROBE_DIR", f"/tmp/cpuprobe-{os.getppid()}"))
    folder.mkdir(parents=True, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    record = {"rows": _rows, "process_cpu": time.process_time(), "children_cpu": _children_cpu()}
    (folder / f"rows-{worker}.json").write_text(json.dumps(record), encoding="utf-8")


def _load_rows(folder: Path) -> tuple[list[dict], float]:
    """Every test's record, and the workers' CPU outside any test."""
    rows: list[dict] = []
    outside = 0.0
    for path in sorted(folder.glob("rows-*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        rows += record["rows"]
        if record["rows"]:  # a worker: its CPU outside any test (imports, collection, session teardown)
            outside += record["process_cpu"] - sum(r["self"] for r in record["rows"])
            outside += record["children_cpu"] - sum(r["kids"] for r in record["rows"])
    return rows, outside


def module_times(folder: Path) -> dict[str, float]:
    """Wall seconds per test module (file name), longest first."""
    per: dict[str, float] = collections.Counter()
    for r in _load_rows(folder)[0]:
        per[Path(r["id"].split("::")[0]).name] += r["wall"]
    return {name: round(t, 1) for name, t in sorted(per.items(), key=lambda kv: -kv[1])}


def report(folder: Path, top: int) -> str:
    rows, outside = _load_rows(folder)
    per: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for r in rows:
        p = per[r["id"].split("::")[0]]
        p[0], p[1], p[2], p[3] = p[0] + r["self"], p[1] + r["kids"], p[2] + r["wall"], p[3] + 1
    cpu = sum(r["self"] + r["kids"] for r in rows)
    wall = sum(r["wall"] for r in rows)
    lines = [
        f"tests: {len(rows)}; CPU in tests {cpu:.1f} s (own {sum(r['self'] for r in rows):.1f}, children "
        f"{sum(r['kids'] for r in rows):.1f}); CPU of workers outside tests {outside:.1f} s; wall summed over tests {wall:.1f} s, "
        f"of which waiting (wall - CPU) {sum(max(0.0, r['wall'] - r['self'] - r['kids']) for r in rows):.1f} s",
        "",
        "| module | own CPU s | children CPU s | CPU s | wall s | tests |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in sorted(per.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))[:top]:
        lines.append(f"| {name} | {p[0]:.1f} | {p[1]:.1f} | {p[0] + p[1]:.1f} | {p[2]:.1f} | {int(p[3])} |")
    lines += ["", "| test | CPU s | wall s |", "|---|---|---|"]
    for r in sorted(rows, key=lambda r: -(r["self"] + r["kids"]))[:top]:
        lines.append(f"| {r['id']} | {r['self'] + r['kids']:.2f} | {r['wall']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--module-times", type=Path, help="write each module's wall seconds to this JSON file")
    args = ap.parse_args()
    print(report(args.folder, args.top))
    if args.module_times:
        args.module_times.write_text(json.dumps(module_times(args.folder), indent=0) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
