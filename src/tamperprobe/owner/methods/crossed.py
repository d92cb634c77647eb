"""Crossed pairs: boundary pairs whose two halves come from different seeds and paths, so they are not near-twins.

The default marker method for label-only APIs (``top1``, ``topk:K``; see ``owner.advice``).

Why. A boundary pair (``boundary``) is two nearly identical inputs on either side of a decision
boundary: an operator who sees the queries flags the second half as a near-duplicate of the first
(the ``near-twin`` router of ``tamperprobe.evaluation.routers``), at no cost on ordinary traffic.

Paths. ``path="auto"`` (the default) takes the gradient path of ``boundary`` (sign-gradient steps
from a natural seed towards its runner-up class) when the model's weights are in PyTorch form, and
blend paths otherwise (an ONNX file gives no gradients). Gradient-path markers are a natural image
plus a small perturbation (median L∞ to the seed 0.09 of the range on the digits CNN, see
``bench/results/adaptive-operator.md``); blends of two photographs are low-contrast and lie nearer
to one another than photographs do, so on CIFAR-10 a near-twin router flags a few percent of them.

Construction. ``Boundary`` (with every one of its parameters except ``pairs`` and ``coverage``)
searches ``spare`` × as many paths as pairs wanted; each path gives two markers on either side of
the boundary between its classes ``{a, c}``, each with top-1 margin in ``[δ, k·δ]``. Paths are
grouped by their unordered class pair; within a group (in random order) paths ``2i`` and
``2i + 1`` make one crossed pair: the half labelled ``min(a, c)`` of the first and the half
labelled ``max(a, c)`` of the second. The other halves are discarded and never sent, and every
natural image (seed or blend partner) feeds at most one of the paths used (two paths through the
same image give markers close to it and so to each other), so no marker of the fingerprint has a
near-twin among the others. ``rounds`` more searches fill the bag when
too few paths share a class pair. MANC coverage (``coverage``) orders the pairs as in ``boundary``.

What the guarantee becomes. The two halves sit at different points of the same ``a|c`` boundary.
Let Δ be the change of ``z_a − z_c`` a tampering causes. A change with Δ of the same sign at both
halves and larger than the margin of the half it pushes flips that half: any shift of the boundary
*in one direction* by more than ``k·δ`` at both points is detected, as with near-twin pairs. A
tampering that moves the boundary in opposite directions at the two points (towards ``a`` at one,
towards ``c`` at the other) can now stay silent, which a near-twin pair excludes by continuity;
``tamperprobe.evaluation`` and ``bench/adaptive_operator.py`` measure how often that happens.

Bag layout as in ``boundary``: ``[m_0, n_0, m_1, n_1, …]`` with ``groups = [0, 0, 1, 1, …]``. ``info``
holds per marker ``margin``, ``label``, ``psnr``, ``snr``, ``linf_to_seed``, ``t``, ``side`` (0: the
half labelled min(a, c)), ``seed_index``, ``partner_index``, ``source_path`` (the index of the path
it came from) and ``twin_distance`` (L2 distance to the other half of its pair, model domain), and
the scalars of ``boundary``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..._params import Interval, Options
from ..._util import Progress
from ...data import Dataset
from ...errors import UsageError
from ...models import Model
from ..selection import manc
from .base import Bag, Method
from .boundary import DEFAULT_DELTA, PATHS, Boundary

_PER_MARKER = ("margin", "label", "psnr", "snr", "linf_to_seed", "t", "seed_index", "partner_index")


class Crossed(Method):
    """Boundary pairs whose halves come from different seeds and paths across the same class boundary (no near-twins; top-1 API).

    See the module doc; every parameter but ``spare`` is the ``boundary`` parameter of the same name.
    ``oversample`` defaults to 1 here: the paths are not chosen by coverage (the pairs are, out of
    ``spare`` × as many as wanted), so a path search that made more than it was asked for would
    only throw the extra away.
    """

    name = "crossed"
    # the boundary search's parameters, plus spare and the automatic path
    constraints = {**Boundary.constraints, "path": Options("auto", *PATHS), "spare": Interval(1.0, None)}

    def __init__(
        self,
        *,
        delta: float = DEFAULT_DELTA,
        k: float = 1.5,
        path: str = "auto",
        linf: float | None = None,
        saturated: bool = False,
        uint8: bool = False,
        coverage: bool = True,
        spare: float = 3.0,
        oversample: float = 1.0,
        step: float = 0.02,
        max_steps: int = 100,
        greedy_steps: int = 60,
        neighbors: int = 24,
        rounds: int = 4,
    ) -> None:
        self.delta = delta
        self.k = k
        self.path = path
        self.linf = linf
        self.saturated = saturated
        self.uint8 = uint8
        self.coverage = coverage
        self.spare = spare
        self.oversample = oversample
        self.step = step
        self.max_steps = max_steps
        self.greedy_steps = greedy_steps
        self.neighbors = neighbors
        self.rounds = rounds

    def resolved_path(self, model: Model) -> str:
        """The path the search takes on ``model``: ``path``, with ``auto`` resolved (gradient where there are weights)."""
        if self.path != "auto":
            return self.path
        return "gradient" if getattr(model, "module", None) is not None else "blend"

    def _paths(self, path: str) -> Boundary:
        """The ``boundary`` search that supplies the paths (pairs kept, no coverage ordering)."""
        keep = ("delta", "k", "linf", "saturated", "uint8", "oversample", "step", "max_steps", "greedy_steps", "neighbors")
        return Boundary(pairs=True, coverage=False, rounds=2, path=path, **{k: getattr(self, k) for k in keep})

    def _check_together(self, params: dict[str, Any]) -> None:
        if params["linf"] is not None and params["path"] == "blend":
            raise UsageError("linf bounds the gradient path: use path=gradient (or auto) with linf")

    def _generate(self, model: Model, data: Dataset, bag: int, rng: np.random.Generator, progress: Progress) -> Bag:
        need = max(1, bag // 2)
        path = self.resolved_path(model)
        if path == "blend" and self.linf is not None:
            raise UsageError(
                f"crossed: linf bounds the gradient path, which needs the model's weights in PyTorch form; {model.source} is {model.format}"
            )
        search = self._paths(path)
        progress(0, need)  # the first report would otherwise come only after the first (and longest) path search
        found: list[Bag] = []
        pairs: list[tuple[int, int]] = []  # (marker index, marker index) into the concatenated paths
        for _ in range(self.rounds):
            want = int(math.ceil(self.spare * max(1, need - len(pairs))))
            try:
                found.append(search.generate(model, data, 2 * want, rng))
            except UsageError:
                if not found:
                    raise
                break
            paths = _concat(found)
            pairs = _cross(paths, rng)
            progress(min(len(pairs), need), need)
            if len(pairs) >= need:
                break
        if not pairs:
            raise UsageError(f"crossed: no two paths crossed the same class boundary (delta={self.delta:g}, path={path}); try a larger bag")
        paths = _concat(found)
        domain = _domain(paths, data)
        order = self._coverage(model, domain, pairs, min(need, len(pairs)), rng)
        return _bag(paths, domain, [pairs[i] for i in order])

    def _coverage(self, model: Model, domain: np.ndarray, pairs: list[tuple[int, int]], need: int, rng: np.random.Generator) -> np.ndarray:
        if self.coverage:
            from ..features import activations

            first, second = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
            try:
                active = (activations(model, domain[first]) > 0) | (activations(model, domain[second]) > 0)
            except UsageError:  # no hookable nn.Linear: a random order
                pass
            else:
                return manc(active, need, rng)
        return rng.permutation(len(pairs))[:need]


def _concat(bags: list[Bag]) -> Bag:
    """Several boundary bags as one; groups renumbered so that each path keeps its own id."""
    groups, offset = [], 0
    for b in bags:
        assert b.groups is not None  # boundary pairs
        groups.append(b.groups + offset)
        offset += int(b.groups.max()) + 1
    info = {k: np.concatenate([b.info[k] for b in bags]) for k in _PER_MARKER}
    info.update({k: v for k, v in bags[0].info.items() if not isinstance(v, np.ndarray)})
    return Bag(np.concatenate([b.inputs for b in bags]), np.concatenate([b.seeds for b in bags]), np.concatenate(groups), info, bags[0].encoding)


def _cross(paths: Bag, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Pairs of marker indices: the min-label half of one path and the max-label half of another of the same class pair."""
    assert paths.groups is not None
    label = paths.info["label"]
    by_class_pair: dict[tuple[int, int], list[tuple[int, int]]] = {}
    # every natural image (seed or blend partner) feeds at most one path: two paths through the same image give markers
    # near that image and so near each other (near-twins); a path found twice (the same seed's gradient path) counts once
    used: set[int] = set()
    groups = np.unique(paths.groups)
    for g in groups[rng.permutation(len(groups))]:
        members = np.flatnonzero(paths.groups == g)
        if len(members) != 2 or label[members[0]] == label[members[1]]:
            continue
        images = {int(paths.info["seed_index"][members[0]]), int(paths.info["partner_index"][members[0]])} - {-1}
        if images & used:
            continue
        used |= images
        lo, hi = (members[0], members[1]) if label[members[0]] < label[members[1]] else (members[1], members[0])
        by_class_pair.setdefault((int(label[lo]), int(label[hi])), []).append((int(lo), int(hi)))
    out = []
    for key in sorted(by_class_pair):
        group = by_class_pair[key]
        for i in range(0, len(group) - 1, 2):
            out.append((group[i][0], group[i + 1][1]))
    return out


def _domain(paths: Bag, data: Dataset) -> np.ndarray:
    return paths.decoded()


def _bag(paths: Bag, domain: np.ndarray, pairs: list[tuple[int, int]]) -> Bag:
    idx = np.array([i for p in pairs for i in p], dtype=np.int64)
    out = paths.take(idx)
    n = len(pairs)
    d = domain[idx].reshape(2 * n, -1).astype(np.float64)
    twin = np.sqrt(((d[0::2] - d[1::2]) ** 2).sum(axis=1))
    info = {k: v for k, v in out.info.items() if k != "side"}
    info.update(
        side=np.tile(np.array([0, 1], dtype=np.int64), n),
        source_path=paths.groups[idx] if paths.groups is not None else idx,
        twin_distance=np.repeat(twin, 2),
    )
    return Bag(np.ascontiguousarray(out.inputs), np.ascontiguousarray(out.seeds), np.repeat(np.arange(n, dtype=np.int64), 2), info, out.encoding)
