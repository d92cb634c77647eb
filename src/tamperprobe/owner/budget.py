"""Query budget: how many markers to send for a wanted detection confidence (TamperNN, Sec. 4).

If a tampering flips each marker independently with probability ``p``, a key of ``s`` markers
detects it with probability ``1 − (1 − p)^s``. TamperNN's key size is the smallest integer
``s`` with ``s > log(1 − c) / log(1 − p)`` for a wanted confidence ``c``; e.g. ``p = 0.5``,
``c = 0.99`` gives ``log(0.01)/log(0.5) = 6.64`` hence ``s = 7``. The inequality is strict, so
when the ratio is an integer (``p = 0.5``, ``c = 0.75``: ratio 2) the answer is one more (3).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from .._util import Progress
from ..fingerprint import Fingerprint
from ..models import Model


def _probability(name: str, value: float, *, allow_zero: bool, allow_one: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or v > 1 or (v == 0 and not allow_zero) or (v == 1 and not allow_one):
        lo = "[0" if allow_zero else "(0"
        hi = "1]" if allow_one else "1)"
        raise ValueError(f"{name} must lie in {lo}, {hi}, got {value!r}")
    return v


def key_size(p: float, c: float) -> int:
    """Smallest integer ``s > log(1 − c) / log(1 − p)``: markers needed to detect with confidence ``c``.

    ``p`` in (0, 1]: the probability that one marker flips under the tampering; ``c`` in (0, 1).
    """
    p = _probability("p", p, allow_zero=False, allow_one=True)
    c = _probability("c", c, allow_zero=False, allow_one=False)
    if p == 1.0:
        return 1
    ratio = math.log1p(-c) / math.log1p(-p)
    nearest = round(ratio)
    if abs(ratio - nearest) <= 1e-9 * max(1.0, abs(ratio)):  # an integer up to rounding error: strict inequality
        return int(nearest) + 1
    return max(1, int(math.floor(ratio)) + 1)


def key_size_or_none(p: float, c: float) -> int | None:
    """``key_size(p, c)``, or ``None`` when ``p = 0``: no key is large enough to detect what never flips a marker."""
    if _probability("p", p, allow_zero=True, allow_one=True) == 0.0:
        _probability("c", c, allow_zero=False, allow_one=False)
        return None
    return key_size(p, c)


def detection_confidence(p: float, s: int) -> float:
    """``1 − (1 − p)^s``: probability that at least one of ``s`` markers flips, each with probability ``p``."""
    p = _probability("p", p, allow_zero=True, allow_one=True)
    if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0:
        raise ValueError(f"s must be an integer >= 0, got {s!r}")
    s = int(s)
    return -math.expm1(s * math.log1p(-p)) if p < 1 else (1.0 if s > 0 else 0.0)


DEFAULT_SELF_CHECK = ("int8", "fp16", "floor", "noise")


def self_check(
    model: Model,
    fp: Fingerprint,
    attacks: Sequence[str] = DEFAULT_SELF_CHECK,
    seeds: Sequence[int] = (0, 1, 2),
    progress: Progress | None = None,
) -> list[dict]:
    """Simulate data-free tamperings on the owner's model and measure this fingerprint against them.

    For each attack (and each seed, for random ones): ``p`` is the share of query units (markers, or
    marker pairs when the fingerprint groups them) whose answer changes under the fingerprint's output
    spec, ``detected`` whether this fingerprint catches it, and ``confidence`` the detection confidence
    ``1 − (1 − p)^s`` that a fresh fingerprint of the same size ``s`` would have if units flipped
    independently. A quick estimate from the owner's side; ``tamperprobe evaluate`` measures properly.
    ``progress(done, total, attack)`` hears about each simulated tampering.
    """
    import numpy as np

    from .._torch import module_logits
    from ..attacks import REGISTRY, run_attack
    from ..outputs import OutputSpec
    from .selection import units_of

    module = model.require_torch("the query-budget self-check")
    spec = OutputSpec.parse(fp.output_spec)
    x = fp.input_spec.decode(fp.inputs)
    unit_of, n_units, _ = units_of(fp.groups, len(fp))
    runs = [(kind, seed) for kind in attacks for seed in (seeds if REGISTRY[kind].random else seeds[:1])]
    rows = []
    for i, (kind, seed) in enumerate(runs):
        if progress is not None:
            progress(i, len(runs), f"{kind} (seed {seed})")
        attacked = run_attack(kind, module, None, seed=seed).model
        changed = spec.changed(fp.logits, module_logits(attacked, x), fp.tolerance)
        unit_changed = np.zeros(n_units, dtype=bool)
        np.logical_or.at(unit_changed, unit_of, changed)
        p = float(unit_changed.mean())
        rows.append(
            {
                "attack": kind,
                "seed": int(seed),
                "p": p,
                "detected": bool(unit_changed.any()),
                "units": n_units,
                "confidence": detection_confidence(p, n_units),
            }
        )
    if progress is not None:
        progress(len(runs), len(runs), "")
    return rows
