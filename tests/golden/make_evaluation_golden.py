"""Write the golden evaluation documents that tests/test_golden.py pins ``results.json`` and ``adversary.json`` with.

Files (in ``evaluation/`` next to this script):

* ``results.json``   the ``results.json`` of a small campaign on the digits MLP of ``tests/conftest.py``
                     (``run_evaluation``, settings in ``CAMPAIGN``), indented, without what depends on the
                     machine and the clock (``machine``, ``started``, ``seconds``, ``timings``);
* ``adversary.json`` the ``adversary.json`` of a small ``run_adversary`` (``ADVERSARY``) on the same model, the same way.

The documents are the contract a campaign's consumers read (keys, their order, rows, statuses). The
test compares everything exactly except floating-point numbers, which may differ in their last
digits on another CPU (``RTOL``, ``ATOL``); on the machine that wrote them they are equal.

Usage::

    python tests/golden/make_evaluation_golden.py           # check: rebuild, compare with the committed files
    python tests/golden/make_evaluation_golden.py --regen   # overwrite them (only on purpose: say why in the commit)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent / "evaluation"
VOLATILE = ("machine", "started", "seconds", "timings")
RTOL, ATOL = 1e-4, 1e-5
CAMPAIGN: dict[str, Any] = dict(
    methods=["natural", "boundary"],
    attacks=["fp16", "prune", "noise"],
    specs=["top1", "probs:2", "logits"],
    trials=2,
    bag=30,
    select="manc",
    resamples=500,
    seed=5,
    baselines=False,
    runtimes=("batch1", "threads2", "torchscript", "onnx"),
    attack_params={"noise": {"fraction": 0.2, "sigma": 0.05}, "prune": {"ratio": 0.3}},
)
ADVERSARY: dict[str, Any] = dict(
    methods=["natural", "boundary"],
    attacks=["fp16", "noise"],
    routers=["exact-repeat", "near-twin", "margin-original"],
    specs=["top1", "logits"],
    costs=(0.0, 0.05, 0.2),
    bag=24,
    resamples=500,
    seed=5,
)
TRAFFIC = dict(seen=100, calibration=150, seed=5)  # of the campaign's held-out part; the rest is measured


def digits_mlp() -> Any:
    """The digits MLP of tests/conftest.py (``trained_mlp``), trained the same way with one torch thread."""
    import torch

    from tamperprobe import zoo
    from tamperprobe.data import load_data
    from tamperprobe.train import fit

    torch.set_num_threads(1)
    train, _ = load_data("digits").split(0.3, seed=0)
    torch.manual_seed(0)
    return fit(zoo.build("mlp", (1, 8, 8)), train.x, train.y, epochs=8, lr=3e-3, seed=0)


def documents(module: Any) -> dict[str, dict[str, Any]]:
    """The campaign's and the adversary run's documents for ``module``, without their volatile parts."""
    from tamperprobe.data import load_data
    from tamperprobe.evaluation import Traffic, run_adversary, run_evaluation
    from tamperprobe.models import TorchModel

    model, data = TorchModel(module, "digits-mlp"), load_data("digits")
    ev = run_evaluation(model, data, **CAMPAIGN)
    train, test = data.split(0.3, seed=0)
    adv = run_adversary(model, train, Traffic.split(test.x, **TRAFFIC), **ADVERSARY)
    out = {}
    for name, doc in (("results.json", ev.to_json()), ("adversary.json", adv.to_json())):
        out[name] = {k: v for k, v in json.loads(json.dumps(doc)).items() if k not in VOLATILE}
    return out


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def differences(expected: Any, got: Any, path: str = "$") -> list[str]:
    """Where ``got`` differs from ``expected``: keys and their order, types, strings and integers exactly, floats within tolerance."""
    if isinstance(expected, dict) and isinstance(got, dict):
        if list(expected) != list(got):
            return [f"{path}: keys {list(got)} instead of {list(expected)}"]
        return [d for k in expected for d in differences(expected[k], got[k], f"{path}.{k}")]
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return [f"{path}: {len(got)} items instead of {len(expected)}"]
        return [d for i, (e, g) in enumerate(zip(expected, got)) for d in differences(e, g, f"{path}[{i}]")]
    if isinstance(expected, float) and isinstance(got, (float, int)) and not isinstance(got, bool):
        return [] if math.isclose(expected, got, rel_tol=RTOL, abs_tol=ATOL) else [f"{path}: {got!r} instead of {expected!r}"]
    if type(expected) is not type(got) or expected != got:
        return [f"{path}: {got!r} instead of {expected!r}"]
    return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regen", action="store_true", help="overwrite the committed golden files")
    args = ap.parse_args(argv)
    docs = documents(digits_mlp())
    if args.regen:
        HERE.mkdir(exist_ok=True)
        for name, doc in docs.items():
            (HERE / name).write_text(render(doc), encoding="utf-8")
            print(f"wrote {HERE / name}")
        return 0
    stale = [name for name, doc in docs.items() if not (HERE / name).is_file() or (HERE / name).read_text(encoding="utf-8") != render(doc)]
    for name in docs:
        print(f"{name}: {'DIFFERS' if name in stale else 'ok'}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
