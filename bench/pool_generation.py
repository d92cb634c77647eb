"""Time ``tamperprobe fingerprint`` making a pool for hourly checks over 30 days (issue 10).

A verification run against an endpoint sends fresh markers and never re-sends one, so a
fingerprint must hold ``runs × markers per run``: hourly for 30 days with two boundary pairs a run
is 720 × 4 = 2,880 markers. For each data set given (``digits``: the bundled 1,797 8x8 digits;
``mnist``: the 10,000-image MNIST test set under ``../shared/data/mnist``) this trains the zoo CNN
with the command line (``tamperprobe train cnn --data D``), then runs, as separate processes on one
torch thread (``OMP_NUM_THREADS=1``) and in interleaved rounds, ``tamperprobe fingerprint`` with
``--output-spec top1 --size 2880 --per-run 4`` for each method given (default: ``crossed``, the
method ``top1`` gets by default, and ``boundary``, the near-twin pairs it replaced). It records the
wall time of each command, the generation phase as the progress line reports it, and the pool the
file holds (markers, decoys, runs), and writes a markdown table (min and median per method).

    python bench/pool_generation.py --out bench/results/pool-generation.md
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
DATA = {"digits": ("digits", "4"), "mnist": (str(MNIST), "2")}  # --data value, training epochs


def _run(args: list[str], env: dict[str, str]) -> tuple[float, str, str | None]:
    """Wall time, output, and the error line when the command failed."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tamperprobe", *args], env=env, capture_output=True, text=True)
    took = time.perf_counter() - t
    error = None
    if proc.returncode != 0:
        error = next((line for line in proc.stderr.splitlines() if line.startswith("error:")), proc.stderr.strip()[-300:])
    return took, proc.stdout + proc.stderr, error


def _seconds(text: str) -> float:
    """``17`` or ``2 min 17`` (the progress line's ``format_duration`` without its last unit) as seconds."""
    parts = text.split(" min ")
    return float(parts[0]) * 60 + float(parts[1]) if len(parts) == 2 else float(parts[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="crossed,boundary")
    ap.add_argument("--data", default="digits,mnist", help="comma-separated: digits, mnist")
    ap.add_argument("--size", type=int, default=2880)
    ap.add_argument("--per-run", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TAMPERPROBE_PROGRESS_INTERVAL": "100000"}
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    datasets = [d.strip() for d in a.data.split(",") if d.strip()]
    rows: list[str] = []
    trained: list[str] = []
    for name in datasets:
        data, epochs = DATA[name]
        times: dict[str, list[float]] = {m: [] for m in methods}
        gen: dict[str, list[float]] = {m: [] for m in methods}
        pools: dict[str, str] = {}
        failed: dict[str, str] = {}
        with tempfile.TemporaryDirectory() as d:
            model = Path(d) / "model.pt"
            train_s, _, error = _run(["train", "cnn", "--data", data, "--epochs", epochs, "--out", str(model)], env)
            if error:
                raise SystemExit(error)
            trained.append(f"{name} {train_s:.0f} s")
            for r in range(a.rounds):
                for m in [m for m in methods if m not in failed]:  # interleaved: each round runs every method once
                    out = Path(d) / f"{m}-{r}.tpf"
                    args = ["fingerprint", str(model), "--data", data, "--out", str(out), "--output-spec", "top1"]
                    args += ["--method", m, "--size", str(a.size), "--per-run", str(a.per_run), "--unsigned"]
                    took, text, error = _run(args, env)
                    if error:
                        failed[m] = f"failed after {took:.0f} s: `{error}`"
                        print(f"{name} round {r + 1} {m}: {failed[m]}", flush=True)
                        continue
                    times[m].append(took)
                    g = re.search(r"generating \w+ markers: .*?, ((?:\d+ min )?\d+) s elapsed, done", text)
                    if g:
                        gen[m].append(_seconds(g.group(1)))
                    budget = re.search(r"query budget: (.*)", text)
                    wrote = re.search(r"wrote \S+: (\d+ markers and \d+ decoys)", text)
                    pools[m] = f"{wrote.group(1) if wrote else '?'}; {budget.group(1).strip() if budget else '?'}"
                    print(f"{name} round {r + 1} {m}: {took:.1f} s", flush=True)
        for m in methods:
            if not times[m]:
                rows.append(f"| {name} | `{m}` | 0 | – | – | – | {failed[m]} |")
                continue
            g = f"{min(gen[m]):.0f} s" if gen[m] else "?"
            rows.append(f"| {name} | `{m}` | {len(times[m])} | {min(times[m]):.1f} s | {statistics.median(times[m]):.1f} s | {g} | {pools[m]} |")
    lines = [
        "# Generating a pool for hourly checks over 30 days",
        "",
        f"`python bench/pool_generation.py` on {datetime.now(UTC).date()} ({platform.machine()}, {os.cpu_count()} cores, shared with "
        "other jobs), one torch thread, separate processes, interleaved rounds. Model: the zoo CNN from "
        f"`tamperprobe train cnn --data D` ({', '.join(trained)}). Command: `tamperprobe fingerprint model.pt --data D "
        f"--output-spec top1 --size {a.size} --per-run {a.per_run} --method M --unsigned` (the self-check included). "
        "`digits` is the bundled set (1,797 8x8 images); `mnist` the 10,000-image MNIST test set (28x28).",
        "",
        "| data | method | rounds | wall time min | median | generation phase (progress line) min | pool written |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Wall time is the whole command: start-up, generation, MANC selection, decoys, signing off (`--unsigned`), the self-check.",
        "`crossed` (the default for label-only APIs) feeds every natural image into at most one boundary path and takes the two",
        "halves of a pair from two paths; on a model with PyTorch weights the paths are gradient paths, one image each, so a",
        "pool of P markers needs more than P natural images, and the images left over become decoys. `boundary` pairs use two",
        "images each (seed and blend partner) but may share them, so they fill a large pool from few images, as near-twins.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out is not None:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
