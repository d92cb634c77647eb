"""The summary of ``bench/adaptive_operator.py``: ``bench/results/adaptive-operator.md`` from the committed ``adversary.json`` files.

One section per setting (``_model_section``), built from one function per table; ``write_summary``
writes the file (``python bench/adaptive_operator.py --summary-only`` rebuilds it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "adaptive-operator"
SUMMARY = REPO / "bench" / "results" / "adaptive-operator.md"
NOTES = OUT / "notes.md"  # hand-written conclusion, included in the summary
SPECS = ("top1", "topk:3", "probs:2", "logits")


def _load(name: str) -> dict[str, Any] | None:
    p = OUT / name / "adversary.json"
    return json.loads(p.read_text()) if p.exists() else None


def _pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f} %"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    from tamperprobe.evaluation.report import md_table

    return [md_table(header, rows), ""]


class _Index:
    """Lookups into one adversary.json."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.rates = {(r["method"], r["attack"], r["spec"], r["router"], round(r["cost"], 9), r["ns"]): r["rate"] for r in doc["detection"]}
        self.methods = list(dict.fromkeys(r["method"] for r in doc["detection"]))
        self.attacks = list(dict.fromkeys(r["attack"] for r in doc["detection"]))
        self.routers = [r for r in dict.fromkeys(r["router"] for r in doc["detection"]) if r != "passive"]
        self.costs = doc["params"]["costs"]
        self.top = doc["params"]["budgets"][-1]
        self.breaking = {(r["method"], r["attack"], r["spec"], r["router"]): r for r in doc["breaking"]}
        self.flagged = {(r["method"], r["router"], round(r["cost"], 9)): r for r in doc["flagged"]}
        self.paid = {(r["router"], round(r["cost"], 9)): r for r in doc["routers"]}

    def rate(self, m: str, a: str, spec: str, router: str, cost: float, ns: int) -> float | None:
        return self.rates.get((m, a, spec, router, round(cost, 9), ns))


def _acceptance_rows(ix: _Index) -> tuple[list[list[Any]], float]:
    """Per method: the largest drop (pp) of detection under exact-repeat / near-twin at every sweep cost whose *paid* cost is <= 1 %."""
    rows, worst = [], 0.0
    for m in ix.methods:
        cells: list[Any] = []
        for r in ("exact-repeat", "near-twin"):
            low = [c for c in ix.costs if (ix.flagged.get((m, r, round(c, 9))) or {}).get("measured_cost", 1.0) <= 0.01 + 1e-12]
            if not low:  # even the strictest threshold pays more than 1 % on held-out traffic: report that one
                low = [min(ix.costs)]
            drop, where = 0.0, ""
            for a in ix.attacks:
                for spec in SPECS:
                    for ns in ix.doc["params"]["budgets"]:
                        p = ix.rate(m, a, spec, "passive", 0.0, ns)
                        for c in low:
                            v = ix.rate(m, a, spec, r, c, ns)
                            if p is not None and v is not None and p - v > drop:
                                drop, where = p - v, f"{a}, {spec}, N_S={ns}"
            if m in _CLEAN:
                worst = max(worst, drop)
            paid = max(((ix.flagged.get((m, r, round(c, 9))) or {}).get("measured_cost", 0.0) for c in low), default=0.0)
            flagged = max(((ix.flagged.get((m, r, round(c, 9))) or {}).get("flagged", 0.0) for c in low), default=0.0)
            cells.append(
                f"{100 * drop:.1f}" + (f" ({where})" if drop > 0.01 else "") + f"; paid ≤ {_pct(paid)}, markers flagged ≤ {_pct(flagged, 0)}"
            )
        rows.append([m, *cells, "yes" if m in _CLEAN else "no (pairs of near-twins)"])
    return rows, worst


_CLEAN = (
    "natural",
    "badv",
    "boundary-single",
    "crossed",
    "crossed-gradient",
    "crossed-edge",
    "matched",
    "matched-grid",
)  # methods without near-twins by design


def _line(ix: _Index, spec: str, costs: tuple[float, ...] = (0.01, 0.05, 0.2)) -> list[list[Any]]:
    """The line: per method, the attacks detected at >= 99 % at the largest budget, passively and under each router at each cost."""
    rows = []
    short = {a: a.replace("poison-generic", "poison").replace("finetune", "ft") for a in ix.attacks}
    for m in ix.methods:
        row: list[Any] = [m]
        detected = [a for a in ix.attacks if (ix.rate(m, a, spec, "passive", 0.0, ix.top) or 0) >= 0.99]
        row.append(", ".join(short[a] for a in detected) or "none")
        for r in ix.routers:
            cells = []
            for c in costs:
                kept = [a for a in detected if (ix.rate(m, a, spec, r, c, ix.top) or 0) >= 0.99]
                cells.append(f"{len(kept)}/{len(detected)}" if detected else "–")
            row.append(" · ".join(cells))
        rows.append(row)
    return rows


def price(ix: _Index, m: str, router: str, spec: str, attacks: list[str] | None = None) -> str:
    """The operator's price: the cheapest sweep cost at which one of the attacks the method detects passively at >= 99 % drops below it."""
    rows = [ix.breaking.get((m, a, spec, router)) for a in (attacks or ix.attacks)]
    rows = [r for r in rows if r is not None and r["status"] != "passive below target"]
    if not rows:
        return "–"
    falls = [r for r in rows if r["status"] == "falls"]
    if not falls:
        return "> 50 %"
    cheapest = min(falls, key=lambda r: (r["cost"], r["attack"]))
    return (
        f"{100 * cheapest['cost']:g} % ({cheapest['measured_cost']:.1%} paid; {cheapest['attack']})"
        if cheapest["cost"]
        else f"free ({cheapest['attack']})"
    )


def _breaking_table(ix: _Index, spec: str, attacks: list[str]) -> list[list[Any]]:
    from tamperprobe.evaluation.adversary_report import breaking_cell

    routers = [r for r in ("margin-original", "margin-tampered", "gradient", "learned", "near-twin") if r in ix.routers]
    return [[m, a] + [breaking_cell(ix.breaking.get((m, a, spec, r))) for r in routers] for m in ix.methods for a in attacks]


def _md_setting(name: str, doc: dict[str, Any], ix: _Index, reduced: str) -> list[str]:
    """The setting, then the markers as the operator sees them."""
    p, info = doc["params"], doc["model"]
    run = OUT / name / "run.json"
    stamp = json.loads(run.read_text()) if run.exists() else {}
    lines = [
        f"## {name}: {info.get('model', info.get('source'))}",
        "",
        f"- owner accuracy {info.get('accuracy_owner', 0):.3f}; owner data {p['data']['size']} images; traffic {p['traffic']}; attack data "
        f"{(p.get('attack_data') or {}).get('name')} ({(p.get('attack_data') or {}).get('size')} images)",
        f"- bag {p['bag']} markers per method (pairs count as two), random selection, {p['resamples']} resamples; {p['trials']} trial(s) per random attack; "
        f"fresh markers every run; took {doc['seconds']:.0f} s (+ {stamp.get('seconds_repeat', '?')} s for the repeated-marker run; "
        f"{stamp.get('seconds_total', '?')} s in all with training and loading) on {doc['machine'].get('nproc')} cores, "
        f"{doc['machine'].get('torch_threads')} torch thread",
        f"- reduced for the time budget: {reduced}",
        f"- every table: [{name}/adversary.md](adaptive-operator/{name}/adversary.md); errors: {len(doc['errors'])}"
        + ("".join(f"; {e['name']}: {e['error']}" for e in doc["errors"])),
        "",
        "### Markers as the operator sees them",
        "",
    ]
    lines += _table(
        ["method", "markers", "margin median (ordinary)", "KS p vs ordinary margins", "max L∞ to seed", "twin distance"]
        + [f"{r} @1 %" for r in ("near-twin", "margin-original", "gradient", "learned")],
        [
            [
                r["method"],
                r.get("markers"),
                f"{r.get('margin_median', 0):.2g} ({r.get('ordinary_margin_median', 0):.2g})" if r.get("margin_median") is not None else None,
                f"{r['margin_ks_p']:.2g}" if r.get("margin_ks_p") is not None else None,
                r.get("linf_to_seed_max"),
                r.get("twin_distance_median"),
            ]
            + [
                _pct((ix.flagged.get((r["method"], router, 0.01)) or {}).get("flagged"), 0)
                for router in ("near-twin", "margin-original", "gradient", "learned")
            ]
            for r in doc["methods"]
        ],
    )
    return lines


def _md_costs(ix: _Index) -> list[str]:
    lines: list[str] = []
    lines += [
        "### What the routers cost",
        "",
        "Share of ordinary traffic flagged: asked for → calibration part / held-out part (mean over methods, folds and attacks).",
        "",
    ]
    lines += _table(
        ["router"] + [f"{c:.2%}" for c in (0.01, 0.05, 0.2)],
        [
            [r]
            + [
                f"{_pct(ix.paid[(r, c)]['calibration_cost'])} / {_pct(ix.paid[(r, c)]['measured_cost'])}" if (r, c) in ix.paid else "–"
                for c in (0.01, 0.05, 0.2)
            ]
            for r in ix.routers
        ],
    )
    return lines


def _md_attacks(doc: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    lines += ["### Attacks", ""]
    lines += _table(
        [
            "attack",
            "acc before",
            "acc after",
            "success",
            "ordinary traffic changed: top1",
            "topk:3",
            "probs:2",
            "top1 above the 20 % margin quantile",
        ],
        [
            [
                r["attack"],
                r.get("acc_before"),
                r.get("acc_after"),
                r.get("success"),
                _pct(r.get("ordinary_changed:top1")),
                _pct(r.get("ordinary_changed:topk:3")),
                _pct(r.get("ordinary_changed:probs:2")),
                _pct(r.get("ordinary_top1_changed_above_q0.2")),
            ]
            for r in doc["attacks"]
        ],
    )
    return lines


def _md_acceptance(ix: _Index, repeat: dict[str, Any] | None) -> list[str]:
    lines: list[str] = []
    rows, worst = _acceptance_rows(ix)
    lines += [
        "### Exact-repeat and near-twin routers at ≤ 1 % cost, fresh markers",
        "",
        "Largest drop of the detection rate against the passive case, in percentage points, over every attack, spec, budget "
        "and every threshold of the sweep whose cost *paid on held-out traffic* is ≤ 1 % (where it happens; the largest cost paid "
        "and share of the method's markers flagged at those thresholds); when even the strictest threshold (cost 0 on the "
        f"calibration part) pays more, that threshold. Methods built without near-twins: largest drop {100 * worst:.1f} pp.",
        "",
    ]
    lines += _table(["method", "exact-repeat", "near-twin", "no near-twins by design"], rows)
    if repeat is not None:
        rx = _Index(repeat)
        lines += ["With the same markers re-sent every run (today's `watch`), detection at N_S = 10 (top1 / logits):", ""]
        lines += _table(
            ["method", "attack", "passive"] + [f"{r} @1 %" for r in rx.routers],
            [
                [m, a, f"{rx.rate(m, a, 'top1', 'passive', 0.0, 10):.2f} / {rx.rate(m, a, 'logits', 'passive', 0.0, 10):.2f}"]
                + [f"{rx.rate(m, a, 'top1', r, 0.01, 10):.2f} / {rx.rate(m, a, 'logits', r, 0.01, 10):.2f}" for r in rx.routers]
                for m in rx.methods
                for a in rx.attacks
            ],
        )
    return lines


def _md_lines(ix: _Index) -> list[str]:
    lines: list[str] = []
    for spec in ("top1", "topk:3", "probs:2"):
        lines += [
            f"### The line ({spec}): attacks detected at ≥ 99 % with N_S = {ix.top}",
            "",
            "Passive: the attacks a method detects at ≥ 99 % without a router. Router columns: how many of those it still detects at "
            "≥ 99 % with the router at 1 % · 5 % · 20 % cost.",
            "",
        ]
        lines += _table(["method", "passive"] + ix.routers, _line(ix, spec))
    return lines


def _md_price(ix: _Index) -> list[str]:
    lines: list[str] = []
    lines += [
        "### The operator's price",
        "",
        f"Per method and router: the cheapest cost (asked for; paid on held-out traffic; for which attack) at which detection at N_S = {ix.top} "
        "of one of the attacks the method detects at ≥ 99 % without a router falls below 99 %. 'free': already at a threshold that flags no "
        "calibration request; '> 50 %': never within the sweep; '–': the method detects no attack at ≥ 99 % even without a router.",
        "",
    ]
    for spec in ("top1", "topk:3", "probs:2"):
        lines += [f"**{spec}**", ""]
        lines += _table(["method"] + ix.routers, [[m] + [price(ix, m, r, spec) for r in ix.routers] for m in ix.methods])
    return lines


def _md_breaking(ix: _Index) -> list[str]:
    lines: list[str] = []
    lines += [
        f"### Cost at which detection at N_S = {ix.top} falls below 99 %",
        "",
        "Cost asked for (paid on held-out traffic). '> sweep': still ≥ 99 % at 50 %; 'passive x': below 99 % without a router.",
        "",
    ]
    for spec in ("top1", "topk:3", "probs:2"):
        lines += [f"**{spec}**", ""]
        routers = [r for r in ("margin-original", "margin-tampered", "gradient", "learned", "near-twin") if r in ix.routers]
        lines += _table(["method", "attack"] + routers, _breaking_table(ix, spec, ix.attacks))
    return lines


def _md_matched(doc: dict[str, Any], ix: _Index) -> list[str]:
    lines: list[str] = []
    lines += ["### Margin-matched markers against the margin routers (top1), and why", ""]
    need = 1 - 0.01 ** (1 / ix.top)
    lines += [
        f"For 99 % detection with {ix.top} queries, each marker must change with probability at least {need:.1%} (1 − 0.01^(1/{ix.top})). "
        "Margin-matched markers have the margins of ordinary inputs, and under top1 they change about as often as ordinary inputs "
        "above the router's margin quantile do (table: share of markers whose top-1 answer changed, and of held-out ordinary traffic).",
        "",
    ]
    trig: dict[tuple[str, str], list[float]] = {}
    for r in doc["trigger"]:
        if r["spec"] == "top1":
            trig.setdefault((r["method"], r["attack"]), []).append(r["changed"] / max(1, r["markers"]))
    att = {r["attack"]: r for r in doc["attacks"]}
    matched = [m for m in ix.methods if m.startswith("matched")] + ["natural"]
    lines += _table(
        ["attack"]
        + [f"{m}: markers changed" for m in matched]
        + ["ordinary changed", "ordinary above q20 changed"]
        + [f"{m}: detection N_S={ix.top} passive / margin-original @5 % / @20 %" for m in matched],
        [
            [a]
            + [_pct(float(np.mean(trig[(m, a)]))) if (m, a) in trig else "–" for m in matched]
            + [_pct(att.get(a, {}).get("ordinary_changed:top1")), _pct(att.get(a, {}).get("ordinary_top1_changed_above_q0.2"))]
            + [
                " / ".join(
                    f"{v:.2f}" if v is not None else "–"
                    for v in (
                        ix.rate(m, a, "top1", "passive", 0.0, ix.top),
                        ix.rate(m, a, "top1", "margin-original", 0.05, ix.top),
                        ix.rate(m, a, "top1", "margin-original", 0.2, ix.top),
                    )
                )
                for m in matched
            ]
            for a in ix.attacks
        ],
    )
    return lines


def _md_pairs(doc: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if doc.get("pairs"):
        lines += ["### Pairs: what the label-only guarantee became", ""]
        summed: dict[tuple[str, str], dict[str, int]] = {}
        for r in doc["pairs"]:
            acc = summed.setdefault((r["method"], r["attack"]), {})
            for k in ("pairs", "shifted", "shifted_opposite", "silent_shifted", "silent_shifted_same_sign"):
                acc[k] = acc.get(k, 0) + int(r[k])
        lines += [
            "Shifted: z_a − z_c moved by more than both halves' margins at both halves; silent: no half's top-1 label changed.",
            "",
        ]
        lines += _table(
            ["method", "attack", "pairs", "shifted", "of which opposite signs", "shifted and silent", "shifted, same sign, silent"],
            [
                [m, a, v["pairs"], v["shifted"], v["shifted_opposite"], v["silent_shifted"], v["silent_shifted_same_sign"]]
                for (m, a), v in summed.items()
            ],
        )
    return lines


def _model_section(name: str, doc: dict[str, Any], repeat: dict[str, Any] | None, reduced: str) -> list[str]:
    ix = _Index(doc)
    return [
        *_md_setting(name, doc, ix, reduced),
        *_md_costs(ix),
        *_md_attacks(doc),
        *_md_acceptance(ix, repeat),
        *_md_lines(ix),
        *_md_price(ix),
        *_md_breaking(ix),
        *_md_matched(doc, ix),
        *_md_pairs(doc),
    ]


def write_summary(settings: list[str], reduced: dict[str, str]) -> Path:
    """``adaptive-operator.md`` from the ``adversary.json`` of each setting run (``reduced``: what each run cut, by setting)."""
    lines = [
        "# An operator who sees the queries: the adaptive-operator benchmark",
        "",
        "Produced by `python bench/adaptive_operator.py` (see its docstring for the setup of each model); the harness is "
        "`tamperprobe.evaluation.adversary` (protocol in its docstring) with the routers of `tamperprobe.evaluation.routers`. "
        "Detection rate at N_S: the share of resampled fingerprints of N_S queries (pairs picked whole) holding a marker whose "
        "answer changed and that the router did not flag. Cost: the share of ordinary traffic the router sends to the original "
        "model, asked for on the calibration part and paid on a held-out part.",
        "",
        "Methods (bench labels): `natural` (TamperNN SM), `badv` (TamperNN BADV), `boundary` (blend pairs, the default for "
        "label-only APIs until 2026-11-22), `boundary-single` (`pairs=false`), `crossed` (pair halves from different blend paths, "
        "`path=blend`), `crossed-gradient` (pair halves from different gradient paths: `crossed` with its default `path=auto` "
        "on a model with PyTorch weights, the default for label-only APIs), `crossed-edge` (crossed pairs "
        "on L∞ ≤ 8/255 gradient paths around natural seeds, 8-bit on MNIST), `matched` (margin-matched, natural seeds moved "
        "within L∞ ≤ 8/255, 8-bit), `matched-grid` (margin-matched from random-bit images, 8-bit).",
        "",
    ]
    if NOTES.exists():
        lines += [NOTES.read_text(encoding="utf-8").strip(), ""]
    from adaptive_operator_scores import section

    lines += section()
    for name in settings:
        doc = _load(name)
        if doc is None:
            lines += [f"## {name}: not run", ""]
            continue
        lines += _model_section(name, doc, _load(f"{name}-repeat"), reduced[name])
    SUMMARY.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return SUMMARY
