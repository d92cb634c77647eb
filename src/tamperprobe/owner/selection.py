"""Keep ``k`` markers out of a bag: MANC (VerIDeep's Algorithm 2) or uniformly at random.

**MANC** (maximum active-neuron coverage) is the greedy algorithm for maximum coverage: a
neuron is *active* on a sample when its activation is > 0, and each step picks the sample
that activates the most neurons not yet covered by the samples already picked.

* *Ties* (several samples adding the same number of new neurons) are broken uniformly at
  random with ``rng``, so the bag's order carries no bias; a seed makes it reproducible.
* *Saturation*: once no remaining sample adds a new neuron, the covered set is reset to
  empty and the same greedy continues over the remaining samples, so later picks again
  favour samples that are diverse among themselves (samples with no active neuron at all
  come last, in random order).

Greedy coverage is within ``1 - 1/e`` of the optimum; it is not optimal in general.

**Groups** (``Bag.groups``): markers that share a group id are kept or dropped together.
A group's coverage is the union of its members' active neurons, and ``k`` counts markers.
Each greedy step only considers groups after which exactly ``k`` markers can still be
reached with the groups left (a small subset-sum check on the group sizes), so the result
has exactly ``k`` markers whenever some set of whole groups adds up to ``k``. When none
does (pairs and an odd ``k``), the greedy takes groups that fit in the remaining budget
and then one more group: the result exceeds ``k`` by less than that group's size.
Members of a group are returned in bag order, groups in the order they were picked.
"""

from __future__ import annotations

import typing
from typing import Literal

import numpy as np

from ..errors import UsageError
from ..models import Model
from .methods.base import Bag

Selection = Literal["manc", "random"]
SELECTIONS: tuple[str, ...] = typing.get_args(Selection)


def _check_k(n: int, k: int) -> None:
    if k < 1:
        raise UsageError(f"cannot select {k} markers: the number must be at least 1")
    if k > n:
        raise UsageError(f"cannot select {k} markers from a bag of {n}")


def _reachable(counts: dict[int, int], target: int) -> bool:
    """Whether some sub-multiset of group sizes (size -> how many) sums to ``target``."""
    if target < 0:
        return False
    reach, mask = 1, (1 << (target + 1)) - 1  # bit t set: sum t reachable
    for size, count in counts.items():
        chunk = 1
        while count > 0:  # binary splitting of the bounded count
            take = min(chunk, count)
            reach = (reach | (reach << (size * take))) & mask
            count -= take
            chunk *= 2
    return bool(reach >> target & 1)


def _exact_ok(sizes: np.ndarray, remaining: np.ndarray, budget: int) -> np.ndarray:
    """Units after which the remaining budget can still be met exactly by the other remaining units."""
    left = sizes[remaining]
    counts = {int(s): int(c) for s, c in zip(*np.unique(left, return_counts=True))}
    ok_size = {}
    for s in counts:
        rest = dict(counts)
        rest[s] -= 1
        ok_size[s] = s <= budget and _reachable(rest, budget - s)
    return remaining & np.array([ok_size.get(int(s), False) for s in sizes], dtype=bool)


def _greedy(active: np.ndarray, sizes: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """Greedy max coverage over units (rows of ``active``, each worth ``sizes`` markers) until ``k`` markers."""
    n = active.shape[0]
    remaining = np.ones(n, dtype=bool)
    covered = np.zeros(active.shape[1], dtype=bool)
    picked: list[int] = []
    taken = 0
    unit = bool((sizes == 1).all())
    while taken < k and remaining.any():
        fits = remaining & (sizes <= k - taken)
        exact = fits if unit else _exact_ok(sizes, remaining, k - taken)
        pool = exact if exact.any() else fits if fits.any() else remaining
        gain = (active & ~covered).sum(axis=1)
        if covered.any() and gain[pool].max() == 0:
            covered[:] = False
            gain = active.sum(axis=1)
        cand = np.flatnonzero(pool)
        best = cand[gain[cand] == gain[cand].max()]
        choice = int(best[rng.integers(len(best))]) if len(best) > 1 else int(best[0])
        picked.append(choice)
        remaining[choice] = False
        covered |= active[choice]
        taken += int(sizes[choice])
    return picked


def manc(acts: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``k`` samples picked by greedy maximum coverage of active neurons (act > 0)."""
    acts = np.asarray(acts)
    if acts.ndim != 2:
        raise UsageError(f"activations must have shape (samples, units), got {acts.shape}")
    _check_k(acts.shape[0], k)
    active = acts > 0
    return np.asarray(_greedy(active, np.ones(len(active), dtype=np.int64), k, rng), dtype=np.int64)


def random_selection(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct indices out of ``n``, uniformly at random."""
    _check_k(n, k)
    return np.asarray(rng.choice(n, size=k, replace=False), dtype=np.int64)


def units_of(groups: np.ndarray | None, n: int) -> tuple[np.ndarray, int, np.ndarray]:
    """The query units of ``n`` markers: the unit of each marker, the number of units, the size of each.

    Markers sharing a group id form one unit (kept, sent and counted together); units are numbered
    in order of first appearance. ``groups=None`` makes every marker a unit of its own.
    """
    if groups is None:
        return np.arange(n, dtype=np.int64), n, np.ones(n, dtype=np.int64)
    groups = np.asarray(groups).reshape(-1)
    if len(groups) != n:
        raise UsageError(f"{len(groups)} group ids for {n} markers")
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    unit = rank[inverse.reshape(-1)]
    return unit, len(first), np.bincount(unit, minlength=len(first)).astype(np.int64)


def select(kind: Selection | str, model: Model | None, bag: Bag, k: int, rng: np.random.Generator, layer: str | None = None) -> np.ndarray:
    """Indices into ``bag`` of the markers to keep, by ``manc`` or ``random``, respecting ``bag.groups``.

    ``layer`` names the module whose activations MANC covers (default: the input of the output
    layer, read on every model format, see ``sensitivity.activations``). Without groups, ``random`` is
    ``random_selection``; with groups, it picks uniformly among the groups that fit.
    """
    if kind not in SELECTIONS:
        raise UsageError(f"unknown selection {kind!r}: choose {' or '.join(SELECTIONS)}")
    n = len(bag)
    _check_k(n, k)
    unit, n_units, sizes = units_of(bag.groups, n)
    if kind == "random" and bag.groups is None:
        return random_selection(n, k, rng)
    if kind == "manc":
        if model is None:
            raise UsageError("MANC selection needs the model: use --select random")
        from .sensitivity import activations

        active = activations(model, bag.inputs, layer) > 0
    else:  # random over groups: no coverage, so every pick is a uniform tie among the groups that fit
        active = np.zeros((n, 0), dtype=bool)
    unit_active = np.zeros((n_units, active.shape[1]), dtype=bool)
    np.logical_or.at(unit_active, unit, active)  # a unit covers the union of its members' neurons
    picked = _greedy(unit_active, sizes, k, rng)
    return np.concatenate([np.flatnonzero(unit == u) for u in picked]).astype(np.int64)
