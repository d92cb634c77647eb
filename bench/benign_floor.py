"""The benign floor: how far the logits of the *same* weights move between runtimes, against the logit scale.

Why: the CIFAR-10 campaign (``bench/results/2026-11-22-cifar10-resnet56``) flagged one benign check:
a ``boundary`` marker's logits under ONNX Runtime moved 3.48e-5, above the comparison tolerance
3e-5 that every fingerprint written without ``--noise`` carries. This script measures, per model
and marker method, what a comparison tolerance must cover, and whether that need scales with the
size of the logits.

Models: the zoo CNN and MLP trained on the bundled 8x8 digits, the zoo CNN trained on 7,000 MNIST
images (``../shared/data/mnist``, as ``mnist_campaign.py``) and the pretrained CIFAR-10 ResNet-56
(``../shared/models/cifar10_resnet56``, through ``_cifar.py``). The last two are skipped when
``../shared`` lacks them. Markers: a bag of ``--bag`` candidates per method (``boundary``,
``sensitive``, ``natural``; ``evaluation.campaign.make_bag``, as the campaigns generate them) from
the training part of a seeded 70/30 split.

Reference: torch eager at the fingerprint's defaults (``Model.logits``: batch size 256, one torch
thread, as ``tamperprobe fingerprint`` runs with its default ``--threads 1``). Runtimes: those of
``owner.calibrate.runtime_logits`` (``batch1``, ``batch64`` in a rotated order, ``threads1``,
``threads2``, ``torchscript``, ``onnx``: ``torch.onnx.export(..., dynamo=False)`` run by ONNX
Runtime at batch 64), and three more that a serving stack may differ in: ONNX Runtime at batch
size 1, with every graph optimisation disabled, and with one intra-op thread. ``float64`` is the
module run in double precision: the error of every float32 runtime against (nearly) exact logits.

For each (model, method, runtime), over the bag's logits ``e`` (reference) and ``o`` (runtime):

* ``max |Δz|``: ``max |o − e|``;
* ``need``: the absolute tolerance the current logits rule (``|o − e| ≤ τ + 1e-6·|e|``) needs,
  ``max(|o − e| − 1e-6·|e|)``;
* ``need / S_bag`` and ``need_i / S_i``: that need against the bag's largest ``|e|`` and, per
  marker, against the marker's own largest ``|e_i|`` (the two candidate scales of a relative rule);
* ``flips``: markers whose top-1 label differs, with the largest expected top-1 gap among them.

Fingerprint-sized draws: ``--draws`` random fingerprints of 10 markers of the method and 10
``natural`` inputs as decoys, each with the tolerance ``fingerprint`` now gives it (max(3e-5, 2 × the
largest deviation of its 20 queries under the ``calibrate`` runtimes)). Against it: the largest
``need`` of the same queries under the three extra ONNX Runtime settings (runtimes the fingerprint
did not measure), and the *triangle bound* ``|ref − exact| + max over runtimes |runtime − exact|``
(float64 as exact): how far a float32 runtime as inexact as the worst one measured could land from
the recorded logits. Reported: the smallest tolerance drawn, and the smallest ratio of a draw's
tolerance to each of those (above 1: no false alarm under the logits rule).

    python bench/benign_floor.py --tables              # markdown tables from the JSON (benign-floor.md)

    python bench/benign_floor.py                       # every model, bag 100; writes bench/results/benign-floor.json
    python bench/benign_floor.py --models digits-cnn --bag 30 --json /tmp/floor.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist"
MODELS = ("digits-cnn", "digits-mlp", "mnist-cnn", "resnet56")
METHODS = ("boundary", "sensitive", "natural")
RUNTIMES = ("batch1", "batch64", "threads1", "threads2", "torchscript", "onnx")
EXTRA = ("onnx-batch1", "onnx-noopt", "onnx-1thread")
RTOL = 1e-6  # the logits rule's relative term (outputs._close)


def _log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load(name: str):
    """(TorchModel, training part) for one model name; None when its files are missing."""
    from tamperprobe import zoo
    from tamperprobe.data import load_data
    from tamperprobe.models import TorchModel
    from tamperprobe.train import fit

    if name in ("digits-cnn", "digits-mlp"):
        trained = zoo.train_model(name.split("-")[1], load_data("digits"), seed=0)
        train, _ = load_data("digits").split(0.3, seed=0)
        return TorchModel(trained.module, name), train
    if name == "mnist-cnn":
        if not MNIST.exists():
            return None
        train, _ = load_data(MNIST).split(0.3, seed=0)
        assert train.y is not None
        torch.manual_seed(0)
        module = fit(zoo.build("cnn", (1, 28, 28)), train.x, train.y, epochs=8, lr=1e-3, seed=0)  # mnist_campaign.TRAINING
        return TorchModel(module.eval(), name), train
    import _cifar

    if _cifar.available() is not None:
        return None
    train, _ = _cifar.load_cifar10().split(0.3, seed=0)
    return TorchModel(_cifar.load_resnet56(), name), train


def onnx_variants(module: torch.nn.Module, x: np.ndarray, workdir: Path) -> dict[str, np.ndarray]:
    """ONNX Runtime configured as another server might: batch 1, no graph optimisation, one intra-op thread."""
    import onnxruntime as ort

    from tamperprobe.models import save_model

    path = save_model(module, workdir / "variants.onnx", x[:2])

    def run(batch: int, **options) -> np.ndarray:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        for k, v in options.items():
            setattr(opts, k, v)
        s = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)])

    return {
        "onnx-batch1": run(1),
        "onnx-noopt": run(64, graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
        "onnx-1thread": run(64, intra_op_num_threads=1),
    }


def float64_logits(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    import copy

    m = copy.deepcopy(module).double().eval()
    with torch.no_grad():
        return np.concatenate([m(torch.from_numpy(x[i : i + 64]).double()).numpy() for i in range(0, len(x), 64)])


def stats(e: np.ndarray, o: np.ndarray) -> dict[str, float | int]:
    e64, o64 = e.astype(np.float64), o.astype(np.float64)
    d = np.abs(o64 - e64)
    need = d - RTOL * np.abs(e64)
    row_scale = np.abs(e64).max(axis=1)
    flips = e64.argmax(1) != o64.argmax(1)
    srt = np.sort(e64, axis=1)
    gap = srt[:, -1] - srt[:, -2]
    return {
        "max_abs": float(d.max()),
        "need": float(max(0.0, need.max())),
        "need_over_bag_scale": float(max(0.0, need.max()) / np.abs(e64).max()),
        "need_over_row_scale": float(max(0.0, (need.max(axis=1) / row_scale).max())),
        "max_abs_over_row_scale": float((d.max(axis=1) / row_scale).max()),
        "flips": int(flips.sum()),
        "flip_gap": float(gap[flips].max()) if flips.any() else 0.0,
    }


def need(e: np.ndarray, o: np.ndarray) -> np.ndarray:
    """Per query, the absolute tolerance the logits rule needs: ``max_j(|o − e| − 1e-6·|e|)``."""
    e64 = e.astype(np.float64)
    return (np.abs(o.astype(np.float64) - e64) - RTOL * np.abs(e64)).max(axis=1)


def draws(ref: np.ndarray, observed: dict, exact: np.ndarray, markers: slice, decoys: slice, n: int, seed: int) -> dict:
    """Fingerprints of 10 markers and 10 decoys drawn from the bags: their tolerance against held-out runtimes (module doc)."""
    from tamperprobe.owner.calibrate import tolerance_from_noise

    dev = {rt: np.abs(o.astype(np.float64) - ref).max(axis=1) for rt, o in observed.items()}  # per query
    held = np.max([need(ref, observed[rt]) for rt in EXTRA], axis=0)
    err = {rt: np.abs(o.astype(np.float64) - exact).max(axis=1) for rt, o in {"reference": ref, **observed}.items()}
    triangle = err["reference"] + np.max([err[rt] for rt in observed], axis=0)
    rng = np.random.default_rng(seed)
    m_idx, d_idx = np.arange(markers.start, markers.stop), np.arange(decoys.start, decoys.stop)
    taus, vs_held, vs_triangle = [], [], []
    alt = {"safety3": ([], [], []), "float64": ([], [], [])}  # variants of the rule: 3 × floor; float64 error counted in the floor
    for _ in range(n):
        q = np.concatenate([rng.choice(m_idx, 10, replace=False), rng.choice(d_idx, 10, replace=False)])
        floor = max(dev[rt][q].max() for rt in RUNTIMES)
        for name, tau in (
            ("chosen", tolerance_from_noise(floor)),
            ("safety3", max(3e-5, 3 * floor)),
            ("float64", tolerance_from_noise(max(floor, err["reference"][q].max()))),
        ):
            t, h, tr = (taus, vs_held, vs_triangle) if name == "chosen" else alt[name]
            t.append(tau)
            h.append(tau / max(held[q].max(), 1e-12))
            tr.append(tau / triangle[q].max())
    return {
        "draws": n,
        "tolerance": [float(np.min(taus)), float(np.median(taus)), float(np.max(taus))],
        "min_tolerance_over_held_out_need": float(np.min(vs_held)),
        "min_tolerance_over_triangle": float(np.min(vs_triangle)),
        "variants": {
            k: {
                "tolerance": [float(np.min(t)), float(np.median(t)), float(np.max(t))],
                "min_over_held_out": float(np.min(h)),
                "min_over_triangle": float(np.min(tr)),
            }
            for k, (t, h, tr) in alt.items()
        },
        "old_tolerance_over_held_out_need": float(3e-5 / max(held[np.concatenate([m_idx, d_idx])].max(), 1e-12)),
    }


def measure(name: str, bag: int, methods: tuple[str, ...], seed: int, n_draws: int) -> dict | None:
    from tamperprobe.evaluation.campaign import make_bag
    from tamperprobe.owner.calibrate import runtime_logits

    torch.set_num_threads(1)
    got = load(name)
    if got is None:
        _log(f"{name}: files missing under ../shared, skipped")
        return None
    model, train = got
    module = model.require_torch("the benign-floor measurement")
    bags: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for method in methods:
        t0 = time.monotonic()
        generated, _ = make_bag(model, train, method, {}, bag, seed, method)
        bags[method] = np.ascontiguousarray(generated.inputs, dtype=np.float32)
        seconds[method] = time.monotonic() - t0
        _log(f"{name}: {len(bags[method])} {method} markers in {seconds[method]:.0f} s")
    x = np.concatenate(list(bags.values()))
    ref = model.logits(x)
    observed: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="benign-floor-") as tmp:
        for rt in RUNTIMES:
            observed[rt] = runtime_logits(model, rt, x, Path(tmp))
        observed.update(onnx_variants(module, x, Path(tmp)))
    torch.set_num_threads(1)
    exact = float64_logits(module, x)
    ref = ref.astype(np.float64)
    out: dict = {"model": name, "markers": {m: len(v) for m, v in bags.items()}, "generation_seconds": seconds, "methods": {}}
    slices, pos = {}, 0
    for method, xm in bags.items():
        slices[method] = slice(pos, pos + len(xm))
        pos += len(xm)
    for method, sl in slices.items():
        e = ref[sl]
        row_scale = np.abs(e.astype(np.float64)).max(axis=1)
        out["methods"][method] = {
            "bag_scale": float(row_scale.max()),
            "row_scale": [float(row_scale.min()), float(np.median(row_scale)), float(row_scale.max())],
            "runtimes": {rt: stats(e, o[sl]) for rt, o in observed.items()},
            "vs_float64": {rt: stats(exact[sl], o[sl]) for rt, o in {"reference": ref, **observed}.items()},
        }
        if "natural" in slices:
            out["methods"][method]["draws"] = draws(ref, observed, exact, sl, slices["natural"], n_draws, seed)
    _log(f"{name}: done")
    return out


def tables(doc: dict) -> None:
    """The markdown tables of benign-floor.md."""
    rts = [*RUNTIMES, *EXTRA]
    print("max |Δlogit| against the reference (torch eager, batch 256, 1 thread), per model and marker method:\n")
    print("| model | markers | logit scale S (bag max; per-marker min–max) | " + " | ".join(rts) + " | need / S | need_i / S_i |")
    print("|---|---|---|" + "---|" * (len(rts) + 2))
    for m in doc["models"]:
        for meth, v in m["methods"].items():
            r = v["runtimes"]
            cells = " | ".join("0" if r[rt]["max_abs"] == 0 else f"{r[rt]['max_abs']:.2e}" for rt in rts)
            nb = max(x["need_over_bag_scale"] for x in r.values())
            nr = max(x["need_over_row_scale"] for x in r.values())
            lo, _, hi = v["row_scale"]
            print(f"| {m['model']} | {meth} | {v['bag_scale']:.1f} ({lo:.1f}–{hi:.1f}) | {cells} | {nb:.1e} | {nr:.1e} |")
    print("\nError against float64 (the module run in double precision), max |z − z_exact|:\n")
    print("| model | markers | reference | " + " | ".join(rts) + " | triangle bound |")
    print("|---|---|---|" + "---|" * (len(rts) + 1))
    for m in doc["models"]:
        for meth, v in m["methods"].items():
            f = v["vs_float64"]
            tri = f["reference"]["max_abs"] + max(f[rt]["max_abs"] for rt in rts)
            print(
                f"| {m['model']} | {meth} | {f['reference']['max_abs']:.2e} | "
                + " | ".join(f"{f[rt]['max_abs']:.2e}" for rt in rts)
                + f" | {tri:.2e} |"
            )
    print("\nFingerprint-sized draws (10 markers + 10 natural decoys), tolerance as `fingerprint` now sets it:\n")
    print(
        "| model | markers | draws | tolerance min / median / max | smallest τ / held-out ONNX need | smallest τ / triangle bound | 3e-5 / held-out ONNX need (whole bag) |"
    )
    print("|---|---|---|---|---|---|---|")
    for m in doc["models"]:
        for meth, v in m["methods"].items():
            d = v.get("draws")
            if d:
                t = " / ".join(f"{x:.3g}" for x in d["tolerance"])
                print(
                    f"| {m['model']} | {meth} | {d['draws']} | {t} | {d['min_tolerance_over_held_out_need']:.2f} | "
                    f"{d['min_tolerance_over_triangle']:.2f} | {d['old_tolerance_over_held_out_need']:.2f} |"
                )
    print("\nTwo variants of the rule on the same draws: τ = max(3e-5, 3 × floor), and τ = max(3e-5, 2 × max(floor, |reference − float64|)):\n")
    print(
        "| model | markers | 3 × floor: τ min / median / max | τ / held-out | τ / triangle | float64 in the floor: τ min / median / max | τ / held-out | τ / triangle |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for m in doc["models"]:
        for meth, v in m["methods"].items():
            d = v.get("draws")
            if d and "variants" in d:
                cells = []
                for k in ("safety3", "float64"):
                    x = d["variants"][k]
                    cells += [" / ".join(f"{t:.3g}" for t in x["tolerance"]), f"{x['min_over_held_out']:.2f}", f"{x['min_over_triangle']:.2f}"]
                print(f"| {m['model']} | {meth} | " + " | ".join(cells) + " |")


def versions() -> dict[str, str]:
    import onnxruntime

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.lower().startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--bag", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "benign-floor.json")
    ap.add_argument("--tables", action="store_true", help="print the markdown tables of --json and exit")
    args = ap.parse_args()
    if args.tables:
        tables(json.loads(args.json.read_text()))
        return
    t0 = time.monotonic()
    results = []
    for name in args.models.split(","):
        r = measure(name.strip(), args.bag, tuple(m.strip() for m in args.methods.split(",")), args.seed, args.draws)
        if r is not None:
            results.append(r)
    doc = {
        "created": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "bag": args.bag,
        "seed": args.seed,
        "versions": versions(),
        "seconds": round(time.monotonic() - t0),
        "models": results,
    }
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    _log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
