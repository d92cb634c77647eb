"""MNIST campaign: every marker method against every attack under every output spec, per zoo model.

Loads the 10 000-image MNIST test set (IDX, gz) from ``../shared/data/mnist`` relative to the
repository, splits it (seeded) into 7 000 training and 3 000 test images, trains the zoo MLP,
CNN and IRNN for 28x28 inputs with ``tamperprobe.train.fit``, and runs
``tamperprobe.evaluation.run_evaluation`` on each (all methods, all attacks, all specs). Results go
to ``bench/results/<date>-<model>/`` (report.md, CSV, PNG, results.json) and a summary to
``bench/results/README.md`` (regenerated from every results.json found there).

    python bench/mnist_campaign.py --models cnn            # one model
    python bench/mnist_campaign.py --models mlp,cnn,irnn   # all three, one after the other
    python bench/mnist_campaign.py --readme-only           # rebuild the summary

The time budget is the campaign itself (``run_evaluation``, without training): under 15
minutes per model on 2 CPU cores. Torch runs with one thread by default (``--threads``): on a
2-core machine shared with other jobs, two OpenMP threads per process oversubscribe the cores
and run several times slower (the benign-runtime check still runs the markers with 2 threads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "mnist"
RESULTS = REPO / "bench" / "results"
BUDGET_SECONDS = 15 * 60
NO_CHANGE = "no functional change"  # tamperprobe.evaluation.results.NO_CHANGE, kept here so the summary builds without the package
# epochs and learning rate per model: enough for a sensible accuracy on 7 000 images, a few seconds to a minute each.
TRAINING = {"mlp": (10, 1e-3), "cnn": (8, 1e-3), "irnn": (12, 1e-3)}


def _log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def run_model(name: str, args: argparse.Namespace) -> Path:
    import torch

    from tamperprobe import zoo
    from tamperprobe.data import load_data
    from tamperprobe.evaluation import run_evaluation, write_report
    from tamperprobe.models import TorchModel
    from tamperprobe.train import accuracy, fit

    data = load_data(DATA)
    train, test = data.split(args.test_fraction, seed=args.seed)
    _log(f"{name}: MNIST {len(data)} images -> {len(train)} train / {len(test)} test")
    epochs, lr = TRAINING[name]
    torch.manual_seed(args.seed)
    module = zoo.build(name, (1, 28, 28))
    t0 = time.monotonic()
    fit(module, train.x, train.y, epochs=epochs, lr=lr, seed=args.seed)
    train_seconds = time.monotonic() - t0
    acc = accuracy(module, test.x, test.y)
    _log(f"{name}: trained {epochs} epochs in {train_seconds:.0f} s, test accuracy {acc:.3f}")

    model = TorchModel(module, f"tamperprobe.zoo:mnist_{name}")
    last = [time.monotonic()]

    def progress(done: int, total: int, what: str) -> None:
        now = time.monotonic()
        _log(f"{name}: {done}/{total} {what} ({now - last[0]:.1f} s)")
        last[0] = now

    ev = run_evaluation(
        model,
        data,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()] or None,
        attacks=None,
        attack_samples=args.attack_samples,
        trials=args.trials,
        bag=args.bag,
        select=args.select,
        resamples=args.resamples,
        seed=args.seed,
        progress=progress,
        test_fraction=args.test_fraction,
    )
    ev.model.update(
        {
            "architecture": name,
            "train_epochs": epochs,
            "train_lr": lr,
            "train_seconds": round(train_seconds, 1),
            "campaign_seconds": round(ev.seconds, 1),
            "budget_seconds": BUDGET_SECONDS,
            "within_budget": ev.seconds < BUDGET_SECONDS,
            "torch_threads": torch.get_num_threads(),
        }
    )
    out = RESULTS / f"{datetime.now(UTC).strftime('%Y-%m-%d')}-{name}"
    write_report(ev, out)
    _log(
        f"{name}: campaign {ev.seconds:.0f} s ({'within' if ev.seconds < BUDGET_SECONDS else 'OVER'} the 15 min budget); "
        f"false alarms {ev.benign_flagged}/{ev.benign_checks}; {len(ev.errors)} errors; wrote {out}"
    )
    return out


def write_readme() -> Path:
    """Summarise every ``results/*/results.json`` into ``results/README.md``."""
    runs = []
    for p in sorted(RESULTS.glob("*/results.json")):
        try:
            runs.append((p.parent.name, json.loads(p.read_text())))
        except (OSError, ValueError):
            continue
    lines = [
        "# Evaluation campaigns (MNIST, CIFAR-10)",
        "",
        "Produced by `python bench/mnist_campaign.py` and `python bench/cifar10_campaign.py` (see their docstrings). Each folder holds `report.md` (all tables),",
        "CSV tables, PNG plots (detection rate vs N_S per attack, trigger ratio per attack and method, seed/marker grids)",
        "and `results.json` (everything, with run parameters and machine).",
        "",
        "Protocol (details in `tamperprobe/evaluation/campaign.py`): MNIST: 10 000 MNIST test images split 7 000 train / 3 000 test (seeded);",
        "CIFAR-10: the 1,017 test images split 700 for the attacker's training / 317 for the owner (marker seeds and accuracy), see the",
        "run's data column; each method generates a bag of candidates from the train part; random attacks run several seeded instances,",
        "deterministic ones once; the trigger ratio is the share of bag markers whose answer changes under the comparison",
        "rule with the run's tolerance (3e-5 in every run below: they predate the measured one, max(3e-5, 2 x each method's benign floor));",
        "the detection rate at N_S is the share of 10 000 resampled selections of N_S queries",
        "holding a changed marker (MANC on random half-bags; boundary pairs picked whole, floor(N_S/2) pairs); false alarms",
        "are counted over benign re-verifications (batch 1/64, threads 1/2, TorchScript, ONNX Runtime) and must be 0.",
        "",
        "Timing caveat: the machine has 2 cores shared with other engineers' concurrent test runs, so wall-clock times are",
        "upper bounds of what an idle 2-core machine takes.",
        "",
        "## Runs",
        "",
        "| run | model | data | test acc | campaign s | within budget | train s | false alarms | max benign Δlogit | errors / warnings | machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs:
        m, mach, fa = r.get("model", {}), r.get("machine", {}), r.get("false_alarm_summary", {})
        budget = m.get("budget_seconds", BUDGET_SECONDS)
        data = r.get("params", {}).get("data", {})
        split = m.get("data_split") or f"{data.get('train')} train / {data.get('test')} test"
        lines.append(
            f"| [{name}]({name}/report.md) | {m.get('architecture', m.get('source'))} | {split} | {_f(m.get('acc_test'))} | {_f(r.get('seconds'), 0)} | "
            f"{'yes' if (r.get('seconds') or 1e9) < budget else 'no'} ({budget / 60:.0f} min) | {_f(m.get('train_seconds'), 0)} | {fa.get('flagged')}/{fa.get('checks')} | "
            f"{_g(fa.get('max_abs_dlogit'))} | {len(r.get('errors', []))} / {len(r.get('warnings', []))} | "
            f"{mach.get('nproc')} cores, {mach.get('cpu')}, torch {mach.get('torch')}, {mach.get('torch_threads')} torch thread(s), "
            f"started {r.get('started')} |"
        )
    notes = [(name, e.get("name"), e.get("error") or e.get("warning")) for name, r in runs for e in r.get("errors", []) + r.get("warnings", [])]
    if notes:
        lines += ["", "Errors and warnings (each run's report.md has them all):", ""]
        lines += [f"- {run}: {what}: {msg}" for run, what, msg in notes]
    for name, r in runs:
        ns = [int(n) for n in r.get("model", {}).get("summary_ns", (1, 5, 10))]
        lines += ["", f"## {name}: top1 detection rate at N_S = {' / '.join(map(str, ns))}", ""]
        if r.get("model", {}).get("reduced"):
            lines += ["Reduced from the defaults: " + "; ".join(r["model"]["reduced"]) + ".", ""]
        det = {}
        for d in r.get("detection", []):
            if d["spec"] == "top1":
                det[(d["method"], d["attack"], d["ns"])] = d["rate"]
        quiet = {d["attack"] for d in r.get("detection", []) if d.get("status") == NO_CHANGE}
        methods = list(dict.fromkeys(d[0] for d in det))
        attacks = list(dict.fromkeys(d[1] for d in det))
        if not det:
            lines.append("(nothing measured)")
            continue
        lines.append("| attack | " + " | ".join(methods) + " |")
        lines.append("|---|" + "---|" * len(methods))
        for a in attacks:
            cells = [NO_CHANGE if a in quiet else " / ".join(f"{det.get((m, a, n), 0):.2f}" for n in ns) for m in methods]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    path = RESULTS / "README.md"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _g(v) -> str:
    return "–" if v is None else f"{v:.2g}"


def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn,mlp,irnn", help="comma-separated zoo models (mlp, cnn, irnn)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--bag", type=int, default=100)
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--select", default="manc", choices=["manc", "random"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: on a 2-core machine shared with other jobs, 2 OpenMP threads thrash)"
    )
    ap.add_argument("--methods", default="", help="comma-separated marker methods (default: every registered one)")
    ap.add_argument(
        "--attack-samples", type=int, default=0, help="training samples the attacks use (default 0: all, the protocol of the committed runs)"
    )
    ap.add_argument("--readme-only", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))
    if not args.readme_only:
        if not DATA.exists():
            print(f"MNIST not found at {DATA}", file=sys.stderr)
            return 2
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if name not in TRAINING:
                print(f"unknown model {name}: choose from {', '.join(TRAINING)}", file=sys.stderr)
                return 2
        failed = []
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            try:
                run_model(name, args)
            except Exception:  # one model failing must not lose the others
                traceback.print_exc()
                failed.append(name)
            _log(f"wrote {write_readme()}")
        return 1 if failed else 0
    _log(f"wrote {write_readme()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
