"""Keep ``k`` markers out of a bag: MANC (VerIDeep's Algorithm 2) or uniformly at random.

**MANC** (maximum active-neuron coverage) is the greedy algorithm for maximum coverage: a
neuron is *active* on a sample when its activation is > 0, and each step picks the sample
that activates the most neurons not yet covered by the samples already picked.

* *Ties* (several samples adding the same number of new neurons) go to the sample of highest
  *priority*: a random permutation of the bag drawn from ``rng`` once per selection. The
  priorities are independent of the bag's order, so that order carries no bias, and a seed
  makes the choice reproducible. One draw per selection, rather than one per tie, is what lets
  ``manc_batch`` run thousands of selections at once and still pick exactly what ``manc`` picks
  for the same priorities (tested); the price is that ties within one selection are not
  independent (a sample that lost a tie to another loses every later tie to it).
* *Saturation*: once no remaining sample adds a new neuron, the covered set is reset to
  empty and the same greedy continues over the remaining samples, so later picks again
  favour samples that are diverse among themselves (samples with no active neuron at all
  come last, in priority order).

The coverage state is a bitset (the active neurons packed 64 to a ``uint64`` word, word axis
first) and a gain is a popcount, so a step costs a few operations per word instead of one per neuron. One step of
the rule (gains, saturation reset, tie-break, cover update) is ``_greedy_step``; ``_greedy``
drives it for one selection with groups, ``manc_batch`` for many selections at once (rows of
one array: the evaluation resamples MANC on thousands of random sub-bags).

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


_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def pack_active(active: np.ndarray) -> np.ndarray:
    """Rows of booleans (..., neurons) as bitsets (..., words) of ``uint64``, neuron j in bit j % 64 of word j // 64."""
    active = np.asarray(active, dtype=bool)
    packed = np.packbits(active, axis=-1, bitorder="little")
    pad = (-packed.shape[-1]) % 8
    if pad or packed.shape[-1] == 0:
        packed = np.concatenate([packed, np.zeros((*packed.shape[:-1], pad or 8), dtype=np.uint8)], axis=-1)
    return np.ascontiguousarray(packed).view(np.uint64)


def _bits(words: np.ndarray) -> np.ndarray:
    """Set bits of every ``uint64`` word, same shape."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(words)
    octets = np.ascontiguousarray(words).view(np.uint8)  # pragma: no cover - numpy 1.x
    return _POP8[octets].reshape(*words.shape, 8).sum(axis=-1, dtype=np.uint8)  # pragma: no cover


def popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per row of ``uint64`` words (last axis summed), as int64."""
    return _bits(words).sum(axis=-1, dtype=np.int64)


def _gains(words: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """New neurons per unit: popcount of ``words`` (W, ..., units) outside ``covered`` (W, ...), summed over the words."""
    return _bits(words & ~covered[..., None]).sum(axis=0, dtype=np.int64)


def _greedy_step(words: np.ndarray, covered: np.ndarray, eligible: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """One greedy pick per selection; the one home of MANC's rule, for one selection or a batch of them.

    ``words`` (W, ..., units) are the units' bitsets, word axis first (so the gains are sums of
    whole slabs), ``covered`` (W, ...) the neurons covered so far (updated in place), ``eligible``
    (..., units) the units that may be picked (at least one per selection), ``priority`` (...,
    units) distinct non-negative tie-break ranks. The gain of a unit is the number of its
    neurons not yet covered; when no eligible unit adds any while something is covered, that
    selection's cover is reset to empty (saturation) and the gains recomputed. The pick is the
    eligible unit of largest gain, ties going to the highest priority.
    """
    gain = _gains(words, covered)
    best = np.where(eligible, gain, -1)  # eligible units' gains (>= 0, at least one per selection), -1 elsewhere
    top = best.max(axis=-1)
    saturated = (top == 0) & covered.any(axis=0)
    if saturated.any():
        if saturated.ndim == 0:
            covered[...] = 0
            gain = _gains(words, covered)
        else:
            covered[:, saturated] = 0
            gain[saturated] = _gains(words[:, saturated], covered[:, saturated])
        best = np.where(eligible, gain, -1)
        top = best.max(axis=-1)
    # the largest gain is >= 0, so a unit tied with it is eligible
    choice = np.asarray(np.argmax(np.where(best == top[..., None], priority, -1), axis=-1))
    if words.ndim == 2:  # one selection: (W, units)
        covered |= words[:, choice]
    elif words.ndim == 3:  # a batch: (W, rows, units), one pick per row
        covered |= words[:, np.arange(words.shape[1]), choice]
    else:
        covered |= np.take_along_axis(words, choice[None, ..., None], axis=-1)[..., 0]
    return choice


def _greedy(active: np.ndarray, sizes: np.ndarray, k: int, priority: np.ndarray) -> list[int]:
    """Greedy max coverage over units (rows of ``active``, each worth ``sizes`` markers) until ``k`` markers."""
    n = active.shape[0]
    words = np.ascontiguousarray(pack_active(active).T)  # (W, units)
    priority = np.asarray(priority, dtype=np.int64)
    remaining = np.ones(n, dtype=bool)
    covered = np.zeros(words.shape[0], dtype=np.uint64)
    picked: list[int] = []
    taken = 0
    unit = bool((sizes == 1).all())
    while taken < k and remaining.any():
        fits = remaining & (sizes <= k - taken)
        exact = fits if unit else _exact_ok(sizes, remaining, k - taken)
        pool = exact if exact.any() else fits if fits.any() else remaining
        choice = int(_greedy_step(words, covered, pool, priority))
        picked.append(choice)
        remaining[choice] = False
        taken += int(sizes[choice])
    return picked


def tie_priority(rng: np.random.Generator, n: int) -> np.ndarray:
    """The tie-break ranks of one selection over ``n`` units: a uniform random permutation (higher wins)."""
    return rng.permutation(n).astype(np.int64)


def manc(acts: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``k`` samples picked by greedy maximum coverage of active neurons (act > 0)."""
    acts = np.asarray(acts)
    if acts.ndim != 2:
        raise UsageError(f"activations must have shape (samples, units), got {acts.shape}")
    _check_k(acts.shape[0], k)
    active = acts > 0
    return np.asarray(_greedy(active, np.ones(len(active), dtype=np.int64), k, tie_priority(rng, len(active))), dtype=np.int64)


BATCH_BYTES = 64 << 20  # bitsets held at once by manc_batch (the resamples are processed in chunks)


def manc_batch(active: np.ndarray, pools: np.ndarray, k: int, priority: np.ndarray, *, chunk_bytes: int = BATCH_BYTES) -> np.ndarray:
    """MANC's first ``k`` picks on many sub-bags at once: row r picks among the units ``pools[r]``.

    ``active`` (units, neurons) is the bag's active-neuron matrix, ``pools`` (R, m) the unit
    indices of each selection's sub-bag, ``priority`` (R, m) its tie-break ranks (distinct per
    row). Returns (R, k) unit indices; row r equals ``pools[r][_greedy(active[pools[r]], ones, k,
    priority[r])]``, the per-selection greedy (every step vectorised across the rows). The rows
    are processed in chunks holding about ``chunk_bytes`` of bitsets.
    """
    pools = np.asarray(pools, dtype=np.int64)
    priority = np.asarray(priority, dtype=np.int64)
    if pools.ndim != 2 or priority.shape != pools.shape:
        raise UsageError(f"pools and priorities must be (selections, sub-bag) arrays of one shape, got {pools.shape} and {priority.shape}")
    r_total, m = pools.shape
    _check_k(m, k)
    words = np.ascontiguousarray(pack_active(active).T)  # (W, units)
    out = np.empty((r_total, k), dtype=np.int64)
    chunk = max(1, chunk_bytes // max(1, m * words.shape[0] * 8))
    for lo in range(0, r_total, chunk):
        hi = min(r_total, lo + chunk)
        sub = words[:, pools[lo:hi]]  # (W, rows, m)
        covered = np.zeros((words.shape[0], hi - lo), dtype=np.uint64)
        remaining = np.ones((hi - lo, m), dtype=bool)
        rows = np.arange(hi - lo)
        for step in range(k):
            choice = _greedy_step(sub, covered, remaining, priority[lo:hi])
            remaining[rows, choice] = False
            out[lo:hi, step] = pools[lo:hi][rows, choice]
    return out


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
    layer, or the map it pools when it reads globally pooled features; read on every model
    format, see ``features``). Without groups, ``random`` is
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
        from .features import activations

        active = activations(model, bag.inputs, layer) > 0
    else:  # random over groups: no coverage, so every pick is a uniform tie among the groups that fit
        active = np.zeros((n, 0), dtype=bool)
    unit_active = np.zeros((n_units, active.shape[1]), dtype=bool)
    np.logical_or.at(unit_active, unit, active)  # a unit covers the union of its members' neurons
    picked = _greedy(unit_active, sizes, k, tie_priority(rng, n_units))
    return np.concatenate([np.flatnonzero(unit == u) for u in picked]).astype(np.int64)
