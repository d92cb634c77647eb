"""MANC's default coverage rule on three architectures: `preset=verideep` markers against 8-bit quantization.

For each model, one bag of ``sensitive`` markers with ``preset=verideep`` (seed 0), the ``int8``
attack, and the top-1 detection rate at N_S = 1..10 over resampled fingerprints (MANC on a
random half of the bag, as the campaign and ``verideep_table6.py`` do) under three selections:

* ``penultimate``: MANC over the output layer's input (the default before this rule);
* ``default``: MANC over what ``owner.features.coverage`` picks (the map pooled into the output
  layer when it reads globally pooled features, else the output layer's input);
* ``random``: uniform random selection.

Models:

* ``resnet56``: the pretrained CIFAR-10 ResNet-56 (``bench/_cifar.py``); its bag is the one
  ``verideep_table6.py`` caches (same label, seed and size), or the one ``verideep_bag_halves.py`` writes there
  (the same seeds, climbed in two processes; the committed row is that one).
* ``vgg``: a small VGG-style CNN (3×3 convolutions with batch norm and max pools down to 2×2, a
  last max pool to 1×1, one linear layer, as the CIFAR VGGs) trained here on 800 of the shared 1,017 CIFAR-10 test
  images (a few epochs on one core; its accuracy on the 217 others is reported, it is not a good
  classifier, only another architecture);
* ``mnist-cnn``: the zoo CNN for 28×28 trained on 7,000 MNIST test images as ``mnist_campaign.py``
  does (its output layer reads a hidden fully connected layer: the rule must leave it alone).

    OMP_NUM_THREADS=1 python bench/manc_default_rule.py                 # all three
    OMP_NUM_THREADS=1 python bench/manc_default_rule.py --models vgg    # one (the others stay as in the JSON)

Results: ``bench/results/manc-default-rule.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import _cifar
from tamperprobe.attacks import get_attack
from tamperprobe.data import Dataset, load_data
from tamperprobe.evaluation.campaign import machine_info, make_bag
from tamperprobe.evaluation.protocol import MAX_NS, detection_curve, manc_orders, selection_orders
from tamperprobe.evaluation.report import md_table
from tamperprobe.models import TorchModel
from tamperprobe.outputs import DEFAULT_TOLERANCE, OutputSpec, changed_markers
from tamperprobe.owner.features import coverage, penultimate
from tamperprobe.train import accuracy, fit

RESULTS = _cifar.REPO / "bench" / "results"
JSON_OUT = RESULTS / "manc-default-rule.json"
MD_OUT = RESULTS / "manc-default-rule.md"
NOTES = RESULTS / "manc-default-rule-notes.md"  # the hand-written reading, appended to the page
MNIST = _cifar.SHARED / "data" / "mnist"
SELECTIONS = ("penultimate", "default", "random")


def _log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


class SmallVGG(nn.Module):
    """VGG-style for 32×32: [16, M, 32, M, 64, M, 64, M, M] (the fifth pool takes 2×2 to 1×1) and one linear layer, as the CIFAR VGGs."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in (16, 32, 64, 64):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers, nn.MaxPool2d(2))  # 2×2 -> 1×1: a global max pool
        self.classifier = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _resnet56(args: argparse.Namespace) -> tuple[TorchModel, Dataset, dict[str, Any]]:
    module = _cifar.load_resnet56()
    data = _cifar.load_cifar10()
    assert data.y is not None
    return TorchModel(module, _cifar.SOURCE), data, {"accuracy": accuracy(module, data.x, data.y), "note": "pretrained (third party)"}


def _vgg(args: argparse.Namespace) -> tuple[TorchModel, Dataset, dict[str, Any]]:
    data = _cifar.load_cifar10()
    assert data.y is not None
    train, test = Dataset(data.x[:800], data.y[:800], "cifar10-800", 0.0, 1.0), Dataset(data.x[800:], data.y[800:], "cifar10-217", 0.0, 1.0)
    torch.manual_seed(args.seed)
    module = SmallVGG()
    t0 = time.monotonic()
    fit(module, train.x, train.y, epochs=args.vgg_epochs, lr=2e-3, seed=args.seed)
    module.eval()
    assert test.y is not None
    info = {"accuracy": accuracy(module, test.x, test.y), "train_seconds": round(time.monotonic() - t0, 1), "epochs": args.vgg_epochs}
    info["note"] = f"trained here: 800 images, {args.vgg_epochs} epochs; accuracy on the other 217"
    return TorchModel(module, "small-vgg-cifar10"), test, info


def _mnist_cnn(args: argparse.Namespace) -> tuple[TorchModel, Dataset, dict[str, Any]]:
    from tamperprobe import zoo

    data = load_data(MNIST)
    train, test = data.split(0.3, seed=args.seed)
    torch.manual_seed(args.seed)
    module = zoo.build("cnn", (1, 28, 28))
    t0 = time.monotonic()
    fit(module, train.x, train.y, epochs=8, lr=1e-3, seed=args.seed)
    module.eval()
    assert test.y is not None
    info = {"accuracy": accuracy(module, test.x, test.y), "train_seconds": round(time.monotonic() - t0, 1), "epochs": 8}
    info["note"] = "zoo CNN, trained here as mnist_campaign.py: 7,000 images, 8 epochs; accuracy on the other 3,000"
    return TorchModel(module, "tamperprobe.zoo:mnist_cnn"), test, info


MODELS = {"resnet56": _resnet56, "vgg": _vgg, "mnist-cnn": _mnist_cnn}


def _bag(name: str, model: TorchModel, data: Dataset, args: argparse.Namespace) -> tuple[np.ndarray, float, str]:
    """The bag's inputs (cached as npz; the ResNet-56's is verideep_table6.py's), its generation seconds and how it was made."""
    cache = Path(args.cache)
    if name == "resnet56":
        import verideep_table6 as vt

        b, meta = vt.load_or_generate(model, data, "verideep", vt.VARIANTS["verideep"], args.bag, args.seed, Path(args.table6_cache))
        made = str(meta.get("generation", "generated by verideep_table6.py"))  # how the cached bag was made
        return np.ascontiguousarray(b.inputs, dtype=np.float32), float(meta.get("seconds", 0.0)), made
    path = cache / f"{name}-verideep-bag{args.bag}-seed{args.seed}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            return f["inputs"], float(f["seconds"]), "generated by this script"
    _log(f"{name}: generating {args.bag} markers with preset=verideep")
    t0 = time.monotonic()
    b, _ = make_bag(model, data, "sensitive", {"preset": "verideep"}, args.bag, args.seed, "verideep")
    seconds = time.monotonic() - t0
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, inputs=b.inputs, seconds=seconds)
    return np.ascontiguousarray(b.inputs, dtype=np.float32), seconds, "generated by this script"


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    model, data, info = MODELS[name](args)
    _log(f"{name}: model ready ({info['note']}, accuracy {info['accuracy']:.3f})")
    x, seconds, made = _bag(name, model, data, args)
    h = penultimate(model, x)
    assert h is not None
    cov = coverage(model, x)
    units = {"penultimate": h > 0, "default": cov.values > 0}
    depth = min(MAX_NS, len(x))
    orders = {
        sel: manc_orders(active.astype(np.float32), depth, args.resamples, np.random.default_rng(args.seed), 0.5) for sel, active in units.items()
    }
    orders["random"] = selection_orders(len(x), depth, args.resamples, np.random.default_rng(args.seed + 1))
    attack = get_attack("int8").run(model.module, None, seed=args.seed)
    ref, obs = model.logits(x), TorchModel(attack.model, "int8").logits(x)
    changed = changed_markers(OutputSpec.parse("top1"), ref, obs, DEFAULT_TOLERANCE)
    out = {
        **info,
        "bag": len(x),
        "generation_seconds": round(seconds, 1),
        "bag_made": made,
        "coverage": cov.what,
        "units": {"penultimate": int(h.shape[1]), "default": int(cov.values.shape[1])},
        "mean_active": {k: float(v.sum(1).mean()) for k, v in units.items()},
        "changed": int(changed.sum()),
        "detection": {sel: [float(v) for v in detection_curve(changed, o)] for sel, o in orders.items()},
    }
    _log(
        f"{name}: {out['changed']}/{len(x)} changed; at 6/10: "
        + ", ".join(f"{s} {100 * d[5]:.1f}/{100 * d[9]:.1f}" for s, d in out["detection"].items())
    )
    return out


def write_markdown(doc: dict[str, Any]) -> None:
    p = doc["params"]
    lines = [
        "# MANC's default coverage rule on three architectures (`preset=verideep`, int8, top-1)",
        "",
        f"`python bench/manc_default_rule.py`: bags of {p['bag']} `sensitive` markers with `preset=verideep` (seed {p['seed']}), the `int8` "
        f"attack, detection = share of {p['resamples']} resampled fingerprints (MANC on a random half of the bag; random: uniform) holding "
        "a marker whose top-1 label changed. `penultimate`: MANC over the output layer's input (the old default); `default`: MANC over "
        "what `owner.features.coverage` picks (the map pooled into the output layer when it reads globally pooled features). "
        f"Machine: 2 shared cores, 1 torch thread; {doc.get('started', '')} – {doc.get('finished', '')}.",
        "",
    ]
    rows = []
    for name, m in sorted(doc["models"].items(), key=lambda kv: list(MODELS).index(kv[0]) if kv[0] in MODELS else len(MODELS)):
        d = m["detection"]
        rows.append(
            [
                name,
                f"{100 * m['accuracy']:.1f} %",
                m["coverage"],
                f"{m['mean_active']['penultimate']:.1f} of {m['units']['penultimate']}",
                f"{m['mean_active']['default']:.1f} of {m['units']['default']}",
                f"{m['changed']}/{m['bag']}",
                *(f"{100 * d[s][5]:.1f} / {100 * d[s][9]:.1f}" for s in SELECTIONS),
            ]
        )
    header = ["model", "accuracy", "default covers", "active (penultimate)", "active (default)", "markers changed"]
    lines += [md_table(header + [f"{s}: N_S 6 / 10 (%)" for s in SELECTIONS], rows), ""]
    for name, m in sorted(doc["models"].items(), key=lambda kv: list(MODELS).index(kv[0]) if kv[0] in MODELS else len(MODELS)):
        made = m.get("bag_made", "generated by this script")
        lines += [f"## {name}", "", m["note"] + f"; bag {made}, {m['generation_seconds']:.0f} s of generation.", ""]
        lines += [
            md_table(["N_S", *SELECTIONS], [[str(k + 1), *(f"{100 * m['detection'][s][k]:.1f}" for s in SELECTIONS)] for k in range(MAX_NS)]),
            "",
        ]
    if NOTES.exists():
        lines += [NOTES.read_text().rstrip(), ""]
    MD_OUT.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--bag", type=int, default=100)
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vgg-epochs", type=int, default=12)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "tamperprobe-manc-default-rule"))
    ap.add_argument("--table6-cache", default=str(Path(tempfile.gettempdir()) / "tamperprobe-verideep-table6"))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    doc: dict[str, Any] = json.loads(JSON_OUT.read_text()) if JSON_OUT.exists() else {"models": {}}
    if not args.report_only:
        doc.update({"format": "tamperprobe.manc-default-rule/v1", "machine": machine_info()})
        doc.setdefault("started", datetime.now(UTC).isoformat(timespec="seconds"))  # the first model's run
        doc["params"] = {"bag": args.bag, "resamples": args.resamples, "seed": args.seed}
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            doc["models"][name] = measure(name, args)
            doc["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
            JSON_OUT.write_text(json.dumps(doc, indent=1))
    write_markdown(doc)
    _log(f"wrote {MD_OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
