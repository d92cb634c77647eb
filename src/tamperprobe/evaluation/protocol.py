"""The measuring protocol: resampled selections, detection curves, and the exact random-selection rate.

A selection protocol turns a bag of query *units* (markers, or whole groups such as boundary
pairs) into ``resamples`` orderings; the first N_S / g units of an ordering are the selection
of N_S queries. Because every selection of size N_S is a prefix of the same ordering, each
resample's detection is monotone in N_S, and the same orderings serve every attack instance
and output spec (common random numbers). See ``tamperprobe.evaluation.campaign`` for the
whole campaign.

* ``random``: each resample is a uniformly random ordering of the bag; its first N_S
  markers are the selection of size N_S. A selection of size N_S is thus a uniform
  N_S-subset, and the expected rate is exactly ``1 − C(n−m, N_S)/C(n, N_S)`` for ``m``
  changed markers out of ``n``.
* ``manc``: MANC is deterministic on a fixed bag up to tie-breaking, so resampling the
  selection alone would measure one fingerprint. Each resample instead draws a random
  sub-bag of ``manc_fraction`` (default half) of the bag and runs MANC on it (the
  penultimate activations, greedy order; ``manc_orders`` runs every resample's
  greedy at once with ``selection.manc_batch``, MANC's one rule); its first N_S
  picks are the selection of size N_S (greedy coverage is a prefix-consistent order).
  This measures "an owner who generated a bag of n/2 candidates and kept N_S by MANC".
* **Groups** (boundary pairs): a group is picked whole and counts as ``g`` markers (its
  size, 2 for pairs), so a selection of N_S queries takes ``floor(N_S / g)`` groups and
  N_S = 1 detects nothing. A group detects when any of its members changed; under MANC a
  group's activation pattern is the union of its members'.
"""

from __future__ import annotations

import math

import numpy as np

MAX_NS = 10  # detection rates are reported for N_S = 1..MAX_NS queries
CONFIDENCES = (0.9, 0.99, 0.999)  # key sizes are reported for these detection confidences
SELECTIONS = ("manc", "random")


def selection_orders(units: int, depth: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``random`` protocol: (resamples, depth) unit indices, each row the start of a uniform random ordering."""
    depth = min(depth, units)
    keys = rng.random((resamples, units))
    return np.argsort(keys, axis=1)[:, :depth].astype(np.int64)


def manc_orders(unit_acts: np.ndarray, depth: int, resamples: int, rng: np.random.Generator, fraction: float = 0.5) -> np.ndarray:
    """``manc`` protocol: per resample, MANC's first ``depth`` picks on a random sub-bag of ``fraction`` of the units.

    One draw of ``resamples`` × ``units`` uniform keys gives every resample its sub-bag (the
    ``sub`` units of smallest key, a uniform random subset) and its tie-break priorities (the
    order of those keys, a uniform random permutation independent of the subset); the greedy
    then runs on all resamples at once (``owner.selection.manc_batch``, MANC's one rule).
    """
    from ..owner.selection import manc_batch

    units = len(unit_acts)
    depth = min(depth, units)
    sub = min(units, max(depth, int(round(fraction * units))))
    pools, priority = manc_draws(units, sub, resamples, rng)
    return manc_batch(np.asarray(unit_acts) > 0, pools, depth, priority)


def manc_draws(units: int, sub: int, resamples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each resample's sub-bag of ``sub`` out of ``units`` (R, sub) and its tie-break priorities (R, sub), from one draw."""
    order = np.argsort(rng.random((resamples, units)), axis=1)[:, :sub]
    priority = np.broadcast_to(np.arange(sub - 1, -1, -1, dtype=np.int64), order.shape)
    return order.astype(np.int64), np.ascontiguousarray(priority)


def unit_any(values: np.ndarray, unit_of: np.ndarray, units: int) -> np.ndarray:
    """Per unit, the OR over its members' rows of ``values`` (a (markers,) or (markers, k) boolean array)."""
    values = np.asarray(values, dtype=bool)
    out = np.zeros((units, *values.shape[1:]), dtype=bool)
    np.logical_or.at(out, unit_of, values)
    return out


def detection_curve(unit_changed: np.ndarray, orders: np.ndarray, group_size: int = 1, max_ns: int = MAX_NS) -> np.ndarray:
    """Detection rate at N_S = 1..max_ns: share of resampled selections holding a changed unit."""
    return hits_curve(np.asarray(unit_changed, dtype=bool)[orders], group_size, max_ns)


def hits_curve(hit: np.ndarray, group_size: int = 1, max_ns: int = MAX_NS) -> np.ndarray:
    """Detection rate at N_S = 1..max_ns from ``hit`` (resamples, depth): whether the j-th unit of each selection detects.

    ``detection_curve`` when a unit detects or not whatever the selection; callers whose units
    detect with a per-selection chance (e.g. an operator who catches a pair's second half only
    when it is sent second) build ``hit`` themselves.
    """
    hit = np.asarray(hit, dtype=bool)
    seen = np.logical_or.accumulate(hit, axis=1).mean(axis=0) if hit.size else np.zeros(hit.shape[1] if hit.ndim == 2 else 0)
    curve = np.zeros(max_ns)
    for ns in range(1, max_ns + 1):
        u = min(ns // group_size, len(seen))
        curve[ns - 1] = seen[u - 1] if u >= 1 else 0.0
    return curve


def exact_random_detection(n: int, m: int, k: int) -> float:
    """Detection probability of a uniform k-subset of n markers, m of them changed."""
    if k > n:
        k = n
    return 1.0 - math.comb(n - m, k) / math.comb(n, k)


def empirical_ns(curve: np.ndarray, confidence: float) -> int | None:
    """The smallest N_S whose measured detection rate reaches ``confidence`` (None when none does)."""
    reach = [ns for ns in range(1, len(curve) + 1) if curve[ns - 1] >= confidence]
    return reach[0] if reach else None
