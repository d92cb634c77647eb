"""One ``fleet check`` pass over many endpoints on 127.0.0.1, beside sequential ``verify`` processes and a plain httpx loop.

The fleet: ``--endpoints`` model names served from ``--servers`` ``tamperprobe serve --model-repository`` processes
(a TorchScript CNN trained on the bundled digits; byte-identical files share one loaded instance); 1 % of the names
serve a tampered copy, 5 % are reached through a relay that holds each answer for ``--slow`` seconds (slow, but within the deadline), 2 % fail
(half to a port where nothing listens, half to a model name the server does not have). Every endpoint draws
``--per-run`` markers and as many decoys from one fingerprint (``allow_repeat``: 10 passes over 1 000 endpoints
need more fresh markers than the bundled digits give; the ledger still records every draw).

Measured, in one run, interleaved: the wall time of each of ``--passes`` fleet check passes (in this process:
client CPU seconds and RSS after each pass), requests per second; ``--sequential`` ``tamperprobe verify``
processes (one endpoint each, scaled to the fleet); and the ceiling, a plain asyncio + httpx loop that sends the
same number of requests of the same body to the same endpoints without drawing, comparing or recording.

    python bench/fleet.py --endpoints 1000 --passes 10 --out bench/results/fleet

Each pass also records the two servers' CPU seconds and the 1-minute load average at its start and end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build_models(root: Path, markers: int = 200, decoys: int = 200) -> tuple[Path, Path, Path]:
    """An intact and a tampered TorchScript CNN on the digits, and a signed fingerprint of the intact one with decoys."""
    import torch

    from tamperprobe import signing, zoo
    from tamperprobe.data import load_data
    from tamperprobe.fingerprint import make_fingerprint, save
    from tamperprobe.models import TorchModel
    from tamperprobe.train import fit

    train, test = load_data("digits").split(0.3, seed=0)
    torch.manual_seed(0)
    module = fit(zoo.build("cnn", (1, 8, 8)), train.x, train.y, epochs=6, lr=3e-3, seed=0).eval()
    tampered = zoo.build("cnn", (1, 8, 8)).eval()
    tampered.load_state_dict(module.state_dict())
    with torch.no_grad():
        last = [p for p in tampered.parameters()][-1]
        last.add_(0.3)
    example = torch.from_numpy(test.x[:1])
    intact_path, tampered_path = root / "intact.pt", root / "tampered.pt"
    torch.jit.trace(module, example).save(str(intact_path))
    torch.jit.trace(tampered, example).save(str(tampered_path))
    intact = TorchModel(module, "intact")
    everything = load_data("digits").x  # natural markers and decoys: any of the bundled images, each used once
    x, d = np.ascontiguousarray(everything[:markers]), np.ascontiguousarray(everything[markers : markers + decoys])
    fp = make_fingerprint(
        x,
        intact.logits(x),
        train.input_spec,
        {"method": "natural"},
        intact.digest(),
        output_spec="logits",
        decoy_inputs=d,
        decoy_logits=intact.logits(d),
    )
    key = root / "owner.key"
    signing.generate_keypair(key)
    save(fp, root / "fp.tpf", sign_key=signing.load_private_key(key))
    return intact_path, tampered_path, root / "fp.tpf"


def build_repositories(root: Path, n: int, servers: int, intact: Path, tampered: Path, rng: np.random.Generator) -> tuple[list[Path], dict[str, str]]:
    """``servers`` repositories holding ``n`` names between them; the kind of each name (intact, tampered, slow, refused, missing)."""
    kinds = np.array(["intact"] * n, dtype=object)
    order = rng.permutation(n)
    cut = [int(round(n * f)) for f in (0.01, 0.05, 0.01, 0.01)]
    at = 0
    for kind, k in zip(("tampered", "slow", "refused", "missing"), cut):
        kinds[order[at : at + k]] = kind
        at += k
    repos = [root / f"repo{s}" for s in range(servers)]
    names: dict[str, str] = {}
    for i in range(n):
        name = f"m{i:04d}"
        names[name] = str(kinds[i])
        if kinds[i] in ("refused", "missing"):
            continue
        d = repos[i % servers] / name
        d.mkdir(parents=True)
        os.link(tampered if kinds[i] == "tampered" else intact, d / "model.pt")
        (d / "config.toml").write_text('input_shape = [1, 8, 8]\noutput_spec = "logits"\n')
    return repos, names


def start_servers(repos: list[Path]) -> tuple[list[subprocess.Popen], list[int]]:
    import httpx

    procs, ports = [], []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for repo in repos:
        port = free_port()
        cmd = [sys.executable, "-m", "tamperprobe", "serve", "--model-repository", str(repo), "--port", str(port), "--threads", "1"]
        cmd += ["--max-concurrent", "64", "--max-connections", "4000"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env))
        ports.append(port)
    for p, port in zip(procs, ports):
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve did not start: {p.stderr.read().decode()[-2000:] if p.stderr else ''}")
            time.sleep(0.2)
    return procs, ports


class SlowRelay:
    """Holds each answer of a real server for ``delay`` seconds (the fleet's slow endpoints), on its own port."""

    def __init__(self, upstream: int, delay: float) -> None:
        self.upstream, self.delay, self.port = upstream, delay, free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ready = threading.Event()
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold: float) -> None:
            try:
                while data := await reader.read(65536):
                    if hold:  # every answer (the answers here fit one read) waits, on new and kept-alive connections alike
                        await asyncio.sleep(hold)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream)
            except OSError:
                cw.close()
                return
            await asyncio.gather(pipe(cr, uw, 0.0), pipe(ur, cw, self.delay))

        async def main() -> None:
            server = await asyncio.start_server(handle, "127.0.0.1", self.port)
            self.ready.set()
            async with server:
                await server.serve_forever()

        self.loop.run_until_complete(main())


def fleet_toml(
    path: Path, fp: Path, names: dict[str, str], ports: list[int], relays: list[int], per_run: int, concurrency: int, per_server: int
) -> Path:
    dead = free_port()
    lines = [
        "[fleet]",
        f"concurrency = {concurrency}",
        f"per_endpoint_connections = {per_server}",
        "",
        "[defaults]",
        f'fingerprint = "{fp}"',
        f'trust_keys = ["{fp.parent / "owner.pub"}"]',
        f"per_run = {per_run}",
        "decoys = 1",
        "allow_repeat = true",
        "timeout = 10",
        "retries = 1",
        'deadline = "30s"',
    ]
    for i, (name, kind) in enumerate(names.items()):
        port = ports[i % len(ports)]
        if kind == "slow":
            port = relays[i % len(relays)]
        elif kind == "refused":
            port = dead
        lines += ["", "[[endpoint]]", f'name = "{name}"', f'url = "http://127.0.0.1:{port}/v2/models/{name}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def plain_httpx(urls: list[str], body: bytes, requests: int, concurrency: int, *, shared: bool = True) -> float:
    """The ceiling: ``requests`` POSTs of ``body`` to each URL's infer route, ``concurrency`` endpoints at once; wall seconds.

    Kept-alive connections (as the fleet's default profile keeps them), no drawing, comparing,
    recording or metadata request. ``shared``: one ``httpx.AsyncClient`` for every endpoint (its pool
    of ``2 * concurrency`` connections); else a client per endpoint, opened and closed around its
    requests (less work per request in httpx's pool: the faster of the two here).
    """
    import httpx

    tls = ssl.create_default_context()  # made once: every client would otherwise load the CA bundle again (plain http needs none)

    async def main() -> None:
        sem = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
        async with httpx.AsyncClient(limits=limits, timeout=30) as common:

            async def send(client: httpx.AsyncClient, url: str) -> None:
                for _ in range(requests):
                    try:
                        await client.post(url + "/infer", content=body, headers={"Content-Type": "application/json"})
                    except httpx.HTTPError:
                        pass

            async def one(url: str) -> None:
                async with sem:
                    if shared:
                        await send(common, url)
                    else:
                        async with httpx.AsyncClient(timeout=30, verify=tls) as own:
                            await send(own, url)

            await asyncio.gather(*(one(u) for u in urls))

    t = time.perf_counter()
    asyncio.run(main())
    return time.perf_counter() - t


def run(args: argparse.Namespace) -> dict:
    from tamperprobe.fleet import check, config

    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    intact, tampered, fp = build_models(root)
    repos, names = build_repositories(root, args.endpoints, args.servers, intact, tampered, rng)
    procs, ports = start_servers(repos)
    relays = [SlowRelay(p, args.slow).port for p in ports]
    try:
        path = fleet_toml(root / "fleet.toml", fp, names, ports, relays, args.per_run, args.concurrency, args.per_server)
        fleet = config.load(path)
        expected = {"intact": "INTACT", "slow": "INTACT", "tampered": "TAMPERED", "refused": "INCONCLUSIVE", "missing": "INCONCLUSIVE"}
        body = json.dumps({"inputs": [{"name": "input-0", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": np.zeros(64).tolist()}]}).encode()
        passes, wrong, began = [], 0, time.monotonic()

        def servers_cpu() -> float:
            return sum(proc_cpu(p.pid) for p in procs)

        for i in range(args.passes):
            if i and time.monotonic() - began > args.budget:
                print(f"time budget of {args.budget:g} s spent: {i} passes", flush=True)
                break
            load0, srv0, cpu0, t0 = os.getloadavg()[0], servers_cpu(), time.process_time(), time.perf_counter()
            outcomes = check.check(fleet, history_path=root / "history.sqlite")
            wall = time.perf_counter() - t0
            cpu, srv = time.process_time() - cpu0, servers_cpu() - srv0
            row = {
                "pass": i + 1,
                "wall_s": round(wall, 2),
                "client_cpu_s": round(cpu, 2),
                "servers_cpu_s": round(srv, 2),
                "rss_mib": round(rss_mib(), 1),
            }
            bad = [o for o in outcomes if o.verdict != expected[names[o.endpoint]]]
            wrong += len(bad)
            sent = sum(o.run.report.marker_count + o.run.report.decoy_count for o in outcomes if o.run is not None)
            row.update({"requests": sent, "requests_per_s": round(sent / wall, 1), "wrong_verdicts": len(bad)})
            row["load_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]  # at the start and the end of the pass
            for shared, key in ((True, "ceiling"), (False, "ceiling_per_endpoint")) if i < args.ceiling_passes else ():
                srv0, cpu0 = servers_cpu(), time.process_time()
                urls = [e.url for e in fleet.endpoints]
                row[f"{key}_wall_s"] = round(plain_httpx(urls, body, 2 * args.per_run, args.concurrency, shared=shared), 2)
                row[f"{key}_client_cpu_s"] = round(time.process_time() - cpu0, 2)
                row[f"{key}_servers_cpu_s"] = round(servers_cpu() - srv0, 2)
            passes.append(row)
            print(json.dumps(row), flush=True)
            for o in bad[:5]:
                print(f"  wrong: {o.endpoint} ({names[o.endpoint]}) read {o.verdict}: {o.summary()}", flush=True)
        seq = sequential(fleet, [n for n, k in names.items() if k == "intact"], args.sequential, root)
        return {
            "endpoints": args.endpoints,
            "servers": args.servers,
            "per_run": args.per_run,
            "concurrency": args.concurrency,
            "per_endpoint_connections": args.per_server,
            "client_profile": "python-requests-session (fleet check's default)",
            "kinds": {k: sum(v == k for v in names.values()) for k in expected},
            "passes": passes,
            "wrong_verdicts": wrong,
            "sequential": seq,
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


def sequential(fleet, intact: list[str], n: int, root: Path) -> dict:
    """``n`` intact endpoints verified one ``tamperprobe verify`` process after another; scaled to the whole fleet."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TAMPERPROBE_HISTORY": str(root / "seq.sqlite")}
    picked = [e for e in fleet.endpoints if e.name in set(intact)][:n]
    t = time.perf_counter()
    codes = []
    for e in picked:
        cmd = [sys.executable, "-m", "tamperprobe", "verify", str(e.fingerprint), "--endpoint", e.url, "--trust-key", str(e.trust_keys[0])]
        cmd += ["--per-run", str(e.per_run), "--decoys", "1", "--allow-repeat", "--retries", "1"]
        codes.append(subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env).returncode)
    wall = time.perf_counter() - t
    return {
        "processes": n,
        "wall_s": round(wall, 2),
        "scaled_to_fleet_s": round(wall / max(1, n) * len(fleet.endpoints), 1),
        "exit_codes": sorted(set(codes)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoints", type=int, default=1000)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--passes", type=int, default=10)
    ap.add_argument("--ceiling-passes", type=int, default=3)
    ap.add_argument("--per-run", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--per-server", type=int, default=32, help="the fleet file's per_endpoint_connections")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds: no new pass starts after this")
    ap.add_argument("--slow", type=float, default=0.5)
    ap.add_argument("--sequential", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "passes"}, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
