"""Load test of ``tamperprobe serve``: concurrency, 1,100 slow connections, 8 MB bodies, and the attacks of issue 18.

Starts the real ``serve`` command as a child process on 127.0.0.1 (a zoo CNN saved as TorchScript,
``--output-spec top1``) with its open-file limit set to 1024 soft and hard (a stock Linux
default, where the issue saw 1,100 slow connections exhaust the descriptors), then runs, with
asyncio and httpx:

1. **concurrency**: 8, 32 and 128 connections each sending valid one-marker inference
   requests back to back for ``--seconds`` seconds;
2. **slow connections**: 1,100 connections that send a request line and then one header byte
   per second (slowloris), while 8 connections send valid requests;
3. **large bodies**: 16 clients sending 8 MB JSON bodies (a flat ``data`` list of ~900 000
   numbers: read, parsed and refused as 400) back to back, in three rounds;
4. **the attacks of issue 18** (``_attacks.py``): 40 connections sending infer headers and no
   body beside 4 real clients; 1 and 4 connections of 1-byte chunks; 4 clients posting 0.25 MB
   requests of repeated ``outputs``; 4 clients sending ~100 KB of headers; and, on a second
   server started with a self-signed certificate, 1,100 connections that never send a TLS
   ClientHello beside 2 real clients.

During every phase a probe opens a fresh connection every 100 ms and asks ``GET
/v2/health/ready`` (timeout 5 s; a failure counts as 5 s), and the server's resident memory is
sampled from ``/proc/PID/status`` every 250 ms (the process and its children, the parser
process included). Every loop is bounded in time and in count.

Goals (issues 9 and 18): zero 5xx anywhere (health probes, real requests and attacking ones), health
p99 under 1 s and no failed probe in every phase, memory flat (the RSS after each large-body round
no higher than after the first, within 10%).

    python bench/load_serve.py                      # writes bench/results/load-serve.md (+ .json)
    python bench/load_serve.py --pythonpath /tmp/old-src --out /tmp/before.md   # another source tree's server

``--pythonpath`` runs the server from another source tree (e.g. ``git archive`` of an older
commit), for a before/after comparison; that server must accept the same basic options.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

import _attacks as attacks

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 8, 8)
BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, *SHAPE], "datatype": "FP32", "data": [0.5] * 64}]}).encode()
INFER = "/v2/models/model/infer"
FD_LIMIT = 1024
ALL_PHASES = ("concurrency", "slow", "bodies", "no-body", "chunks", "duplicates", "headers", "tls-stall")


# --------------------------------------------------------------------------- measurements


@dataclass
class Phase:
    name: str
    statuses: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    health_failures: dict[str, int] = field(default_factory=dict)
    rss: list[float] = field(default_factory=list)  # MiB
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, key: str) -> None:
        self.statuses[key] = self.statuses.get(key, 0) + 1

    def fivexx(self) -> int:
        return sum(n for k, n in self.statuses.items() if k.startswith("5"))

    def summary(self) -> dict:
        def pct(values: list[float], q: float) -> float | None:
            return float(np.percentile(values, q)) if values else None

        return {
            "phase": self.name,
            "seconds": round(self.seconds, 1),
            "requests": sum(self.statuses.values()),
            "statuses": dict(sorted(self.statuses.items())),
            "5xx": self.fivexx(),
            "latency_p50_ms": _ms(pct(self.latencies, 50)),
            "latency_p99_ms": _ms(pct(self.latencies, 99)),
            "health_probes": len(self.health),
            "health_failures": dict(self.health_failures),
            "health_p50_ms": _ms(pct(self.health, 50)),
            "health_p99_ms": _ms(pct(self.health, 99)),
            "health_max_ms": _ms(max(self.health) if self.health else None),
            "rss_start_mib": round(self.rss[0], 1) if self.rss else None,
            "rss_max_mib": round(max(self.rss), 1) if self.rss else None,
            "rss_end_mib": round(self.rss[-1], 1) if self.rss else None,
            "notes": self.notes,
        }


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def rss_mib(pid: int) -> float:
    """Resident memory of the server process and all its descendants (the parser process included), MiB."""
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
        stack += _children(p)
    return total / 1024


async def sample_rss(pid: int, phase: Phase, stop: asyncio.Event) -> None:
    while not stop.is_set():
        phase.rss.append(rss_mib(pid))
        await asyncio.sleep(0.25)


def probe_process(url: str, stop, results) -> None:
    """Runs in its own process (so the load generator's busy event loop cannot delay it): a fresh connection
    every 100 ms, as an orchestrator's probe would open; puts (latency, failure or None) on ``results``."""
    with httpx.Client(timeout=5.0, verify=False, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        while not stop.is_set():
            t0 = time.monotonic()
            failure = None
            try:
                r = client.get(f"{url}/v2/health/ready")
                if r.status_code != 200:
                    failure = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                failure = type(exc).__name__
            dt = time.monotonic() - t0
            results.put((max(dt, 5.0) if failure and failure.startswith(("Connect", "Read", "Remote", "Pool")) else dt, failure))
            time.sleep(max(0.0, 0.1 - dt))


async def probe_health(url: str, phase: Phase, stop: asyncio.Event) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    stop_flag, results = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=probe_process, args=(url, stop_flag, results), daemon=True)
    proc.start()
    try:
        while not stop.is_set():
            await asyncio.sleep(0.1)
    finally:
        stop_flag.set()
        await asyncio.to_thread(proc.join, 20)
        while not results.empty():
            dt, failure = results.get()
            phase.health.append(dt)
            if failure:
                phase.health_failures[failure] = phase.health_failures.get(failure, 0) + 1


async def send_loop(url: str, body: bytes, phase: Phase, until: float, max_requests: int) -> None:
    """One client on one kept-alive connection, sending ``body`` back to back until ``until`` (at most ``max_requests`` times).

    (A client per connection: one httpx pool shared by 128 connections spends more CPU than the server.)
    """
    async with httpx.AsyncClient(timeout=60.0, verify=False, limits=httpx.Limits(max_connections=1)) as client:
        for _ in range(max_requests):
            if time.monotonic() >= until:
                return
            t0 = time.monotonic()
            try:
                r = await client.post(f"{url}{INFER}", content=body, headers={"Content-Type": "application/json"})
                phase.count(str(r.status_code))
                phase.latencies.append(time.monotonic() - t0)
            except httpx.HTTPError as exc:
                phase.count(type(exc).__name__)


async def run_phase(pid: int, url: str, name: str, work) -> Phase:
    phase = Phase(name)
    stop = asyncio.Event()
    background = [asyncio.create_task(sample_rss(pid, phase, stop)), asyncio.create_task(probe_health(url, phase, stop))]
    t0 = time.monotonic()
    try:
        await work(phase)
    finally:
        phase.seconds = time.monotonic() - t0
        stop.set()
        await asyncio.gather(*background)
    print(f"  {name}: {json.dumps(phase.summary())}", flush=True)
    return phase


# --------------------------------------------------------------------------- the phases


def concurrency(url: str, n: int, seconds: float):
    async def work(phase: Phase) -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(send_loop(url, BODY, phase, until, 100_000) for _ in range(n)))

    return work


def slow_connections(url: str, port: int, n: int, seconds: float):
    async def one(phase: Phase, closed: list[float], opened: list[int], until: float) -> None:
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            phase.notes.append(f"slow connection not opened: {exc}") if len(phase.notes) < 5 else None
            return
        opened.append(1)
        try:
            writer.write(f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
            await writer.drain()
            while time.monotonic() < until:
                writer.write(b"X")  # one byte of a header that never ends
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1), timeout=1.0) == b"":
                        closed.append(time.monotonic() - t0)
                        return
                except TimeoutError:
                    pass
        except (ConnectionError, OSError):
            closed.append(time.monotonic() - t0)
        finally:
            writer.close()

    async def work(phase: Phase) -> None:
        closed: list[float] = []
        opened: list[int] = []
        until = time.monotonic() + seconds
        slow = [asyncio.create_task(one(phase, closed, opened, until)) for _ in range(n)]
        legit = [asyncio.create_task(send_loop(url, BODY, phase, until, 100_000)) for _ in range(8)]
        await asyncio.gather(*slow, *legit)
        phase.notes.append(f"{len(opened)} of {n} slow connections opened; {len(closed)} closed by the server")
        if closed:
            phase.notes.append(f"closed after {np.percentile(closed, 50):.1f} s (median), {max(closed):.1f} s (max)")

    return work


def large_bodies(url: str, clients: int, size: int, seconds: float):
    numbers = ",".join(["0.1234567"] * (size // 10))
    body = (f'{{"inputs": [{{"name": "input", "shape": [1, {", ".join(map(str, SHAPE))}], "datatype": "FP32", "data": [' + numbers + "]}]}").encode()

    async def work(phase: Phase) -> None:
        phase.notes.append(f"body of {len(body) / 1e6:.1f} MB")
        until = time.monotonic() + seconds
        await asyncio.gather(*(send_loop(url, body, phase, until, 200) for _ in range(clients)))
        await asyncio.sleep(2.0)  # let the server settle before the last RSS samples

    return work


# --------------------------------------------------------------------------- the server


def start_server(args: list[str], port: int, env_extra: dict[str, str], log: Path, scheme: str = "http") -> subprocess.Popen:
    """Start a server command (``args``) with an open-file limit of ``FD_LIMIT``; returns once its health probe answers."""
    env = dict(os.environ, **env_extra)

    def limit_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))

    # a session of its own: stop_server ends the server and any worker process it started (granian's), nothing else
    proc = subprocess.Popen(args, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, preexec_fn=limit_fds, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{scheme}://127.0.0.1:{port}/v2/health/ready", timeout=1, verify=False).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def serve_args(model: Path, port: int, tls: tuple[Path, Path] | None = None) -> list[str]:
    args = [sys.executable, "-m", "tamperprobe", "serve", str(model), "--input-shape", "1,8,8", "--port", str(port), "--output-spec", "top1"]
    return args + (["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])] if tls else [])


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it leads its own session), SIGKILL after 20 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
    try:  # a worker that outlived its parent
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_model(d: Path) -> Path:
    import torch

    from tamperprobe import zoo
    from tamperprobe.models import save_model

    torch.manual_seed(0)
    return save_model(zoo.build("cnn", SHAPE).eval(), d / "cnn.pt", np.zeros((2, *SHAPE), np.float32))


async def main_async(args: argparse.Namespace, pid: int, url: str, port: int) -> list[Phase]:
    """The phases on a plain-HTTP server (the TLS stall runs on its own server: ``tls_phase``)."""
    phases = []
    want = args.phases.split(",")
    if "concurrency" in want:
        for n in (8, 32, 128):
            phases.append(await run_phase(pid, url, f"{n} concurrent connections", concurrency(url, n, args.seconds)))
    if "slow" in want:
        work = slow_connections(url, port, args.slow, args.slow_seconds)
        phases.append(await run_phase(pid, url, f"{args.slow} slow connections + 8 clients", work))
    if "bodies" in want:
        for round_ in (1, 2, 3):
            phases.append(await run_phase(pid, url, f"16 clients x 8 MB bodies, round {round_}", large_bodies(url, 16, 8_000_000, args.seconds)))
    if "no-body" in want:
        phases.append(await run_phase(pid, url, "40 headers-then-no-body + 4 clients", attacks.headers_no_body(url, port, 40, args.attack_seconds)))
    if "chunks" in want:
        for n in (1, 4):
            phases.append(await run_phase(pid, url, f"{n} x 1-byte chunks + 1 client", attacks.tiny_chunks(url, port, n, args.attack_seconds)))
    if "duplicates" in want:
        phases.append(await run_phase(pid, url, "4 x duplicate outputs + 1 client", attacks.duplicate_outputs(url, 4, args.attack_seconds)))
    if "headers" in want:
        phases.append(await run_phase(pid, url, "4 x 100 KB headers + 1 client", attacks.big_headers(url, 4, args.attack_seconds)))
    return phases


async def tls_phase(args: argparse.Namespace, pid: int, url: str, port: int) -> list[Phase]:
    work = attacks.tls_stall(url, port, args.slow, args.slow_seconds)
    return [await run_phase(pid, url, f"TLS: {args.slow} pre-handshake stalls + 2 clients", work)]


def write_report(phases: list[Phase], out: Path, meta: dict) -> bool:
    rows = [p.summary() for p in phases]
    big = [r for r in rows if "8 MB" in r["phase"]]
    fivexx = sum(r["5xx"] for r in rows)
    worst_p99 = max(r["health_p99_ms"] or 0 for r in rows)
    health_failed = sum(sum(r["health_failures"].values()) for r in rows)
    flat = bool(big) and all(r["rss_end_mib"] <= big[0]["rss_end_mib"] * 1.10 for r in big[1:])
    ok = fivexx == 0 and worst_p99 < 1000 and flat and health_failed == 0
    lines = [
        "# Load test of `tamperprobe serve`",
        "",
        f"Produced by `python bench/load_serve.py` ({meta['started']}, {meta['machine']}; server source {meta['server_source']}).",
        f"The server runs as a child process with an open-file limit of {FD_LIMIT} (soft and hard); see the script's docstring",
        f"for the phases. Load average of the machine (shared with other work) at start and end: {meta['load_average']['start']},",
        f"{meta['load_average']['end']}: times are upper bounds of what an idle machine takes.",
        *(["", meta["note"]] if meta["note"] else []),
        "",
        "## Goals",
        "",
        "| goal | result | |",
        "|---|---|---|",
        f"| zero 5xx | {fivexx} | {'met' if fivexx == 0 else 'NOT MET'} |",
        f"| health p99 under 1 s in every phase | worst p99 {worst_p99:.0f} ms, {health_failed} failed probes | "
        f"{'met' if worst_p99 < 1000 and health_failed == 0 else 'NOT MET'} |",
        f"| memory flat across large-body rounds | RSS after rounds {', '.join(str(r['rss_end_mib']) for r in big) or '-'} MiB | {'met' if flat else 'NOT MET'} |",
        "",
        "## Phases",
        "",
        "| phase | s | requests | statuses | 5xx | latency p50 / p99 ms | health probes | health p50 / p99 / max ms | failed probes | RSS start / max / end MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
        fails = ", ".join(f"{k}: {v}" for k, v in r["health_failures"].items()) or "0"
        lines.append(
            f"| {r['phase']} | {r['seconds']} | {r['requests']} | {statuses} | {r['5xx']} | {r['latency_p50_ms']} / {r['latency_p99_ms']} | "
            f"{r['health_probes']} | {r['health_p50_ms']} / {r['health_p99_ms']} / {r['health_max_ms']} | {fails} | "
            f"{r['rss_start_mib']} / {r['rss_max_mib']} / {r['rss_end_mib']} |"
        )
    notes = [f"- {r['phase']}: {n}" for r in rows for n in r["notes"]]
    if notes:
        lines += ["", "## Notes", "", *notes]
    lines += [
        "",
        f"Server log: {meta['log_bytes']} bytes, {meta['log_too_many_open_files']} 'Too many open files' messages; first lines:",
        "",
        "```",
        *meta["log_head"],
        "```",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "phases": rows, "goals_met": ok}, indent=1))
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=8.0, help="length of each concurrency and large-body phase")
    p.add_argument("--slow", type=int, default=1100, help="slow connections (and pre-handshake TLS stalls)")
    p.add_argument("--slow-seconds", type=float, default=25.0, help="length of the slow-connection and TLS-stall phases")
    p.add_argument("--attack-seconds", type=float, default=12.0, help="length of each other attack phase")
    p.add_argument("--pythonpath", default=None, help="run the server from this source tree")
    p.add_argument("--phases", default=",".join(ALL_PHASES), help="which phases to run (comma-separated)")
    p.add_argument("--note", default="", help="a line for the report (e.g. which commit the server came from)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load-serve.md")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))  # the client side needs ~1,200
    load_start = [round(v, 2) for v in os.getloadavg()]
    env = {"PYTHONPATH": args.pythonpath} if args.pythonpath else {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model = make_model(d)
        log = d / "server.log"
        started = datetime.now(UTC).isoformat(timespec="seconds")
        port = free_port()
        proc = start_server(serve_args(model, port), port, env, log)
        try:
            phases = asyncio.run(main_async(args, proc.pid, f"http://127.0.0.1:{port}", port))
        finally:
            stop_server(proc)
        if "tls-stall" in args.phases.split(","):
            port = free_port()
            proc = start_server(serve_args(model, port, attacks.make_certificate(d)), port, env, log, "https")
            try:
                phases += asyncio.run(tls_phase(args, proc.pid, f"https://127.0.0.1:{port}", port))
            finally:
                stop_server(proc)
        text = log.read_text(errors="replace")
        meta = {
            "started": started,
            "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()}",
            "load_average": {"start": load_start, "end": [round(v, 2) for v in os.getloadavg()]},
            "server_source": args.pythonpath or "this tree's src/",
            "note": args.note,
            "log_bytes": len(text.encode()),
            "log_too_many_open_files": text.count("Too many open files"),
            "log_head": text.splitlines()[:8],
        }
    ok = write_report(phases, args.out, meta)
    print(f"wrote {args.out}: goals {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
