"""Torch threads on a small shared machine: 1 vs 2 vs more threads, idle and with other jobs running.

Why: torch starts as many intra-op threads as the machine has cores. When other processes keep
some of those cores busy, a parallel region waits for its slowest thread, and that thread waits
for a core: generation on 2 threads was measured 7–10× slower than on one (issue 11). This
benchmark decides the default of ``--threads``.

Workloads, each timed as one call, on the digits CNN (zoo ``cnn``, trained here in seconds) and
on the pretrained CIFAR-10 ResNet-56 (``../shared/models/cifar10_resnet56``, if present):

* ``generate``: ``SensitiveSamples(patience=0)`` for a fixed number of ascent steps on a bag of
  natural inputs (the fingerprint command's default method, fixed work);
* ``infer``: ``Model.logits`` on a few hundred inputs in batches of 64 (verify, serve, calibrate).

Conditions: the machine as found (other jobs may be running; the load average is recorded), and
with ``N`` extra busy processes of our own (``--loads``), each a one-thread torch matmul loop,
standing in for other users' jobs. Within a condition every (workload, threads) pair runs once per
round, interleaved, for ``--rounds`` rounds after a warm-up; the tables give min and median and
the ratio of each thread count's median to the 1-thread median.

    python bench/threads.py --out bench/results/threads.md
    OMP_WAIT_POLICY=PASSIVE python bench/threads.py --out threads-passive.md   # sleeping instead of spinning
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

#: libgomp reads its wait policy when torch loads; tamperprobe sets PASSIVE only if torch is not loaded yet
#: (here it is), so this run measures the policy of the environment it was started in.
WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY") or "unset (libgomp's default: waiting threads spin)"
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESNET = SHARED / "models" / "cifar10_resnet56"
CIFAR = SHARED / "data" / "cifar10" / "test1017_uint8.npz"

#: A stand-in for another user's job: one core kept busy by a one-thread torch matmul loop.
HOG = "import torch\ntorch.set_num_threads(1)\na = torch.randn(384, 384)\nwhile True:\n    a = (a @ a).tanh()\n"


def digits_cnn() -> tuple[object, np.ndarray, str]:
    from tamperprobe import zoo
    from tamperprobe.data import load_data
    from tamperprobe.models import TorchModel
    from tamperprobe.train import fit

    train, _ = load_data("digits").split(0.3, seed=0)
    assert train.y is not None
    module = fit(zoo.build("cnn", (1, 8, 8)), train.x, train.y, epochs=8, lr=3e-3, seed=0)
    return TorchModel(module, "digits cnn"), np.ascontiguousarray(train.x, dtype=np.float32), "digits CNN (zoo `cnn`, 1×8×8)"


def resnet56() -> tuple[object, np.ndarray, str]:
    from tamperprobe.models import TorchModel

    sys.path.insert(0, str(RESNET))
    import model_def  # type: ignore[import-not-found]

    x = np.load(CIFAR)["x"].astype(np.float32) / 255.0
    return TorchModel(model_def.load(), "resnet56"), x, "CIFAR-10 ResNet-56 (pretrained, 3×32×32)"


def workloads(model: object, x: np.ndarray, bag: int, steps: int, infer_n: int) -> dict[str, Callable[[], object]]:
    from tamperprobe.data import Dataset
    from tamperprobe.owner.methods.sensitive import SensitiveSamples

    data = Dataset(x[:bag], None, "bench", 0.0, 1.0)
    gen = SensitiveSamples(steps=steps, patience=0)
    batch = x[:infer_n]

    def generate() -> object:
        return gen.generate(model, data, bag, np.random.default_rng(0))  # type: ignore[arg-type]

    def infer() -> object:
        return model.logits(batch, batch_size=64)  # type: ignore[attr-defined]

    return {f"generate (bag {bag}, {steps} steps)": generate, f"infer ({infer_n} inputs, batch 64)": infer}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def measure(cases: dict[str, Callable[[], object]], threads: list[int], rounds: int) -> dict[tuple[str, int], list[float]]:
    """Seconds per call for every (case, threads), in interleaved rounds after one warm-up call each."""
    for run in cases.values():
        for n in threads:
            torch.set_num_threads(n)
            run()
    times: dict[tuple[str, int], list[float]] = {(c, n): [] for c in cases for n in threads}
    for r in range(rounds):
        order = threads if r % 2 == 0 else threads[::-1]  # alternate so neither count always runs first
        for name, run in cases.items():
            for n in order:
                torch.set_num_threads(n)
                t = time.perf_counter()
                run()
                times[(name, n)].append(time.perf_counter() - t)
    return times


def rows(times: dict[tuple[str, int], list[float]], threads: list[int]) -> list[str]:
    out = []
    for name in dict.fromkeys(c for c, _ in times):
        base = float(np.median(times[(name, threads[0])]))
        for n in threads:
            ts = times[(name, n)]
            out.append(f"| {name} | {n} | {min(ts) * 1e3:.0f} | {float(np.median(ts)) * 1e3:.0f} | {float(np.median(ts)) / base:.2f} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default=f"1,2,{2 * (os.cpu_count() or 1)}", help="thread counts to compare (the first is the reference)")
    parser.add_argument("--loads", default="0,1,2", help="numbers of extra busy processes, one condition each")
    parser.add_argument("--models", default="digits,resnet56")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    threads = [int(t) for t in args.threads.split(",")]
    loads = [int(n) for n in args.loads.split(",")]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    lines = [
        f"# Torch threads under load ({datetime.now(UTC).date()})",
        "",
        f"`python bench/threads.py {' '.join(sys.argv[1:])}` at {head}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (shared with other jobs), torch {torch.__version__}, OMP_WAIT_POLICY {WAIT_POLICY}, "
        f"{args.rounds} interleaved rounds after a warm-up. "
        "`load +N`: N extra one-thread busy processes of ours besides whatever else ran. "
        "Ratio: median ÷ the 1-thread median of the same workload and condition.",
    ]
    builders = {"digits": (digits_cnn, 100, 20, 512), "resnet56": (resnet56, 16, 3, 128)}
    models = []
    for name in args.models.split(","):
        build, bag, steps, infer_n = builders[name]
        if name == "resnet56" and not CIFAR.exists():
            lines.append(f"\n(skipped {name}: {CIFAR} not found)")
            continue
        torch.set_num_threads(1)
        model, x, what = build()
        models.append((what, workloads(model, x, bag, steps, infer_n)))
    for load in loads:
        hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(load)]
        try:
            time.sleep(2.0 if hogs else 0.0)
            before = loadavg()
            t0 = time.monotonic()
            section = ["", f"## load +{load}", "", "| workload | threads | min ms | median ms | ÷ 1 thread |", "|---|---:|---:|---:|---:|"]
            for what, cases in models:
                times = measure(cases, threads, args.rounds)
                section += [line.replace("| ", f"| {what}: ", 1) for line in rows(times, threads)]
            section += ["", f"(load average before {before}, after {loadavg()}; {time.monotonic() - t0:.0f} s)"]
        finally:
            for p in hogs:
                p.kill()
                p.wait()
        lines += section
        print("\n".join(section), flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
