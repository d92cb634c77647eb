"""The page of ``bench/ray_campaign.py``: the speed-up table, each campaign's runs, cells and projection, the notes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

NOTES = Path(__file__).resolve().parents[1] / "bench" / "results" / "ray-campaign-notes.md"  # hand-written, appended to the page


def _f(v: float) -> str:
    return f"{v:,.1f}" if v >= 10 else f"{v:.2f}"


def report_md(doc: dict[str, Any]) -> str:
    m, th = doc["machine"], doc["threads"]
    lines = [
        "# Campaigns through the Ray backend, side by side with the local one",
        "",
        f"`python bench/ray_campaign.py` ({doc['date']}; {m.get('nproc')} usable cores, {m.get('cpu')}, torch {m.get('torch')}). "
        f"One local Ray cluster of {doc['cpus']} CPUs (127.0.0.1) is started once; then each campaign runs **interleaved**, "
        f"local, Ray, local, Ray, … (every run is listed), so that both backends see the same load: the 2 cores were "
        "shared with other jobs (the load average before and after each run is in the tables), so the absolute seconds are upper "
        "bounds and only the side-by-side ratios are the measurement.",
        "",
        f"- **Torch threads**: local = one process with {th['local']} torch thread; Ray = the driver ({th['ray_driver']} thread) "
        f"plus {doc['cpus']} workers running one task each with {th['ray_task']} thread (a task takes the driver's number).",
        "- **Cold start**, apart from every campaign time below (each session started its own cluster): "
        + "; ".join(_cold_md(i, sess) for i, sess in enumerate(doc.get("sessions", [{"cold_start": doc.get("cold_start", {})}])))
        + ". Paid once per session, not per campaign.",
        "",
    ]
    lines += _overview_md(doc)
    for name, camp in doc["campaigns"].items():
        lines += _campaign_md(name, camp, doc["cpus"])
    lines += _committed_md(doc.get("committed", []))
    if NOTES.exists():
        lines += [NOTES.read_text().rstrip(), ""]
    lines += [
        "## Earlier single runs (not a speed-up measurement)",
        "",
        "The first runs (one local then one Ray run per campaign, under loads that changed between them, start-up inside the Ray time) "
        "are kept in [ray-campaign-first-run.md](ray-campaign-first-run.md) (digits: 9.0 s local, 30.6 s Ray including 20.6 s start-up) "
        "and [ray-campaign-cifar10.md](ray-campaign-cifar10.md) (the full-size CIFAR-10 pruning-grid campaign: 1,146 s local at load 11–14, "
        "461 s Ray at load 6–9). Their results were identical too; their wall times are not comparable.",
        "",
    ]
    return "\n".join(lines)


def _overview_md(doc: dict[str, Any]) -> list[str]:
    """The speed-up table: one row per campaign and session, wall times local vs Ray (min, median) and their ratio."""
    from tamperprobe.evaluation.report import md_table

    rows = []
    for name, camp in doc["campaigns"].items():
        s = camp["summary"]
        sess = doc.get("sessions", [{}])[camp.get("session", 0)] if doc.get("sessions") else {}
        nice = sess.get("cold_start", {}).get("worker_niceness", "15 (Ray's default; seen in ps)")
        rows.append(
            [
                name.split(" [")[0],
                camp.get("session", 0) + 1,
                "bags" if camp.get("bags_first") else "attacks",
                nice if isinstance(nice, str) else ", ".join(map(str, sorted(set(nice)))),
                len(s["walls"]["local"]),
                f"{_f(s['min']['local'])} / {_f(s['median']['local'])}",
                f"{_f(s['min']['ray'])} / {_f(s['median']['ray'])}",
                f"**{s['speedup_min']:.2f}× / {s['speedup_median']:.2f}×**",
                ", ".join(f"{x:.2f}" for x in s["pair_ratios"]),
                "yes" if s["all_same"] else "**NO**",
            ]
        )
    return [
        "## The speed-up table",
        "",
        "Local backend against Ray with 2 workers on the same 2 cores; seconds per campaign, the cluster already started and warm. "
        "Speed-up = local / Ray (of the minima / of the medians; per pair: each local run against the Ray run after it). "
        "'First submitted': which cells the campaign hands to the workers first. 'Worker niceness': Ray starts its workers at "
        "niceness 15 unless `RAY_worker_niceness` says otherwise, so on a shared machine they yield the cores to every ordinary "
        "process, the local backend's included.",
        "",
        md_table(
            [
                "campaign",
                "session",
                "first submitted",
                "worker niceness",
                "pairs",
                "local s (min / median)",
                "Ray s (min / median)",
                "speed-up",
                "per pair",
                "results equal",
            ],
            rows,
        ),
        "",
    ]


def _cold_md(i: int, sess: dict[str, Any]) -> str:
    c = sess["cold_start"]
    text = f"session {i + 1} ({sess.get('campaigns', '')}, {sess.get('date', '')}): `ray.init` {_f(c['ray_init_s'])} s, each worker's first task "
    text += (
        f"(imports) {_f(c['workers_first_task_s'])} s, a first digits campaign through Ray on the fresh workers {_f(c['first_digits_campaign_s'])} s"
    )
    if "first_local_digits_campaign_s" in c:
        text += f" and one in the local process {_f(c['first_local_digits_campaign_s'])} s (untimed warm-ups of both sides)"
    if "worker_niceness" in c:
        text += f"; Ray workers at niceness {', '.join(map(str, sorted(set(c['worker_niceness']))))}, the driver and the local backend at {c['driver_niceness']}"
    return text


def _campaign_md(name: str, camp: dict[str, Any], cpus: int) -> list[str]:
    from tamperprobe.evaluation.report import md_table

    s, st, costs = camp["summary"], camp["settings"], camp["ray_costs"]
    mdl = s["model"]
    runs = camp["runs"]
    what = "; ".join(f"{k} {v}" for k, v in st.items())
    lines = [
        f"## {name}: {camp['model']} on {camp['data']} (session {camp.get('session', 0) + 1})",
        "",
        f"Campaign (`run_evaluation`, three baseline methods added as always, every output spec and benign runtime): {what}.",
        "",
        md_table(
            ["run", "backend", "wall s", "load before / after", "results.json = first local run"],
            [
                [
                    i + 1,
                    r["backend"],
                    _f(r["wall"]),
                    f"{r['load_before']:.1f} / {r['load_after']:.1f}",
                    "yes" if r["same_as_first_local"] else "**NO**",
                ]
                for i, r in enumerate(runs)
            ],
        ),
        "",
        f"- **results.json identical** local vs Ray in every pair (timings, machine, start time aside): **{'yes' if s['all_same'] else 'NO'}**",
        f"- local: min {_f(s['min']['local'])} s, median {_f(s['median']['local'])} s; Ray on {cpus} CPUs: min {_f(s['min']['ray'])} s, "
        f"median {_f(s['median']['ray'])} s; **speed-up {s['speedup_min']:.2f}× (min) / {s['speedup_median']:.2f}× (median)**; "
        f"per pair: {', '.join(f'{x:.2f}×' for x in s['pair_ratios'])}",
        f"- Ray's own cost: an empty task's round trip {1000 * costs['empty_task_round_trip_s']:.1f} ms one at a time, "
        f"{1000 * costs['empty_task_throughput_s']:.2f} ms each when 200 are in flight; `ray.put` of the model "
        f"{costs['put_model_mib']:.2f} MiB in {1000 * costs['put_model_s']:.0f} ms, of the data {costs['put_data_mib']:.2f} MiB in "
        f"{1000 * costs['put_data_s']:.0f} ms",
        f"- object store, from the objects' sizes (this Ray install has no grpc, so no memory summary to sample): "
        f"{camp['store']['put_mib']:.1f} MiB put per run (the model twice, the owner's and the attacker's data), "
        f"{camp['store']['returned_mib']:.1f} MiB returned ({camp['store']['attack_cells']} attacked models, "
        f"{camp['store']['bag_cells']} bags): {camp['store']['total_mib']:.1f} MiB per run, of a store of "
        f"{camp.get('store_capacity_mib', float('nan')):,.0f} MiB",
        "",
        "### The cells (median over the runs; local: in-process, an attack's time includes the driver measuring the markers against "
        "it; Ray: in the worker)",
        "",
    ]
    cells = sorted(((k, v) for k, v in s["cells_local"].items() if k.startswith(("method:", "attack:"))), key=lambda kv: -kv[1])
    lines += [
        md_table(
            ["cell", "local s", "Ray (in worker) s", "Ray − local s"],
            [[k, _f(v), _f(s["cells_ray"].get(k, float("nan"))), f"{s['cells_ray'].get(k, float('nan')) - v:+.2f}"] for k, v in cells],
        ),
        "",
        "Driver phases (median; Ray's `methods` includes waiting for the bag cells, its `attacks` waiting for the attack cells): "
        + ", ".join(
            f"{k} {_f(s['cells_local'].get(k, float('nan')))} / {_f(s['cells_ray'].get(k, float('nan')))} s"
            for k in ("methods", "selections", "runtimes", "attacks", "total")
        )
        + " (local / Ray).",
        "",
    ]
    lines += _projection_md(s, mdl, cpus)
    return lines


def _committed_md(rows: list[dict[str, Any]]) -> list[str]:
    from tamperprobe.evaluation.report import md_table

    if not rows:
        return []
    ns = list(dict.fromkeys(n for r in rows for n in r["projection"]))
    return [
        "## Projection for the full-size CIFAR-10 campaigns, from their committed cell times",
        "",
        "The same model, fed with the cell times in the committed `results.json` of two full-size local runs (bags of 100, 10,000 "
        "resamples, 3 trials). Their attack cells include the driver's measuring (local backend), so each is taken whole as a cell "
        "and nothing as the final measuring. Those runs were made under heavy, changing load: the seconds are the runs' own, "
        "the shape (what dominates, where it stops) is the point.",
        "",
        md_table(
            ["campaign", "measured s (local)", "cells", "cells sum s", "serial s", "longest cell", *(f"N={n}" for n in ns)],
            [
                [
                    f"[{r['run']}]({r['run']}/summary.md)",
                    _f(r["seconds"]),
                    r["cells"],
                    _f(r["cells_sum"]),
                    _f(r["serial"]),
                    f"{r['longest'][0]} ({_f(r['longest'][1])} s)",
                    *(_f(r["projection"][n]) if n in r["projection"] else "" for n in ns),
                ]
                for r in rows
            ],
        ),
        "",
    ]


def _projection_md(s: dict[str, Any], mdl: dict[str, Any], cpus: int) -> list[str]:
    from tamperprobe.evaluation.report import md_table

    longest = max([*mdl["bags"].items(), *mdl["attacks"].items()], key=lambda kv: kv[1])
    cells_total = sum(mdl["bags"].values()) + sum(mdl["attacks"].values())
    floor = mdl["pre"] + mdl["driver"] + mdl["measure"]
    order = "bags first" if s.get("bags_first") else "attacks first"
    p, other, contended, as_run = s["projection"], s["projection_attacks_first"], s["projection_contended"], s["projection_as_run"]
    return [
        "### Projection for N workers",
        "",
        "Model (`projection` in the script): the driver's first part (intact model: "
        f"{_f(mdl['pre'])} s), then the cells scheduled first-come first-served in the order the campaign submits them on N "
        f"workers, each costing its measured time plus Ray's round trip ({1000 * mdl['overhead']:.1f} ms); the driver waits for "
        f"the last bag, does its own work (reference logits, selections, benign runtimes: {_f(mdl['driver'])} s), then waits for the "
        f"last attack and measures the markers against each attacked model ({_f(mdl['measure'])} s, the local attack cells minus the attack "
        "cells' costs). Cell costs: the local bag times (a worker with a core of its own) and, per attack, its time in a worker "
        "or its local time (which includes the driver's measuring) when smaller. Not modelled: the driver competing with the workers for cores, shipping models to and from workers.",
        "",
        f"These runs used the order **{order}**. The campaign submitted every attack before every bag until this benchmark; it "
        "now submits the bags first, so that with fewer workers than cells the driver's own work, which waits for the bags, "
        "overlaps with the attacks' training (the results are the same: every cell is seeded by its coordinates).",
        "",
        md_table(
            ["workers", "bags first (now)", "speed-up vs 1", "attacks first (before)", f"{order}, bag times in the workers"],
            [[n, _f(v), f"{p['1'] / v:.2f}×", _f(other.get(n, float("nan"))), _f(contended.get(n, float("nan")))] for n, v in p.items()],
        ),
        "",
        f"- Check of the model against these runs ({order}): projected at {cpus} workers {_f(as_run.get(str(cpus), float('nan')))} s "
        f"({_f(contended.get(str(cpus), float('nan')))} s with the bag times in the workers) against the measured Ray median "
        f"{_f(s['median']['ray'])} s; at 1 worker {_f(p['1'])} s against the local median {_f(s['median']['local'])} s. Where the "
        "measured Ray time is above the projection, the workers and the driver got less than a core each (the in-worker cell "
        "times above against the local ones show by how much).",
        f"- The cells sum to {_f(cells_total)} s; the driver's serial work to {_f(floor)} s. The longest cell is `{longest[0]}` "
        f"({_f(longest[1])} s). With a worker per cell the model gives {_f(p['unbounded'])} s = intact model + "
        "max(longest bag + driver work, longest attack) + measuring: past that, more workers do nothing; splitting the longest "
        "cell or the driver's serial work is what would.",
        "",
    ]
