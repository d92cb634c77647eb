"""Writing a campaign out: ``report.md``, one CSV file per table, ``results.json`` and the plots.

``write_report(evaluation, out_dir)`` is the entry point (``plots=False``, or matplotlib missing:
no PNG files, and the report says why). The JSON document is ``Evaluation.to_json``
(``tamperprobe.evaluation.results``); ``write_csv``, ``md_table`` and ``fmt_cell`` also serve the
adversary's report.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._util import Progress, atomic_write, atomic_write_text
from .protocol import CONFIDENCES, MAX_NS
from .results import NO_CHANGE, Evaluation, jsonable

# file name -> (Evaluation attribute, columns)
TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "methods.csv": ("methods", ("method", "markers", "groups", "units", "group_size", "selection", "tolerance", "benign_floor", "params", "error")),
    "attacks.csv": (
        "attacks",
        (
            "attack",
            "trial",
            "seed",
            "acc_before",
            "acc_after",
            "success",
            "max_abs_dlogit",
            "max_abs_dlogit_test",
            "benign_floor",
            "functional_change",
            "changed",
            "params",
            "error",
        ),
    ),
    "trigger.csv": ("trigger", ("method", "attack", "trial", "spec", "changed", "markers", "ratio")),
    "detection.csv": ("detection", ("method", "attack", "spec", "ns", "rate", "min_trial", "trials", "resamples", "selection", "status")),
    "key_size.csv": ("key_sizes", ("method", "attack", "spec", "p", "c", "s", "empirical_ns", "status")),
    "false_alarms.csv": ("false_alarms", ("method", "runtime", "spec", "flagged", "markers", "max_abs_dlogit", "tolerance", "error")),
    "errors.csv": ("errors", ("stage", "name", "error")),
}


# ----------------------------------------------------------------------------- files


def write_report(evaluation: Evaluation, out_dir: str | os.PathLike, *, plots: bool = True, progress: Progress | None = None) -> list[Path]:
    """Write ``report.md``, CSV tables, PNG plots and ``results.json`` into ``out_dir``; return the paths.

    The plots are drawn when ``plots`` is true and matplotlib can be imported; otherwise
    ``report.md`` says why there are none. Their time is recorded as ``timings["plots"]``
    (``results.json`` is written after them). ``progress`` hears about each figure.
    """
    from .plots import draw_plots, plots_unavailable

    ev = evaluation
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for fname, (attr, columns) in TABLES.items():
        written.append(write_csv(out / fname, getattr(ev, attr), columns))
    plot_errors: list[str] = []
    drawn: list[Path] = []
    skipped = "plots were not asked for (--no-plots)" if not plots else plots_unavailable()
    if skipped is None:
        t0 = time.monotonic()
        drawn = draw_plots(ev, out, plot_errors, progress)
        ev.timings["plots"] = time.monotonic() - t0
    written += drawn
    written.append(atomic_write_text(out / "results.json", json.dumps(ev.to_json(), separators=(",", ":"), allow_nan=False)))
    written.append(atomic_write_text(out / "report.md", markdown(ev, [p.name for p in drawn], plot_errors, skipped)))
    return written


def write_csv(path: Path, rows: Sequence[Any], columns: Sequence[str]) -> Path:
    """One CSV file: a header of ``columns``, then each row's values for them (rows are typed rows or dicts; absent: empty)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            for r in rows:
                w.writerow([_csv_value(r.get(c)) for c in columns])

    return atomic_write(path, write)


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(jsonable(v), sort_keys=True)
    return v


# ----------------------------------------------------------------------------- markdown


def fmt_cell(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v).replace("|", "\\|")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(fmt_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def markdown(ev: Evaluation, plots: Sequence[str] = (), plot_errors: Sequence[str] = (), skipped: str | None = None) -> str:
    """``report.md``: the setup, then one section per table; ``plots`` are image files beside it (``skipped``: why none)."""
    sections = [
        _md_header(ev),
        _md_methods_and_attacks(ev),
        _md_detection(ev),
        _md_trigger(ev),
        _md_key_sizes(ev),
        _md_false_alarms(ev),
        _md_errors_and_timings(ev),
        _md_plots(plots, plot_errors, skipped),
    ]
    lines = [line for section in sections for line in section]
    lines.append("Files: methods.csv, attacks.csv, trigger.csv, detection.csv, key_size.csv, false_alarms.csv, errors.csv, results.json.")
    return "\n".join(lines) + "\n"


def _md_header(ev: Evaluation) -> list[str]:
    p, m = ev.params, ev.machine
    lines = [f"# Tamper-detection evaluation: {ev.model.get('source')}", ""]
    lines += [
        f"- started {ev.started}, took {ev.seconds:.1f} s on {m.get('hostname')} ({m.get('nproc')} usable cores, {m.get('cpu')}; "
        f"torch {m.get('torch')}, python {m.get('python')})",
        f"- model {ev.model.get('source')} ({ev.model.get('kind')}, {ev.model.get('classes')} classes), "
        f"accuracy train {fmt_cell(ev.model.get('acc_train'))}, test {fmt_cell(ev.model.get('acc_test'))}",
        f"- data {p['data']['name']}: {p['data']['train']} train / {p['data']['test']} test (test fraction {p['test_fraction']}, seed {p['seed']})",
        f"- bag {p['bag']} candidates per method; selection {p['select']} over {p['resamples']} resamples"
        + (f" (MANC on random sub-bags of {p['manc_fraction']:.0%})" if p["select"] == "manc" else " (uniform random subsets)")
        + f"; {p['trials']} trials per random attack, trained on {p['data'].get('attack', p['data']['train'])} samples of the train part"
        + f"; {_tolerance_text(ev)}",
        f"- output specs: {', '.join(p['specs'])}",
        "",
        "Protocol: see the docstring of `tamperprobe.evaluation.campaign`. Detection rate at N_S = share of resampled selections of "
        "N_S queries that hold at least one marker whose answer changed (boundary pairs are picked whole: floor(N_S/2) pairs), "
        "averaged over attack instances. Trigger ratio = share of the bag's markers whose answer changed.",
        "",
    ]
    if not ev.measured:
        lines += ["**Nothing could be measured** (see errors below).", ""]
    return lines


def _md_methods_and_attacks(ev: Evaluation) -> list[str]:
    methods = [[r.method, r.markers, r.groups, r.selection, json.dumps(jsonable(r.params or {}), sort_keys=True), r.error] for r in ev.methods]
    attacks = [
        [r.attack, r.trial, r.acc_before, r.acc_after, r.success, _g(r.max_abs_dlogit), _g(r.max_abs_dlogit_test), _g(r.benign_floor)]
        + [r.functional_change, r.error]
        for r in ev.attacks
    ]
    header = ["attack", "trial", "acc before", "acc after", "success", "max abs Δlogit (markers)", "(test part)", "benign floor"]
    return [
        "## Methods",
        "",
        md_table(["method", "markers", "groups", "selection", "parameters", "error"], methods),
        "",
        "## Attacks",
        "",
        md_table([*header, "functional change", "error"], attacks),
        *_md_no_change(ev),
    ]


def _g(v: float | None) -> str | None:
    return None if v is None else f"{v:.3g}"


def _md_no_change(ev: Evaluation) -> list[str]:
    """The attacks that stayed below the benign floor, and why their cells read NO_CHANGE."""
    quiet = ev.no_functional_change()
    if not quiet:
        return []
    each = []
    for a in quiet:
        rows = [r for r in ev.attacks if r.attack == a and r.max_abs_dlogit is not None]
        most = max(max(r.max_abs_dlogit or 0.0, r.max_abs_dlogit_test or 0.0) for r in rows)
        each.append(f"{a} (max |Δlogit| {most:.3g})")
    return [
        "",
        f"**{NO_CHANGE.capitalize()}**: {', '.join(each)}, below the benign floor {ev.benign_floor:.3g} (the largest |Δlogit| a benign "
        "runtime caused on the markers). The attacked model answers as a benign runtime change of the intact one would; no black-box "
        f"method can tell them apart, so these attacks get no detection rate: their cells read '{NO_CHANGE}'.",
    ]


def _md_detection(ev: Evaluation) -> list[str]:
    if not ev.detection:
        return []
    methods, attacks = ev.measured_names()
    specs = ev.params["specs"]
    det = {(r.method, r.attack, r.spec, r.ns): r.rate for r in ev.detection}
    key_spec = ev.key_spec
    lines = ["", f"## Detection rate vs N_S ({key_spec})", "", "Rows: attack / method; columns: number of queries N_S.", ""]
    quiet = set(ev.no_functional_change())
    rows: list[list[Any]] = [
        [a, mth, *(det[(mth, a, key_spec, ns)] for ns in range(1, MAX_NS + 1))]
        for a in attacks
        for mth in methods
        if (mth, a, key_spec, 1) in det and a not in quiet
    ]
    rows += [[a, "every method", NO_CHANGE] + [""] * (MAX_NS - 1) for a in attacks if a in quiet]
    lines.append(md_table(["attack", "method"] + [str(ns) for ns in range(1, MAX_NS + 1)], rows))
    for ns_show in (1, MAX_NS):
        lines += ["", f"## Detection rate at N_S = {ns_show}, every output spec", "", "Rows: attack; one table per spec, one column per method.", ""]
        for s in specs:
            lines += [f"**{s}**", ""]
            cells: list[list[Any]] = [[a, *(NO_CHANGE if a in quiet else det.get((mth, a, s, ns_show)) for mth in methods)] for a in attacks]
            lines.append(md_table(["attack"] + methods, cells))
            lines.append("")
    return lines


def _md_trigger(ev: Evaluation) -> list[str]:
    trig = ev.mean_trigger()
    if not trig:
        return []
    methods, attacks = ev.measured_names()
    lines = ["## Trigger ratio (mean over trials)", ""]
    for s in ev.params["specs"]:
        lines += [f"**{s}**", ""]
        lines.append(md_table(["attack"] + methods, [[a] + [trig.get((mth, a, s), (None,))[0] for mth in methods] for a in attacks]))
        lines.append("")
    return lines


def _md_key_sizes(ev: Evaluation) -> list[str]:
    if not ev.key_sizes:
        return []
    methods, attacks = ev.measured_names()
    ks = {(r.method, r.attack, r.spec, r.c): r for r in ev.key_sizes}
    key_spec = ev.key_spec
    lines = [
        f"## Key size for confidence c ({key_spec})",
        "",
        "TamperNN: s > log(1−c)/log(1−p), p = mean trigger ratio; – means p = 0 (never). "
        "In brackets: the smallest N_S ≤ 10 whose measured detection rate reaches c.",
        "",
    ]
    rows = []
    for a in attacks:
        for mth in methods:
            cells: list[str | None] = []
            for c in CONFIDENCES:
                r = ks.get((mth, a, key_spec, c))
                if r is None:
                    cells.append(None)
                elif r.status == NO_CHANGE:
                    cells.append(NO_CHANGE)
                else:
                    emp = r.empirical_ns
                    cells.append(f"{'–' if r.s is None else r.s} [{'>10' if emp is None else emp}]")
            if any(cell is not None for cell in cells):
                first = ks.get((mth, a, key_spec, CONFIDENCES[0]))
                rows.append([a, mth, None if first is None else first.p, *cells])
    lines.append(md_table(["attack", "method", "p"] + [f"c={c}" for c in CONFIDENCES], rows))
    lines.append("")
    return lines


def _tolerance_text(ev: Evaluation) -> str:
    """The comparison tolerance: the given one, or each method's as a fingerprint measures it."""
    if ev.params["tolerance"] is not None:
        return f"tolerance {ev.params['tolerance']:g}"
    each = ", ".join(f"{r.method} {r.tolerance:.2g}" for r in ev.methods if r.tolerance is not None)
    return f"tolerance as a fingerprint sets it, max(3e-05, 2 × the benign floor measured on the method's bag): {each or '-'}"


def _md_false_alarms(ev: Evaluation) -> list[str]:
    lines = [
        "## False alarms under benign runtime changes",
        "",
        f"Flagged markers over all benign re-verifications: **{ev.benign_flagged}** of {ev.benign_checks} (markers × runtimes × specs; must be 0).",
        "",
    ]
    rt_rows = []
    for rt in ev.params["runtimes"]:
        rows = [r for r in ev.false_alarms if r.runtime == rt]
        err = next((r.error for r in rows if r.error), None)
        flagged = None if err else sum(r.flagged or 0 for r in rows)
        checks = None if err else sum(r.markers for r in rows)
        dmax = max((r.max_abs_dlogit for r in rows if r.max_abs_dlogit is not None), default=None)
        share = max((r.max_abs_dlogit / r.tolerance for r in rows if r.max_abs_dlogit is not None and r.tolerance), default=None)
        rt_rows.append([rt, flagged, checks, None if dmax is None else f"{dmax:.3g}", None if share is None else f"{share:.2f}", err])
    lines.append(md_table(["runtime", "flagged", "checks", "max abs Δlogit", "largest Δlogit / tolerance", "error"], rt_rows))
    lines.append("")
    return lines


def _md_errors_and_timings(ev: Evaluation) -> list[str]:
    lines = []
    if ev.errors:
        lines += ["## Errors (the campaign continued)", ""]
        lines.append(md_table(["stage", "name", "error"], [[e.stage, e.name, e.error] for e in ev.errors]))
        lines.append("")
    if ev.warnings:
        lines += ["## Warnings", ""]
        lines.append(md_table(["stage", "name", "warning"], [[w.stage, w.name, w.warning] for w in ev.warnings]))
        lines.append("")
    lines += ["## Timings (seconds)", ""]
    lines.append(md_table(["phase", "seconds"], [[k, v] for k, v in ev.timings.items() if ":" not in k]))
    lines.append("")
    return lines


def _md_plots(plots: Sequence[str], plot_errors: Sequence[str], skipped: str | None = None) -> list[str]:
    lines = [f"No plots: {skipped}.", ""] if skipped else []
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    if plot_errors:
        lines += ["Plots that could not be drawn: " + "; ".join(plot_errors), ""]
    return lines
