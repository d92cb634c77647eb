"""Which marker method suits which prediction API, from the committed benchmark measurements.

What an API reveals decides which markers can show a change of the weights. A label-only API
(``top1``, ``topk:K``) shows a change only when a marker's label flips, so its markers should sit
right at a decision boundary: ``crossed`` pairs, whose two halves come from different natural
seeds, so that a server which sees the queries cannot single out the second half as a near-twin
of the first as it can with ``boundary`` pairs (``bench/results/adaptive-operator.md``); an API that returns scores (``logits``,
``probs:N``) shows any change that moves them, and VerIDeep's Sensitive-Samples (``sensitive``)
are built to move them most.

The numbers behind this are the MNIST campaigns committed under ``bench/results`` (three zoo
models, fourteen attacks, every method and output spec): ``benchmark_detection.json`` next to this
module holds, per run, output spec, method and attack, the detection rate of a fingerprint of 10
queries (written by ``bench/method_advice.py``). From it:

* a method is **weak** under a spec when, on some benchmark model, it detected an attack in fewer
  than ``WEAK`` (50 %) of 10-query fingerprints while another method detected the same attack
  under the same spec in at least ``STRONG`` (90 %): the miss is the method's, not the API's;
* ``choose_method(spec)`` takes the first method of the spec's preference list that is not weak
  (label-only specs: crossed, boundary, badv, sensitive; score specs: sensitive, crossed, boundary,
  badv; the first when all are) and says why. So ``top1-prob:2``, which shows a label and one
  rounded probability, gets crossed pairs: sensitive missed fp16 there where they caught it;
* ``pairing_warning(method, spec)`` is the one-line warning for a weak pair, with the measured rates.

A spec that was not measured is judged by the measured one of its kind closest to it
(``topk:4`` by ``topk:3``, ``probs:4`` by ``probs:2``); ``top1-prob:N`` by ``top1-prob:2``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ..outputs import OutputSpec

WEAK = 0.5
STRONG = 0.9
TABLE = "benchmark_detection.json"
LABEL_ONLY = ("top1", "topk")
PREFERENCE = {
    "labels": ("crossed", "boundary", "badv", "sensitive"),
    "scores": ("sensitive", "crossed", "boundary", "badv"),
}
_WHY = {
    "crossed": (
        "crossed marker pairs straddle the decision boundary, so a shift of it above δ flips a label the API shows, "
        "and their halves come from different natural seeds, so no marker is a near-twin of another that the server could single out"
    ),
    "boundary": "boundary marker pairs straddle the decision boundary, so any shift of it above δ flips a label the API shows",
    "sensitive": "Sensitive-Samples are built so that the scores the API shows move most when any weight changes",
    "badv": "BADV markers are adversarial inputs just across the decision boundary",
}


@dataclass(frozen=True)
class Miss:
    """A measured weakness: ``method`` detected ``attack`` in ``rate`` of 10-query fingerprints, ``best`` in ``best_rate``."""

    run: str
    model: str
    spec: str
    method: str
    attack: str
    rate: float
    best: str
    best_rate: float


@dataclass(frozen=True)
class Choice:
    """The method chosen for an output spec and the one-line reason."""

    method: str
    reason: str


@functools.cache
def table() -> dict[str, Any]:
    """The committed benchmark table (``benchmark_detection.json``)."""
    text = resources.files(__package__).joinpath(TABLE).read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def measured_spec(spec: str | OutputSpec) -> str | None:
    """The benchmark spec that stands for ``spec``: itself, or the measured one of its kind closest to it."""
    s = OutputSpec.parse(spec)
    measured = sorted({name for run in table()["runs"].values() for name in run["rates"]})
    if str(s) in measured:
        return str(s)
    same_kind = [OutputSpec.parse(m) for m in measured if OutputSpec.parse(m).kind == s.kind]
    if not same_kind:
        return None
    if s.kind == "topk":
        return str(min(same_kind, key=lambda m: (abs(m.k - s.k), m.k)))
    return str(min(same_kind, key=lambda m: (abs(m.places - s.places), -m.places)))


def _spec_of(spec: str | OutputSpec) -> tuple[OutputSpec, str | None]:
    s = OutputSpec.parse(spec)
    return s, measured_spec(s)


def misses(method: str, spec: str | OutputSpec) -> list[Miss]:
    """Every measured miss of ``method`` under ``spec`` (see the module doc), worst first."""
    _, name = _spec_of(spec)
    if name is None:
        return []
    out = []
    for run_name, run in table()["runs"].items():
        rates = run["rates"].get(name, {})
        if method not in rates:
            continue
        for i, attack in enumerate(run["attacks"]):
            rate = rates[method][i]
            if rate is None or rate >= WEAK:
                continue
            others = {m: r[i] for m, r in rates.items() if m != method and r[i] is not None}
            if not others:
                continue
            best = max(others, key=lambda m: (others[m], m == "crossed", m == "boundary", m == "sensitive"))
            if others[best] >= STRONG:
                out.append(Miss(run_name, run["model"], name, method, attack, float(rate), best, float(others[best])))
    return sorted(out, key=lambda m: (m.rate, -m.best_rate, m.run, m.attack))


def worst_rate(method: str, spec: str | OutputSpec) -> tuple[float, int] | None:
    """(lowest detection rate of ``method`` over the benchmark attacks that some method detects, number of such cases)."""
    _, name = _spec_of(spec)
    if name is None:
        return None
    worst, cases = 1.0, 0
    for run in table()["runs"].values():
        rates = run["rates"].get(name, {})
        if method not in rates:
            continue
        for i in range(len(run["attacks"])):
            column = [r[i] for r in rates.values() if r[i] is not None]
            if rates[method][i] is None or not column or max(column) < STRONG:
                continue  # an attack no method detects under this spec says nothing about the method
            worst, cases = min(worst, float(rates[method][i])), cases + 1
    return (worst, cases) if cases else None


def _pct(rate: float) -> str:
    return f"{100 * rate:.0f} %"


def _model_name(miss: Miss) -> str:
    return miss.model.rsplit(":", 1)[-1]


def _measured_on(spec: OutputSpec, name: str) -> str:
    return "" if str(spec) == name else f" (measured under {name})"


def choose_method(spec: str | OutputSpec) -> Choice:
    """The marker method for an API that reveals ``spec``, and why (one line).

    The first method of the spec's preference list that the benchmark does not show weak; when all
    are, the first one (and the reason says that no method was strong under this spec).
    """
    s, name = _spec_of(spec)
    family = "labels" if s.kind in LABEL_ONLY else "scores"
    reveals = "labels only" if family == "labels" else ("a label and its rounded probability" if s.kind == "top1-prob" else "scores")
    order = PREFERENCE[family]
    strong = [m for m in order if not misses(m, s)]
    chosen = strong[0] if strong else order[0]
    evidence = []
    worst = worst_rate(chosen, s)
    if worst is not None:
        least = "" if worst[0] >= 1.0 else "at least "
        evidence.append(f"{least}{_pct(worst[0])} detection of every attack that some method detects")
    if chosen != order[0] and misses(order[0], s):
        miss = misses(order[0], s)[0]
        evidence.append(f"{order[0]}, the usual choice, detected {miss.attack} in only {_pct(miss.rate)} on {_model_name(miss)}")
    if not strong:
        evidence.append(f"none of {', '.join(order)} was strong in every case under this spec")
    reason = f"{chosen} for {s}: the API reveals {reveals}, and {_WHY[chosen]}"
    if evidence and name is not None:
        reason += f" (benchmark{_measured_on(s, name)}, 10 queries: {'; '.join(evidence)})"
    return Choice(chosen, reason)


def pairing_warning(method: str, spec: str | OutputSpec) -> str | None:
    """A one-line warning when the benchmark shows ``method`` weak under ``spec``; None otherwise."""
    s, name = _spec_of(spec)
    found = misses(method, s)
    if not found or name is None:
        return None
    first = found[0]
    on_run = [m for m in found if m.run == first.run][:5]
    listed = ", ".join(f"{m.attack} in {_pct(m.rate)}" for m in on_run)
    better = choose_method(s).method
    hint = f"; --method {better} suits this API" if better != method else ""
    return (
        f"{method} markers are weak under {s}{_measured_on(s, name)}: on the {_model_name(first)} benchmark "
        f"(bench/results/{first.run}) 10 queries detected {listed} of fingerprints, "
        f"where {first.best} detected {first.attack} in {_pct(first.best_rate)}{hint}"
    )
