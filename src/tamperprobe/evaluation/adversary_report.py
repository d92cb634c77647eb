"""Writing the adversary harness's results out: ``adversary.md``, one CSV file per table, ``adversary.json``.

``write_adversary_report(evaluation, out_dir)`` is the entry point; ``markdown`` builds the report
from one function per section, as ``report.markdown`` does for a campaign. ``COSTS`` are the
operator costs the tables show (every cost of the sweep is in ``detection.csv``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._util import atomic_write_text
from .report import fmt_cell, md_table, write_csv
from .results import PASSIVE, AdversaryEvaluation, BreakingRow

COSTS = (0.01, 0.05, 0.2)  # the operator costs the tables show

CSV_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "methods.csv": (
        "methods",
        (
            "method",
            "markers",
            "units",
            "group_size",
            "margin_median",
            "ordinary_margin_median",
            "margin_ks",
            "margin_ks_p",
            "linf_to_seed_max",
            "twin_distance_median",
            "params",
            "error",
        ),
    ),
    "attacks.csv": ("attacks", ("attack", "trial", "seed", "acc_before", "acc_after", "success", "changed", "params", "error")),
    "routers.csv": ("routers", ("router", "cost", "calibration_cost", "measured_cost")),
    "flagged.csv": ("flagged", ("method", "router", "cost", "calibration_cost", "measured_cost", "flagged")),
    "trigger.csv": ("trigger", ("method", "attack", "trial", "spec", "changed", "markers")),
    "pairs.csv": ("pairs", ("method", "attack", "trial", "pairs", "shifted", "shifted_opposite", "silent_shifted", "silent_shifted_same_sign")),
    "detection.csv": ("detection", ("method", "attack", "spec", "router", "cost", "measured_cost", "ns", "rate", "trials")),
    "breaking.csv": ("breaking", ("method", "attack", "spec", "router", "ns", "passive", "status", "cost", "measured_cost", "rate")),
    "errors.csv": ("errors", ("stage", "name", "error")),
}


def write_adversary_report(ev: AdversaryEvaluation, out_dir: str | os.PathLike, *, costs: Sequence[float] = COSTS) -> list[Path]:
    """Write ``adversary.md``, one CSV per table and ``adversary.json`` into ``out_dir``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_csv(out / name, getattr(ev, attr), cols) for name, (attr, cols) in CSV_TABLES.items()]
    written.append(atomic_write_text(out / "adversary.json", json.dumps(ev.to_json(), separators=(",", ":"), allow_nan=False)))
    written.append(atomic_write_text(out / "adversary.md", markdown(ev, costs)))
    return written


def markdown(ev: AdversaryEvaluation, costs: Sequence[float] = COSTS) -> str:
    """The report: setup, markers as the operator sees them, router costs, flagged shares, detection tables, breaking costs."""
    sections = [
        _md_header(ev),
        _md_markers(ev),
        _md_attacks(ev),
        _md_router_costs(ev),
        _md_flagged(ev, costs),
        _md_detection(ev, costs),
        _md_pairs(ev),
        _md_breaking(ev),
        _md_errors_and_timings(ev),
    ]
    return "\n".join(line for section in sections for line in section) + "\n"


def breaking_cell(row: BreakingRow | dict[str, Any] | None) -> str:
    """A breaking-cost table cell: the cost asked for (measured) at which detection falls below the target.

    ``row`` is a ``BreakingRow`` or its JSON object (``adversary.json``), as the benchmarks read it back.
    """
    if row is None:
        return "–"
    if row["status"] == "passive below target":
        return f"passive {row['passive']:.2f}"
    if row["status"] == "never":
        return "> sweep"
    return f"{row['cost']:.2%} ({row['measured_cost']:.2%})"


def _md_header(ev: AdversaryEvaluation) -> list[str]:
    p = ev.params
    return [
        f"# An operator who sees the queries: {ev.model.get('source')}",
        "",
        f"- started {ev.started}, took {ev.seconds:.0f} s on {ev.machine.get('nproc')} cores ({ev.machine.get('cpu')}, torch {ev.machine.get('torch')})",
        f"- owner data {p['data']['name']} ({p['data']['size']} inputs, marker seeds); ordinary traffic {p['traffic']}; attack data "
        + (f"{p['attack_data']['name']} ({p['attack_data']['size']})" if p.get("attack_data") else "the owner data"),
        f"- bag {p['bag']} per method; {p['select']} selection over {p['resamples']} resamples; budgets N_S = {p['budgets']}; "
        f"markers {'fresh every run (never re-sent)' if p['reuse'] == 'fresh' else 'repeated every run'}; learned router cross-fitted over {p['folds']} folds",
        f"- routers {', '.join(p['routers'])}; thresholds set on the calibration part for costs {[f'{c:.2%}' for c in p['costs']]}; "
        "costs paid measured on the held-out part",
        "",
    ]


def _md_markers(ev: AdversaryEvaluation) -> list[str]:
    columns = ("markers", "units", "margin_median", "ordinary_margin_median", "margin_ks")
    rows = [
        [r["method"], *(r.get(k) for k in columns)]
        + [
            None if r.get("margin_ks_p") is None else f"{r['margin_ks_p']:.2g}",
            r.get("linf_to_seed_max"),
            r.get("twin_distance_median"),
            r.get("error"),
        ]
        for r in ev.methods
    ]
    header = ["method", "markers", "units", "margin median", "ordinary median", "KS D", "KS p", "max L∞ to seed", "twin distance", "error"]
    return [
        "## Markers as the operator sees them",
        "",
        "Margin: top-1 minus top-2 logit of the original model; KS: two-sample Kolmogorov–Smirnov test of the markers' margins "
        "against the ordinary traffic's (p > 0.05: indistinguishable at 5 %). L∞ to seed in units of the input range; twin "
        "distance: L2 between the members of a unit.",
        "",
        md_table(header, rows),
    ]


def _md_attacks(ev: AdversaryEvaluation) -> list[str]:
    specs = ev.params["specs"]
    spec_keys = [f"ordinary_changed:{x}" for x in specs]
    header = ["attack", "trial", "acc before", "acc after", "success"] + [f"ordinary changed ({x})" for x in specs] + ["error"]
    rows = [
        [r["attack"], r["trial"], r.get("acc_before"), r.get("acc_after"), r.get("success")] + [r.get(k) for k in spec_keys] + [r.get("error")]
        for r in ev.attacks
    ]
    return ["", "## Attacks", "", md_table(header, rows)]


def _md_router_costs(ev: AdversaryEvaluation) -> list[str]:
    costs = ev.params["costs"]
    _, _, routers = ev.names()
    cost_of_row = {(r.router, r.cost): r for r in ev.routers}

    def cell(r: str, c: float) -> str | None:
        row = cost_of_row.get((r, c))
        return None if row is None else f"{row.calibration_cost:.2%} / {row.measured_cost:.2%}"

    return [
        "",
        "## What each router costs",
        "",
        "Share of ordinary traffic flagged (answered by the original model): on the calibration part / on the held-out part.",
        "",
        md_table(["router"] + [f"{c:.2%}" for c in costs], [[r] + [cell(r, c) for c in costs] for r in routers]),
    ]


def _md_flagged(ev: AdversaryEvaluation, costs: Sequence[float]) -> list[str]:
    methods, _, routers = ev.names()
    fl = {(r.method, r.router, r.cost): r.flagged for r in ev.flagged}
    header = ["method"] + [f"{r} @{c:.0%}" for r in routers for c in costs]
    return [
        "",
        "## Share of markers each router flags",
        "",
        md_table(header, [[m] + [fl.get((m, r, c)) for r in routers for c in costs] for m in methods]),
    ]


def _curve_cell(ev: AdversaryEvaluation, m: str, a: str, spec: str, r: str, c: float, budgets: Sequence[int]) -> str:
    rates = [ev.rate(m, a, spec, r, c, ns) for ns in budgets]
    return " / ".join(fmt_cell(x, 2) for x in rates)


def _md_detection(ev: AdversaryEvaluation, costs: Sequence[float]) -> list[str]:
    """The first spec: one table per router with the rate at every budget; the others: the rate at the largest budget."""
    p = ev.params
    methods, attacks, routers = ev.names()
    budgets, top = p["budgets"], p["budgets"][-1]
    lines: list[str] = []
    body: list[list[Any]]
    for spec in p["specs"]:
        lines += ["", f"## Detection ({spec})", ""]
        if spec == p["specs"][0]:
            lines += [f"Each cell: detection rate at N_S = {' / '.join(map(str, budgets))}.", ""]
            for r in routers:
                header = ["method", "attack", PASSIVE] + [f"{r} @{c:.0%}" for c in costs]
                body = [
                    [m, a, _curve_cell(ev, m, a, spec, PASSIVE, 0.0, budgets)] + [_curve_cell(ev, m, a, spec, r, c, budgets) for c in costs]
                    for m in methods
                    for a in attacks
                ]
                lines += [f"**{r}**", "", md_table(header, body), ""]
        else:
            header = ["method", "attack", PASSIVE] + [f"{r} @{c:.0%}" for r in routers for c in costs]
            body = [
                [m, a, ev.rate(m, a, spec, PASSIVE, 0.0, top), *[ev.rate(m, a, spec, r, c, top) for r in routers for c in costs]]
                for m in methods
                for a in attacks
            ]
            lines += [f"Detection rate at N_S = {top}.", "", md_table(header, body), ""]
    return lines


PAIR_COUNTS = ("pairs", "shifted", "shifted_opposite", "silent_shifted", "silent_shifted_same_sign")


def _md_pairs(ev: AdversaryEvaluation) -> list[str]:
    if not ev.pairs:
        return []
    summed: dict[tuple[str, str], dict[str, int]] = {}
    for row in ev.pairs:
        acc = summed.setdefault((row.method, row.attack), {})
        for k in PAIR_COUNTS:
            acc[k] = acc.get(k, 0) + int(row[k])
    header = ["method", "attack", "pairs", "shifted", "shifted, opposite signs", "shifted and silent", "shifted, same sign, silent"]
    return [
        "",
        "## Pairs: what the label-only guarantee became",
        "",
        "Per attack (summed over trials): pairs; *shifted*: z_a − z_c moved by more than both halves' margins at both halves; "
        "of those, with opposite signs at the two halves; and *silent* (no half's top-1 label changed), in total and with the same sign.",
        "",
        md_table(header, [[m, a, *(v[k] for k in PAIR_COUNTS)] for (m, a), v in summed.items()]),
    ]


def _md_breaking(ev: AdversaryEvaluation) -> list[str]:
    p = ev.params
    methods, attacks, routers = ev.names()
    lines = [
        "",
        f"## Cost at which detection at N_S = {p['budgets'][-1]} falls below {p['target']:.0%}",
        "",
        "The smallest cost of the sweep (asked for; paid on the held-out part in brackets) at which the detection rate falls below "
        "the target; '> sweep': still above it at the largest cost; 'passive x': below it even without a router.",
        "",
    ]
    br: dict[tuple[str, str, str, str], BreakingRow] = {(r.method, r.attack, r.spec, r.router): r for r in ev.breaking}
    for spec in p["specs"]:
        body = [[m, a] + [breaking_cell(br.get((m, a, spec, r))) for r in routers] for m in methods for a in attacks]
        lines += [f"**{spec}**", "", md_table(["method", "attack"] + routers, body), ""]
    return lines


def _md_errors_and_timings(ev: AdversaryEvaluation) -> list[str]:
    lines = []
    if ev.errors:
        lines += ["## Errors (the run continued)", "", md_table(["stage", "name", "error"], [[e.stage, e.name, e.error] for e in ev.errors]), ""]
    return lines + ["## Timings (seconds)", "", md_table(["phase", "seconds"], [[k, v] for k, v in ev.timings.items()]), ""]
