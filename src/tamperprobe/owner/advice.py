"""Which marker method suits which prediction API, from the committed benchmark measurements.

What an API reveals decides which markers can show a change of the weights. A label-only API
(``top1``, ``topk:K``) shows a change only when a marker's label flips, so its markers should sit
right at a decision boundary: ``crossed`` pairs, whose two halves come from different natural
seeds, so that a server which sees the queries cannot single out the second half as a near-twin
of the first as it can with ``boundary`` pairs (``bench/results/adaptive-operator.md``); an API that returns scores (``logits``,
``probs:N``) shows any change that moves them. VerIDeep's Sensitive-Samples (``sensitive``) are
built to move them most, but they are not ordinary inputs, and an operator who routes what it can
single out to the original model takes them away; natural inputs cannot be singled out, and under
logits they show every change (the routed benchmark below).

The numbers behind this are the MNIST campaigns committed under ``bench/results`` (three zoo
models, fourteen attacks, every method and output spec): ``benchmark_detection.json`` next to this
module holds, per run, output spec, method and attack, the detection rate of a fingerprint of 10
queries (written by ``bench/method_advice.py``). From it:

* a method is **weak** under a spec when, on some benchmark model, it detected an attack in fewer
  than ``WEAK`` (50 %) of 10-query fingerprints while another method detected the same attack
  under the same spec in at least ``STRONG`` (90 %): the miss is the method's, not the API's;
* without a routed table, ``choose_method(spec)`` takes the first method of the spec's preference
  list that is not weak (label-only specs: crossed, boundary, badv, sensitive; score specs:
  sensitive, crossed, boundary, badv; the first when all are) and says why;
* ``pairing_warning(method, spec)`` is the one-line warning for a weak pair, with the measured rates.

A spec that was not measured is judged by the measured one of its kind closest to it
(``topk:4`` by ``topk:3``, ``probs:4`` by ``probs:2``); ``top1-prob:N`` by ``top1-prob:2``.

A passive benchmark is not enough for an API whose server's operator sees the queries: it can send
the markers it can single out to the original model (``tamperprobe.evaluation.routers``). So a
score spec (``top1-prob:N``, ``probs:N``, ``logits``) is chosen first by ``benchmark_routed.json``
(written by ``bench/adaptive_operator_scores.py`` from the adaptive-operator benchmark on the MNIST
CNN and the CIFAR-10 ResNet-56): for each method, how many of the attacks some method detects
passively it still detects in at least ``ROUTED_TARGET`` (99 %) of 10-query fingerprints with
**every** router at 5 % cost. ``choose_method`` takes the methods that keep every such attack on
every model (in ``ROUTED_PREFERENCE`` order), else the one that keeps the most (then the one that
detects the most without a router, then the highest lowest rate), among the methods the routed runs
measured with their default parameters (``at_defaults``: what a default fingerprint gets), and the
reason says which line holds. Methods without rows in the passive table are never strong by that
table alone; for label-only specs ``crossed`` is chosen by an explicit rule (the adaptive-operator
benchmark: the near-twin router defeats ``boundary`` pairs for free), not because the passive
table holds no miss of it.
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
ROUTED = "benchmark_routed.json"
ROUTED_TARGET = 0.99
LABEL_ONLY = ("top1", "topk")
PREFERENCE = {
    "labels": ("crossed", "boundary", "badv", "sensitive"),
    "scores": ("sensitive", "crossed", "boundary", "badv"),
}
#: score specs under routers: the methods of the routed benchmark, in the order taken when several keep every attack
ROUTED_PREFERENCE = ("sensitive", "matched", "crossed", "natural", "badv")
_WHY = {
    "crossed": (
        "crossed marker pairs straddle the decision boundary, so a shift of it above δ flips a label the API shows, "
        "and their halves come from different natural seeds, so no marker is a near-twin of another that the server could single out"
    ),
    "boundary": "boundary marker pairs straddle the decision boundary, so any shift of it above δ flips a label the API shows",
    "sensitive": "Sensitive-Samples are built so that the scores the API shows move most when any weight changes",
    "badv": "BADV markers are adversarial inputs just across the decision boundary",
    "matched": (
        "margin-matched markers have the margins of ordinary inputs, so a server that routes low-margin or unusual "
        "requests to the original model pays for every marker it catches, while the scores the API shows still move"
    ),
    "natural": "natural inputs are ordinary traffic, so no router can single them out (they show the changes ordinary inputs show)",
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


@dataclass(frozen=True)
class Routed:
    """One method under a spec in the routed benchmark: attacks kept at >= 99 % with every router at 5 %, of the detectable ones."""

    method: str
    kept: int
    detectable: int
    lowest: float
    spec: str
    passive: int = 0  # detectable attacks it detects at >= 99 % without a router

    @property
    def holds(self) -> bool:
        return self.detectable > 0 and self.kept == self.detectable


@functools.cache
def routed_table() -> dict[str, Any] | None:
    """The committed routed benchmark table (``benchmark_routed.json``), or None when absent."""
    path = resources.files(__package__).joinpath(ROUTED)
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _nearest(s: OutputSpec, measured: set[str]) -> str | None:
    if str(s) in measured:
        return str(s)
    same_kind = [OutputSpec.parse(m) for m in measured if OutputSpec.parse(m).kind == s.kind]
    if not same_kind:
        return None
    if s.kind == "topk":
        return str(min(same_kind, key=lambda m: (abs(m.k - s.k), m.k)))
    if s.kind == "logits":
        return str(same_kind[0])
    return str(min(same_kind, key=lambda m: (abs(m.places - s.places), -m.places)))


def routed_ranking(spec: str | OutputSpec, data: dict[str, Any] | None = None) -> list[Routed]:
    """Every method of the routed benchmark under ``spec`` (or the nearest measured spec of its kind), best first.

    An attack is *detectable* on a model when some method detects it passively at >= the table's
    target; a method *keeps* it when its lowest rate over every router at the table's cost is >= it.
    Summed over the models; best: most kept, then most detected without a router (what is left when no method
    keeps them all), then the highest lowest rate, then ``ROUTED_PREFERENCE``.
    """
    data = routed_table() if data is None else data
    if data is None:
        return []
    s = OutputSpec.parse(spec)
    name = _nearest(s, {sp for run in data["runs"].values() for sp in run["rates"]})
    if name is None:
        return []
    target = float(data["target"])
    acc: dict[str, list[float]] = {}
    for run in data["runs"].values():
        block = run["rates"].get(name)
        if not block:
            continue
        attacks = run["attacks"]
        detectable = [i for i in range(len(attacks)) if any((row["passive"][i] or 0.0) >= target for row in block.values())]
        for method, row in block.items():
            got = acc.setdefault(method, [0, 0, 1.0, 0])
            routed = [0.0 if row["routed"][i] is None else float(row["routed"][i]) for i in detectable]
            got[0] += sum(r >= target for r in routed)
            got[1] += len(detectable)
            got[2] = min([got[2], *routed])
            got[3] += sum((row["passive"][i] or 0.0) >= target for i in detectable)
    rank = {m: i for i, m in enumerate(ROUTED_PREFERENCE)}
    out = [Routed(m, int(k), int(n), float(low), name, int(p)) for m, (k, n, low, p) in acc.items()]
    return sorted(out, key=lambda r: (-r.kept, -r.passive, -r.lowest, rank.get(r.method, len(rank)), r.method))


def _at_defaults() -> set[str] | None:
    """Methods every routed run measured with their default parameters (None: the table does not say)."""
    data = routed_table()
    if data is None or any("at_defaults" not in run for run in data["runs"].values()):
        return None
    return set.intersection(*(set(run["at_defaults"]) for run in data["runs"].values()))


def _choose_routed(s: OutputSpec, reveals: str) -> Choice | None:
    measured = routed_ranking(s)
    defaults = _at_defaults()
    # only a method measured as a fingerprint would generate it by default may be chosen (matched was measured 8-bit)
    ranking = [r for r in measured if defaults is None or r.method in defaults]
    if not ranking:
        return None
    holding = [r for r in ranking if r.holds]
    rank = {m: i for i, m in enumerate(ROUTED_PREFERENCE)}
    if holding:
        chosen = min(holding, key=lambda r: rank.get(r.method, len(rank)))
        line = f"kept >= 99 % detection of all {chosen.detectable} detectable attacks with every router at 5 % cost"
    else:
        chosen = ranking[0]
        line = (
            f"no method kept every attack with every router at 5 % cost; {chosen.method} kept {chosen.kept} of "
            f"{chosen.detectable} detectable attacks at >= 99 % (lowest rate {_pct(chosen.lowest)})"
        )
    others = [r for r in measured if r.method != chosen.method][:3]
    if others:
        line += "; " + ", ".join(f"{r.method} {r.kept} of {r.detectable}" for r in others)
    best_passive = max(measured, key=lambda r: r.passive)
    if best_passive.passive > chosen.passive:
        line += (
            f"; without a router {best_passive.method} detects {best_passive.passive} of {best_passive.detectable}, {chosen.method} {chosen.passive}"
        )
    under = "" if str(s) == chosen.spec else f" (measured under {chosen.spec})"
    why = _WHY.get(chosen.method, "")
    return Choice(
        chosen.method,
        f"{chosen.method} for {s}: the API reveals {reveals}, and {why} "
        f"(adaptive-operator benchmark{under}, MNIST CNN and CIFAR-10 ResNet-56, 10 queries: {line})",
    )


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


def _has_rows(method: str, spec: str | OutputSpec) -> bool:
    _, name = _spec_of(spec)
    return name is not None and any(method in run["rates"].get(name, {}) for run in table()["runs"].values())


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
    if family == "scores":
        routed = _choose_routed(s, reveals)
        if routed is not None:
            return routed
    order = PREFERENCE[family]
    # a method without rows under this spec is strong only by an explicit rule: crossed for label-only specs
    strong = [m for m in order if not misses(m, s) and (_has_rows(m, s) or (family == "labels" and m == "crossed"))]
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
