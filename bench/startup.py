"""Start-up and the README's timing goals, measured as a user meets them: fresh processes, wall clock.

Part 1, start-up of a small fingerprint (issue 11: "ends in ≤ 4 s, of which imports ≤ 1.5 s"):

* ``python -c pass``, ``import torch``, ``import torch`` plus ``torch.fx.experimental.symbolic_shapes``
  (which imports sympy; torch's autograd imports it on the first backward pass with an explicit
  ``grad_outputs`` tensor), for the floor under any command;
* ``tamperprobe fingerprint model.pt --data digits --out x.tpf --size 8`` (default method for
  ``logits``: Sensitive-Samples, bag 100, then the self-check), wall clock;
* the same under ``python -X importtime``: the sum of the top-level imports, split into torch,
  sympy (the symbolic-shapes chain), and everything else.

Part 2, the README's commands exactly as written, each in a fresh ``bash -c`` in a scratch folder:
"Owner side" (``train``, ``calibrate``, ``fingerprint``) and the "Python API" example (its
``served.pt`` is a copy of ``model.pt``: the intact model).

Every contender runs once per round, interleaved, for ``--rounds`` rounds; min and median are
reported. ``--baseline REV`` runs the same commands with the package of git revision ``REV``
(``git archive``) side by side. The machine is shared: the load average is recorded per part.

    python bench/startup.py --baseline 6de438d --out bench/results/startup.md
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FINGERPRINT = "tamperprobe fingerprint model.pt --data digits --out x.tpf --size 8"
README_OWNER = [
    "tamperprobe train cnn --data digits --out model.pt",
    "tamperprobe calibrate model.pt --data digits",
    "tamperprobe fingerprint model.pt --data digits --out model.tpf --output-spec top1 --size 8 --noise model.pt.noise.json",
]
README_API = """import tamperprobe as tp

model = tp.load_model("model.pt")                       # or "mypkg.nets:Net" with weights="w.safetensors"
data = tp.load_data("digits")
fp = tp.create_fingerprint(model, data, output_spec="top1", size=10, seed=0)   # a top1 API: boundary pairs
tp.save_fingerprint(fp, "model.tpf")

report = tp.verify(tp.load_fingerprint("model.tpf"), tp.LocalTarget(tp.load_model("served.pt")), "top1")
print(report.verdict, report.summary())                 # INTACT / TAMPERED / INCONCLUSIVE
"""


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def shell(command: str, cwd: Path, src: Path) -> tuple[float, str]:
    """Wall seconds of ``bash -c command`` in ``cwd`` with the package from ``src``; raises on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("TAMPERPROBE_THREADS", None)
    t = time.perf_counter()
    r = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{command!r} exited {r.returncode}: {r.stderr.strip()[-400:]}")
    return seconds, r.stderr


def import_split(stderr: str) -> tuple[float, float, float]:
    """(total, torch, sympy chain) seconds of the top-level imports in ``-X importtime`` output."""
    total = torch = sympy = 0.0
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)
        if not m:  # nested imports are indented after the bar
            continue
        seconds, name = int(m.group(1)) / 1e6, m.group(2)
        total += seconds
        if name == "torch":
            torch += seconds
        elif name.startswith(("torch.fx.experimental.symbolic_shapes", "sympy")):
            sympy += seconds
    return total, torch, sympy


def baseline_src(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def stats(ts: list[float]) -> str:
    return f"{min(ts):.2f} | {float(np.median(ts)):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", default="", help="git revision to compare with, side by side")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    scratch = Path(tempfile.mkdtemp(prefix="tp-startup-"))
    trees = {f"this tree ({head})": REPO / "src"}
    if args.baseline:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", args.baseline], check=True, capture_output=True, text=True
        ).stdout.strip()
        trees[f"baseline {rev}"] = baseline_src(args.baseline, scratch / "baseline")
    py = shlex.quote(sys.executable)
    lines = [
        f"# Start-up and the README's timing goals ({datetime.now(UTC).date()})",
        "",
        f"`python bench/startup.py {' '.join(sys.argv[1:])}`: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared "
        f"with other jobs, Python {platform.python_version()}; every contender a fresh process, {args.rounds} interleaved rounds; "
        "seconds, wall clock. Neither `OMP_NUM_THREADS` nor `$TAMPERPROBE_THREADS` is set, so each tree runs with its own default.",
    ]
    try:
        # one model for both parts, written by this tree's train command
        work = {name: scratch / f"w{i}" for i, name in enumerate(trees)}
        for folder in work.values():
            folder.mkdir()
        first = next(iter(trees))
        shell(README_OWNER[0], work[first], trees[first])
        for folder in work.values():
            if folder != work[first]:
                shutil.copy(work[first] / "model.pt", folder / "model.pt")
            shutil.copy(folder / "model.pt", folder / "served.pt")
            (folder / "api.py").write_text(README_API, encoding="utf-8")

        # part 1: start-up
        floor = {
            "python -c pass": f"{py} -c pass",
            "import torch": f"{py} -c 'import torch'",
            "import torch + sympy chain": f"{py} -c 'import torch, torch.fx.experimental.symbolic_shapes'",
        }
        times: dict[str, list[float]] = {k: [] for k in floor}
        for name in trees:
            times[f"{name}: fingerprint"] = []
            times[f"{name}: imports (-X importtime)"] = []
            times[f"{name}: of which torch"] = []
            times[f"{name}: of which sympy chain"] = []
        before = loadavg()
        for _ in range(args.rounds):
            for label, command in floor.items():
                times[label].append(shell(command, scratch, REPO / "src")[0])
            for name, src in trees.items():
                times[f"{name}: fingerprint"].append(shell(FINGERPRINT, work[name], src)[0])
                _, err = shell(f"{py} -X importtime -m {FINGERPRINT}", work[name], src)
                total, torch_s, sympy_s = import_split(err)
                times[f"{name}: imports (-X importtime)"].append(total)
                times[f"{name}: of which torch"].append(torch_s)
                times[f"{name}: of which sympy chain"].append(sympy_s)
        lines += [
            "",
            f"## Start-up: `{FINGERPRINT}`",
            "",
            "| contender | min s | median s |",
            "|---|---:|---:|",
            *(f"| {k} | {stats(v)} |" for k, v in times.items()),
            "",
            f"(load average before {before}, after {loadavg()})",
        ]
        print("\n".join(lines), flush=True)

        # part 2: the README's commands
        times = {}
        for name in trees:
            for command in README_OWNER:
                times[f"{name}: `{command}`"] = []
            times[f"{name}: README owner side, total"] = []
            times[f"{name}: README Python API example (`python api.py`)"] = []
        before = loadavg()
        for _ in range(args.rounds):
            for name, src in trees.items():
                total = 0.0
                for command in README_OWNER:
                    seconds = shell(command, work[name], src)[0]
                    times[f"{name}: `{command}`"].append(seconds)
                    total += seconds
                times[f"{name}: README owner side, total"].append(total)
                times[f"{name}: README Python API example (`python api.py`)"].append(shell(f"{py} api.py", work[name], src)[0])
        lines += [
            "",
            "## The README's commands, as written (goal: each of the owner side's fingerprint and the Python API example under 30 s)",
            "",
            "| contender | min s | median s |",
            "|---|---:|---:|",
            *(f"| {k} | {stats(v)} |" for k, v in times.items()),
            "",
            f"(load average before {before}, after {loadavg()})",
        ]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
