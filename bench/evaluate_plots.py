"""The cost of ``evaluate``'s plots: the 25 figures drawn before this change against today's three.

Both versions draw the same ``Evaluation``: one of the default campaign's shape (11 methods, 14
attacks, 7 output specs, 3 trials, 8 sample markers of 28x28 per method), filled with seeded
random rates and images (matplotlib's cost depends on the numbers of axes, artists and tick
labels, not on the values). The code before is read from git at ``--before`` (default: the
commit this change started from) and run as a module of the installed package, so both use the
same matplotlib and the same helpers. Each contender runs in a fresh subprocess (matplotlib's
import and font cache included, as in one ``evaluate`` run), interleaved, ``--repeats`` times;
the table gives min and median seconds and their ratio.

    python bench/evaluate_plots.py            # writes bench/results/evaluate-plots.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "evaluate-plots.md"
BEFORE = "6de438dbbbc508cfa2a05648473ede18e1938b27"

CHILD = r"""
import importlib.util, json, sys, tempfile, time
t0 = time.perf_counter()
import numpy as np
from tamperprobe.attacks import attack_names
from tamperprobe.evaluation.campaign import DEFAULT_SPECS, Evaluation
from tamperprobe.owner.methods import method_names

which, source = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
methods = list(dict.fromkeys([*method_names(), "natural", "noise", "rotation", "distortion"]))
specs = list(DEFAULT_SPECS)
ev = Evaluation(params={"specs": specs, "select": "manc", "data": {"low": 0.0, "high": 1.0}}, machine={}, started="")
ev.methods = [{"method": m} for m in methods]
for m in methods:
    for a in attack_names():
        for s in specs:
            ev.trigger += [{"method": m, "attack": a, "trial": t, "spec": s, "ratio": float(rng.random())} for t in range(3)]
            curve = np.sort(rng.random(10))
            ev.detection += [{"method": m, "attack": a, "spec": s, "ns": ns, "rate": float(curve[ns - 1])} for ns in range(1, 11)]
    ev.samples[m] = {"seeds": rng.random((8, 1, 28, 28)), "inputs": rng.random((8, 1, 28, 28)), "labels": rng.integers(0, 10, 8)}
if which == "before":
    spec = importlib.util.spec_from_loader("tamperprobe.evaluation._plots_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "tamperprobe.evaluation"
    exec(compile(open(source).read(), "plots_before.py", "exec"), module.__dict__)
    draw = module.draw_plots
else:
    from tamperprobe.evaluation.plots import draw_plots as draw
out = tempfile.mkdtemp()
t1 = time.perf_counter()
errors = []
written = draw(ev, __import__("pathlib").Path(out), errors)
print(json.dumps({"seconds": time.perf_counter() - t1, "files": len(written), "errors": errors}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", default=BEFORE, help="git commit whose evaluation/plots.py is the code before")
    args = ap.parse_args()
    old = Path(os.environ.get("TMPDIR", "/tmp")) / "tamperprobe_plots_before.py"
    old.write_text(
        subprocess.run(
            ["git", "-C", str(REPO), "show", f"{args.before}:src/tamperprobe/evaluation/plots.py"], check=True, capture_output=True, text=True
        ).stdout
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    times: dict[str, list[float]] = {"before": [], "now": []}
    files: dict[str, int] = {}
    for _ in range(args.repeats):
        for which in times:
            proc = subprocess.run([sys.executable, "-c", CHILD, which, str(old)], capture_output=True, text=True, env=env, check=True)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            assert not result["errors"], result["errors"]
            times[which].append(result["seconds"])
            files[which] = result["files"]
            print(which, round(result["seconds"], 2), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        "# `evaluate`'s plots: before and after",
        "",
        f"Written by `bench/evaluate_plots.py` on {datetime.now(UTC).isoformat(timespec='seconds')}, {platform.node()} ({os.cpu_count()} cores, "
        f"shared; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} at the end). Seconds of `draw_plots` (matplotlib import "
        "included) on an evaluation of the default campaign's shape; fresh process per run, contenders interleaved, "
        f"{args.repeats} runs each.",
        "",
        "| code | figures | min | median |",
        "|---|---|---|---|",
        f"| before ({args.before[:7]}) | {files['before']} | {min(times['before']):.1f} | {med['before']:.1f} |",
        f"| now | {files['now']} | {min(times['now']):.1f} | {med['now']:.1f} |",
        "",
        f"Median ratio before ÷ now: **{med['before'] / med['now']:.1f}×**.",
    ]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
