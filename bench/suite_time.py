"""Wall time of the whole test suite as CI runs it (``python -m pytest``), repeated: min and median, with the load.

Each round runs the suite in a fresh process from the repository root with the pyproject's options
(``-n logical``: 3 xdist workers per 2 logical CPUs, at most 4; bytecode cached as ``.ci/run`` allows); ``--serial`` rounds add ``-n 0``
and alternate with the parallel ones, so both see the same machine. The load average before and
after each round is recorded: the 2 cores here are shared. ``--against DIR`` times another checkout
(e.g. ``git worktree add /tmp/old COMMIT``) the same way, its ``src`` first on the import path, in
rounds alternating with this one's, so the two are compared on the same machine at the same time.
A round that fails records the tests that failed.

    python bench/suite_time.py --rounds 3 --out bench/results/suite-time.md
    python bench/suite_time.py --rounds 3 --against /tmp/old
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commit(root: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


def _round(extra: list[str], root: Path = ROOT) -> dict:
    load0 = os.getloadavg()[0]
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # as .ci/run: bytecode cached
    if root != ROOT:
        env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *extra]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    last = lines[-1] if lines else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last)}
    failed = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return {
        "wall": wall,
        "exit": proc.returncode,
        "summary": last,
        "counts": counts,
        "failed": failed,
        "load_before": load0,
        "load_after": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--serial", action="store_true", help="also time one-process rounds (-n 0), interleaved")
    ap.add_argument("--against", type=Path, help="another checkout of the repository, timed in alternating rounds")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/suite-time.md")
    args = ap.parse_args()
    kinds: dict[str, tuple[list[str], Path]] = {"parallel (-n logical)": ([], ROOT)}
    if args.serial:
        kinds["serial (-n 0)"] = (["-n", "0"], ROOT)
    if args.against:
        kinds[f"parallel (-n logical), commit {_commit(args.against.resolve())}"] = ([], args.against.resolve())
    rows: dict[str, list[dict]] = {k: [] for k in kinds}
    for i in range(args.rounds):
        for kind, (extra, root) in kinds.items():
            r = _round(extra, root)
            rows[kind].append(r)
            print(
                f"round {i + 1} {kind}: {r['wall']:.1f} s, exit {r['exit']}, load {r['load_before']:.2f}->{r['load_after']:.2f}: {r['summary']}",
                flush=True,
            )
    lines = [
        "# The test suite's wall time",
        "",
        f"`python bench/suite_time.py --rounds {args.rounds}{' --serial' if args.serial else ''}{f' --against {args.against}' if args.against else ''}` "
        f"({dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}; {os.cpu_count()} logical CPUs; commit "
        f"{_commit(ROOT)}{f'; against {args.against}' if args.against else ''}). "
        "Each round is `python -m pytest` from the repository root, as `.ci/run` runs it after the install.",
        "",
        "| how | min (s) | median (s) | max (s) | rounds | every round green |",
        "|---|---|---|---|---|---|",
    ]
    for kind, rs in rows.items():
        walls = [r["wall"] for r in rs]
        green = all(r["exit"] == 0 for r in rs)
        lines.append(f"| {kind} | {min(walls):.1f} | {statistics.median(walls):.1f} | {max(walls):.1f} | {len(rs)} | {'yes' if green else 'NO'} |")
    lines += ["", "| round | how | wall (s) | load average before → after | result |", "|---|---|---|---|---|"]
    for kind, rs in rows.items():
        for i, r in enumerate(rs, 1):
            failed = "".join(f"<br>{line}" for line in r["failed"])
            lines.append(f"| {i} | {kind} | {r['wall']:.1f} | {r['load_before']:.2f} → {r['load_after']:.2f} | {r['summary']}{failed} |")
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
