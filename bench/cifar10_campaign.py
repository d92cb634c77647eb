"""CIFAR-10 campaign: every marker method against every attack under every output spec, on a pretrained ResNet-56.

The model is the third-party CIFAR-10 ResNet-56 of ``../shared/models/cifar10_resnet56`` and the
data the first 1,017 CIFAR-10 test images (``bench/_cifar.py``). There is no other CIFAR data on
the machine, so the 1,017 images are split once (seeded):

* **attacker**: 700 images, the only labelled data the attacks that train (trojan, poisoning,
  fine-tuning, watermarking) learn from — far less than the 50,000 a real attacker would have,
  so those attacks are cruder (and hurt accuracy more) than with a real training set;
* **owner**: the other 317, split by ``run_evaluation`` (``--test-fraction``) into the marker
  seeds and the held-out images that measure accuracy before and after each attack. The
  attacker never holds the owner's marker seeds.

``run_evaluation`` (``tamperprobe.evaluation.campaign``) then runs as in ``bench/mnist_campaign.py``:
all methods, all attacks, all output specs, benign runtimes for false alarms. Results go to
``bench/results/<date>-cifar10-resnet56/`` (report.md, CSV, PNG, results.json) and a line to the
summary ``bench/results/README.md`` (rebuilt by ``mnist_campaign.write_readme`` from every
results.json), with top1 detection at N_S = 2 / 4 / 6 / 10.

    python bench/cifar10_campaign.py                       # the full campaign (about 2 hours on 2 shared cores)
    python bench/cifar10_campaign.py --trials 2 --bag 60   # smaller; the reductions are recorded in results.json

Torch runs with one thread (``--threads``). Anything smaller than the defaults of ``run_evaluation``
(3 trials, bag 100, 10,000 resamples) is listed under ``reduced`` in results.json and the summary.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime

import _cifar
from mnist_campaign import RESULTS, write_readme

ATTACKER_IMAGES = 700
BUDGET_SECONDS = 2 * 3600
SUMMARY_NS = (2, 4, 6, 10)
FULL = {"trials": 3, "bag": 100, "resamples": 10_000}  # run_evaluation's defaults


def _log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from tamperprobe.evaluation import run_evaluation, write_report
    from tamperprobe.models import TorchModel

    data = _cifar.load_cifar10()
    attacker, owner = data.split(1 - ATTACKER_IMAGES / len(data), seed=args.seed)
    attacker.name, owner.name = "cifar10[attacker]", "cifar10[owner]"
    _log(f"CIFAR-10: {len(data)} images -> {len(attacker)} attacker / {len(owner)} owner (marker seeds + accuracy)")
    model = TorchModel(_cifar.load_resnet56(), _cifar.SOURCE)
    attack_params = {label: {"epochs": int(epochs)} for label, epochs in (kv.split("=", 1) for kv in args.attack_epochs or [])}
    t0 = time.monotonic()

    def progress(done: int, total: int, what: str = "") -> None:
        _log(f"{done}/{total} {what} ({time.monotonic() - t0:.0f} s)")

    ev = run_evaluation(
        model,
        owner,
        methods=None,
        attacks=None,
        trials=args.trials,
        bag=args.bag,
        select=args.select,
        resamples=args.resamples,
        seed=args.seed,
        progress=progress,
        test_fraction=args.test_fraction,
        attack_data=attacker,
        attack_params=attack_params,
    )
    reduced = [f"{k} {getattr(args, k)} (default {v})" for k, v in FULL.items() if getattr(args, k) < v]
    reduced += [f"{label} trains {p['epochs']} epochs" for label, p in attack_params.items()]
    ev.model.update(
        {
            "architecture": "resnet56 (pretrained, CIFAR-10)",
            "data_split": f"{len(attacker)} attacker images; {len(owner)} owner images: {ev.params['data']['train']} marker seeds, "
            f"{ev.params['data']['test']} accuracy",
            "campaign_seconds": round(ev.seconds, 1),
            "budget_seconds": BUDGET_SECONDS,
            "within_budget": ev.seconds < BUDGET_SECONDS,
            "torch_threads": torch.get_num_threads(),
            "summary_ns": list(SUMMARY_NS),
            "reduced": reduced,
        }
    )
    out = RESULTS / f"{datetime.now(UTC).strftime('%Y-%m-%d')}-cifar10-resnet56"
    write_report(ev, out)
    _log(
        f"campaign {ev.seconds:.0f} s; false alarms {ev.benign_flagged}/{ev.benign_checks}; "
        f"{len(ev.errors)} errors, {len(ev.warnings)} warnings; wrote {out}"
    )
    _log(f"wrote {write_readme()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=FULL["trials"])
    ap.add_argument("--bag", type=int, default=FULL["bag"])
    ap.add_argument("--resamples", type=int, default=FULL["resamples"])
    ap.add_argument("--select", default="manc", choices=["manc", "random"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-fraction", type=float, default=0.3, help="share of the owner's 317 images kept for accuracy")
    ap.add_argument("--attack-epochs", nargs="*", metavar="ATTACK=EPOCHS", help="fewer training epochs for an attack (recorded as a reduction)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: 2 shared cores)")
    args = ap.parse_args(argv)
    missing = _cifar.available()
    if missing:
        print(f"CIFAR-10 model or data not found: {missing}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(max(1, args.threads))
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
