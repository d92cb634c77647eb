"""Human-readable summaries of a fingerprint, and a picture of its markers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .fingerprint import Fingerprint
from .outputs import top_margin


def describe(fp: Fingerprint):
    """A rich renderable summarising ``fp``."""
    from rich.table import Table

    t = Table(show_header=False, title=f"fingerprint {fp.id}")
    t.add_column(style="bold")
    t.add_column()
    spec = fp.input_spec
    gen = fp.generator
    labels = np.bincount(fp.labels, minlength=fp.classes)
    params = ", ".join(f"{k}={v}" for k, v in (gen.get("params") or {}).items()) or "-"
    _, margins = top_margin(fp.logits)
    rows = [
        ("markers", str(len(fp))),
        ("input", f"shape {tuple(spec.shape)}, {spec.dtype}, range [{spec.low:g}, {spec.high:g}]"),
        ("classes", f"{fp.classes}; markers per intact label: {' '.join(str(int(c)) for c in labels)}"),
        ("generator", f"{gen.get('method')} ({params})"),
        ("selection", f"{gen.get('selection')} of a bag of {gen.get('bag')}, seed {gen.get('seed')}, data {gen.get('data')}"),
        ("output spec", f"{fp.output_spec}, tolerance {fp.tolerance:g}"),
        ("top-1 margin", f"min {margins.min():.3g}, median {np.median(margins):.3g}"),
        ("model digest", fp.model_digest),
        ("signature", f"verified, key {fp.signer}" if fp.signer else f"NONE (format v{fp.version}, unsigned)"),
        ("created", fp.created),
    ]
    if fp.groups is not None:
        rows.append(("groups", f"{len(np.unique(fp.groups))} (markers kept together)"))
    if fp.seeds is not None:
        d = np.linalg.norm((fp.inputs.astype(np.float64) - fp.seeds).reshape(len(fp), -1), axis=1)
        s = np.linalg.norm(fp.seeds.astype(np.float64).reshape(len(fp), -1), axis=1)
        rows.append(("distance to seed", f"median relative L2 {np.median(d / np.maximum(s, 1e-12)):.3g}"))
    for k, v in rows:
        t.add_row(k, v)
    return t


def save_grid(fp: Fingerprint, path: str | Path, max_markers: int = 16) -> Path:
    """Save a PNG: one column per marker, seed input above the generated marker."""
    import matplotlib

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
