"""A campaign through the Ray backend beside the local one: same results, and what the cells cost.

Runs one campaign (``run_evaluation``) twice on this machine, with ``backend="local"`` and with
``backend=RayBackend()`` on a local Ray cluster of ``--cpus`` CPUs, and records:

* whether ``results.json`` is the same (timings, machine and start time aside);
* wall time of each, and the cluster's start-up;
* each cell's seconds (``method:*``, ``attack:*`` timings: in-process for local, in the worker for Ray);
* the object store's use after the run (``ray.available_resources``/``cluster_resources``);
* a projection for N workers from the measured cells: the driver's serial part (everything but the
  cells) plus the cells packed greedily, longest first, onto N workers (the longest cell bounds it).

The model is the zoo CNN trained on the bundled 8x8 digits (seconds to train), so that the run fits
a shared 2-core machine; ``--attacks``/``--methods`` choose the cells. Results go to
``bench/results/ray-campaign.json`` and ``ray-campaign.md``.

    python bench/ray_campaign.py                  # local, then Ray with 2 CPUs
    python bench/ray_campaign.py --cpus 2 --bag 60
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results"
VOLATILE = ("machine", "started", "seconds", "timings")


def _log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def projection(serial: float, cells: list[float], workers: int) -> float:
    """Wall time on ``workers`` workers: the serial part plus the cells packed longest first onto the least loaded worker."""
    loads = [0.0] * max(1, workers)
    for c in sorted(cells, reverse=True):
        heapq.heapreplace(loads, loads[0] + c)
    return serial + max(loads)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--bag", type=int, default=60)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--methods", default="natural,boundary,badv,sensitive")
    ap.add_argument("--attacks", default="noise,prune,fp16,int8,floor,finetune,trojan")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the cluster listens on 127.0.0.1 only
    import ray
    import torch

    from tamperprobe import zoo
    from tamperprobe.data import load_data
    from tamperprobe.evaluation import run_evaluation
    from tamperprobe.evaluation.backends import RayBackend
    from tamperprobe.models import TorchModel
    from tamperprobe.train import fit

    torch.set_num_threads(1)
    data = load_data("digits")
    train, _ = data.split(0.3, seed=0)
    torch.manual_seed(0)
    model = TorchModel(fit(zoo.build("cnn", (1, 8, 8)), train.x, train.y, epochs=8, lr=3e-3, seed=0), "digits-cnn")
    settings = dict(
        methods=args.methods.split(","),
        attacks=args.attacks.split(","),
        bag=args.bag,
        resamples=args.resamples,
        trials=2,
        attack_samples=500,
        seed=0,
    )
    runs = {}
    t0 = time.monotonic()
    local = run_evaluation(model, data, **settings)
    runs["local"] = {"wall": time.monotonic() - t0, "timings": local.timings}
    _log(f"local: {runs['local']['wall']:.0f} s")
    t0 = time.monotonic()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    startup = time.monotonic() - t0
    t0 = time.monotonic()
    remote = run_evaluation(model, data, backend=RayBackend(), **settings)
    runs["ray"] = {"wall": time.monotonic() - t0, "timings": remote.timings, "startup": startup}
    resources = {"available": ray.available_resources(), "cluster": ray.cluster_resources()}
    ray.shutdown()
    _log(f"ray: {runs['ray']['wall']:.0f} s (+ {startup:.0f} s start-up)")

    same = {k: v for k, v in local.to_json().items() if k not in VOLATILE} == {k: v for k, v in remote.to_json().items() if k not in VOLATILE}
    cells = {k: v for k, v in local.timings.items() if k.startswith(("method:", "attack:"))}
    serial = local.seconds - sum(cells.values())
    overhead = {k: remote.timings[k] - v for k, v in cells.items() if k in remote.timings}
    doc = {
        "settings": settings,
        "cpus": args.cpus,
        "same_results": same,
        "runs": runs,
        "cells_local": cells,
        "serial_local": serial,
        "object_store": {k: {r: v for r, v in d.items() if "memory" in r} for k, d in resources.items()},
        "projection": {n: projection(serial, list(cells.values()), n) for n in (1, 2, 4, 8, 16, 32)},
        "machine": local.machine,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (OUT / "ray-campaign.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (OUT / "ray-campaign.md").write_text(markdown(doc))
    _log(f"same results: {same}; wrote {OUT / 'ray-campaign.md'}; in-worker minus in-process seconds per cell: {overhead}")
    return 0 if same else 1


def markdown(doc: dict) -> str:
    runs, cells = doc["runs"], doc["cells_local"]
    top = sorted(cells.items(), key=lambda kv: -kv[1])[:8]
    lines = [
        "# A campaign through the Ray backend, beside the local one",
        "",
        f"`python bench/ray_campaign.py` ({doc['date']}; {doc['machine'].get('nproc')} usable cores, {doc['machine'].get('cpu')}; "
        "the cores are shared with other jobs, so wall times are upper bounds). Digits CNN; "
        f"methods {', '.join(doc['settings']['methods'])} + baselines; attacks {', '.join(doc['settings']['attacks'])}; "
        f"bag {doc['settings']['bag']}, {doc['settings']['resamples']} resamples, 2 trials per random attack.",
        "",
        f"- results.json identical (timings aside): **{'yes' if doc['same_results'] else 'NO'}**",
        f"- local: {runs['local']['wall']:.1f} s; Ray on {doc['cpus']} CPUs: {runs['ray']['wall']:.1f} s "
        f"(speed-up {runs['local']['wall'] / runs['ray']['wall']:.2f}×), cluster start-up {runs['ray']['startup']:.1f} s",
        f"- the driver's serial part (intact model, reference logits, selections, benign runtimes, measuring): {doc['serial_local']:.1f} s "
        f"of {runs['local']['wall']:.1f} s; the cells: {sum(cells.values()):.1f} s",
        f"- object store after the run: {json.dumps(doc['object_store'])}",
        "",
        "## The costliest cells (local, seconds; Ray: in the worker)",
        "",
        "| cell | local | Ray |",
        "|---|---|---|",
        *(f"| {k} | {v:.2f} | {runs['ray']['timings'].get(k, float('nan')):.2f} |" for k, v in top),
        "",
        "## Projection for N workers",
        "",
        "Serial part plus the cells packed longest first onto N workers, from the local cell times: where it stops scaling is where "
        "the longest cell or the serial part dominates.",
        "",
        "| workers | projected seconds |",
        "|---|---|",
        *(f"| {n} | {s:.1f} |" for n, s in doc["projection"].items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
