"""What the sandbox costs ``verify --model``: starting the child, loading, and answering batches.

A suspect's TorchScript or ``torch.export`` file runs in a locked-down child process
(``tamperprobe._sandbox``). This measures, for the digits CNN written as ``.pt`` and ``.pt2``, the
wall time to load it in this process and in the sandbox: the first start in a process (the zygote, a
clean interpreter that imports torch, then the child it forks) and a later one (a fork of the running
zygote), and the time
per call of ``logits`` on a batch of 64 and of 1 input, in process and sandboxed (a pipe round trip
of raw float32). Each figure is the median of ``--rounds`` rounds; the load average is recorded.

    OMP_NUM_THREADS=1 python bench/sandbox_overhead.py --out bench/results/sandbox.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/sandbox.md"))
    args = ap.parse_args()

    import torch

    from tamperprobe import _zygote, zoo
    from tamperprobe.models import load_model, save_model

    torch.set_num_threads(1)
    x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    model = zoo.build("cnn", (1, 8, 8)).eval()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for suffix in (".pt", ".pt2"):
            path = save_model(model, Path(d) / f"m{suffix}", x)
            times: dict[str, list[float]] = {k: [] for k in ("load", "load-sandbox", "load-sandbox-again", "b64", "b64-sandbox", "b1", "b1-sandbox")}
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                here = load_model(path)
                times["load"].append(time.perf_counter() - t0)
                _zygote.stop()  # the first start of a process: zygote and child
                t0 = time.perf_counter()
                boxed = load_model(path, sandbox=True)
                times["load-sandbox"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                load_model(path, sandbox=True).close()  # a later start: a fork of the running zygote
                times["load-sandbox-again"].append(time.perf_counter() - t0)
                try:
                    for tag, m in (("", here), ("-sandbox", boxed)):
                        m.logits(x, batch_size=64)  # warm-up
                        times["b64" + tag].append(_timed(lambda m=m: m.logits(x, batch_size=64), 20))
                        times["b1" + tag].append(_timed(lambda m=m: m.logits(x[:1]), 50))
                finally:
                    boxed.close()
            rows.append((suffix, {k: statistics.median(v) for k, v in times.items()}))
    load = os.getloadavg()[0]
    lines = [
        "# Sandbox overhead (verify --model with a TorchScript or torch.export file)",
        "",
        f"`OMP_NUM_THREADS=1 python bench/sandbox_overhead.py` — digits CNN, 1 torch thread, median of {args.rounds} rounds,",
        f"load average {load:.1f} on {os.cpu_count()} cores while it ran (other jobs share the machine: absolute times are inflated).",
        "",
        "| file | load in process | start + load in sandbox: first / later | logits, batch of 64 (in process / sandbox) | logits, 1 input (in process / sandbox) |",
        "|---|---|---|---|---|",
    ]
    for suffix, t in rows:
        lines.append(
            f"| {suffix} | {t['load']:.2f} s | {t['load-sandbox']:.2f} / {t['load-sandbox-again']:.2f} s | {t['b64'] * 1e3:.2f} / {t['b64-sandbox'] * 1e3:.2f} ms "
            f"| {t['b1'] * 1e3:.2f} / {t['b1-sandbox'] * 1e3:.2f} ms |"
        )
    lines += [
        "",
        "The first start is the zygote importing torch and tamperprobe, then its fork; a later start in the same process is a fork "
        "of the running zygote loading the file; a batch adds one pipe round trip.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
