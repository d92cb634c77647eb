"""How long ``tamperprobe evaluate`` takes with its defaults on a ~650k-parameter TorchScript CNN (issue 11's goal: < 5 min).

The model is a LeNet-5-like CNN for 28x28 MNIST digits, wider than the zoo's (conv 5x5 with 32
and 64 channels, two 2x2 max-pools, a 3,136 -> 200 hidden layer, 10 outputs: 681,506
parameters), trained for two epochs on the 10,000-image MNIST test set (``../shared/data/mnist``,
the only MNIST part on this machine) and saved as TorchScript with ``tamperprobe.models.save_model``,
as ``tamperprobe train`` would. Then the script runs, as a user would, in a subprocess::

    tamperprobe evaluate model.pt --data ../shared/data/mnist --out report/

with nothing but the defaults, and times it end to end (wall clock, process start to exit,
imports included). The phase timings come from the report's ``results.json``.

Torch runs with one thread: the subprocess gets ``OMP_NUM_THREADS=1`` (torch's intra-op
default follows it; ``results.json`` records ``torch_threads``), because the machine has 2 shared
cores and other jobs run beside it.

    python bench/evaluate_time.py                      # make the model if needed, time the current source
    python bench/evaluate_time.py --src /path/to/src   # time another source tree (e.g. the code before a change)
    python bench/evaluate_time.py --label before --timeout 2400

Results: one row per run appended to ``bench/results/evaluate-time.json``; the markdown
``bench/results/evaluate-time.md`` is rebuilt from every row, with the phase table of each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" if (REPO.parent / "shared").exists() else Path("/work/shared")
MNIST = SHARED / "data" / "mnist"
WORK = Path(os.environ.get("TAMPERPROBE_BENCH_WORK", "/tmp/tamperprobe-evaluate-time"))
RESULTS_JSON = REPO / "bench" / "results" / "evaluate-time.json"
RESULTS_MD = REPO / "bench" / "results" / "evaluate-time.md"
GOAL_SECONDS = 300.0


def make_model(path: Path, seed: int = 0) -> dict[str, Any]:
    """Train the LeNet-like CNN briefly on MNIST and save it as TorchScript; returns its description."""
    import torch
    from torch import nn

    from tamperprobe.data import load_data
    from tamperprobe.models import save_model
    from tamperprobe.train import accuracy, fit

    class LeNetWide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)
            )
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(7 * 7 * 64, 200), nn.ReLU(), nn.Linear(200, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    data = load_data(str(MNIST))
    assert data.y is not None
    module = LeNetWide()
    t0 = time.monotonic()
    fit(module, data.x, data.y, epochs=2, lr=1e-3, seed=seed)
    info = {
        "parameters": int(sum(p.numel() for p in module.parameters())),
        "train_seconds": round(time.monotonic() - t0, 1),
        "accuracy": round(accuracy(module, data.x, data.y), 4),
        "data": f"MNIST test set, {len(data)} images, 2 epochs",
    }
    save_model(module, path, data.x[:2])
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return info


def run_evaluate(src: Path, model: Path, out: Path, timeout: float, extra: list[str]) -> dict[str, Any]:
    """Time ``python -m tamperprobe evaluate MODEL --data MNIST --out OUT`` (defaults) in a subprocess."""
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", TAMPERPROBE_PROGRESS_INTERVAL="30")
    cmd = [sys.executable, "-m", "tamperprobe", "evaluate", str(model), "--data", str(MNIST), "--out", str(out), *extra]
    log = out.with_suffix(".log")
    t0 = time.monotonic()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    wall = time.monotonic() - t0
    row: dict[str, Any] = {"wall_seconds": round(wall, 1), "exit_code": code, "timed_out": code is None, "extra": extra}
    if code is not None and (out / "results.json").exists():
        row.update(summarise(json.loads((out / "results.json").read_text())))
    row["log_tail"] = log.read_text().splitlines()[-6:]
    return row


def summarise(doc: dict[str, Any]) -> dict[str, Any]:
    """What the markdown needs of a report's ``results.json``: timings, threads, errors, attack outcomes, top-1 detection."""
    outcomes: dict[str, list[tuple[float | None, float | None]]] = {}
    for r in doc.get("attacks", []):
        if not r.get("error"):
            outcomes.setdefault(r["attack"], []).append((r.get("acc_after"), r.get("success")))

    def mean(values: list[float | None]) -> float | None:
        known = [x for x in values if x is not None]
        return round(sum(known) / len(known), 4) if known else None

    detection = {f"{r['method']}|{r['attack']}|{r['ns']}": round(r["rate"], 4) for r in doc.get("detection", []) if r["spec"] == "top1"}
    return {
        "timings": doc.get("timings", {}),
        "torch_threads": doc.get("machine", {}).get("torch_threads"),
        "errors": [f"{e['stage']} {e['name']}" for e in doc.get("errors", [])],
        "attack_data": doc.get("params", {}).get("data", {}).get("attack"),
        "acc_before": doc.get("model", {}).get("acc_test"),
        "outcomes": {a: {"acc_after": mean([x for x, _ in v]), "success": mean([y for _, y in v]), "instances": len(v)} for a, v in outcomes.items()},
        "detection_top1": detection,
    }


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=REPO / "src", help="source tree to run (PYTHONPATH)")
    ap.add_argument("--label", default="current", help="name of this run in the results")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra evaluate options (the goal is measured without any)")
    ap.add_argument("--summary-only", action="store_true", help="rebuild the markdown from the recorded rows")
    ap.add_argument("--backfill", type=Path, nargs=2, metavar=("LABEL", "REPORT"), help="re-read a recorded run's results.json")
    args = ap.parse_args()
    if args.backfill:
        label, report = args.backfill
        rows = json.loads(RESULTS_JSON.read_text())
        for r in rows:
            if r["label"] == str(label):
                r.update(summarise(json.loads((report / "results.json").read_text())))
        RESULTS_JSON.write_text(json.dumps(rows, indent=1) + "\n")
    elif not args.summary_only:
        sys.path.insert(0, str(args.src))
        WORK.mkdir(parents=True, exist_ok=True)
        model = WORK / "lenet_wide.pt"
        if not model.exists():
            print(f"training the model -> {model}", flush=True)
            print(make_model(model), flush=True)
        info = json.loads(model.with_suffix(".json").read_text())
        out = WORK / f"report-{args.label}"
        print(f"timing evaluate ({args.label}, {args.src}) -> {out}", flush=True)
        before = load_avg()
        row = run_evaluate(args.src, model, out, args.timeout, args.extra)
        row.update(label=args.label, src=str(args.src), model=info, load_before=before, load_after=load_avg())
        row["date"] = datetime.now(UTC).isoformat(timespec="seconds")
        rows = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else []
        rows.append(row)
        RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_JSON.write_text(json.dumps(rows, indent=1) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}, indent=1), flush=True)
    write_markdown()


TRAINING = ("trojan", "trojan-neuron", "poison-generic", "poison-specific", "watermark", "finetune")
NOTES = RESULTS_MD.with_name("evaluate-time-notes.md")  # hand-written reading of the tables, included as is


def phases(r: dict[str, Any]) -> dict[str, float | None]:
    """The run's time split into the phases the markdown shows (seconds)."""
    t = r.get("timings", {})
    if not t:
        return {}
    by_attack: dict[str, float] = {}
    for k, v in t.items():
        if k.startswith("attack:"):
            name = k.split(":", 1)[1].rsplit("#", 1)[0]
            by_attack[name] = by_attack.get(name, 0.0) + v
    training = sum(v for a, v in by_attack.items() if a in TRAINING)
    named = sum(t.get(k, 0.0) for k in ("methods", "selections", "runtimes", "attacks"))
    return {
        "marker generation (11 methods)": t.get("methods"),
        "MANC resampled selections": t.get("selections"),
        "benign runtimes (false alarms)": t.get("runtimes"),
        "attacks that train (trojans, poisoning, watermark, fine-tuning)": training,
        "other attacks (quantisation, casts, pruning, noise)": t.get("attacks", 0.0) - training,
        "intact model, reference answers, aggregation": t.get("total", 0.0) - named,
        "plots": t.get("plots"),
        "start-up, report files (and plots before: not timed apart)": r["wall_seconds"] - t.get("total", 0.0) - t.get("plots", 0.0),
        "**wall clock**": r["wall_seconds"],
    }


def cell(v: Any, digits: int = 0) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def write_markdown() -> None:
    rows = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else []
    model = rows[0]["model"] if rows else {}
    lines = [
        f"# `tamperprobe evaluate` with defaults on a {model.get('parameters', 0):,}-parameter TorchScript CNN",
        "",
        f"Written by `bench/evaluate_time.py` (its docstring says how). Model: {model.get('data')}, accuracy {model.get('accuracy')}. "
        f"Data: `--data ../shared/data/mnist` (10,000 images: 7,000 train part, 3,000 test part). One torch thread "
        f"(`OMP_NUM_THREADS=1`), 2 shared cores with other jobs running: the load average is given for every run. Goal: {GOAL_SECONDS:.0f} s.",
        "",
    ]
    if NOTES.exists():
        lines += [NOTES.read_text().strip(), ""]
    lines += [
        "## Runs",
        "",
        "| run | code | options | wall clock | 1-min load average at start → end | torch threads | failed steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        wall = f"> {r['wall_seconds']:.0f} s (stopped)" if r.get("timed_out") else f"{r['wall_seconds']:.0f} s"
        code = "before this change" if "baseline" in r["src"] else "this change"
        opts = " ".join(r.get("extra") or []) or "defaults"
        lines.append(
            f"| {r['label']} | {code} | {opts} | {wall} | {r['load_before'][0]:.1f} → {r['load_after'][0]:.1f} | {r.get('torch_threads')} "
            f"| {len(r.get('errors', []))} |"
        )
    lines += ["", "## Where the time goes (seconds)", "", "| phase | " + " | ".join(r["label"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    split = [phases(r) for r in rows]
    for name in split[0] if split else []:
        lines.append(f"| {name} | " + " | ".join(cell(p.get(name)) for p in split) + " |")
    attacks = list(dict.fromkeys(a for r in rows for a in r.get("outcomes", {})))
    lines += [
        "",
        "## What the attacks did (mean over instances)",
        "",
        "Accuracy of the attacked model on the 3,000-image test part (intact: "
        + ", ".join(f"{r['label']} {cell(r.get('acc_before'), 4)}" for r in rows)
        + ") and the attack's success rate (trojans: triggered inputs sent to the target; poisoning: target class no longer "
        "predicted or predicted as the chosen class).",
        "",
        "| attack | " + " | ".join(f"{r['label']}: acc after / success" for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for a in attacks:
        cells = []
        for r in rows:
            o = r.get("outcomes", {}).get(a)
            cells.append("–" if o is None else f"{cell(o['acc_after'], 4)} / {cell(o['success'], 4)}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Top-1 detection rate, mean over the 11 methods, at N_S = 1 / 5 / 10",
        "",
        "| attack | " + " | ".join(r["label"] for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for a in attacks:
        cells = []
        for r in rows:
            det = r.get("detection_top1", {})
            means = []
            for ns in (1, 5, 10):
                v = [x for k, x in det.items() if k.split("|")[1] == a and k.split("|")[2] == str(ns)]
                means.append(cell(sum(v) / len(v), 2) if v else "–")
            cells.append(" / ".join(means))
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    RESULTS_MD.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
