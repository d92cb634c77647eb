"""Campaigns through the Ray backend beside the local one, side by side: same results, speed-up, what the cells cost.

One Ray cluster of ``--cpus`` CPUs is started on this machine (127.0.0.1) and warmed (``start_cluster``:
each worker's first task, then one digits campaign through Ray and one in this process, all timed
as the cold start); then each campaign (``run_evaluation``) runs **interleaved** — local, Ray,
local, Ray, ... ``--repeats`` times each — so that both backends see the same load on the shared
machine. Recorded, per campaign:

* whether every Ray run's ``results.json`` equals the first local run's (timings, machine and
  start time aside);
* wall time of each run and the load average around it; min and median per backend and their
  ratio (the speed-up);
* each cell's seconds (``method:*``, ``attack:*``: in-process for local — an attack's includes the
  driver measuring the markers against it — and in the worker for Ray);
* Ray's own cost per task (round trip of an empty task, one at a time and many at once) and what
  ``ray.put`` of the model and data costs;
* the object store's use, from the sizes of the objects a run puts and gets back (``store_use``:
  this Ray install has no memory summary);
* a projection for N workers from the measured cells (``projection``; its model is in its docstring),
  also for the committed full-size CIFAR-10 campaigns (``committed_projection``).

Torch threads: the driver runs with ``--threads`` (1); a Ray task runs with the driver's number,
so local = one process, one thread; Ray = the driver (one thread) plus ``--cpus`` workers of one
thread each. Ray starts its workers at the niceness of ``RAY_worker_niceness`` (its default: 15,
below every ordinary process); the session records what the workers got.

Campaigns (``CAMPAIGNS``): ``digits`` (the zoo CNN trained on the bundled 8x8 digits), ``cifar`` and
``cifar-attacks`` (the pretrained CIFAR-10 ResNet-56 of ``bench/_cifar.py``, reduced to fit a shared
2-core machine: ``CIFAR_REDUCED``, ``CIFAR_ATTACKS``). Results: ``bench/results/ray-campaign.json``
and ``ray-campaign.md`` (with ``ray-campaign-notes.md``); ``--merge`` adds a session's campaigns to
the existing JSON (a campaign measured again keeps its earlier runs as ``<name> [session N]``).

    python bench/ray_campaign.py --repeats 3                                   # digits and cifar
    RAY_worker_niceness=0 python bench/ray_campaign.py --campaigns cifar-attacks --repeats 2 --merge --tag "workers nice 0"
    python bench/ray_campaign.py --report-only                                 # the page again from the JSON
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ray_campaign_report import report_md

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results"
VOLATILE = ("machine", "started", "seconds", "timings")
DIGITS = {
    "methods": ["natural", "boundary", "badv", "sensitive"],
    "attacks": ["noise", "prune", "fp16", "int8", "floor", "finetune", "trojan"],
    "bag": 60,
    "resamples": 2000,
    "trials": 2,
    "attack_samples": 500,
}
# The CIFAR-10 campaign, reduced to fit: two methods (+ the three baselines), int8 and two pruning ratios,
# bags of 30, 2,000 resamples; every output spec and benign runtime as the full campaign.
CIFAR_REDUCED = {
    "methods": ["natural", "boundary"],
    "attacks": [("int8", "int8"), ("prune-10%", "prune"), ("prune-30%", "prune")],
    "attack_params": {"prune-10%": {"ratio": 0.1}, "prune-30%": {"ratio": 0.3}},
    "bag": 30,
    "resamples": 2000,
    "trials": 1,
}


# Full-size CIFAR-10 campaigns whose cell times the projection also reads (local backend, committed results).
COMMITTED = ("2026-11-22-cifar10-resnet56", "2026-12-06-cifar10-resnet56-prune-grid")

# A second reduced CIFAR-10 campaign whose cells are attacks that train (and so run in parallel): one method,
# fine-tuning and weight noise (2 instances each), int8 and two pruning ratios.
CIFAR_ATTACKS = {
    "methods": ["natural"],
    "attacks": [("finetune", "finetune"), ("noise", "noise"), ("int8", "int8"), ("prune-10%", "prune"), ("prune-30%", "prune")],
    "attack_params": {"prune-10%": {"ratio": 0.1}, "prune-30%": {"ratio": 0.3}},
    "bag": 30,
    "resamples": 2000,
    "trials": 2,
}


def _log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def projection(
    pre: float, bags: list[float], attacks: list[float], driver: float, measure: float, workers: int, overhead: float = 0.0, bags_first: bool = True
) -> float:
    """Projected wall time of a campaign on ``workers`` workers, from measured cell costs.

    The model follows the campaign's order: after the driver's first part ``pre`` (intact model),
    every bag cell and then every attack cell is submitted (``bags_first``; the other way round
    before the campaign changed its order); a free worker takes the next cell in that order (FIFO
    list scheduling), each costing its measured seconds plus ``overhead`` (Ray's per-task cost). The driver waits for the last bag, then does its own work ``driver`` (reference logits,
    selections, benign runtimes), then waits for the last attack and measures the markers against
    every attacked model (``measure``). So the wall time is
    ``pre + max(t_bags + driver, t_all) + measure``, where ``t_bags`` is when the last bag finishes
    and ``t_all`` when the last cell does. Not modelled: the driver's work competing for the same
    cores as the workers, and the time to ship models to and from the workers.
    """
    free = [(0.0, w) for w in range(max(1, workers))]
    heapq.heapify(free)
    t_bags = t_all = 0.0
    cells = [*(("bag", c) for c in bags), *(("attack", c) for c in attacks)]
    for kind, cost in cells if bags_first else cells[len(bags) :] + cells[: len(bags)]:
        start, w = heapq.heappop(free)
        end = start + cost + overhead
        heapq.heappush(free, (end, w))
        t_all = max(t_all, end)
        if kind == "bag":
            t_bags = max(t_bags, end)
    return pre + max(t_bags + driver, t_all) + measure


def store_use(camp: dict[str, Any], settings: dict[str, Any], costs: dict[str, Any], data: Any) -> dict[str, float]:
    """What a Ray run puts through the object store, from the objects' sizes (this Ray has no memory summary: no grpc).

    Put once per run: the model twice (once for the bags, once for the attacks), the owner's data (its
    training and test parts) and the attacker's data; returned: one attacked model per attack cell
    and one bag per method (inputs and seeds, float32). Objects under 100 KiB travel inline, not
    through the store.
    """
    import numpy as np

    runs = [r for r in camp["runs"] if r["backend"] == "ray"]
    attacks = len([k for k in runs[0]["timings"] if k.startswith("attack:")]) if runs else 0
    methods = len([k for k in runs[0]["timings"] if k.startswith("method:")]) if runs else 0
    per_bag = 2 * settings["bag"] * int(np.prod(data.x.shape[1:])) * 4 / 2**20
    put = 2 * costs["put_model_mib"] + costs["put_data_mib"] + costs.get("put_attack_data_mib", costs["put_data_mib"])
    returned = attacks * costs["put_model_mib"] + methods * per_bag
    return {"put_mib": put, "returned_mib": returned, "total_mib": put + returned, "attack_cells": attacks, "bag_cells": methods}


def _noop() -> None:
    return None


def ray_costs(ray: Any, model: Any, data: Any, attack_data: Any) -> dict[str, Any]:
    """Ray's own cost: an empty task's round trip (50 one at a time; 200 at once), and ``ray.put`` of the model and the data."""
    from ray import cloudpickle

    from tamperprobe.evaluation.backends import portable

    task = ray.remote(_noop).options(num_cpus=1)
    ray.get(task.remote())
    t0 = time.monotonic()
    for _ in range(50):
        ray.get(task.remote())
    serial = (time.monotonic() - t0) / 50
    t0 = time.monotonic()
    ray.get([task.remote() for _ in range(200)])
    batch = (time.monotonic() - t0) / 200
    out: dict[str, Any] = {"empty_task_round_trip_s": serial, "empty_task_throughput_s": batch}
    for name, value in (("model", model), ("data", data), ("attack_data", attack_data)):
        if value is None:
            continue
        t0 = time.monotonic()
        ref = ray.put(portable(value))
        out[f"put_{name}_s"] = time.monotonic() - t0
        out[f"put_{name}_mib"] = len(cloudpickle.dumps(portable(value))) / 2**20
        del ref
    return out


def warm_up(ray: Any, cpus: int) -> tuple[float, list[int]]:
    """Seconds until every worker has run a task that imports torch and tamperprobe (the workers' cold start), and their niceness."""

    def touch(i: int) -> int:
        import torch  # noqa: F401

        import tamperprobe.evaluation.campaign  # noqa: F401

        time.sleep(0.5)  # hold the worker so that the next task lands on another one
        return os.nice(0) + 0 * i

    t0 = time.monotonic()
    nice = ray.get([ray.remote(touch).options(num_cpus=1).remote(i) for i in range(cpus)])
    return time.monotonic() - t0, [int(n) for n in nice]


def digits_campaign() -> tuple[Any, Any, dict[str, Any]]:
    """The zoo CNN trained on the bundled 8x8 digits, its data, and the campaign's settings."""
    import torch

    from tamperprobe import zoo
    from tamperprobe.data import load_data
    from tamperprobe.models import TorchModel
    from tamperprobe.train import fit

    data = load_data("digits")
    train, _ = data.split(0.3, seed=0)
    torch.manual_seed(0)
    model = TorchModel(fit(zoo.build("cnn", (1, 8, 8)), train.x, train.y, epochs=8, lr=3e-3, seed=0), "digits-cnn")
    return model, data, {**DIGITS, "seed": 0}


def cifar_campaign(reduced: dict[str, Any] | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """The pretrained CIFAR-10 ResNet-56, the owner's images, and a reduced campaign (the attacker's 700 images as in cifar10_campaign)."""
    import _cifar
    from cifar10_campaign import ATTACKER_IMAGES
    from tamperprobe.models import TorchModel

    data = _cifar.load_cifar10()
    attacker, owner = data.split(1 - ATTACKER_IMAGES / len(data), seed=0)
    attacker.name, owner.name = "cifar10[attacker]", "cifar10[owner]"
    model = TorchModel(_cifar.load_resnet56(), _cifar.SOURCE)
    return model, owner, {**(reduced or CIFAR_REDUCED), "seed": 0, "attack_data": attacker, "test_fraction": 0.3}


CAMPAIGNS = {"digits": digits_campaign, "cifar": cifar_campaign, "cifar-attacks": lambda: cifar_campaign(CIFAR_ATTACKS)}


def _stable(ev: Any) -> str:
    """The results as JSON text without the volatile keys (NaN compares equal to itself as text)."""
    return json.dumps({k: v for k, v in ev.to_json().items() if k not in VOLATILE}, sort_keys=True, default=str)


def interleaved(name: str, model: Any, data: Any, settings: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Run campaign ``name`` local, Ray, local, Ray, ... ``repeats`` times each on the running cluster; every run's numbers."""
    from tamperprobe.evaluation import run_evaluation
    from tamperprobe.evaluation.backends import RayBackend

    runs: list[dict[str, Any]] = []
    reference: str | None = None
    for r in range(repeats):
        for backend in ("local", "ray"):
            load = os.getloadavg()[0]
            t0 = time.monotonic()
            ev = run_evaluation(model, data, backend=RayBackend() if backend == "ray" else "local", **settings)
            wall = time.monotonic() - t0
            text = _stable(ev)
            reference = reference or text
            row = {"backend": backend, "repeat": r, "wall": wall, "load_before": load, "load_after": os.getloadavg()[0]}
            row |= {"same_as_first_local": text == reference, "timings": ev.timings, "errors": len(ev.errors)}
            runs.append(row)
            _log(f"{name} {backend} #{r}: {wall:.1f} s (load {load:.1f}), same results: {row['same_as_first_local']}, {len(ev.errors)} errors")
    shown = {k: v for k, v in settings.items() if k != "attack_data"}
    shown["attacks"] = [a if isinstance(a, str) else list(a) for a in shown["attacks"]]
    if "attack_data" in settings:
        shown["attack_data"] = f"{settings['attack_data'].name} ({len(settings['attack_data'])} images)"
    return {"settings": shown, "data": f"{data.name} ({len(data)})", "model": model.source, "runs": runs}


def _median_cells(runs: list[dict[str, Any]], backend: str) -> dict[str, float]:
    keys = {k for r in runs if r["backend"] == backend for k in r["timings"]}
    return {k: statistics.median(r["timings"][k] for r in runs if r["backend"] == backend and k in r["timings"]) for k in sorted(keys)}


def summarise(camp: dict[str, Any], costs: dict[str, Any], cpus: int) -> dict[str, Any]:
    """Min/median walls and speed-up, per-cell medians, and the projection's inputs and outputs."""
    walls = {b: [r["wall"] for r in camp["runs"] if r["backend"] == b] for b in ("local", "ray")}
    loc, ray_ = _median_cells(camp["runs"], "local"), _median_cells(camp["runs"], "ray")
    bags = {k: v for k, v in loc.items() if k.startswith("method:")}
    # an attack's cost: its time in a worker (the training alone), unless the local one (training + the driver's measuring) is
    # smaller, as when the workers got less than a core; what the local attack cells hold beyond that is the measuring
    attacks_worker = {k: min(ray_.get(k, loc[k]), loc[k]) for k in loc if k.startswith("attack:")}
    measure = max(0.0, sum(loc[k] for k in attacks_worker) - sum(attacks_worker.values()))
    driver = loc.get("selections", 0.0) + loc.get("runtimes", 0.0)
    pre = max(0.0, loc["total"] - loc.get("methods", 0.0) - driver - loc.get("attacks", 0.0))
    overhead = costs.get("empty_task_round_trip_s", 0.0)
    model = {"pre": pre, "bags": bags, "attacks": attacks_worker, "driver": driver, "measure": measure, "overhead": overhead}
    measured_order = camp.get("bags_first", False)
    proj = projections(pre, list(bags.values()), list(attacks_worker.values()), driver, measure, overhead)
    other = projections(pre, list(bags.values()), list(attacks_worker.values()), driver, measure, overhead, bags_first=False)
    bags_worker = [ray_.get(k, v) for k, v in bags.items()]
    contended = projections(pre, bags_worker, list(attacks_worker.values()), driver, measure, overhead, bags_first=measured_order)
    as_run = projections(pre, list(bags.values()), list(attacks_worker.values()), driver, measure, overhead, bags_first=measured_order)
    return {
        "walls": walls,
        "min": {b: min(w) for b, w in walls.items()},
        "median": {b: statistics.median(w) for b, w in walls.items()},
        "speedup_min": min(walls["local"]) / min(walls["ray"]),
        "speedup_median": statistics.median(walls["local"]) / statistics.median(walls["ray"]),
        "pair_ratios": [lw / rw for lw, rw in zip(walls["local"], walls["ray"])],
        "all_same": all(r["same_as_first_local"] for r in camp["runs"]),
        "cells_local": loc,
        "cells_ray": ray_,
        "model": model,
        "projection": proj,
        "projection_contended": contended,
        "projection_attacks_first": other,
        "projection_as_run": as_run,
        "bags_first": measured_order,
    }


def projections(
    pre: float, bags: list[float], attacks: list[float], driver: float, measure: float, overhead: float, bags_first: bool = True
) -> dict[str, float]:
    """``projection`` for 1, 2, 4, ... 32 workers (as far as there are cells) and for one worker per cell ("unbounded")."""
    cells = len(bags) + len(attacks)
    out = {str(n): projection(pre, bags, attacks, driver, measure, n, overhead, bags_first) for n in (1, 2, 4, 8, 16, 32) if n < cells}
    out["unbounded"] = projection(pre, bags, attacks, driver, measure, cells, overhead, bags_first)
    return out


def bags_first() -> bool:
    """Whether this campaign code submits the bag cells before the attack cells (it submitted the attacks first until 2026-12-06)."""
    import inspect

    from tamperprobe.evaluation import campaign

    return "_submit_attacks" not in inspect.getsource(campaign._run)


def committed_projection(path: Path, overhead: float) -> dict[str, Any]:
    """The projection for a committed full-size campaign, from its results.json cell times (local backend).

    Its attack cells include the driver's measuring (local backend), so they are taken whole as cell
    costs and ``measure`` is 0: an attack cell is over-estimated by its measuring, the serial part
    under-estimated by as much.
    """
    r = json.loads(path.read_text())
    t = r["timings"]
    bags = {k: v for k, v in t.items() if k.startswith("method:")}
    attacks = {k: v for k, v in t.items() if k.startswith("attack:")}
    driver = t.get("selections", 0.0) + t.get("runtimes", 0.0)
    pre = max(0.0, t["total"] - t.get("methods", 0.0) - driver - t.get("attacks", 0.0) - t.get("plots", 0.0))
    longest = max([*bags.items(), *attacks.items()], key=lambda kv: kv[1])
    return {
        "run": path.parent.name,
        "seconds": r["seconds"],
        "cells": len(bags) + len(attacks),
        "cells_sum": sum(bags.values()) + sum(attacks.values()),
        "serial": pre + driver,
        "longest": list(longest),
        "projection": projections(pre, list(bags.values()), list(attacks.values()), driver, 0.0, overhead),
    }


def write_outputs(doc: dict[str, Any], out: Path) -> None:
    """Every campaign's summary again from its runs (the summary may have grown since an earlier session), the JSON, the page."""
    for camp in doc["campaigns"].values():
        camp["summary"] = summarise(camp, camp["ray_costs"], doc["cpus"])
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(report_md(doc))


def start_cluster(ray: Any, cpus: int) -> dict[str, Any]:
    """Start the cluster and warm both sides; every step's seconds (the cold start, apart from the campaigns).

    Warm-up: each worker runs a first task (imports), then one digits campaign runs through Ray
    (fresh workers pay the first use of torch's optimisers, TorchScript, ... inside their first
    cells) and one in this process (the local backend's first attack training, ONNX export, ...
    happen here): so that the interleaved runs compare warm with warm.
    """
    from tamperprobe.evaluation import run_evaluation
    from tamperprobe.evaluation.backends import RayBackend

    _log(f"starting a Ray cluster of {cpus} CPUs")
    t0 = time.monotonic()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    init = time.monotonic() - t0
    first, nice = warm_up(ray, cpus)
    cold: dict[str, Any] = {"ray_init_s": init, "workers_first_task_s": first, "worker_niceness": nice, "driver_niceness": os.nice(0)}
    model, data, settings = digits_campaign()
    for key, backend in (("first_digits_campaign_s", RayBackend()), ("first_local_digits_campaign_s", "local")):
        t0 = time.monotonic()
        run_evaluation(model, data, backend=backend, **settings)
        cold[key] = time.monotonic() - t0
    _log(f"cold start: {cold}")
    return cold


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the driver (and so of each Ray task)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--campaigns", default="digits,cifar")
    ap.add_argument("--cifar-bag", type=int, default=CIFAR_REDUCED["bag"], help="bag size of the CIFAR campaign")
    ap.add_argument("--out", default=str(OUT / "ray-campaign"), help="output path without suffix")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--merge", action="store_true", help="keep the campaigns of the existing JSON (one redone is kept as '<name> [session N]')")
    ap.add_argument("--tag", default="", help="a label for this session's campaigns (e.g. the worker niceness)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        write_outputs(json.loads(out.with_suffix(".json").read_text()), out)
        return 0
    CIFAR_REDUCED["bag"] = args.cifar_bag
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the cluster listens on 127.0.0.1 only
    import ray
    import torch

    from tamperprobe.evaluation.runner import machine_info

    torch.set_num_threads(max(1, args.threads))
    cold = start_cluster(ray, args.cpus)
    capacity = ray.cluster_resources().get("object_store_memory", 0.0) / 2**20
    doc: dict[str, Any] = json.loads(out.with_suffix(".json").read_text()) if args.merge and out.with_suffix(".json").exists() else {}
    if "cold_start" in doc and "sessions" not in doc:  # a JSON written before sessions were recorded: its one session
        first = {
            "date": doc["date"],
            "cold_start": doc.pop("cold_start"),
            "campaigns": ",".join(doc["campaigns"]),
            "repeats": doc.pop("repeats", None),
        }
        doc["sessions"] = [first]
    doc.update(
        {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "cpus": args.cpus,
            "threads": {"local": torch.get_num_threads(), "ray_driver": torch.get_num_threads(), "ray_task": torch.get_num_threads()},
        }
    )
    doc.setdefault("campaigns", {})
    session = {"date": doc["date"], "cold_start": cold, "campaigns": args.campaigns, "repeats": args.repeats, "tag": args.tag}
    session["env"] = {k: v for k, v in os.environ.items() if k.startswith("RAY_") and "TOKEN" not in k and "AUTH" not in k}
    doc.setdefault("sessions", []).append(session)
    try:
        for name in args.campaigns.split(","):
            model, data, settings = CAMPAIGNS[name]()
            camp = interleaved(name, model, data, settings, args.repeats)
            key = f"{name} [{args.tag}]" if args.tag else name
            if key in doc["campaigns"]:  # measured in an earlier session: kept under that session's number
                old = doc["campaigns"].pop(key)
                doc["campaigns"][f"{key} [session {old.get('session', 0) + 1}]"] = old
            camp["session"] = len(doc["sessions"]) - 1
            camp["bags_first"] = bags_first()
            camp["ray_costs"] = ray_costs(ray, model, data, settings.get("attack_data"))
            camp["store"] = store_use(camp, settings, camp["ray_costs"], data)
            camp["store_capacity_mib"] = capacity
            camp["summary"] = summarise(camp, camp["ray_costs"], args.cpus)
            doc["campaigns"][key] = camp
            write_outputs(doc, out)
            _log(f"{name}: speed-up (median) {camp['summary']['speedup_median']:.2f}; wrote {out.with_suffix('.md')}")
        overhead = statistics.median(c["ray_costs"]["empty_task_round_trip_s"] for c in doc["campaigns"].values())
        doc["committed"] = [committed_projection(OUT / run / "results.json", overhead) for run in COMMITTED if (OUT / run / "results.json").exists()]
        write_outputs(doc, out)
    finally:
        ray.shutdown()
    same = all(c["summary"]["all_same"] for c in doc["campaigns"].values())
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
