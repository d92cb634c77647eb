"""Turning what a prediction API returned into an ``Answer``, or a ``Failure`` saying why not.

A response may carry labels, a top-1 probability, a full probability vector, full logits, or
ranked ``(index, score)`` pairs (the classification extension, TorchServe's ``{label: prob}``).
Each client reads its response into ``Parts``; ``to_answer`` then takes the answer the output
spec asks for. The form the spec asks for is used as it is; a richer form is reduced the way
``OutputSpec.reveal`` would (logits answer every spec, probabilities every spec but ``logits``,
ranked pairs the label specs); a poorer form is a failure. Probabilities are used as returned,
not re-rounded (an unrounded or more finely rounded answer still matches); an API that rounds
more coarsely than the spec says will mismatch.

Every answer gets a last check (``check_answer``): the right form for the spec, finite, labels
distinct and in range, one score per class.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..._util import one_line
from ...outputs import Answer, OutputSpec


class Failure(Exception):
    """Raised inside a client; becomes ``QueryFailure(reason)`` for the markers concerned.

    ``retryable`` failures (connection errors, timeouts) are tried again; ``unreachable`` ones say
    the endpoint could not be reached at all (see ``http.HTTPTarget``).
    """

    def __init__(self, reason: str, *, retryable: bool = False, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.unreachable = unreachable


@dataclass
class Parts:
    """What one response says about one marker, before the output spec decides what to use."""

    logits: list[float] | None = None
    probs: list[float] | None = None
    labels: list[int] | None = None
    probability: float | None = None  # the top-1 probability
    ranked: list[tuple[int, float]] | None = None  # (class index, score), most likely first
    ranked_kind: str | None = None  # "probs" | "logits" | None (unknown)

    def empty(self) -> bool:
        return self.logits is None and self.probs is None and self.labels is None and self.probability is None and self.ranked is None

    def describe(self) -> str:
        if self.logits is not None:
            return "logits"
        if self.probs is not None:
            return "probabilities"
        have = []
        if self.labels is not None:
            have.append(f"{len(self.labels)} label(s)")
        if self.probability is not None:
            have.append("the top-1 probability")
        if self.ranked is not None:
            have.append(f"the top {len(self.ranked)} classes")
        return " and ".join(have) or "nothing usable"


def as_label(value: Any, what: str = "label") -> int:
    """An int class index from a JSON int or an integer string ("7"); anything else is malformed."""
    if isinstance(value, bool):
        raise Failure(f"malformed response: {what} {value!r} is not a class index")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (str, bytes)):
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if re.fullmatch(r"\s*-?\d+\s*", text):
            return int(text)
        raise Failure(f"malformed response: {what} {one_line(text, 40)!r} is not a class index")
    raise Failure(f"malformed response: {what} {one_line(repr(value), 40)} is not a class index")


def as_number(value: Any, what: str = "score") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
            value = float(value)
        else:
            raise Failure(f"malformed response: {what} {one_line(repr(value), 40)} is not a number")
    v = float(value)
    if math.isnan(v):
        raise Failure("NaN in response")
    if math.isinf(v):
        raise Failure("infinite value in response")
    return v


def as_vector(value: Any, what: str = "scores") -> list[float]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]  # one row of a batch
    if not isinstance(value, list) or not value:
        raise Failure(f"malformed response: {what} must be a non-empty list of numbers")
    return [as_number(v, what[:-1] if what.endswith("s") else what) for v in value]


def as_labels(value: Any, what: str = "labels") -> list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    if not isinstance(value, list):
        value = [value]
    if not value:
        raise Failure(f"malformed response: {what} is empty")
    return [as_label(v) for v in value]


def guess_kind(name: str, values: list[float] | None = None) -> str:
    """Are these scores probabilities or logits? By name first, then by value (in [0, 1] summing to 1)."""
    n = name.lower()
    if "logit" in n:
        return "logits"
    if "prob" in n or "softmax" in n:
        return "probs"
    if values is not None and values and all(0.0 <= v <= 1.0 for v in values) and abs(sum(values) - 1.0) <= 1e-3:
        return "probs"
    return "logits"


LABEL_KEYS = ("label", "labels", "class", "classes", "class_id", "class_ids", "predicted_label", "predicted_class", "prediction")
PROB_VECTOR_KEYS = ("probabilities", "probs", "softmax", "scores", "probability", "prob", "confidence")
LOGIT_KEYS = ("logits", "logit")


def parts_from_named(d: dict) -> Parts:
    """Read a dict of named outputs ({"logits": [...]}, {"label": 3, "probability": 0.9}, TF's {"classes", "probabilities"})."""
    low = {str(k).lower(): v for k, v in d.items()}
    p = Parts()
    for k in LOGIT_KEYS:
        if k in low and p.logits is None:
            p.logits = as_vector(low[k], k)
    for k in PROB_VECTOR_KEYS:
        if k in low:
            v = low[k]
            if isinstance(v, list) and not (len(v) == 1 and not isinstance(v[0], list)):
                if p.probs is None:
                    p.probs = as_vector(v, k)
            elif p.probability is None:
                p.probability = as_number(v[0] if isinstance(v, list) else v, k)
    for k in LABEL_KEYS:
        if k in low and p.labels is None:
            p.labels = as_labels(low[k], k)
    if p.labels is not None and p.probs is not None and 1 < len(p.labels) == len(p.probs) and p.labels != list(range(len(p.labels))):
        # TensorFlow's top-k layout: {"classes": [3, 5, 8], "scores": [0.93, 0.04, 0.01]} ranks classes, it is not a score vector
        p.ranked, p.ranked_kind = list(zip(p.labels, p.probs)), "probs"  # read under a probability key
        p.probs = None
    if p.empty():
        keys = one_line(", ".join(sorted(map(str, d))), 120)
        raise Failure(f"malformed response: no labels or scores found (keys: {keys or 'none'})")
    return p


def parts_from_scores(values: list[float], kind: str | None = None) -> Parts:
    """A score vector: probabilities or logits as ``kind`` says, else as ``guess_kind`` reads the values."""
    if (kind or guess_kind("", values)) == "probs":
        return Parts(probs=values)
    return Parts(logits=values)


def parts_from_value(doc: Any) -> Parts:
    """One prediction in the common JSON forms: a dict of named outputs, a score vector, or a plain label."""
    if isinstance(doc, dict):
        return parts_from_named(doc)
    if isinstance(doc, list):
        return parts_from_scores(as_vector(doc, "scores"))
    if isinstance(doc, (int, str)) and not isinstance(doc, bool):
        return Parts(labels=[as_label(doc)])
    raise Failure(f"malformed response: unexpected prediction {one_line(str(doc), 40)!r}")


def parts_from_label_map(d: dict) -> Parts:
    """TorchServe's {class: probability} (top-5 by default): ranked pairs, most likely first."""
    pairs = [(as_label(k), as_number(v, "probability")) for k, v in d.items()]
    if not pairs:
        raise Failure("malformed response: empty prediction")
    pairs.sort(key=lambda kv: -kv[1])  # stable: keeps the server's order for ties
    return Parts(ranked=pairs, ranked_kind="probs")


def check_labels(labels: list[int], classes: int | None) -> None:
    if len(set(labels)) != len(labels):
        raise Failure(f"malformed response: repeated label in {labels}")
    for c in labels:
        if c < 0 or (classes is not None and c >= classes):
            raise Failure(f"malformed response: label {c} out of range" + (f" for {classes} classes" if classes else ""))


def check_vector(v: list[float], classes: int | None, what: str) -> None:
    if classes is not None and len(v) != classes:
        raise Failure(f"wrong number of classes: got {len(v)} {what}, expected {classes}")


def to_answer(parts: Parts, spec: OutputSpec, classes: int | None = None) -> Answer:
    """The answer ``spec`` asks for, from what the response holds (rules in the module doc); raises Failure."""
    p = parts
    for v, what in ((p.logits, "logits"), (p.probs, "probabilities")):
        if v is not None:
            for x in v:
                as_number(x)
            check_vector(v, classes, what)
    if p.probability is not None:
        as_number(p.probability)
    if p.labels is not None:
        check_labels(p.labels, classes)
    if p.ranked is not None:
        check_labels([c for c, _ in p.ranked], classes)
        for _, s in p.ranked:
            as_number(s)
        # every class present: the ranking is a full score vector
        full = len(p.ranked) if classes is None else classes
        if len(p.ranked) == full and sorted(c for c, _ in p.ranked) == list(range(full)) and p.logits is None and p.probs is None:
            vec = [0.0] * full
            for c, s in p.ranked:
                vec[c] = s
            kind = p.ranked_kind or guess_kind("", vec)
            p = replace(p, probs=vec, ranked_kind=kind) if kind == "probs" else replace(p, logits=vec, ranked_kind=kind)

    if spec.kind == "logits":
        if p.logits is not None:
            return spec.reveal(np.asarray(p.logits, dtype=np.float64))
        raise Failure(
            f"the endpoint reveals {p.describe()}, not the logits the output spec asks for: this endpoint does not serve what the fingerprint was made for"
        )
    if spec.kind == "probs":
        if p.probs is not None:
            return Answer(scores=tuple(float(v) for v in p.probs))
        if p.logits is not None:
            return spec.reveal(np.asarray(p.logits, dtype=np.float64))
        raise Failure(
            f"the endpoint reveals {p.describe()}, not every class probability as the output spec asks: this endpoint does not serve what the fingerprint was made for"
        )
    if spec.kind == "top1-prob":
        if p.labels is not None and p.probability is not None:
            return Answer(labels=(p.labels[0],), scores=(float(p.probability),))
        if p.probs is not None:
            top = int(np.argsort(-np.asarray(p.probs), kind="stable")[0])
            return Answer(labels=(top,), scores=(float(p.probs[top]),))
        if p.logits is not None:
            return spec.reveal(np.asarray(p.logits, dtype=np.float64))
        if p.ranked and p.ranked_kind == "probs":
            return Answer(labels=(p.ranked[0][0],), scores=(float(p.ranked[0][1]),))
        raise Failure(f"the endpoint reveals {p.describe()}, not the top-1 probability: verify with --output-spec top1")
    k = spec.label_count
    if p.labels is not None and len(p.labels) >= k:
        return Answer(labels=tuple(p.labels[:k]))
    if p.ranked is not None and len(p.ranked) >= k:
        return Answer(labels=tuple(c for c, _ in p.ranked[:k]))
    scores = p.logits if p.logits is not None else p.probs
    if scores is not None:
        if k > len(scores):
            raise Failure(f"wrong number of classes: got {len(scores)} scores, {spec} needs at least {k}")
        return Answer(labels=tuple(int(c) for c in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]))
    raise Failure(f"the endpoint reveals only {p.describe()}; {spec} needs {k} labels")


def check_answer(answer: Answer, spec: OutputSpec, classes: int | None) -> Answer:
    """A last check of any answer a client produced: right form for the spec, finite, in range."""
    if spec.label_count:
        if answer.labels is None or len(answer.labels) != spec.label_count:
            raise Failure(f"malformed response: expected {spec.label_count} label(s)")
        check_labels(list(answer.labels), classes)
    if spec.kind in ("top1-prob", "probs", "logits"):
        if answer.scores is None:
            raise Failure("malformed response: no scores")
        for s in answer.scores:
            as_number(s)
        if spec.kind != "top1-prob":
            check_vector(list(answer.scores), classes, "scores")
    return answer
