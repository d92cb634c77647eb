"""MANC resampling in ``evaluate``: the per-resample loop it replaced against the batched bitset greedy.

The campaign's ``manc`` protocol (``tamperprobe.evaluation.protocol.manc_orders``) runs MANC's
greedy on ``resamples`` (default 10,000) random half-bags of every method's bag and keeps the
first 10 picks (5 for boundary pairs). Three contenders, on the same activation matrices:

* ``before``: the code this change replaced, copied here: one ``rng.choice`` sub-bag and one
  ``manc`` call per resample, the greedy on boolean matrices, ties drawn with ``rng.integers``.
* ``loop-bitset``: one call per resample of today's ``selection._greedy`` (bitsets, the new
  tie-break by a priority drawn once per selection): the rule without batching.
* ``batched``: today's ``manc_orders``: every resample's greedy step at once (``manc_batch``).

Settings: bags of 100 units (single markers; sub-bags of 50, 10 picks) and 50 units (pairs;
sub-bags of 25, 5 picks), penultimate layers of 64 neurons (the digits CNN), 200 (the 681k
LeNet of ``evaluate_time.py``) and 512, about 40 % of the neurons active per marker (a ReLU of
Gaussian pre-activations shifted by -0.25). Torch is not involved; numpy runs single-threaded.
The contenders run interleaved, ``--repeats`` times each; the table gives min and median
seconds and the ratio of the medians to ``batched``.

    python bench/manc_resampling.py                # writes bench/results/manc-resampling.md
    python bench/manc_resampling.py --repeats 5 --resamples 10000
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from tamperprobe.evaluation.protocol import manc_draws, manc_orders  # noqa: E402
from tamperprobe.owner.selection import _greedy  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "bench" / "results" / "manc-resampling.md"


# ----------------------------------------------------------------------------- the code before (copied, unit sizes)


def _before_greedy(active: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    n = active.shape[0]
    remaining = np.ones(n, dtype=bool)
    covered = np.zeros(active.shape[1], dtype=bool)
    picked: list[int] = []
    while len(picked) < k and remaining.any():
        pool = remaining
        gain = (active & ~covered).sum(axis=1)
        if covered.any() and gain[pool].max() == 0:
            covered[:] = False
            gain = active.sum(axis=1)
        cand = np.flatnonzero(pool)
        best = cand[gain[cand] == gain[cand].max()]
        choice = int(best[rng.integers(len(best))]) if len(best) > 1 else int(best[0])
        picked.append(choice)
        remaining[choice] = False
        covered |= active[choice]
    return picked


def before(unit_acts: np.ndarray, depth: int, resamples: int, rng: np.random.Generator, fraction: float = 0.5) -> np.ndarray:
    units = len(unit_acts)
    sub = min(units, max(depth, int(round(fraction * units))))
    out = np.empty((resamples, depth), dtype=np.int64)
    for r in range(resamples):
        pool = np.sort(rng.choice(units, size=sub, replace=False))
        out[r] = pool[np.asarray(_before_greedy(unit_acts[pool] > 0, depth, rng), dtype=np.int64)]
    return out


def loop_bitset(unit_acts: np.ndarray, depth: int, resamples: int, rng: np.random.Generator, fraction: float = 0.5) -> np.ndarray:
    units = len(unit_acts)
    sub = min(units, max(depth, int(round(fraction * units))))
    pools, priority = manc_draws(units, sub, resamples, rng)
    active = unit_acts > 0
    ones = np.ones(sub, dtype=np.int64)
    return np.stack([pools[r][_greedy(active[pools[r]], ones, depth, priority[r])] for r in range(resamples)])


CONTENDERS = {"before": before, "loop-bitset": loop_bitset, "batched": manc_orders}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--resamples", type=int, default=10_000)
    args = ap.parse_args()
    settings = [(units, depth, neurons) for units, depth in ((100, 10), (50, 5)) for neurons in (64, 200, 512)]
    rows = []
    for units, depth, neurons in settings:
        acts = np.maximum(np.random.default_rng(neurons + units).normal(size=(units, neurons)) - 0.25, 0.0).astype(np.float32)
        times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        results = {}
        for _ in range(args.repeats):
            for name, fn in CONTENDERS.items():
                t0 = time.perf_counter()
                results[name] = fn(acts, depth, args.resamples, np.random.default_rng(0))
                times[name].append(time.perf_counter() - t0)
        same = bool(np.array_equal(results["loop-bitset"], results["batched"]))
        med = {n: statistics.median(t) for n, t in times.items()}
        rows.append((units, depth, neurons, float((acts > 0).mean()), times, med, same))
        print(units, depth, neurons, {n: round(v, 3) for n, v in med.items()}, "same:", same, flush=True)
    write(rows, args)


def write(rows: list, args: argparse.Namespace) -> None:
    lines = [
        "# MANC resampling: per-resample loop vs batched bitset greedy",
        "",
        f"Written by `bench/manc_resampling.py` on {datetime.now(UTC).isoformat(timespec='seconds')}, {platform.node()} "
        f"({os.cpu_count()} cores, shared; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} at the end), numpy {np.__version__}, "
        f"one thread. {args.resamples} resamples per run, {args.repeats} interleaved repeats per contender; seconds per call of the "
        "protocol on one method's bag (the campaign makes one per method: 11 with the defaults).",
        "",
        "| units (sub-bag) | picks | neurons | active | before min / median | loop-bitset min / median | batched min / median "
        "| before ÷ batched | loop-bitset ÷ batched | batched = loop-bitset |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for units, depth, neurons, density, times, med, same in rows:

        def cell(n: str, times: dict = times, med: dict = med) -> str:
            return f"{min(times[n]):.3f} / {med[n]:.3f}"

        lines.append(
            f"| {units} ({units // 2}) | {depth} | {neurons} | {density:.0%} | {cell('before')} | {cell('loop-bitset')} | {cell('batched')} "
            f"| {med['before'] / med['batched']:.0f}× | {med['loop-bitset'] / med['batched']:.0f}× | {'yes' if same else 'NO'} |"
        )
    lines += [
        "",
        "`before` draws its sub-bags and ties from the generator in another order than today's code, so its picks are not compared; "
        "`batched = loop-bitset` checks that the batched greedy picks exactly what the per-selection greedy picks for the same draws "
        "(also a test: `tests/test_selection.py`).",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
