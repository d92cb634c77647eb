"""Which ASGI server keeps ``tamperprobe serve`` up under the attacks of issue 18: ours against granian and hypercorn.

The same ASGI application (``tamperprobe.server.app.create_app``, a zoo CNN, output spec top1) runs
under each server as a child process on 127.0.0.1 with an open-file limit of 1024, configured as
close to ``serve``'s limits as each server allows (header deadline 10 s, keep-alive 5 s, backlog
128):

* ``uvicorn+guard (main)``: ``tamperprobe serve`` from another source tree (``--main-src``, e.g. a
  ``git archive`` of main), the guard as it was;
* ``uvicorn+guard``: ``tamperprobe serve`` from this tree;
* ``granian 2.8.7``: ``--interface asgi --http 1 --http1-header-read-timeout 10000 --backpressure 1000``
  (its connection bound), the application of ``_serve_app.py``;
* ``hypercorn 0.18.0``: ``--keep-alive 5 --read-timeout 10`` (its only read deadline), the same application.

Each server is attacked (``_attacks.py`` and ``load_serve.slow_connections``) while a probe asks
``/v2/health/ready`` on a fresh connection every 100 ms: 1,100 pre-handshake TLS stalls (on a TLS
start of the server), 1,100 slowloris connections, 40 headers-then-no-body connections, one
connection of 1-byte chunks, ~100 KB headers. Granian and hypercorn come from ``--extra-path`` (a
``pip install --target`` folder), so the project's environment does not change.

    python bench/server_compare.py --main-src /tmp/main-src --extra-path /tmp/srvcmp

writes ``bench/results/server-compare.md`` (+ ``.json``). Every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

import _attacks as attacks
import load_serve as ls

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent


def server_args(kind: str, model: Path, port: int, tls: tuple[Path, Path] | None) -> list[str]:
    if kind.startswith("uvicorn"):
        return ls.serve_args(model, port, tls)
    if kind == "granian":
        args = [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        args += [
            "--no-ws",
            "--http",
            "1",
            "--http1-header-read-timeout",
            "10000",
            "--backlog",
            "128",
            "--backpressure",
            "1000",
            "--log-level",
            "warning",
        ]
        return args + (["--ssl-certificate", str(tls[0]), "--ssl-keyfile", str(tls[1])] if tls else []) + ["_serve_app:app"]
    if kind == "hypercorn":
        args = [sys.executable, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", "--keep-alive", "5", "--read-timeout", "10"]
        args += ["--backlog", "128", "--log-level", "warning"]
        return args + (["--certfile", str(tls[0]), "--keyfile", str(tls[1])] if tls else []) + ["_serve_app:app"]
    raise ValueError(kind)


async def plain_phases(args: argparse.Namespace, pid: int, port: int) -> list[ls.Phase]:
    url = f"http://127.0.0.1:{port}"
    s = args.seconds
    return [
        await ls.run_phase(pid, url, f"{args.slow} slowloris + 8 clients", ls.slow_connections(url, port, args.slow, s)),
        await ls.run_phase(pid, url, "40 headers-then-no-body + 4 clients", attacks.headers_no_body(url, port, 40, s)),
        await ls.run_phase(pid, url, "1 x 1-byte chunks + 1 client", attacks.tiny_chunks(url, port, 1, s)),
        await ls.run_phase(pid, url, "4 x 100 KB headers + 1 client", attacks.big_headers(url, 4, min(s, 6.0))),
    ]


async def tls_phases(args: argparse.Namespace, pid: int, port: int) -> list[ls.Phase]:
    url = f"https://127.0.0.1:{port}"
    return [await ls.run_phase(pid, url, f"TLS: {args.slow} pre-handshake stalls + 2 clients", attacks.tls_stall(url, port, args.slow, args.seconds))]


def run_server(kind: str, args: argparse.Namespace, d: Path, model: Path, cert: tuple[Path, Path]) -> list[dict]:
    src = args.main_src if kind.endswith("(main)") else str(ROOT / "src")
    env = {"PYTHONPATH": os.pathsep.join([src, str(BENCH), args.extra_path]), "TP_MODEL": str(model), "OMP_NUM_THREADS": "1"}
    rows = []
    for tls in (False, True):
        port = ls.free_port()
        log = d / f"{kind.split()[0]}.log"
        proc = ls.start_server(server_args(kind, model, port, cert if tls else None), port, env, log, "https" if tls else "http")
        try:
            phases = asyncio.run((tls_phases if tls else plain_phases)(args, proc.pid, port))
        finally:
            ls.stop_server(proc)
        rows += [{"server": kind, **p.summary()} for p in phases]
    return rows


def write(rows: list[dict], out: Path, meta: dict) -> None:
    lines = [
        "# ASGI servers under the attacks of issue 18",
        "",
        f"Produced by `python bench/server_compare.py` ({meta['machine']}; load average at start {meta['load_start']}, at end {meta['load_end']}).",
        "Same application, same model, open-file limit 1024, health probe on a fresh connection every 100 ms (a failure counts 5 s).",
        "",
        "| server | attack | health p50 / p99 / max ms | failed probes | real requests | attacking connections |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        fails = ", ".join(f"{k}: {v}" for k, v in r["health_failures"].items()) or "0"
        statuses = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items()) or "-"
        lines.append(
            f"| {r['server']} | {r['phase']} | {r['health_p50_ms']} / {r['health_p99_ms']} / {r['health_max_ms']} | {fails} | {statuses} | {'; '.join(r['notes'])} |"
        )
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--main-src", required=True, help="source tree of the server as it was (uvicorn+guard (main))")
    p.add_argument("--extra-path", required=True, help="folder holding granian and hypercorn (pip install --target)")
    p.add_argument("--servers", default="uvicorn+guard (main),uvicorn+guard,granian,hypercorn")
    p.add_argument("--seconds", type=float, default=12.0, help="length of each attack")
    p.add_argument("--slow", type=int, default=1100)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "server-compare.md")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    meta = {"machine": f"{os.cpu_count()} cores", "load_start": [round(v, 2) for v in os.getloadavg()]}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model, cert = ls.make_model(d), attacks.make_certificate(d)
        for kind in args.servers.split(","):
            print(f"== {kind}", flush=True)
            rows += run_server(kind, args, d, model, cert)
            meta["load_end"] = [round(v, 2) for v in os.getloadavg()]
            write(rows, args.out, meta)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
