"""A soak of ``tamperprobe fleet watch`` against flapping servers on 127.0.0.1, with one endpoint tampered mid-run.

One ``serve --model-repository`` process holds ``--endpoints`` names of one TorchScript CNN (the digits); a
``fleet watch`` process verifies each name every ``--every`` seconds with fresh markers from one shared pool (no
repeats allowed), with its metrics, event log and history. Every ``--flap`` seconds the server is killed
(SIGKILL) and restarted ``--down`` seconds later on the same port; at ``--tamper-at`` (a fraction of the run) the
file behind one name is replaced by a tampered copy and that name unloaded, so that it loads the new file.

Recorded: every run's verdict against what was served when it ran (intact and up, down, tampered), the watch's
RSS and open descriptors every 10 s, a scrape of ``tamperprobe_tampered`` per endpoint, the markers each outage
spent (runs that reached nothing give theirs back) and the watch's exit code after SIGTERM.

    python bench/fleet_soak.py --minutes 20 --out bench/results/fleet-soak
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import build_models, free_port  # noqa: E402  (bench/fleet.py)


def proc_stats(pid: int) -> tuple[float, int]:
    rss = float("nan")
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def scrape(port: int) -> dict[str, float]:
    import httpx

    out = {}
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        if line.startswith("tamperprobe_tampered{"):
            name = line.split('endpoint="', 1)[1].split('"', 1)[0]
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


class Server:
    def __init__(self, repo: Path, port: int) -> None:
        self.repo, self.port, self.proc = repo, port, None
        self.windows: list[list[float]] = []  # [down_from, up_again]

    def start(self) -> None:
        import httpx

        cmd = [sys.executable, "-m", "tamperprobe", "serve", "--model-repository", str(self.repo), "--port", str(self.port), "--threads", "1"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        if self.windows and len(self.windows[-1]) == 1:
            self.windows[-1].append(time.time())

    def kill(self) -> None:
        assert self.proc is not None
        self.windows.append([time.time()])
        self.proc.kill()
        self.proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--endpoints", type=int, default=6)
    ap.add_argument("--every", type=float, default=20.0)
    ap.add_argument("--flap", type=float, default=180.0)
    ap.add_argument("--down", type=float, default=30.0)
    ap.add_argument("--tamper-at", type=float, default=0.6)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="fleet-soak-"))
    intact, tampered, fp = build_models(root, markers=900, decoys=897)
    repo = root / "repo"
    names = [f"m{i}" for i in range(args.endpoints)]
    for n in names:
        (repo / n).mkdir(parents=True)
        os.link(intact, repo / n / "model.pt")
        (repo / n / "config.toml").write_text('input_shape = [1, 8, 8]\noutput_spec = "logits"\n')
    port, mport = free_port(), free_port()
    server = Server(repo, port)
    server.start()
    fleet = root / "fleet.toml"
    lines = ["[defaults]", f'fingerprint = "{fp}"', f'trust_keys = ["{root / "owner.pub"}"]', "per_run = 2", "decoys = 0.5"]
    lines += [f"every = {args.every}", "timeout = 5", "retries = 1", 'deadline = "15s"']
    for n in names:
        lines += ["", "[[endpoint]]", f'name = "{n}"', f'url = "http://127.0.0.1:{port}/v2/models/{n}"']
    fleet.write_text("\n".join(lines) + "\n")
    events = root / "events.jsonl"
    cmd = [sys.executable, "-m", "tamperprobe", "fleet", "watch", str(fleet), "--metrics-port", str(mport), "--event-log", str(events)]
    cmd += ["--history", str(root / "history.sqlite")]
    watcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(root / "watch.err", "w"), env={**os.environ, "OMP_NUM_THREADS": "1"})
    start = time.time()
    end = start + args.minutes * 60
    tamper_at, tampered_name, tampered_since = start + args.tamper_at * args.minutes * 60, names[len(names) // 2], None
    next_flap, samples = start + args.flap, []
    try:
        while time.time() < end:
            now = time.time()
            if now >= next_flap:
                server.kill()
                time.sleep(args.down)
                server.start()
                next_flap = time.time() + args.flap
            if tampered_since is None and now >= tamper_at:
                target = repo / tampered_name / "model.pt"
                target.unlink()
                os.link(tampered, target)
                import httpx

                httpx.post(f"http://127.0.0.1:{port}/v2/repository/models/{tampered_name}/unload", json={}, timeout=10)
                tampered_since = time.time()
            rss, fds = proc_stats(watcher.pid)
            samples.append({"t": round(time.time() - start, 1), "rss_mib": round(rss, 1), "fds": fds, "tampered": scrape(mport)})
            time.sleep(10)
        watcher.send_signal(signal.SIGTERM)
        code = watcher.wait(60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
        if server.proc is not None:
            server.proc.kill()
    result = analyse(events, server.windows, tampered_name, tampered_since, start, samples, code, args)
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "outages")}, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")


def analyse(events: Path, windows: list[list[float]], tampered_name: str, tampered_since: float | None, start: float, samples, code, args) -> dict:
    from datetime import datetime

    runs = [json.loads(line) for line in events.read_text().splitlines()]
    rows, outages = [], [{"down_s": round(w[0] - start, 1), "up_s": round(w[1] - start, 1), "runs": 0, "spent": 0, "returned": 0} for w in windows]
    for r in runs:
        t = datetime.fromisoformat(r["time"]).timestamp()
        # a run's time is when it ended; it began at most its seconds earlier
        began = t - float(r.get("seconds") or 0)
        down = next((i for i, w in enumerate(windows) if began < w[1] and t > w[0] - 1), None)
        whole = down is not None and began >= windows[down][0] and t <= windows[down][1]  # the run lay wholly inside the outage
        if down is not None:
            served = "down" if whole else "edge"  # edge: the run overlapped a kill or a restart (answers may have come while up)
        else:
            served = "tampered" if tampered_since and r["endpoint"] == tampered_name and began >= tampered_since else "intact"
        rows.append({"endpoint": r["endpoint"], "t": round(t - start, 1), "served": served, "verdict": r["verdict"]})
        if down is not None:
            o = outages[down]
            o["runs"] += 1
            sent = len(r.get("markers") or [])  # markers and decoys of the run
            returned = any("went back to the pool" in n for n in r.get("notes") or [])
            o["returned" if returned else "spent"] += sent
    wrong = [x for x in rows if (x["served"] == "intact" and x["verdict"] != "INTACT") or (x["served"] == "tampered" and x["verdict"] != "TAMPERED")]
    false_alarms = [x for x in rows if x["verdict"] == "TAMPERED" and x["served"] != "tampered"]
    intact_when_not = [x for x in rows if x["verdict"] == "INTACT" and x["served"] in ("down", "tampered")]
    return {
        "minutes": args.minutes,
        "endpoints": args.endpoints,
        "every_s": args.every,
        "runs": len(rows),
        "by_served_and_verdict": {
            f"{s}->{v}": sum(x["served"] == s and x["verdict"] == v for x in rows)
            for s in ("intact", "edge", "down", "tampered")
            for v in ("INTACT", "TAMPERED", "INCONCLUSIVE")
        },
        "false_alarms": len(false_alarms),
        "intact_when_not_intact": len(intact_when_not),
        "unexpected": wrong[:20],
        "tampered_endpoint": tampered_name,
        "tampered_at_s": None if tampered_since is None else round(tampered_since - start, 1),
        "exit_code": code,
        # after the first minute (imports and the first runs done): flat means the last is no more than the first
        "rss_mib_at_1min_last_max": _first_last_max([x["rss_mib"] for x in samples if x["t"] >= 60]),
        "fds_at_1min_last_max": _first_last_max([x["fds"] for x in samples if x["t"] >= 60]),
        "outages": outages,
        "samples": samples,
    }


def _first_last_max(values: list) -> list | None:
    return [values[0], values[-1], max(values)] if values else None


if __name__ == "__main__":
    main()
