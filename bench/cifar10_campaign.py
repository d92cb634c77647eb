"""CIFAR-10 campaign: every marker method against every attack under every output spec, on a pretrained ResNet-56.

The model is the third-party CIFAR-10 ResNet-56 of ``../shared/models/cifar10_resnet56`` and the
data the first 1,017 CIFAR-10 test images (``bench/_cifar.py``). There is no other CIFAR data on
the machine, so the 1,017 images are split once (seeded):

* **attacker**: 700 images, the only labelled data the attacks that train (trojan, poisoning,
  fine-tuning, watermarking) learn from — far less than the 50,000 a real attacker would have,
  so those attacks are cruder (and hurt accuracy more) than with a real training set;
* **owner**: the other 317, split by ``run_evaluation`` (``--test-fraction``) into the marker
  seeds and the held-out images that measure accuracy before and after each attack. The
  attacker never holds the owner's marker seeds.

``run_evaluation`` (``tamperprobe.evaluation.campaign``) then runs as in ``bench/mnist_campaign.py``:
all methods, all attacks, all output specs, benign runtimes for false alarms. Pruning runs as a
grid (``PRUNE_GRID``: global L1 pruning of 10 % to 50 % of the weights, labelled ``prune-10%`` …),
since a small ratio may leave the function within the benign floor: such an attack reads "no
functional change" in the report instead of a detection rate. Results go to
``bench/results/<date>-cifar10-resnet56[-label]/`` (report.md, summary.md, CSV, PNG, results.json) and a line to the
summary ``bench/results/README.md`` (rebuilt by ``mnist_campaign.write_readme`` from every
results.json), with top1 detection at N_S = 2 / 4 / 6 / 10.

    python bench/cifar10_campaign.py                       # the full campaign (about 2 hours on 2 shared cores)
    python bench/cifar10_campaign.py --trials 2 --bag 60   # smaller; the reductions are recorded in results.json
    python bench/cifar10_campaign.py --methods natural,boundary --attacks prune-grid,int8 --label prune-grid
    python bench/cifar10_campaign.py ... --backend ray                        # the same campaign as Ray tasks

Torch runs with one thread (``--threads``). Anything smaller than the defaults of ``run_evaluation``
(3 trials, bag 100, 10,000 resamples) is listed under ``reduced`` in results.json and the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import _cifar
from mnist_campaign import NO_CHANGE, RESULTS, write_readme

ATTACKER_IMAGES = 700
BUDGET_SECONDS = 2 * 3600
SUMMARY_NS = (2, 4, 6, 10)
FULL = {"trials": 3, "bag": 100, "resamples": 10_000}  # run_evaluation's defaults
PRUNE_GRID = (0.1, 0.2, 0.3, 0.4, 0.5)  # global L1 pruning ratios, in place of the single default ratio


def campaign_attacks(names: str | None = None) -> tuple[list[tuple[str, str]], dict[str, dict[str, float]]]:
    """The attacks as (label, name) pairs and the pruning grid's parameters: every registered attack (or ``names``,
    comma-separated; ``prune-grid`` stands for the grid), with ``prune`` replaced by one instance per ratio of ``PRUNE_GRID``."""
    from tamperprobe.attacks import attack_names

    chosen = attack_names() if names is None else [n.strip() for n in names.split(",") if n.strip()]
    entries: list[tuple[str, str]] = []
    params: dict[str, dict[str, float]] = {}
    for name in chosen:
        if name in ("prune", "prune-grid"):
            for ratio in PRUNE_GRID:
                label = f"prune-{ratio:.0%}"
                entries.append((label, "prune"))
                params[label] = {"ratio": ratio}
        else:
            entries.append((name, name))
    return entries, params


def _log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from tamperprobe.evaluation import run_evaluation, write_report
    from tamperprobe.models import TorchModel

    data = _cifar.load_cifar10()
    attacker, owner = data.split(1 - ATTACKER_IMAGES / len(data), seed=args.seed)
    attacker.name, owner.name = "cifar10[attacker]", "cifar10[owner]"
    _log(f"CIFAR-10: {len(data)} images -> {len(attacker)} attacker / {len(owner)} owner (marker seeds + accuracy)")
    model = TorchModel(_cifar.load_resnet56(), _cifar.SOURCE)
    attacks, attack_params = campaign_attacks(args.attacks)
    for label, epochs in (kv.split("=", 1) for kv in args.attack_epochs or []):
        attack_params.setdefault(label, {})["epochs"] = int(epochs)
    t0 = time.monotonic()

    def progress(done: int, total: int, what: str = "") -> None:
        _log(f"{done}/{total} {what} ({time.monotonic() - t0:.0f} s)")

    ev = run_evaluation(
        model,
        owner,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
        attacks=attacks,
        trials=args.trials,
        bag=args.bag,
        select=args.select,
        resamples=args.resamples,
        seed=args.seed,
        progress=progress,
        test_fraction=args.test_fraction,
        attack_data=attacker,
        attack_params=attack_params,
        backend=args.backend,
    )
    reduced = [f"{k} {getattr(args, k)} (default {v})" for k, v in FULL.items() if getattr(args, k) < v]
    reduced += [f"{label} trains {p['epochs']} epochs" for label, p in attack_params.items() if "epochs" in p]
    if args.methods:
        reduced.append(f"methods {args.methods} only")
    if args.attacks:
        reduced.append(f"attacks {args.attacks} only")
    ev.model.update(
        {
            "architecture": "resnet56 (pretrained, CIFAR-10)",
            "data_split": f"{len(attacker)} attacker images; {len(owner)} owner images: {ev.params['data']['train']} marker seeds, "
            f"{ev.params['data']['test']} accuracy",
            "campaign_seconds": round(ev.seconds, 1),
            "budget_seconds": BUDGET_SECONDS,
            "within_budget": ev.seconds < BUDGET_SECONDS,
            "torch_threads": torch.get_num_threads(),
            "summary_ns": list(SUMMARY_NS),
            "reduced": reduced,
        }
    )
    out = RESULTS / f"{datetime.now(UTC).strftime('%Y-%m-%d')}-cifar10-resnet56{'-' + args.label if args.label else ''}"
    write_report(ev, out)
    write_summary(out)
    _log(
        f"campaign {ev.seconds:.0f} s; false alarms {ev.benign_flagged}/{ev.benign_checks}; "
        f"{len(ev.errors)} errors, {len(ev.warnings)} warnings; wrote {out}"
    )
    _log(f"wrote {write_readme()}")
    return 0


def _exact_random(trigger: list[dict], method: str, attack: str, spec: str, ns: int) -> float | None:
    """Detection at N_S under uniform random selection, exactly from each trial's changed/markers counts (mean over trials)."""
    from tamperprobe.evaluation.protocol import exact_random_detection

    rows = [t for t in trigger if (t["method"], t["attack"], t["spec"]) == (method, attack, spec)]
    if not rows:
        return None
    return sum(exact_random_detection(t["markers"], t["changed"], ns) for t in rows) / len(rows)


def write_summary(out: Path) -> Path:
    """``summary.md`` next to the run's report: top1 detection at N_S = 2/4/6/10 under MANC and under random selection."""
    from tamperprobe.evaluation.report import md_table

    r = json.loads((out / "results.json").read_text())
    m, params = r["model"], r["params"]
    det = {(d["method"], d["attack"], d["ns"]): d["rate"] for d in r["detection"] if d["spec"] == "top1"}
    quiet = {d["attack"] for d in r["detection"] if d.get("status") == NO_CHANGE}
    methods = list(dict.fromkeys(d[0] for d in det))
    attacks = list(dict.fromkeys(d[1] for d in det))
    ns = m.get("summary_ns", list(SUMMARY_NS))
    lines = [
        f"# CIFAR-10 ResNet-56 campaign ({out.name})",
        "",
        "`python bench/cifar10_campaign.py` (see its docstring); every table is in [report.md](report.md), everything in `results.json`.",
        "",
        f"- Model: the third-party pretrained CIFAR-10 ResNet-56 ({m.get('source')}); accuracy on the owner's held-out images "
        f"{m.get('acc_test', float('nan')):.3f}, on the marker seeds {m.get('acc_train', float('nan')):.3f}.",
        f"- Data: the first 1,017 CIFAR-10 test images, split once (seed {params['seed']}): {m.get('data_split')}. The attacks that train "
        "(trojan, poisoning, fine-tuning, watermarking) learn from the attacker's 700 images only, far fewer than a real attacker's "
        "50,000: they are cruder and cost more accuracy than they would with a real training set.",
        f"- Settings: bag {params['bag']} per method, {params['trials']} instances of each random attack, {params['resamples']} resampled "
        f"selections ({params['select']}), specs {', '.join(params['specs'])}; campaign {r['seconds']:.0f} s on "
        f"{r['machine']['nproc']} shared cores with {r['machine']['torch_threads']} torch thread.",
        "- Reduced from the defaults: " + ("; ".join(m["reduced"]) if m.get("reduced") else "nothing") + ".",
        "- Every method with its default parameters: `sensitive` is lr 0.01, 200 steps with early stopping, not `preset=verideep` "
        "(measured against 8-bit compression in `bench/results/verideep-table6.md`).",
        f"- False alarms under benign runtimes: {r['false_alarm_summary']['flagged']}/{r['false_alarm_summary']['checks']}; "
        f"{len(r.get('errors', []))} errors, {len(r.get('warnings', []))} warnings (listed in report.md).",
        *(
            f"  - flagged: {f['flagged']} of {f['markers']} `{f['method']}` markers under `{f['runtime']}`, spec `{f['spec']}` "
            f"(max |Δlogit| {f['max_abs_dlogit']:.2g} against the tolerance {f.get('tolerance', params['tolerance']):g})"
            for f in r["false_alarms"]
            if f.get("flagged")
        ),
        "",
        *_attacks_section(r),
        "",
        f"## top1 detection rate at N_S = {' / '.join(map(str, ns))}, {params['select']} selection (as measured by the campaign)",
        "",
        md_table(
            ["attack", *methods],
            [[a, *(NO_CHANGE if a in quiet else " / ".join(f"{det.get((mm, a, n), 0):.2f}" for n in ns) for mm in methods)] for a in attacks],
        ),
        "",
        f"## top1 detection rate at N_S = {' / '.join(map(str, ns))}, uniform random selection (exact, from each trial's changed markers)",
        "",
        "MANC reads the penultimate features, here 64 average-pooled ReLU channels of which nearly all are active on every input, "
        "so its coverage says little; `bench/results/verideep-table6.md` measures it against random selection on the same markers. "
        "Methods made of pairs (boundary, crossed) are left out here: a pair is one query unit, which per-marker counts cannot resolve.",
        "",
    ]
    grouped = {row["method"] for row in r["methods"] if row.get("groups")}
    rows = []
    for a in attacks:
        cells = []
        for mm in methods:
            if a in quiet:
                cells.append(NO_CHANGE)
                continue
            if mm in grouped:  # a pair is one query unit: the per-marker counts cannot give its rate
                cells.append("pairs: see above")
                continue
            vals = [_exact_random(r["trigger"], mm, a, "top1", n) for n in ns]
            cells.append(" / ".join("–" if v is None else f"{v:.2f}" for v in vals))
        rows.append([a, *cells])
    lines += [md_table(["attack", *methods], rows), ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _attacks_section(r: dict) -> list[str]:
    """The attacks table: what each did, and its largest logit change against the benign floor."""
    from tamperprobe.evaluation.report import md_table

    return [
        "## Attacks",
        "",
        "Max |Δlogit|: the attacked model's largest logit change on the markers / on the held-out images, against the benign floor "
        "(the largest change a benign runtime caused on the markers); below it the attack reads 'no functional change'.",
        "",
        md_table(
            ["attack", "trial", "accuracy before", "accuracy after", "success", "weights changed", "max |Δlogit|", "benign floor", "error"],
            [
                [a["attack"], a["trial"], a["acc_before"], a["acc_after"], a["success"], a["changed"], _dlogit(a), _g(a.get("benign_floor"))]
                + [a["error"] or ""]
                for a in r["attacks"]
            ],
        ),
    ]


def _g(v: float | None) -> str:
    return "–" if v is None else f"{v:.2g}"


def _dlogit(a: dict) -> str:
    """An attack row's largest logit change: on the markers / on the held-out images (the latter absent before 2026-12)."""
    return f"{_g(a.get('max_abs_dlogit'))} / {_g(a.get('max_abs_dlogit_test'))}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=FULL["trials"])
    ap.add_argument("--bag", type=int, default=FULL["bag"])
    ap.add_argument("--resamples", type=int, default=FULL["resamples"])
    ap.add_argument("--select", default="manc", choices=["manc", "random"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-fraction", type=float, default=0.3, help="share of the owner's 317 images kept for accuracy")
    ap.add_argument("--methods", help="comma-separated marker methods (default: every registered one; recorded as a reduction)")
    ap.add_argument("--attacks", help="comma-separated attacks, prune-grid for the pruning grid (default: all; recorded as a reduction)")
    ap.add_argument("--label", help="suffix of the results folder")
    ap.add_argument("--backend", default="local", choices=["local", "ray"], help="where the bags and attacks run (ray: a local Ray cluster)")
    ap.add_argument("--attack-epochs", nargs="*", metavar="ATTACK=EPOCHS", help="fewer training epochs for an attack (recorded as a reduction)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: 2 shared cores)")
    ap.add_argument("--summary-only", metavar="RUN_DIR", help="rebuild summary.md of a finished run and the results README")
    args = ap.parse_args(argv)
    if args.summary_only:
        _log(f"wrote {write_summary(Path(args.summary_only))}")
        _log(f"wrote {write_readme()}")
        return 0
    missing = _cifar.available()
    if missing:
        print(f"CIFAR-10 model or data not found: {missing}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(max(1, args.threads))
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
