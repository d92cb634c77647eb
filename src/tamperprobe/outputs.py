"""What a prediction API reveals, and the one rule that decides whether an answer matches.

Output specifications (the forms of VerIDeep's Table III):

==================  =====================================================================
``top1``            the top-1 label
``topk:K``          the K most likely labels, most likely first
``top1-prob:N``     the top-1 label and its probability rounded to N decimals
``probs:N``         every class probability rounded to N decimals
``logits``          every logit, unrounded
==================  =====================================================================

The comparison rule (``OutputSpec.compare``) with a tolerance ``tol`` (logit units; the
same number bounds probabilities, since ``|Δp_i| <= max|Δz| / 2`` for a softmax):

* **Labels.** Let ``s_1 >= s_2 >= ...`` be the expected logits sorted. The observed labels
  ``o_1..o_K`` match when they are distinct and ``|z[o_i] - s_i| <= tol`` for every i. A
  label whose logit ties the expected one within ``tol`` is accepted in its place, so a
  near-tie never raises a false alarm; any other label, or another order, is a mismatch.
* **Rounded probabilities.** An observed value ``r`` matches the expected probability
  ``p`` when ``|r - p| <= 0.5 * 10**-N + tol``: a value within ``tol`` of a rounding
  boundary matches whichever side the API rounded to. An unrounded answer also matches.
* **Logits.** ``|r - z| <= tol + 1e-6 * |z|``.

Everything else (wrong length, NaN, labels out of range) is a mismatch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from .errors import UsageError

DEFAULT_TOLERANCE = 3e-5
_KINDS = ("top1", "topk", "top1-prob", "probs", "logits")
_MAX_DECIMALS = 12


@dataclass(frozen=True)
class Answer:
    """One API answer in a normal form: labels (most likely first) and/or scores.

    ``top1``/``topk`` fill ``labels``; ``top1-prob`` fills both (one score, the top-1
    probability); ``probs``/``logits`` fill ``scores`` with one value per class.
    """

    labels: tuple[int, ...] | None = None
    scores: tuple[float, ...] | None = None

    def __str__(self) -> str:
        parts = []
        if self.labels is not None:
            parts.append(",".join(str(c) for c in self.labels))
        if self.scores is not None:
            shown = ", ".join(f"{s:.4g}" for s in self.scores[:4])
            more = ", …" if len(self.scores) > 4 else ""
            parts.append(f"[{shown}{more}]")
        return " ".join(parts) if parts else "-"


@dataclass(frozen=True)
class Match:
    ok: bool
    detail: str = ""


def softmax64(logits: np.ndarray) -> np.ndarray:
    """Softmax in float64 along the last axis (the reference both sides use)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class OutputSpec:
    kind: str
    k: int = 1
    decimals: int | None = None

    @classmethod
    def parse(cls, text: str | OutputSpec) -> OutputSpec:
        if isinstance(text, OutputSpec):
            return text
        raw = str(text).strip().lower()
        m = re.fullmatch(r"(top1|topk|top1-prob|probs|logits)(?::([0-9]{1,4}))?", raw)
        if not m:
            raise UsageError(f"bad output spec {text!r}: expected one of top1, topk:K, top1-prob:N, probs:N, logits")
        kind, arg = m.group(1), m.group(2)
        if kind in ("top1", "logits"):
            if arg is not None:
                raise UsageError(f"bad output spec {text!r}: {kind} takes no argument")
            return cls(kind)
        if arg is None:
            raise UsageError(f"bad output spec {text!r}: {kind} needs a number, e.g. {kind}:3")
        n = int(arg)
        if kind == "topk":
            if n < 1:
                raise UsageError(f"bad output spec {text!r}: K must be at least 1")
            return cls("top1") if n == 1 else cls("topk", k=n)
        if n > _MAX_DECIMALS:
            raise UsageError(f"bad output spec {text!r}: at most {_MAX_DECIMALS} decimals")
        if n == 0:  # every probability reads 0 or 1: an API answering 0.5 everywhere would match, so nothing is proven
            raise UsageError(f"bad output spec {text!r}: probabilities rounded to 0 decimals prove nothing; give 1 to {_MAX_DECIMALS} decimals")
        return cls(kind, decimals=n)

    def __str__(self) -> str:
        if self.kind == "topk":
            return f"topk:{self.k}"
        if self.kind in ("top1-prob", "probs"):
            return f"{self.kind}:{self.decimals}"
        return self.kind

    @property
    def places(self) -> int:
        """Decimals of the rounded probabilities (0 for the forms that carry none)."""
        return 0 if self.decimals is None else self.decimals

    @property
    def rounding(self) -> float:
        """Half a unit in the last rounded place: the largest rounding error of a probability."""
        return 0.5 * 10.0**-self.places

    def covers(self, other: str | OutputSpec) -> bool:
        """Does an answer under this spec reveal at least what ``other`` reveals (every label it names, every
        score to as many decimals)? ``verify`` under a spec that does not cover the fingerprint's is weaker
        than the markers were made for, and needs the caller's explicit consent (``--allow-weaker-spec``)."""
        o = OutputSpec.parse(other)
        if self.kind == "logits" or self == o:
            return True
        if o.kind == "logits":
            return False
        if self.kind == "probs":  # every probability: any ranking, any rounding to no more decimals
            return o.kind in ("top1", "topk") or o.places <= self.places
        if self.kind == "top1-prob":
            return o.kind == "top1" or (o.kind == "top1-prob" and o.places <= self.places)
        if self.kind == "topk":
            return o.kind == "top1" or (o.kind == "topk" and o.k <= self.k)
        return o.kind == "top1"

    @property
    def label_count(self) -> int:
        """How many labels an answer carries (0 for the score-only forms)."""
        return {"top1": 1, "topk": self.k, "top1-prob": 1}.get(self.kind, 0)

    def reveal(self, logits: np.ndarray) -> Answer:
        """What an API following this spec answers for one sample's logits (C,)."""
        z = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.kind == "logits":
            return Answer(scores=tuple(float(v) for v in z))
        if self.k > z.size:
            raise UsageError(f"output spec {self} asks for {self.k} labels but the model has {z.size} classes")
        order = np.argsort(-z, kind="stable")
        if self.kind in ("top1", "topk"):
            return Answer(labels=tuple(int(c) for c in order[: self.k]))
        p = softmax64(z)
        if self.kind == "top1-prob":
            top = int(order[0])
            return Answer(labels=(top,), scores=(round(float(p[top]), self.places),))
        return Answer(scores=tuple(round(float(v), self.places) for v in p))

    def compare(self, expected_logits: np.ndarray, observed: Answer, tol: float = DEFAULT_TOLERANCE) -> Match:
        """Does ``observed`` match what the intact model answers for ``expected_logits``?"""
        z = np.asarray(expected_logits, dtype=np.float64).reshape(-1)
        if z.size == 0:
            return Match(False, "no expected classes")
        n_labels = self.label_count
        if n_labels:
            labels = observed.labels
            if labels is None or len(labels) != n_labels:
                return Match(False, f"expected {n_labels} label(s), got {observed}")
            if len(set(labels)) != len(labels) or any(not 0 <= c < z.size for c in labels):
                return Match(False, f"invalid labels {labels}")
            ranked = np.sort(z)[::-1]
            for i, c in enumerate(labels):
                if abs(z[c] - ranked[i]) > tol:
                    want = int(np.argsort(-z, kind="stable")[i])
                    return Match(False, f"label #{i + 1} is {c}, expected {want}")
        if self.kind in ("top1", "topk"):
            return Match(True)
        scores = observed.scores
        if self.kind == "top1-prob":
            if scores is None or len(scores) != 1:
                return Match(False, "expected one probability")
            assert observed.labels is not None  # checked with the labels above
            want = softmax64(z)[observed.labels[0]]
            return _close(scores, [want], self.rounding + tol, 0.0)
        if scores is None or len(scores) != z.size:
            return Match(False, f"expected {z.size} scores, got {0 if scores is None else len(scores)}")
        if self.kind == "probs":
            return _close(scores, softmax64(z), self.rounding + tol, 0.0)
        return _close(scores, z, tol, 1e-6)

    def matches(self, expected_logits: np.ndarray, observed_logits: np.ndarray, tol: float = DEFAULT_TOLERANCE) -> np.ndarray:
        """Vectorised ``compare`` for a model behind this API: ``ok[i]`` for rows of (n, C) logits (``compare_many``)."""
        return compare_many(self, expected_logits, observed_logits, tol)

    def changed(self, expected_logits: np.ndarray, observed_logits: np.ndarray, tol: float = DEFAULT_TOLERANCE) -> np.ndarray:
        """Which rows a model with ``observed_logits`` answers differently from ``expected_logits`` (``~matches``)."""
        return ~compare_many(self, expected_logits, observed_logits, tol)


def _close(observed, expected, atol: float, rtol: float) -> Match:
    # The 1e-12 absorbs the decimal representation error of a rounded float (0.15 is not exactly 0.15).
    for i, (r, e) in enumerate(zip(observed, expected)):
        r = float(r)
        if not math.isfinite(r):
            return Match(False, f"score {i} is {r}")
        if abs(r - e) > atol + rtol * abs(e) + 1e-12:
            return Match(False, f"score {i} is {r:.6g}, expected {e:.6g}")
    return Match(True)


# ----------------------------------------------------------------------------- many rows at once


def _round_like_python(a: np.ndarray, decimals: int) -> np.ndarray:
    """``round(float(v), decimals)`` for every element, as ``OutputSpec.reveal`` rounds.

    ``np.round`` scales, rounds half to even and divides; Python's ``round`` rounds the exact
    binary value correctly. They agree except when ``v * 10**decimals`` lies within its own
    rounding error of a half-integer: those few elements are redone with ``round``.
    """
    a = np.asarray(a, dtype=np.float64)
    out = np.round(a, decimals)
    with np.errstate(invalid="ignore", over="ignore"):
        t = a * 10.0**decimals
        frac = t - np.floor(t)
        near = np.abs(frac - 0.5) < 1e-3
    for idx in zip(*np.nonzero(near)):
        out[idx] = round(float(a[idx]), decimals)
    return out


def _close_many(observed: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> np.ndarray:
    """Row-wise ``outputs._close``: every score finite and within ``atol + rtol·|e| + 1e-12``."""
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(observed) | (np.abs(observed - expected) > atol + rtol * np.abs(expected) + 1e-12)
    return ~bad.any(axis=1)


def compare_many(spec: str | OutputSpec, expected_logits: np.ndarray, observed_logits: np.ndarray, tol: float = DEFAULT_TOLERANCE) -> np.ndarray:
    """Vectorised ``OutputSpec.compare`` over rows: ``ok[i]`` is

    ``spec.compare(expected_logits[i], spec.reveal(observed_logits[i]), tol).ok``

    for an API that follows ``spec`` and is backed by a model returning ``observed_logits``.
    Both arrays have shape (n, C).
    """
    spec = OutputSpec.parse(spec)
    z = np.asarray(expected_logits, dtype=np.float64)
    o = np.asarray(observed_logits, dtype=np.float64)
    if z.ndim != 2 or z.shape != o.shape:
        raise UsageError(f"expected and observed logits must both have shape (n, C); got {z.shape} and {o.shape}")
    n, classes = z.shape
    if spec.kind == "logits":
        return _close_many(o, z, tol, 1e-6)
    k = spec.label_count
    if k > classes:
        raise UsageError(f"output spec {spec} asks for {k} labels but the model has {classes} classes")
    ok = np.ones(n, dtype=bool)
    if k:
        labels = np.argsort(-o, axis=1, kind="stable")[:, :k]
        ranked = np.sort(z, axis=1)[:, ::-1][:, :k]
        got = np.take_along_axis(z, labels, axis=1)
        with np.errstate(invalid="ignore"):
            ok &= ~(np.abs(got - ranked) > tol).any(axis=1)
    if spec.kind in ("top1", "topk"):
        return ok
    atol = spec.rounding + tol
    places = spec.places
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf logits: a mismatch, not a warning
        po, pz = softmax64(o), softmax64(z)
    if spec.kind == "top1-prob":
        top = labels[:, :1]
        r = _round_like_python(np.take_along_axis(po, top, axis=1), places)
        want = np.take_along_axis(pz, top, axis=1)
        return ok & _close_many(r, want, atol, 0.0)
    r = _round_like_python(po, places)
    return _close_many(r, pz, atol, 0.0)


def changed_markers(spec: str | OutputSpec, expected_logits: np.ndarray, observed_logits: np.ndarray, tol: float = DEFAULT_TOLERANCE) -> np.ndarray:
    """Which markers answer differently from the intact model (``~compare_many``)."""
    return ~compare_many(spec, expected_logits, observed_logits, tol)


def signed_margin(logits: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """``z[cls] − max_{j≠cls} z[j]`` per row, in float64: ≥ 0 exactly when ``cls`` is top-1."""
    z = np.asarray(logits, dtype=np.float64).copy()
    rows = np.arange(len(z))
    zc = z[rows, cls].copy()
    z[rows, cls] = -np.inf
    return zc - z.max(axis=1)


def top_margin(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 labels and top-1 minus top-2 margins (float64); a single class has margin +inf."""
    z = np.asarray(logits)
    labels = z.argmax(axis=1)
    return labels, signed_margin(z, labels)
