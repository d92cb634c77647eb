"""Human-readable summaries of a fingerprint, and a picture of its markers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .fingerprint import Fingerprint
from .outputs import top_margin


def summary(fp: Fingerprint) -> dict[str, Any]:
    """The description of ``fp`` as data (``tamperprobe inspect --json``)."""
    spec = fp.input_spec
    gen = fp.generator
    _, margins = top_margin(fp.logits)
    out: dict[str, Any] = {
        "id": fp.id,
        "markers": len(fp),
        "input": spec.to_json(),
        "classes": int(fp.classes),
        "markers_per_label": [int(c) for c in np.bincount(fp.labels, minlength=fp.classes)],
        "generator": {"method": gen.get("method"), "params": dict(gen.get("params") or {})},
        "selection": gen.get("selection"),
        "bag": gen.get("bag"),
        "seed": gen.get("seed"),
        "data": gen.get("data"),
        "output_spec": fp.output_spec,
        "tolerance": float(fp.tolerance),
        "benign_noise": fp.extra.get("benign_noise"),
        "top1_margin": {"min": float(margins.min()), "median": float(np.median(margins))},
        "model_digest": fp.model_digest,
        "signature": {"verified": fp.signer is not None, "key": fp.signer, "format_version": fp.version},
        "created": fp.created,
        "groups": None if fp.groups is None else int(len(np.unique(fp.groups))),
        "decoys": fp.decoys,
        "per_run": fp.per_run,
        "distance_to_seed": None,
    }
    if fp.seeds is not None:
        d = np.linalg.norm((fp.inputs.astype(np.float64) - fp.seeds).reshape(len(fp), -1), axis=1)
        s = np.linalg.norm(fp.seeds.astype(np.float64).reshape(len(fp), -1), axis=1)
        out["distance_to_seed"] = {"median_relative_l2": float(np.median(d / np.maximum(s, 1e-12)))}
    return out


def describe(fp: Fingerprint) -> list[tuple[str, str]]:
    """``fp`` summarised as (field, text) rows, the first one naming the fingerprint; nothing is shortened."""
    d = summary(fp)
    spec = d["input"]
    params = ", ".join(f"{k}={v}" for k, v in d["generator"]["params"].items()) or "-"
    sig = d["signature"]
    rows = [
        ("fingerprint", d["id"]),
        ("markers", str(d["markers"])),
        ("input", f"shape {tuple(spec['shape'])}, {spec['dtype']}, range [{spec['low']:g}, {spec['high']:g}]"),
        ("classes", f"{d['classes']}; markers per intact label: {' '.join(str(c) for c in d['markers_per_label'])}"),
        ("generator", f"{d['generator']['method']} ({params})"),
        ("selection", f"{d['selection']} of a bag of {d['bag']}, seed {d['seed']}, data {d['data']}"),
        ("output spec", f"{d['output_spec']}, tolerance {tolerance_note(fp)}"),
        ("top-1 margin", f"min {d['top1_margin']['min']:.3g}, median {d['top1_margin']['median']:.3g}"),
        ("model digest", d["model_digest"]),
        ("signature", f"verified, key {sig['key']}" if sig["verified"] else f"NONE (format v{sig['format_version']}, unsigned)"),
        ("created", d["created"]),
    ]
    if d["groups"] is not None:
        rows.append(("groups", f"{d['groups']} (markers kept together)"))
    per_run = "served side's default" if d["per_run"] is None else str(d["per_run"])
    rows.append(("pool", f"{d['decoys']} decoys (natural inputs with known answers); markers per run: {per_run}"))
    if d["distance_to_seed"] is not None:
        rows.append(("distance to seed", f"median relative L2 {d['distance_to_seed']['median_relative_l2']:.3g}"))
    return rows


def tolerance_note(fp: Fingerprint) -> str:
    """The comparison tolerance and, when the file records it, the benign floor it was set from (``owner.generate``)."""
    noise = fp.extra.get("benign_noise")
    if not isinstance(noise, dict) or "floor" not in noise:
        return f"{fp.tolerance:g}"
    runtimes = ", ".join(f"{k} {float(v):.2g}" for k, v in dict(noise.get("runtimes") or {}).items()) or "none"
    skipped = f"; not measured: {', '.join(noise['skipped'])}" if noise.get("skipped") else ""
    return (
        f"{fp.tolerance:.3g} (at least {float(noise.get('safety', 2)):g}× the benign floor {float(noise['floor']):.3g} "
        f"measured on {noise.get('queries')} markers and decoys: {runtimes}{skipped})"
    )


def save_grid(fp: Fingerprint, path: str | Path, max_markers: int = 16) -> Path:
    """Save a PNG: one column per marker, seed input above the generated marker."""
    from ._extras import require

    matplotlib = require("matplotlib", "a picture of the markers")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(fp), max_markers)
    seeds = fp.seeds if fp.seeds is not None else fp.inputs
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n + 0.6, 2.8), squeeze=False)
    for i in range(n):
        for row, (arr, name) in enumerate(((seeds[i], "seed"), (fp.inputs[i], "marker"))):
            ax = axes[row][i]
            ax.imshow(
                as_image(arr),
                cmap="gray",
                vmin=fp.input_spec.low if arr.dtype != np.uint8 else 0,
                vmax=fp.input_spec.high if arr.dtype != np.uint8 else 255,
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name)
        axes[1][i].set_xlabel(str(int(fp.labels[i])))
    fig.suptitle(f"fingerprint {fp.id} · {fp.generator.get('method')}")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def as_image(arr: np.ndarray) -> np.ndarray:
    """A 2-D (or H×W×3) picture of one input: (1,H,W) -> (H,W), (3,H,W) -> (H,W,3), flat -> square."""
    a = np.asarray(arr)
    if a.ndim == 3:
        a = np.moveaxis(a, 0, -1) if a.shape[0] == 3 else a[0]
    if a.ndim == 1:
        side = int(np.sqrt(a.size))
        a = a[: side * side].reshape(side, side)
    return a
