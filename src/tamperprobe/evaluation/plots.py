"""The campaign's figures (matplotlib, Agg backend): detection curves, trigger ratios, marker grids."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._util import one_line
from ..describe import as_image
from .protocol import MAX_NS

if TYPE_CHECKING:
    from .campaign import Evaluation


def slug(text: str) -> str:
    """A file-name-safe form of a spec or method name (``topk:3`` -> ``topk3``)."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "" for ch in str(text).replace(":", "")) or "x"


def draw_plots(ev: Evaluation, out: Path, errors: list[str]) -> list[Path]:
    """Draw every plot into ``out``; one that fails is noted in ``errors`` and the others still get drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, attacks = ev.measured_names()
    jobs: list[tuple[str, Callable[[Path], bool]]] = []
    for s in ev.params["specs"]:
        jobs.append((f"detection_{slug(s)}.png", partial(_plot_detection, ev, s, methods, attacks, plt=plt)))
        jobs.append((f"trigger_{slug(s)}.png", partial(_plot_trigger, ev, s, methods, attacks, plt=plt)))
    for m in ev.samples:
        jobs.append((f"markers_{slug(m)}.png", partial(_plot_markers, ev, m, plt=plt)))
    written: list[Path] = []
    for name, draw in jobs:
        path = out / name
        try:
            if draw(path):
                written.append(path)
        except Exception as exc:
            errors.append(f"{name}: {one_line(exc, with_type=True)}")
        finally:
            plt.close("all")
    return written


def _colours(methods: Sequence[str], plt: Any) -> dict[str, Any]:
    return {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}


def _plot_detection(ev: Evaluation, s: str, methods: list[str], attacks: list[str], path: Path, plt: Any) -> bool:
    """VerIDeep Fig. 8/10/12 style: detection rate vs N_S, one subplot per attack, one line per method."""
    table = ev.detection_table(s)
    if not (table and attacks):
        return False
    colours = _colours(methods, plt)
    ns = np.arange(1, MAX_NS + 1)
    cols = min(4, len(attacks))
    rows = int(math.ceil(len(attacks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows + 0.6), squeeze=False, sharex=True, sharey=True)
    for i, a in enumerate(attacks):
        ax = axes[i // cols][i % cols]
        for m in methods:
            if (m, a) in table:
                ax.plot(ns, table[(m, a)], marker="o", ms=3, lw=1.2, label=m, color=colours[m])
        ax.set_title(a, fontsize=9)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xticks([1, 2, 4, 6, 8, 10])
        ax.grid(alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("detection rate")
        if i // cols == rows - 1 or i + cols >= len(attacks):
            ax.set_xlabel("N_S (queries)")
    for j in range(len(attacks), rows * cols):
        axes[j // cols][j % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(f"detection rate vs N_S · {s} · {ev.params['select']} selection", fontsize=10)
    fig.tight_layout(rect=(0, 0.45 / (2.6 * rows + 0.6), 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 9) or 1, fontsize=8, frameon=False)
    fig.savefig(path, dpi=72)
    return True


def _plot_trigger(ev: Evaluation, s: str, methods: list[str], attacks: list[str], path: Path, plt: Any) -> bool:
    """TamperNN Fig. 4 style: grouped bars of the trigger ratio per attack, one bar per method."""
    trig = ev.mean_trigger()
    if not (trig and attacks and methods):
        return False
    colours = _colours(methods, plt)
    fig, ax = plt.subplots(figsize=(min(15.0, max(6.0, 0.12 * len(attacks) * len(methods) + 2)), 4.2))
    width = 0.8 / len(methods)
    x = np.arange(len(attacks))
    for j, m in enumerate(methods):
        vals = [trig.get((m, a, s)) for a in attacks]
        mean = [v[0] if v else 0.0 for v in vals]
        err = np.clip(np.array([[v[0] - v[1], v[2] - v[0]] if v else [0.0, 0.0] for v in vals]).T, 0.0, None)
        ax.bar(x - 0.4 + width * (j + 0.5), mean, width, yerr=err, capsize=1.5, label=m, color=colours[m], error_kw={"lw": 0.6})
    ax.set_xticks(x)
    ax.set_xticklabels(attacks, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("trigger ratio")
    ax.set_title(f"trigger ratio · {s} (mean; whiskers: min–max over trials)", fontsize=9)
    ax.legend(fontsize=7, ncol=min(len(methods), 5))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    return True


def _plot_markers(ev: Evaluation, m: str, path: Path, plt: Any) -> bool:
    """VerIDeep Fig. 7/9/11 style: seeds above the markers generated from them."""
    smp = ev.samples[m]
    seeds, inputs = np.asarray(smp["seeds"], dtype=np.float32), np.asarray(smp["inputs"], dtype=np.float32)
    k = len(inputs)
    if k == 0:
        return False
    lo, hi = ev.params.get("data", {}).get("low"), ev.params.get("data", {}).get("high")
    lo = float(min(seeds.min(), inputs.min())) if lo is None else lo
    hi = float(max(seeds.max(), inputs.max())) if hi is None else hi
    fig, axes = plt.subplots(2, k, figsize=(1.2 * k + 0.6, 2.8), squeeze=False)
    for i in range(k):
        for row, (arr, label) in enumerate(((seeds[i], "seed"), (inputs[i], "marker"))):
            ax = axes[row][i]
            ax.imshow(as_image(arr), cmap="gray", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label)
        axes[1][i].set_xlabel(str(int(smp["labels"][i])), fontsize=8)
    fig.suptitle(f"{m}: seeds (top) and markers (bottom), intact top-1 label below", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    return True
