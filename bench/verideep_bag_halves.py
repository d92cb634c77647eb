"""verideep_table6.py's `preset=verideep` bag of the CIFAR-10 ResNet-56, generated in two processes of 50 markers.

The 1,000-step preset ascent of 100 markers takes about 1.5 hours of one core; on a loaded shared machine two
processes of 50 get it done in about half the wall time. Both draw the table's 100 seed images exactly as
``make_bag`` does (same seed label, same generator), each climbs its half, and ``--merge`` writes the bag in the
cache format ``verideep_table6.load_or_generate`` reads (so ``manc_default_rule.py --models resnet56`` uses it).
A batch of 50 rounds differently from one of 100: the markers are not bit-identical to a one-process run.

    OMP_NUM_THREADS=1 python bench/verideep_bag_halves.py --half 0 &
    OMP_NUM_THREADS=1 python bench/verideep_bag_halves.py --half 1 &
    wait; python bench/verideep_bag_halves.py --merge
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import _cifar
from tamperprobe._util import derive_seed
from tamperprobe.models import TorchModel
from tamperprobe.owner.markers import sample_indices
from tamperprobe.owner.methods import get_method

BAG, SEED, SEED_LABEL = 100, 0, "verideep-code-ball"  # verideep_table6.VARIANTS["verideep"]


def generate_half(half: int, cache: Path) -> Path:
    torch.set_num_threads(1)
    model = TorchModel(_cifar.load_resnet56(), _cifar.SOURCE)
    data = _cifar.load_cifar10()
    torch.manual_seed(derive_seed(SEED, "method", SEED_LABEL))
    idx = sample_indices(len(data), BAG, np.random.default_rng(derive_seed(SEED, "method", SEED_LABEL)))  # make_bag's draw
    seeds = np.ascontiguousarray(data.x[idx], dtype=np.float32)[half * BAG // 2 : (half + 1) * BAG // 2]
    built = get_method("sensitive", preset="verideep")
    method = type(built)(**built.validated())
    route = method._route(model, method._weights(model))
    t0 = time.monotonic()

    def progress(done: int, total: int, what: str = "") -> None:
        if done % 50 == 0:
            print(f"half {half}: step {done}/{total} ({time.monotonic() - t0:.0f} s)", flush=True)

    with route.session():
        s_seed, best_s, best_x, ran = method._ascend(route, torch.from_numpy(seeds.copy()), float(data.low), float(data.high), progress)
    out = cache / f"verideep-half{half}.npz"
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        inputs=best_x.numpy(),
        seeds=seeds,
        sensitivity_seed=s_seed.numpy(),
        sensitivity=best_s.numpy(),
        ascent_steps=ran.numpy(),
        seconds=time.monotonic() - t0,
    )
    return out


def merge(cache: Path) -> Path:
    halves = [np.load(cache / f"verideep-half{h}.npz") for h in (0, 1)]
    secs = [float(h["seconds"]) for h in halves]
    meta = {
        "label": "verideep",
        "params": {"preset": "verideep"},
        "seconds": round(sum(secs), 1),
        "bag": BAG,
        "seed": SEED,
        "seed_label": SEED_LABEL,
        "generation": f"regenerated in two halves of {BAG // 2} markers from the same {BAG} seed images (two processes, {secs[0]:.0f} s and {secs[1]:.0f} s)",
    }
    out = cache / f"verideep-bag{BAG}-seed{SEED}.npz"
    info = {f"info_{k}": np.concatenate([h[k] for h in halves]) for k in ("sensitivity_seed", "sensitivity", "ascent_steps")}
    np.savez(
        out, inputs=np.concatenate([h["inputs"] for h in halves]), seeds=np.concatenate([h["seeds"] for h in halves]), meta=json.dumps(meta), **info
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--half", type=int, choices=(0, 1))
    ap.add_argument("--merge", action="store_true")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "tamperprobe-verideep-table6"))
    args = ap.parse_args()
    if args.merge:
        print(merge(Path(args.cache)))
    elif args.half is not None:
        print(generate_half(args.half, Path(args.cache)))
    else:
        ap.error("give --half 0, --half 1 or --merge")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
