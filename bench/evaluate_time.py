"""How long ``tamperprobe evaluate`` takes with its defaults on a ~650k-parameter TorchScript CNN (issue 11's goal: < 5 min).

The model is a LeNet-5-like CNN for 28x28 MNIST digits, wider than the zoo's (conv 5x5 with 32
and 64 channels, two 2x2 max-pools, a 3,136 -> 200 hidden layer, 10 outputs: 681,302
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
    row: dict[str, Any] = {"wall_seconds": round(wall, 1), "exit_code": code, "timed_out": code is None, "command": " ".join(cmd[2:])}
    results = out / "results.json"
    if code is not None and results.exists():
        doc = json.loads(results.read_text())
        row["timings"] = doc.get("timings", {})
        row["torch_threads"] = doc.get("machine", {}).get("torch_threads")
        row["errors"] = len(doc.get("errors", []))
    row["log_tail"] = log.read_text().splitlines()[-12:]
    return row


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
    args = ap.parse_args()
    if not args.summary_only:
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


def write_markdown() -> None:
    rows = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else []
    lines = ["# `tamperprobe evaluate` with defaults on a 681k-parameter TorchScript CNN", "", "Written by `bench/evaluate_time.py`.", ""]
    lines += ["| run | date | wall clock | exit | torch threads | load avg before/after | extra options |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        wall = f"> {r['wall_seconds']:.0f} s (stopped)" if r.get("timed_out") else f"{r['wall_seconds']:.0f} s"
        lines.append(
            f"| {r['label']} | {r['date']} | {wall} | {r.get('exit_code')} | {r.get('torch_threads')} | "
            f"{r.get('load_before')} / {r.get('load_after')} | {r['command'].split('--out')[1].split(' ', 2)[2:] or ''} |"
        )
    for r in rows:
        if r.get("timings"):
            lines += ["", f"## Phases of run `{r['label']}` ({r['date']})", "", "| phase | seconds |", "|---|---|"]
            lines += [f"| {k} | {v:.1f} |" for k, v in r["timings"].items()]
    RESULTS_MD.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
