"""Detection before and after the measured tolerance: the fixed 3e-5 against max(3e-5, 2 × the benign floor).

Runs ``tamperprobe.evaluation.run_evaluation`` twice per model on the same seed (so the same bags,
selections and attacked models): once with ``tolerance=3e-5`` (every fingerprint's tolerance before)
and once with the default ``tolerance=None`` (each method's tolerance measured on its bag under the
benign runtimes, as ``fingerprint`` now sets it). Methods ``boundary``, ``sensitive`` and ``natural``,
the small attacks (fp16, bf16, int8, weight noise, flooring, magnitude pruning), specs ``logits``,
``probs:2`` and ``top1``, random selection. Models: the zoo CNN and MLP on the bundled digits and the
pretrained CIFAR-10 ResNet-56 (``../shared``, skipped when absent). Prints markdown: per model the
tolerance per method and the false alarms, then the detection rate at N_S = 1 / 5 / 10 under each spec,
before → after, and writes everything to ``--json``.

    python bench/tolerance_detection.py                        # ~10 minutes on 2 cores
    python bench/tolerance_detection.py --models digits-cnn
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
METHODS = ["boundary", "sensitive", "natural"]
ATTACKS = ["fp16", "bf16", "int8", "noise", "floor", "prune"]
SPECS = ["logits", "probs:2", "top1"]
NS = (1, 5, 10)


def load(name: str):
    from tamperprobe import zoo
    from tamperprobe.data import load_data
    from tamperprobe.models import TorchModel

    if name.startswith("digits-"):
        data = load_data("digits")
        return TorchModel(zoo.train_model(name.split("-")[1], data, seed=0).module, name), data
    import _cifar

    if _cifar.available() is not None:
        return None
    return TorchModel(_cifar.load_resnet56(), name), _cifar.load_cifar10()


def main() -> None:
    from tamperprobe.evaluation import run_evaluation

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits-cnn,digits-mlp,resnet56")
    ap.add_argument("--bag", type=int, default=100)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "tolerance-detection.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    for name in args.models.split(","):
        got = load(name.strip())
        if got is None:
            print(f"{name}: not under ../shared, skipped", file=sys.stderr)
            continue
        model, data = got
        runs = {}
        for label, tol in (("before", 3e-5), ("after", None)):
            t0 = time.monotonic()
            ev = run_evaluation(
                model, data, methods=METHODS, attacks=ATTACKS, specs=SPECS, bag=args.bag, resamples=args.resamples,
                select="random", baselines=False, tolerance=tol, attack_samples=200,
            )  # fmt: skip
            runs[label] = {
                "seconds": round(time.monotonic() - t0),
                "tolerance": {r["method"]: r.get("tolerance") for r in ev.methods},
                "benign_floor": {r["method"]: r.get("benign_floor") for r in ev.methods},
                "flagged": ev.benign_flagged,
                "checks": ev.benign_checks,
                "max_benign_dlogit": ev.max_benign_dlogit,
                "detection": {f"{m}|{a}|{s}": [ev.detection_table(s)[(m, a)][n - 1] for n in NS] for s in SPECS for (m, a) in ev.detection_table(s)},
                "errors": ev.errors,
            }
            print(f"{name} {label}: {runs[label]['seconds']} s, flagged {ev.benign_flagged}/{ev.benign_checks}", file=sys.stderr, flush=True)
        out[name] = runs
        b, a = runs["before"], runs["after"]
        print(f"\n### {name}\n")
        print("| method | benign floor | tolerance before | tolerance after |\n|---|---|---|---|")
        for m in METHODS:
            print(f"| {m} | {a['benign_floor'][m]:.3g} | {b['tolerance'][m]:.3g} | {a['tolerance'][m]:.3g} |")
        print(f"\nfalse alarms: before {b['flagged']}/{b['checks']}, after {a['flagged']}/{a['checks']}\n")
        print("| method | attack | " + " | ".join(f"{s} N_S=1/5/10 before → after" for s in SPECS) + " |")
        print("|---|---|" + "---|" * len(SPECS))
        for m in METHODS:
            for atk in ATTACKS:
                cells = []
                for s in SPECS:
                    key = f"{m}|{atk}|{s}"
                    if key not in b["detection"]:
                        cells.append("–")
                        continue
                    bb, aa = b["detection"][key], a["detection"][key]
                    same = all(abs(x - y) < 5e-4 for x, y in zip(bb, aa))
                    cells.append("/".join(f"{x:.2f}" for x in bb) + (" (same)" if same else " → " + "/".join(f"{y:.2f}" for y in aa)))
                print(f"| {m} | {atk} | " + " | ".join(cells) + " |")
    args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
