"""The campaign's figures (matplotlib, Agg backend): three PNG files, drawn cheaply.

* ``detection.png``: detection rate vs N_S for the headline spec (``Evaluation.key_spec``), one
  panel per attack, one line per method (VerIDeep Fig. 8/10/12 style); an attack with no
  functional change gets an empty panel that says so. The other specs' curves
  are in ``detection.csv`` and the report's tables.
* ``trigger.png``: the mean trigger ratio as one heat map per output spec (methods × attacks).
* ``markers.png``: every method's first seeds above the markers generated from them, as one
  mosaic image.

Why so few, and drawn this way: the plots are optional (matplotlib is the ``plots`` extra) and
must not cost a noticeable share of ``evaluate``. One figure per spec and per method (25 with the
defaults), each laid out with ``tight_layout``, took about half of a small campaign's time;
matplotlib's cost is per axes and per tick label, not per data point. So the figures use a fixed
layout (no ``tight_layout``), tick labels only on the outer panels, heat maps and a single mosaic
image (one artist each) instead of grouped bars and one axes per marker.

``plots_unavailable()`` says why plots cannot be drawn (matplotlib missing), before any work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .._util import Progress, one_line
from ..describe import as_image
from .protocol import MAX_NS
from .results import NO_CHANGE, Evaluation

FILES = ("detection.png", "trigger.png", "markers.png")
DPI = 72


def slug(text: str) -> str:
    """A file-name-safe form of a spec or method name (``topk:3`` -> ``topk3``)."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "" for ch in str(text).replace(":", "")) or "x"


def plots_unavailable() -> str | None:
    """Why no plot can be drawn (matplotlib cannot be imported, with the install hint), or None when they can."""
    from .._extras import missing

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return str(missing("matplotlib", "evaluate's plots"))
    return None


def draw_plots(ev: Evaluation, out: Path, errors: list[str], progress: Progress | None = None) -> list[Path]:
    """Draw every plot into ``out``; one that fails is noted in ``errors`` and the others still get drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, attacks = ev.measured_names()
    jobs: list[tuple[str, Callable[[Path], bool]]] = [
        ("detection.png", partial(_plot_detection, ev, ev.key_spec, methods, attacks, plt=plt)),
        ("trigger.png", partial(_plot_trigger, ev, methods, attacks, plt=plt)),
        ("markers.png", partial(_plot_markers, ev, plt=plt)),
    ]
    written: list[Path] = []
    for i, (name, draw) in enumerate(jobs):
        if progress is not None:
            progress(i, len(jobs), name)
        path = out / name
        try:
            if draw(path):
                written.append(path)
        except Exception as exc:
            errors.append(f"{name}: {one_line(exc, with_type=True)}")
        finally:
            plt.close("all")
    if progress is not None:
        progress(len(jobs), len(jobs), "")
    return written


def _colours(methods: Sequence[str], plt: Any) -> dict[str, Any]:
    return {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}


def _plot_detection(ev: Evaluation, s: str, methods: list[str], attacks: list[str], path: Path, plt: Any) -> bool:
    """Detection rate vs N_S under ``s``: one panel per attack, one line per method."""
    table = ev.detection_table(s)
    if not (table and attacks):
        return False
    colours = _colours(methods, plt)
    quiet = set(ev.no_functional_change())
    ns = np.arange(1, MAX_NS + 1)
    cols = min(4, len(attacks))
    rows = int(math.ceil(len(attacks) / cols))
    width, height = 2.6 * cols + 0.8, 2.0 * rows + 1.3
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False, sharex=True, sharey=True)
    fig.subplots_adjust(left=0.7 / width, right=1 - 0.1 / width, bottom=1.0 / height, top=1 - 0.45 / height, wspace=0.08, hspace=0.28)
    for i, a in enumerate(attacks):
        ax = axes[i // cols][i % cols]
        for m in methods:
            if (m, a) in table:
                ax.plot(ns, table[(m, a)], lw=1.2, label=m, color=colours[m])
        if a in quiet:
            ax.text(0.5, 0.5, NO_CHANGE, ha="center", va="center", fontsize=7, transform=ax.transAxes)
        ax.set_title(a, fontsize=8, pad=2)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylim(-0.03, 1.03)
    axes[0][0].set_yticks([0, 0.5, 1])
    axes[0][0].set_xticks([1, 4, 7, 10])
    for j in range(len(attacks), rows * cols):
        axes[j // cols][j % cols].axis("off")
    for r in range(rows):
        axes[r][0].set_ylabel("detection", fontsize=8)
    for c in range(cols):
        last = max(r for r in range(rows) if r * cols + c < len(attacks))
        axes[last][c].set_xlabel("N_S (queries)", fontsize=8)
        axes[last][c].tick_params(labelbottom=True)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(f"detection rate vs N_S · {s} · {ev.params['select']} selection", fontsize=9, y=1 - 0.12 / height)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6) or 1, fontsize=7, frameon=False)
    fig.savefig(path, dpi=DPI)
    return True


def _plot_trigger(ev: Evaluation, methods: list[str], attacks: list[str], path: Path, plt: Any) -> bool:
    """Mean trigger ratio, one heat map (methods × attacks) per output spec."""
    trig = ev.mean_trigger()
    specs = ev.params["specs"]
    if not (trig and attacks and methods):
        return False
    cols = min(2, len(specs))
    rows = int(math.ceil(len(specs) / cols))
    cell = 0.22
    panel_w, panel_h = cell * len(attacks) + 0.3, cell * len(methods) + 0.45
    left, bottom = 1.3, 1.2
    width, height = left + cols * panel_w + 0.8, bottom + rows * panel_h + 0.3
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False, sharex=True, sharey=True)
    fig.subplots_adjust(left=left / width, right=1 - 0.8 / width, bottom=bottom / height, top=1 - 0.3 / height, wspace=0.06, hspace=0.15)
    image = None
    for i, s in enumerate(specs):
        ax = axes[i // cols][i % cols]
        grid = np.array([[trig.get((m, a, s), (np.nan,))[0] for a in attacks] for m in methods], dtype=float)
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(s, fontsize=8, pad=2)
        ax.tick_params(labelsize=7)
    for j in range(len(specs), rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].set_yticks(range(len(methods)))
    axes[0][0].set_yticklabels(methods)
    axes[0][0].set_xticks(range(len(attacks)))
    for c in range(cols):
        last = max(r for r in range(rows) if r * cols + c < len(specs))
        axes[last][c].tick_params(labelbottom=True)
        axes[last][c].set_xticklabels(attacks, rotation=60, ha="right")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02, label="trigger ratio (mean over trials)")
    fig.savefig(path, dpi=DPI)
    return True


def _tile(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """One input as an RGB picture in [0, 1]."""
    a = np.clip((as_image(np.asarray(arr, dtype=np.float32)) - lo) / ((hi - lo) or 1.0), 0.0, 1.0)
    return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a


def marker_mosaic(ev: Evaluation, gap: int = 2) -> tuple[np.ndarray, list[tuple[float, str]]]:
    """The seeds and markers of every method as one RGB image, and (row centre, label) for each row of pictures.

    Rows come in pairs (a method's seeds, then its markers); pictures are ``gap`` pixels apart,
    methods ``3 * gap``.
    """
    lo, hi = ev.params.get("data", {}).get("low"), ev.params.get("data", {}).get("high")
    tiles: list[list[np.ndarray]] = []
    labels: list[str] = []
    for m, smp in ev.samples.items():
        seeds, inputs = np.asarray(smp["seeds"], dtype=np.float32), np.asarray(smp["inputs"], dtype=np.float32)
        if len(inputs) == 0:
            continue
        low = float(min(seeds.min(), inputs.min())) if lo is None else float(lo)
        high = float(max(seeds.max(), inputs.max())) if hi is None else float(hi)
        tiles += [[_tile(x, low, high) for x in seeds], [_tile(x, low, high) for x in inputs]]
        labels += [f"{m}: seeds", f"{m}: markers"]
    if not tiles:
        return np.zeros((0, 0, 3)), []
    h, w = tiles[0][0].shape[:2]
    cols = max(len(row) for row in tiles)
    top_of = [gap + r * (h + gap) + (r // 2) * 2 * gap for r in range(len(tiles))]
    mosaic = np.ones((top_of[-1] + h + gap, cols * (w + gap) + gap, 3), dtype=np.float32)
    centres = []
    for r, row in enumerate(tiles):
        top = top_of[r]
        for c, t in enumerate(row):
            mosaic[top : top + h, gap + c * (w + gap) : gap + c * (w + gap) + w] = t
        centres.append((top + h / 2, labels[r]))
    return mosaic, centres


def _plot_markers(ev: Evaluation, path: Path, plt: Any) -> bool:
    """Every method's seeds above its markers (VerIDeep Fig. 7/9/11 style), drawn as one image."""
    mosaic, centres = marker_mosaic(ev)
    if mosaic.size == 0:
        return False
    rows = len(centres)
    height = 0.5 * rows + 0.5
    width = max(4.0, height * mosaic.shape[1] / mosaic.shape[0] + 1.8)
    fig, ax = plt.subplots(figsize=(width, height))
    fig.subplots_adjust(left=1.8 / width, right=1 - 0.1 / width, bottom=0.1 / height, top=1 - 0.35 / height)
    ax.imshow(mosaic, interpolation="nearest", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([c for c, _ in centres])
    ax.set_yticklabels([label for _, label in centres], fontsize=7)
    ax.set_title("seeds and the markers generated from them", fontsize=8)
    fig.savefig(path, dpi=DPI)
    return True
