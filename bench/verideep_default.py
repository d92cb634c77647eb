"""VerIDeep's headline through the default path: ``preset=verideep``, default selection, measured directly.

``bench/verideep_table6.py`` filled its default-selection column from bags generated before the
pooled-map rule, by identity (the default coverage equals layer3's map on this ResNet-56). This
script measures it without that step: it makes a fingerprint exactly as a user would,
``create_fingerprint(model, data, method="sensitive", params={"preset": "verideep"},
output_spec="top1", seed=S)`` — default ``select`` (MANC), no ``layer``, the default bag of 100 —
which is what ``tamperprobe fingerprint ... --method sensitive --param preset=verideep --output-spec top1
--seed S`` runs. The bag the method generated inside that call is kept (the method's ``generate`` is
wrapped to hold on to its result; nothing it returns is changed), and then:

* the bag is measured as ``verideep_table6.measure_bag`` measures every bag (detection at N_S = 1..10
  = share of 10,000 resampled fingerprints, MANC on a random half of the bag, holding at least one
  changed answer), for every 8-bit scheme of that page; the ``manc-default`` curve is the default
  selection (``owner.features.coverage``: the map pooled into the output layer), computed here;
* the fingerprint the call made (its 10 markers, in MANC's order) is run against each scheme:
  how many of its markers change top-1, and whether its first N_S markers detect, N_S = 1..10.

Results: ``bench/results/verideep-table6-default.json`` and ``.md``. Bags and fingerprints are cached
(npz and the fingerprint file; never pickle) under ``--cache``.

    python bench/verideep_default.py --seeds 0        # one bag (1,000 ascent steps per marker: the slow part)
    python bench/verideep_default.py --seeds 0,1 --reuse   # measure the cached bags again
    python bench/verideep_default.py --report-only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import _cifar
import verideep_table6 as t6
from tamperprobe.attacks import get_attack
from tamperprobe.evaluation.campaign import machine_info
from tamperprobe.evaluation.protocol import MAX_NS
from tamperprobe.evaluation.report import md_table
from tamperprobe.fingerprint import save as save_fingerprint
from tamperprobe.models import TorchModel
from tamperprobe.outputs import DEFAULT_TOLERANCE, OutputSpec, changed_markers
from tamperprobe.owner import generate as generate_module
from tamperprobe.owner.methods import Bag

JSON_OUT = t6.RESULTS / "verideep-table6-default.json"
MD_OUT = t6.RESULTS / "verideep-table6-default.md"
REUSE = False  # --reuse: measure a bag cached by an earlier run instead of generating it again
SMOKE: dict[str, Any] = {}  # --smoke: 3 ascent steps (a check of the script, not a measurement)


def _log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def fingerprint_by_default(model: TorchModel, data: Any, seed: int, cache: Path) -> tuple[Bag, dict[str, Any]]:
    """``create_fingerprint`` with the preset and every default (selection, layer, bag), seed ``seed``; the bag it generated.

    Returns the bag (model domain) and what the fingerprint holds: its markers' indices in the bag, its
    recorded selection and generator, and its file (saved to ``cache``).
    """
    from tamperprobe.owner.generate import create_fingerprint

    cached = cache / f"default-seed{seed}-bag.npz"
    if cached.exists() and REUSE:
        with np.load(cached, allow_pickle=False) as f:
            _log(f"seed {seed}: the bag made earlier through the default path, from {cached}")
            return Bag(f["inputs"], f["seeds"], None, {k[5:]: f[k] for k in f.files if k.startswith("info_")}), json.loads(str(f["meta"]))
    kept: list[Bag] = []
    original = generate_module.get_method

    def capturing(name: Any, **params: Any) -> Any:
        method = original(name, **params)
        inner = method.generate

        def generate(*args: Any, **kwargs: Any) -> Bag:
            out = inner(*args, **kwargs)
            kept.append(out)
            return out

        method.generate = generate
        return method

    last = [time.monotonic()]

    def progress(done: int, total: int, what: str = "") -> None:
        if done % 100 == 0 or done == total:
            _log(f"  seed {seed}: step {done}/{total} ({time.monotonic() - last[0]:.0f} s)")

    t0 = time.monotonic()
    generate_module.get_method = capturing
    try:
        fp = create_fingerprint(
            model, data, method="sensitive", params=SMOKE or {"preset": "verideep"}, output_spec="top1", seed=seed, progress=progress
        )
    finally:
        generate_module.get_method = original
    seconds = time.monotonic() - t0
    assert len(kept) == 1, f"expected one generation, got {len(kept)}"
    bag = kept[0]
    inputs = np.ascontiguousarray(bag.decoded() if bag.encoding is not None else bag.inputs, dtype=np.float32)
    markers = np.ascontiguousarray(fp.inputs, dtype=np.float32)
    index = [int(np.flatnonzero((inputs == m).reshape(len(inputs), -1).all(1))[0]) for m in markers]
    cache.mkdir(parents=True, exist_ok=True)
    fp_path = cache / f"default-seed{seed}.tpf"
    save_fingerprint(fp, fp_path, sign_key=None)  # unsigned: a benchmark artefact, no signing key made on this machine
    gen = fp.generator
    info = {
        "seed": seed,
        "made_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "selection": gen.get("selection"),
        "layer": gen.get("layer"),
        "bag": gen.get("bag"),
        "params": t6._plain(gen.get("params", {})),
        "fingerprint_markers_in_bag": index,
        "fingerprint_file": str(fp_path),
        "tolerance": float(fp.tolerance),
    }
    arrays = {f"info_{k}": v for k, v in bag.info.items() if isinstance(v, np.ndarray) and v.dtype != object}
    np.savez(cached, inputs=inputs, seeds=np.asarray(bag.seeds, dtype=np.float32), meta=json.dumps(info), **arrays)
    _log(f"seed {seed}: fingerprint of {len(markers)} from a bag of {len(inputs)} in {seconds:.0f} s; selection {info['selection']}")
    return Bag(inputs, bag.seeds, None, {k: v for k, v in bag.info.items() if isinstance(v, np.ndarray)}), info


def first_picks(model: TorchModel, x: np.ndarray, changed: dict[str, np.ndarray], resamples: int, seed: int, fraction: float) -> dict[str, Any]:
    """How concentrated the default selection's first pick is over the resamples (the orders ``measure_bag`` used).

    MANC's first pick is the marker of the sub-bag that covers the most units, so a few markers of wide
    coverage are picked first in most resamples: the detection rate at small N_S is then mostly whether
    those few change. Returns the three most frequent first picks, their shares and which schemes change them.
    """
    from tamperprobe.evaluation.protocol import manc_orders
    from tamperprobe.owner.features import activations

    active = (activations(model, x) > 0).astype(np.float32)
    orders = manc_orders(active, MAX_NS, resamples, np.random.default_rng(seed), fraction)
    counts = np.bincount(orders[:, 0], minlength=len(x))
    top = np.argsort(-counts, kind="stable")[:3]
    return {
        "distinct": int((counts > 0).sum()),
        "top": [
            {
                "marker": int(i),
                "share": float(counts[i] / len(orders)),
                "units": int(active[i].sum()),
                "changed_by": [a for a, c in changed.items() if c[i]],
            }
            for i in top
        ],
        "median_units": float(np.median(active.sum(1))),
    }


def fingerprint_detection(ref: np.ndarray, obs: np.ndarray, index: list[int]) -> dict[str, Any]:
    """The fingerprint itself (its markers in MANC's order) against a tampered model: changed markers, detection by its first N_S."""
    changed = changed_markers(OutputSpec.parse("top1"), ref[index], obs[index], DEFAULT_TOLERANCE)
    return {"changed": [bool(c) for c in changed], "detected_at": [bool(changed[:k].any()) for k in range(1, len(index) + 1)]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(max(1, args.threads))
    module = _cifar.load_resnet56()
    model = TorchModel(module, _cifar.SOURCE)
    data = _cifar.load_cifar10()
    doc: dict[str, Any] = json.loads(JSON_OUT.read_text()) if JSON_OUT.exists() else {}
    doc.update(
        {
            "format": "tamperprobe.verideep-table6-default/v1",
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "params": {"resamples": args.resamples, "manc_fraction": args.manc_fraction},
        }
    )
    doc.setdefault("bags", {})
    tampered = {name: TorchModel(get_attack(entry).run(module, None, seed=0).model, f"attack:{name}") for name, entry in t6.ATTACKS.items()}
    for seed in [int(s) for s in args.seeds.split(",")]:
        b, info = fingerprint_by_default(model, data, seed, Path(args.cache))
        ns = argparse.Namespace(resamples=args.resamples, seed=seed, manc_fraction=args.manc_fraction)
        measured = t6.measure_bag(model, tampered, b, info, ns)
        ref = model.logits(b.inputs)
        measured["fingerprint"] = {
            name: fingerprint_detection(ref, tm.logits(b.inputs), info["fingerprint_markers_in_bag"]) for name, tm in tampered.items()
        }
        top1 = OutputSpec.parse("top1")
        changed = {name: changed_markers(top1, ref, tm.logits(b.inputs), DEFAULT_TOLERANCE) for name, tm in tampered.items()}
        measured["first_picks"] = first_picks(model, b.inputs, changed, args.resamples, seed, args.manc_fraction)
        earlier = doc["bags"].get(str(seed), {})
        if "median_S" in earlier.get("stats", {}) and "median_S" not in measured["stats"]:
            measured["stats"] = earlier["stats"]  # a cache written before it kept the sensitivities: the first measurement's
        measured["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        doc["bags"][str(seed)] = measured
        doc["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        JSON_OUT.write_text(json.dumps(doc, indent=1))
        _log(f"seed {seed}: measured; wrote {JSON_OUT}")
    return doc


def _curve(v: dict, attack: str, sel: str) -> list[float] | None:
    for r in v.get("detection", []):
        if (r["attack"], r["spec"], r["rule"]) == (attack, "top1", "ours"):
            return r.get(sel)
    return None


def _bag_md(seed: str, v: dict, p: dict) -> list[str]:
    """One bag's section: detection by N_S per scheme, other selections, the first picks, the fingerprint itself, false alarms."""
    lines: list[str] = []
    au = v.get("active_units", {}).get("manc-default", {})
    lines += [
        f"## Seed {seed} (bag made {v.get('made_at', '')}, measured {v.get('measured_at', '')}): bag of {v.get('bag')} in {v.get('seconds', 0):.0f} s, selection recorded in the fingerprint: `{v.get('selection')}` "
        f"(layer {v.get('layer')}; default coverage {au.get('mean_active', float('nan')):.0f} of {au.get('units')} units active per marker)",
        "",
        "Detection rate (%) by N_S, top-1, default selection (resampled); the paper: 99.5 at 6, > 99.9 at 10.",
        "",
    ]
    attacks = list(v.get("margins", {}))
    rows = []
    for n in range(1, MAX_NS + 1):
        row: list[Any] = [n, t6.PAPER.get(("top1", n), "")]
        for a in attacks:
            c = _curve(v, a, "manc-default")
            row.append(t6._pct(c[n - 1]) if c else "–")
        rows.append(row)
    lines += [md_table(["N_S", "paper", *attacks], rows), ""]
    lines.append(
        "Markers changed (top-1, of the bag): " + ", ".join(f"{a} {t6._trig({'variants': {'x': v}}, 'x', a, 'top1')}" for a in attacks) + "."
    )
    lines.append("")
    lines += ["Same bag, other selections, N_S = 6 / 10 (%):", ""]
    rows = []
    for sel in ("manc-default", "manc-layer3", "manc", "random"):
        cells = []
        for a in attacks:
            c = _curve(v, a, sel)
            cells.append(f"{t6._pct(c[5])} / {t6._pct(c[9])}" if c else "–")
        rows.append([sel, *cells])
    lines += [md_table(["selection", *attacks], rows), ""]
    fp1 = v.get("first_picks")
    if fp1:
        lines.append(
            f"The default selection's first pick, over the {p.get('resamples')} resamples: {fp1['distinct']} distinct markers; the most "
            "frequent: "
            + "; ".join(
                f"marker {t['marker']} in {100 * t['share']:.1f} % ({t['units']} units active, median {fp1['median_units']:.0f}; "
                f"changed by {', '.join(t['changed_by']) or 'no scheme'})"
                for t in fp1["top"]
            )
            + ". The rate at small N_S is mostly whether these few wide-coverage markers change."
        )
        lines.append("")
    fpd = v.get("fingerprint", {})
    if fpd:
        lines += [
            f"The fingerprint the call made (its 10 markers, bag indices {v.get('fingerprint_markers_in_bag')}, in MANC's order): "
            "markers that change top-1, and the first N_S at which its first N_S markers detect.",
            "",
            md_table(
                ["scheme", "markers changed (of 10)", "first detecting N_S"],
                [[a, sum(d["changed"]), next((i + 1 for i, x in enumerate(d["detected_at"]) if x), "none")] for a, d in fpd.items()],
            ),
            "",
        ]
    fa = v.get("false_alarms", [])
    if fa:
        top = [r for r in fa if r["spec"] == "top1"]
        lines.append(
            "Benign re-runs (batch 1, batch 64, TorchScript), top-1 markers flagged: "
            + ", ".join(f"{r['runtime']} {r['ours']}" for r in top)
            + f" (max |Δlogit| {max(r['max_abs_dlogit'] for r in fa):.2g})."
        )
        lines.append("")
    return lines


def write_markdown(doc: dict) -> Path:
    p = doc.get("params", {})
    m = doc.get("machine", {})
    bags = doc.get("bags", {})
    lines = [
        "# VerIDeep Table VI through the default path (measured directly)",
        "",
        f"`python bench/verideep_default.py` (last run {doc.get('started')} – {doc.get('finished')}; {m.get('nproc')} shared cores, "
        f"{m.get('torch_threads')} torch thread, torch {m.get('torch')}). The CIFAR-10 ResNet-56 and the 1,017 test images of "
        "`bench/verideep_table6.py`. Each bag below was made **through the default path**: `create_fingerprint(model, data, "
        'method="sensitive", params={"preset": "verideep"}, output_spec="top1", seed=S)` with the default selection '
        "(MANC, no layer) and the default bag of 100 — what `tamperprobe fingerprint --method sensitive --param preset=verideep "
        "--output-spec top1 --seed S` runs. The bag the call generated is kept and measured as the Table VI page measures "
        f"every bag: detection at N_S = the share of {p.get('resamples')} resampled fingerprints (MANC with the default "
        f"coverage on a random {p.get('manc_fraction')} of the bag) holding at least one changed top-1 answer. "
        "No column here is inferred from another selection.",
        "",
    ]
    for seed, v in bags.items():
        lines += _bag_md(seed, v, p)
    MD_OUT.write_text("\n".join(lines) + "\n")
    return MD_OUT


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="comma-separated fingerprint seeds, one bag each")
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--manc-fraction", type=float, default=0.5)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "tamperprobe-verideep-default"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="measure the bags cached by an earlier run (same seeds) instead of generating them")
    ap.add_argument("--smoke", action="store_true", help="3 ascent steps, 200 resamples, results in the cache folder (not a measurement)")
    args = ap.parse_args(argv)
    global JSON_OUT, MD_OUT, REUSE
    REUSE = args.reuse
    if args.smoke:
        SMOKE.update(lr=1e-3, steps=3, patience=0)
        args.resamples = 200
        JSON_OUT, MD_OUT = Path(args.cache) / "smoke.json", Path(args.cache) / "smoke.md"
    if not args.report_only:
        missing = _cifar.available()
        if missing:
            print(f"CIFAR-10 model or data not found: {missing}", file=sys.stderr)
            return 2
        run(args)
    if not JSON_OUT.exists():
        print(f"no results at {JSON_OUT}", file=sys.stderr)
        return 2
    _log(f"wrote {write_markdown(json.loads(JSON_OUT.read_text()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
