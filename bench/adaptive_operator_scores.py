"""The score-API plan of the adaptive-operator benchmark: tables, the routers' compute cost, and the advice table.

``python bench/adaptive_operator.py --plan scores`` runs the methods a score API could default to
(``SCORES`` there) against every router, the request-shape routers included, and calls
``write_scores``, which writes:

* ``bench/results/adaptive-operator-scores.md``: per model and output spec, how many of the attacks
  some method detects passively (≥ 99 % at N_S = 10) each method keeps at ≥ 99 % with each router
  at 5 % cost, and the lowest rate; the routers' compute cost; the method each spec gets;
* ``src/tamperprobe/owner/benchmark_routed.json``: the same rates, read by
  ``tamperprobe.owner.advice`` to choose the default method of a score spec.

``python bench/adaptive_operator_scores.py`` rebuilds both from the committed ``adversary.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "adaptive-operator"
SUMMARY = REPO / "bench" / "results" / "adaptive-operator-scores.md"
TABLE = REPO / "src" / "tamperprobe" / "owner" / "benchmark_routed.json"
COST, NS, TARGET = 0.05, 10, 0.99
SETTINGS = ("mnist", "cifar")
# bench label -> registered method (crossed-gradient is `crossed` with its default path=auto on a model with PyTorch weights)
REGISTERED = {"crossed-gradient": "crossed"}
# routers shown but left out of "every router": the contrast of a client that no longer exists (today's sends the ordinary shape)
CONTRAST = ("request-shape-id",)

# What each router needs the operator to run to decide, besides O on the requests it flags (the share c) and T on the rest,
# and which operator it can serve. Whether O runs on every request is the router class's ``runs_original``.
ROUTER_COMPUTE: dict[str, tuple[str, str]] = {
    "exact-repeat": ("a cache of earlier requests (no model)", "cutting cost, planting a trojan"),
    "near-twin": ("a nearest-neighbour search over earlier requests (no model)", "cutting cost, planting a trojan"),
    "margin-original": ("O on every request to read its margin", "planting a trojan only: no compute saving left"),
    "margin-tampered": ("T's own margin (T runs anyway)", "cutting cost, planting a trojan"),
    "gradient": ("O forward and backward on every request", "planting a trojan only: no compute saving left"),
    "learned": ("image statistics and a logistic regression (no model)", "cutting cost, planting a trojan"),
    "request-shape": ("the request's headers, body keys and number format (no model)", "cutting cost, planting a trojan"),
    "request-shape-id": ("the same, against the client before the profiles", "cutting cost, planting a trojan"),
}


def _runs_original(router: str) -> bool:
    from tamperprobe.evaluation.routers import ROUTERS, RequestShapeOldClient, RequestShapeRouter

    classes = {**ROUTERS, "request-shape": RequestShapeRouter, "request-shape-id": RequestShapeOldClient}
    return bool(classes[router].runs_original)


def load(name: str) -> dict[str, Any] | None:
    path = OUT / f"{name}-scores" / "adversary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def rates(doc: dict[str, Any], cost: float = COST, ns: int = NS) -> dict[tuple[str, str, str, str], float]:
    """(method, attack, spec, router) -> detection at ``ns`` queries: the router at ``cost``, or ``passive``."""
    out = {}
    for r in doc["detection"]:
        if r["ns"] != ns:
            continue
        if r["router"] == "passive" or abs(r["cost"] - cost) < 1e-9:
            out[(r["method"], r["attack"], r["spec"], r["router"])] = float(r["rate"])
    return out


def summarise(doc: dict[str, Any]) -> dict[str, Any]:
    """Per spec and method: the passive rate and the worst rate over every router at ``COST``, per attack; and the
    attacks that some method detects passively (the ones a default must keep)."""
    rate = rates(doc)
    methods = [m["method"] for m in doc["methods"] if not m.get("error")]
    attacks = list(dict.fromkeys(a["attack"] for a in doc["attacks"] if not a.get("error")))
    routers = doc["params"]["routers"]
    out: dict[str, Any] = {"attacks": attacks, "routers": routers, "specs": {}}
    for spec in doc["params"]["specs"]:
        per: dict[str, Any] = {}
        for m in methods:
            passive = [rate.get((m, a, spec, "passive")) for a in attacks]
            by_router = {r: [rate.get((m, a, spec, r)) for a in attacks] for r in routers}
            counted = [r for r in routers if r not in CONTRAST]
            worst = [min((by_router[r][i] for r in counted if by_router[r][i] is not None), default=None) for i in range(len(attacks))]
            per[m] = {"passive": passive, "worst": worst, "by_router": by_router}
        detectable = [a for i, a in enumerate(attacks) if any((per[m]["passive"][i] or 0.0) >= TARGET for m in methods)]
        out["specs"][spec] = {"methods": per, "detectable": detectable}
    return out


def kept(s: dict[str, Any], spec: str, m: str, attacks: list[str], key: str = "worst", router: str | None = None) -> tuple[int, float]:
    """(attacks of ``s``'s detectable ones that ``m`` keeps at ≥ target, the lowest rate over them) under the worst router."""
    row = s["specs"][spec]["methods"][m]
    values = row["by_router"][router] if router else row[key]
    picked = [values[attacks.index(a)] for a in s["specs"][spec]["detectable"]]
    picked = [0.0 if v is None else v for v in picked]
    return sum(v >= TARGET for v in picked), min(picked, default=1.0)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _md_spec(name: str, s: dict[str, Any], spec: str) -> list[str]:
    det = s["specs"][spec]["detectable"]
    routers = s["routers"]
    header = ["method", "passive", *routers, "every router"]
    rows = []
    for m in s["specs"][spec]["methods"]:
        cells = [m]
        k, low = kept(s, spec, m, s["attacks"], key="passive")
        cells.append(f"{k}/{len(det)} ({low:.2f})")
        for r in routers:
            k, low = kept(s, spec, m, s["attacks"], router=r)
            cells.append(f"{k}/{len(det)} ({low:.2f})")
        k, low = kept(s, spec, m, s["attacks"])
        cells.append(f"**{k}/{len(det)} ({low:.2f})**")
        rows.append(cells)
    return [f"**{name}, {spec}** — detectable: {', '.join(det) or 'none'}", "", *_table(header, rows), ""]


def _md_flagged(doc: dict[str, Any], routers: list[str]) -> list[str]:
    """Share of each method's markers each router flags at ``COST`` (mean over folds and attacks), against the cost paid."""
    got = {(r["method"], r["router"]): r for r in doc["flagged"] if abs(r["cost"] - COST) < 1e-9}
    methods = [m["method"] for m in doc["methods"] if not m.get("error")]
    rows = []
    for m in methods:
        cells: list[Any] = [m]
        for r in routers:
            row = got.get((m, r))
            cells.append("–" if row is None else f"{100 * row['flagged']:.0f} % ({100 * row['measured_cost']:.1f} %)")
        rows.append(cells)
    return [
        f"Markers flagged at {100 * COST:g} % cost (in brackets: the share of held-out ordinary traffic flagged, what the operator paid):",
        "",
        *_table(["method", *routers], rows),
        "",
    ]


def _md_compute(docs: dict[str, dict[str, Any]]) -> list[str]:
    paid: dict[str, list[str]] = {}
    for doc in docs.values():
        for r in doc["routers"]:
            if abs(r["cost"] - COST) < 1e-9:
                paid.setdefault(r["router"], []).append(f"{100 * r['measured_cost']:.1f} %")
    rows = []
    for router, (runs, motive) in ROUTER_COMPUTE.items():
        if router in paid:
            o_share = "1 (every request)" if _runs_original(router) else "c (the flagged)"
            rows.append([f"`{router}`", motive, runs, o_share, " / ".join(paid[router])])
    header = ["router", "serves the motive", "what it runs to decide", "share of requests O runs on", "c paid at 5 % (MNIST / CIFAR)"]
    return _table(header, rows)


def routed_table(docs: dict[str, dict[str, Any]], summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    runs = {}
    for name, doc in docs.items():
        s = summaries[name]
        spec_rates: dict[str, Any] = {}
        for spec, block in s["specs"].items():
            spec_rates[spec] = {
                REGISTERED.get(m, m): {"passive": row["passive"], "routed": row["worst"]} for m, row in sorted(block["methods"].items())
            }
        runs[f"adaptive-operator/{name}-scores"] = {
            "model": doc["model"]["source"],
            "attacks": s["attacks"],
            "routers": s["routers"],
            "at_defaults": _at_defaults(doc),
            "rates": spec_rates,
        }
    return {"format": "tamperprobe.benchmark-routed/v1", "queries": NS, "cost": COST, "target": TARGET, "runs": runs}


def _at_defaults(doc: dict[str, Any]) -> list[str]:
    """The methods this run measured with their default parameters (what a fingerprint gets when the advice picks them)."""
    from tamperprobe.owner.methods import get_method

    out = []
    for row in doc["methods"]:
        name = REGISTERED.get(row["method"], row["method"])
        if not row.get("error") and row["params"] == get_method(name).validated():
            out.append(name)
    return sorted(out)


def render(table: dict[str, Any]) -> str:
    return json.dumps(table, indent=1, sort_keys=False) + "\n"


def section(settings: list[str] | tuple[str, ...] = SETTINGS) -> list[str]:
    """The part of ``adaptive-operator.md`` on score APIs: the routers' compute cost and the method each score spec gets."""
    docs = {name: doc for name in settings if (doc := load(name)) is not None}
    if not docs:
        return []
    summaries = {name: summarise(doc) for name, doc in docs.items()}
    return [
        "## Score APIs, the request-shape router, and what each router costs in compute",
        "",
        "From the score plan (`python bench/adaptive_operator.py --plan scores`; every table: "
        "[adaptive-operator-scores.md](adaptive-operator-scores.md)).",
        "",
        *_md_compute(docs),
        "",
        *_md_choice(routed_table(docs, summaries), summaries),
    ]


def _md_choice(table: dict[str, Any], summaries: dict[str, dict[str, Any]]) -> list[str]:
    from tamperprobe.owner.advice import choose_method, routed_ranking

    rows = []
    for spec in dict.fromkeys(sp for s in summaries.values() for sp in s["specs"]):
        ranking = routed_ranking(spec, table)
        cells = [f"{r.method}: {r.kept}/{r.detectable} ({r.lowest:.2f}; passive {r.passive})" for r in ranking]
        holding = [r.method for r in ranking if r.holds]
        rows.append([spec, ", ".join(holding) or "none", f"`{choose_method(spec).method}`", "; ".join(cells)])
    at_defaults = sorted(set.intersection(*(set(run["at_defaults"]) for run in table["runs"].values())))
    header = ["spec", "methods that keep every attack", "default", "kept / detectable (lowest rate; passive: kept without a router), best first"]
    return [
        "### The method each score spec gets (both models, every router at 5 %)",
        "",
        *_table(header, rows),
        "",
        "Default (`tamperprobe.owner.advice.choose_method`; label-only specs keep `crossed`): among the methods measured with "
        f"their default parameters ({', '.join(at_defaults)}; `matched` was measured 8-bit, `crossed` on gradient paths), the "
        "first of `ROUTED_PREFERENCE` that keeps every attack, else the one that keeps the most, then detects the most without "
        "a router. Totals over both models (the `request-shape-id` contrast left out of `every router`).",
        "",
    ]


def write_scores(settings: list[str] | tuple[str, ...] = SETTINGS) -> Path:
    """``adaptive-operator-scores.md`` and ``benchmark_routed.json`` from the committed score-plan results."""
    docs = {name: doc for name in settings if (doc := load(name)) is not None}
    summaries = {name: summarise(doc) for name, doc in docs.items()}
    lines = [
        "# Score APIs against an operator who routes: the score plan of the adaptive-operator benchmark",
        "",
        "Produced by `python bench/adaptive_operator.py --plan scores` (tables: `python bench/adaptive_operator_scores.py`). "
        f"Cell: of the attacks some method detects passively at ≥ 99 % with N_S = {NS} queries under that spec on that model, "
        f"how many the method still detects at ≥ 99 % with the router at {100 * COST:g} % cost, and (in brackets) its lowest "
        "rate over them. `every router`: the worst router for each attack, `request-shape-id` (a contrast) left out. Markers selected as a fingerprint selects them "
        "(manc); the request-shape routers score the markers as the verifier's client sends them "
        "(`tamperprobe`: the default client profile, the ordinary client's requests; `tamperprobe-id`: the client before the "
        "profiles, with an `id` key and its own `Accept`).",
        "",
        "## What each router costs the operator in compute",
        "",
        "The cost c is the share of ordinary traffic sent to the original model O. A router that must run O on every request "
        "to decide (its margin, its gradient) leaves no compute saving to a cheaper tampered model (quantized, pruned): it only "
        "serves an operator who wants T's different answers (a trojan, poisoning) and pays for O and T on every request.",
        "",
        *_md_compute(docs),
        "",
    ]
    table = routed_table(docs, summaries)
    if docs:  # first: the choice column asks the advice, which reads the shipped table
        from tamperprobe.owner.advice import routed_table as shipped

        TABLE.write_text(render(table), encoding="utf-8")
        shipped.cache_clear()
    lines += _md_choice(table, summaries)
    for name in settings:
        if name not in summaries:
            lines += [f"## {name}: not run", ""]
            continue
        doc = docs[name]
        lines += [f"## {name}: {doc['model'].get('model', doc['model']['source'])}", ""]
        lines += [f"- took {doc['seconds']:.0f} s; errors: {len(doc['errors'])}; bag {doc['params']['bag']}; attacks "
                  f"{', '.join(summaries[name]['attacks'])}", ""]  # fmt: skip
        lines += _md_flagged(doc, summaries[name]["routers"])
        for spec in summaries[name]["specs"]:
            lines += _md_spec(name, summaries[name], spec)
    SUMMARY.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return SUMMARY


if __name__ == "__main__":
    print(write_scores())
    sys.exit(0)
