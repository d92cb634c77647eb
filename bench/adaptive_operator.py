"""Adaptive-operator benchmark: what each marker method detects when the server's operator routes markers around T.

The operator holds the original model O and a tampered copy T, sees every request and answers the
requests a router flags with O (``tamperprobe.evaluation.adversary``, ``.routers``). For two models:

* **mnist** — the zoo CNN for 28x28 inputs trained (seeded, 8 epochs) on 4,000 images of the
  10,000-image MNIST test set (``../shared/data/mnist``); 1,000 other images are the owner's
  (marker seeds, accuracy before/after), the remaining 5,000 the operator's ordinary traffic
  (1,000 seen earlier, 2,000 to calibrate thresholds, 2,000 held out to measure the cost). The
  attacks train on the CNN's 4,000 training images.
* **cifar** — the pretrained CIFAR-10 ResNet-56 (``../shared/models/cifar10_resnet56``) with the
  1,017 test images of ``../shared/data/cifar10``: 267 are the owner's, 750 the operator's traffic
  (150 seen, 300 calibration, 300 held out). The attacks that need training data (trojan,
  poisoning, fine-tuning) train on the operator's 750 images: the only labelled images there are
  besides the owner's, so the CIFAR attacks are cruder than with a real training set.

Every method, attack and router is measured at query budgets N_S = 2, 4, 6, 10 under top1, top-3,
probabilities to 2 decimals and logits, for the operator costs of the sweep (0 to 50 %), with
fresh markers every run (the pool accounting of ``verify``/``watch``). A small second run with
``reuse="repeat"`` shows today's ``watch`` (the same markers every run) against the exact-repeat,
near-twin and learned routers.

    python bench/adaptive_operator.py                 # both models, then the summary
    python bench/adaptive_operator.py --models mnist  # one model
    python bench/adaptive_operator.py --summary-only  # rebuild bench/results/adaptive-operator.md
    python bench/adaptive_operator.py --plan scores   # score APIs: SCORES methods and specs, + the request-shape routers

The score plan writes ``<model>-scores/`` and, through ``adaptive_operator_scores``,
``bench/results/adaptive-operator-scores.md`` and ``src/tamperprobe/owner/benchmark_routed.json``
(the advice's routed table); about 28 minutes for both models on 2 busy cores.

Results: ``bench/results/adaptive-operator/<model>[-repeat]/`` (adversary.md with every table, CSV,
adversary.json) and the summary ``bench/results/adaptive-operator.md``. Torch runs with one thread
(``--threads``); the budget is about 40 minutes for both models on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import _cifar
from adaptive_operator_summary import write_summary

REPO = Path(__file__).resolve().parents[1]
# ../shared next to the repository; from a git worktree under /work/wt, next to the main checkout
SHARED = next((p for p in (REPO.parent / "shared", REPO.parent.parent / "shared") if p.is_dir()), REPO.parent / "shared")
if not _cifar.SHARED.is_dir():
    _cifar.MODEL_DIR, _cifar.DATA_FILE = SHARED / _cifar.MODEL_DIR.relative_to(_cifar.SHARED), SHARED / _cifar.DATA_FILE.relative_to(_cifar.SHARED)
MNIST = SHARED / "data" / "mnist"
OUT = REPO / "bench" / "results" / "adaptive-operator"
LINF = 8 / 255
SPECS = ("top1", "topk:3", "probs:2", "logits")
LARGE = ("trojan", "poison-generic", "finetune")  # the attacks margin-matched markers should keep catching

# label -> (registered method, parameters): the same recipe on both models unless overridden below
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "sensitive": ("sensitive", {}),  # VerIDeep's Sensitive-Samples: the default for score APIs
    "natural": ("natural", {}),
    "badv": ("badv", {}),
    "boundary": ("boundary", {}),
    "boundary-single": ("boundary", {"pairs": False}),
    "crossed": ("crossed", {"path": "blend"}),
    # the default for label-only APIs: crossed pairs on (unbounded) gradient paths around natural seeds
    "crossed-gradient": ("crossed", {"path": "gradient"}),
    # few MNIST digits change label within 8/255 (about one in ten): every seed is tried once or twice, the bag is what that yields
    "crossed-edge": (
        "crossed",
        {
            "path": "gradient",
            "linf": LINF,
            "uint8": True,
            "max_steps": 20,
            "spare": 2,
            "oversample": 5,
            "rounds": 2,
            "neighbors": 8,
            "greedy_steps": 30,
        },
    ),
    "matched": ("matched", {"uint8": True}),
    "matched-grid": ("matched", {"source": "grid", "uint8": True}),
}

CONFIG: dict[str, dict[str, Any]] = {
    "mnist": {
        "methods": [m for m in METHODS if m != "sensitive"],
        "attacks": ["trojan", "poison-generic", "finetune", "fp16", "int8", "noise", "prune"],
        "attack_params": {},
        "bag": 100,
        "trials": 2,
        "resamples": 2000,
        "overrides": {},
        "reduced": "2 seeded instances of each random attack (trojan, poisoning, fine-tuning, noise); crossed-edge tries each seed "
        "once or twice, so its bag holds what that yields",
    },
    "cifar": {
        "methods": [m for m in METHODS if m != "sensitive"],
        "attacks": ["trojan", "poison-generic", "finetune", "fp16", "int8", "noise"],
        "attack_params": {"trojan": {"epochs": 3}, "poison-generic": {"epochs": 3}},
        "bag": 60,
        "trials": 1,
        "resamples": 2000,
        "reduced": "bag of 60 markers per method (MNIST 100); one instance per attack; trojan and poisoning train 3 epochs (default 10) "
        "on the operator's 750 images; no pruning attack; crossed-edge markers in float (the 8-bit pixel search took over 8 minutes "
        "for 40 markers), so they are off the 8-bit grid; traffic parts of 150/300/300 images, so a cost paid on the held-out part "
        "has a sampling error of about ±2.3 points at 20 %",
        "overrides": {
            "crossed": {"spare": 3, "oversample": 2},
            "crossed-gradient": {"spare": 3, "oversample": 2},
            # the 8-bit pixel search took over 8 minutes for 40 markers of the ResNet-56: float markers (off the 8-bit grid)
            "crossed-edge": {"spare": 2, "oversample": 2, "rounds": 4, "uint8": False},
            "matched": {"oversample": 3},
        },
    },
}
# The score-API plan (``--plan scores``): the methods a score spec could default to, under every score spec (and top-3
# labels), against every router and the request-shape routers, with the fingerprint's default selection (manc).
SCORES = {
    "methods": ["sensitive", "natural", "badv", "crossed-gradient", "matched"],
    "specs": ("topk:3", "top1-prob:2", "probs:1", "probs:2", "logits"),
    "select": "manc",
}
REPEAT = {"methods": ["boundary", "matched"], "attacks": ["fp16", "finetune"], "routers": ["exact-repeat", "near-twin", "learned"]}


def _log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- the two settings


def mnist_setting(seed: int) -> dict[str, Any]:
    import torch

    from tamperprobe import zoo
    from tamperprobe.data import Dataset, load_data
    from tamperprobe.evaluation.adversary import Traffic
    from tamperprobe.models import TorchModel
    from tamperprobe.train import accuracy, fit

    data = load_data(MNIST)
    order = np.random.default_rng(seed).permutation(len(data))

    def part(idx: np.ndarray, name: str) -> Dataset:
        assert data.y is not None
        return Dataset(data.x[idx], data.y[idx], name, data.low, data.high)

    train, owner, traffic = part(order[:4000], "mnist[train]"), part(order[4000:5000], "mnist[owner]"), part(order[5000:], "mnist[traffic]")
    torch.manual_seed(seed)
    module = zoo.build("cnn", (1, 28, 28))
    t0 = time.monotonic()
    fit(module, train.x, train.y, epochs=8, lr=1e-3, seed=seed)
    assert owner.y is not None
    info = {
        "model": "zoo CNN (28x28), 8 epochs on 4,000 MNIST images",
        "train_seconds": round(time.monotonic() - t0, 1),
        "accuracy_owner": accuracy(module, owner.x, owner.y),
    }
    return {
        "model": TorchModel(module, "tamperprobe.zoo:mnist_cnn"),
        "owner": owner,
        "traffic": Traffic.split(traffic.x, seen=1000, calibration=2000, seed=seed),
        "attack_data": train,
        "eval_data": owner,
        "info": info,
    }


def cifar_setting(seed: int) -> dict[str, Any]:
    from tamperprobe.data import Dataset
    from tamperprobe.evaluation.adversary import Traffic
    from tamperprobe.models import TorchModel
    from tamperprobe.train import accuracy

    module = _cifar.load_resnet56()
    data = _cifar.load_cifar10()
    assert data.y is not None
    x, y = data.x, data.y
    order = np.random.default_rng(seed).permutation(len(x))
    owner = Dataset(x[order[:267]], y[order[:267]], "cifar10[owner]", 0.0, 1.0)
    traffic = Dataset(x[order[267:]], y[order[267:]], "cifar10[traffic]", 0.0, 1.0)
    info = {
        "model": "pretrained CIFAR-10 ResNet-56 (third party, 92.79 % recorded test accuracy)",
        "accuracy_owner": accuracy(module, owner.x, y[order[:267]]),
    }
    return {
        "model": TorchModel(module, "cifar10_resnet56"),
        "owner": owner,
        "traffic": Traffic.split(traffic.x, seen=150, calibration=300, seed=seed),
        "attack_data": traffic,
        "eval_data": owner,
        "info": info,
    }


SETTINGS = {"mnist": mnist_setting, "cifar": cifar_setting}


# ----------------------------------------------------------------------------- runs


def run_scores(name: str, args: argparse.Namespace) -> None:
    """The score-API plan (``SCORES``) on one model: every registered router plus the two request-shape routers."""
    from tamperprobe.evaluation.adversary import run_adversary, write_adversary_report
    from tamperprobe.evaluation.routers import RequestShapeOldClient, RequestShapeRouter, get_router, router_names

    t0 = time.monotonic()
    setting = SETTINGS[name](args.seed)
    cfg = CONFIG[name]
    _log(f"{name} (scores): {setting['info']}")
    labels = SCORES["methods"]
    method_params = {label: {**METHODS[label][1], **cfg["overrides"].get(label, {})} for label in labels}
    routers = [get_router(r) for r in router_names()] + [RequestShapeRouter(), RequestShapeOldClient()]

    def progress(done: int, total: int, what: str = "") -> None:
        _log(f"{name} (scores): {done}/{total} {what} ({time.monotonic() - t0:.0f} s)")

    ev = run_adversary(
        setting["model"],
        setting["owner"],
        setting["traffic"],
        methods=[(label, METHODS[label][0]) for label in labels],
        attacks=cfg["attacks"],
        routers=routers,
        attack_data=setting["attack_data"],
        eval_data=setting["eval_data"],
        specs=SCORES["specs"],
        bag=cfg["bag"],
        trials=cfg["trials"],
        resamples=cfg["resamples"],
        select=SCORES["select"],
        seed=args.seed,
        method_params=method_params,
        attack_params=cfg["attack_params"],
        progress=progress,
    )
    ev.model.update(setting["info"])
    write_adversary_report(ev, OUT / f"{name}-scores")
    stamp = {"model": name, "plan": "scores", "seconds_total": round(time.monotonic() - t0, 1), "seconds_run": round(ev.seconds, 1)}
    stamp["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    (OUT / f"{name}-scores" / "run.json").write_text(json.dumps(stamp, indent=1))
    _log(f"{name} (scores): {ev.seconds:.0f} s, {len(ev.errors)} errors")


def run_model(name: str, args: argparse.Namespace) -> None:
    from tamperprobe.evaluation.adversary import run_adversary, write_adversary_report

    t0 = time.monotonic()
    setting = SETTINGS[name](args.seed)
    cfg = CONFIG[name]
    _log(f"{name}: {setting['info']}")
    methods = [(label, METHODS[label][0]) for label in cfg["methods"]]
    method_params = {label: {**METHODS[label][1], **cfg["overrides"].get(label, {})} for label in cfg["methods"]}

    def progress(done: int, total: int, what: str = "") -> None:
        _log(f"{name}: {done}/{total} {what} ({time.monotonic() - t0:.0f} s)")

    common = {
        "attack_data": setting["attack_data"],
        "eval_data": setting["eval_data"],
        "specs": SPECS,
        "bag": cfg["bag"],
        "trials": cfg["trials"],
        "resamples": cfg["resamples"],
        "seed": args.seed,
        "method_params": method_params,
        "attack_params": cfg["attack_params"],
        "progress": progress,
    }
    ev = run_adversary(setting["model"], setting["owner"], setting["traffic"], methods=methods, attacks=cfg["attacks"], **common)
    ev.model.update(setting["info"])
    write_adversary_report(ev, OUT / name)
    _log(f"{name}: fresh-marker run {ev.seconds:.0f} s, {len(ev.errors)} errors")
    repeat_methods = [(label, METHODS[label][0]) for label in REPEAT["methods"]]
    rep = run_adversary(
        setting["model"],
        setting["owner"],
        setting["traffic"],
        methods=repeat_methods,
        attacks=REPEAT["attacks"],
        routers=REPEAT["routers"],
        reuse="repeat",
        **common,
    )
    rep.model.update(setting["info"])
    write_adversary_report(rep, OUT / f"{name}-repeat")
    total = time.monotonic() - t0
    _log(f"{name}: repeated-marker run {rep.seconds:.0f} s; total with setup {total:.0f} s")
    stamp = {
        "model": name,
        "seconds_total": round(total, 1),
        "seconds_fresh": round(ev.seconds, 1),
        "seconds_repeat": round(rep.seconds, 1),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (OUT / name / "run.json").write_text(json.dumps(stamp, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mnist,cifar")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--plan", choices=("all", "scores"), default="all", help="scores: the score-API plan only (SCORES)")
    args = ap.parse_args()
    if not args.summary_only:
        import torch

        torch.set_num_threads(args.threads)
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if name not in SETTINGS:
                print(f"unknown model {name!r}: choose from {', '.join(SETTINGS)}", file=sys.stderr)
                return 2
            (run_scores if args.plan == "scores" else run_model)(name, args)
    if args.plan == "scores":
        from adaptive_operator_scores import write_scores

        _log(f"wrote {write_scores(list(SETTINGS))}")
        return 0
    _log(f"wrote {write_summary(list(SETTINGS), {name: CONFIG[name]['reduced'] for name in SETTINGS})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
