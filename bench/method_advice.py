"""Write the benchmark table that ``tamperprobe.owner.advice`` reads (which method suits which output spec).

Reads the committed MNIST campaigns ``bench/results/*-{cnn,irnn,mlp}/results.json`` and keeps, per run, output spec,
method and attack, the detection rate at N_S = 10 queries (averaged over the attack's trials, as
in the run's report). The table ships inside the package as
``src/tamperprobe/owner/benchmark_detection.json``; ``tests/test_advice.py`` checks that it is
exactly what this script writes from the committed results.

    python bench/method_advice.py            # rewrite the table
    python bench/method_advice.py --check    # exit 1 when the table differs from the results
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TABLE = REPO / "src" / "tamperprobe" / "owner" / "benchmark_detection.json"
QUERIES = 10
FORMAT = "tamperprobe.benchmark-detection/v1"
# The advice quotes the three MNIST models' campaigns. The CIFAR-10 ResNet-56 campaign is reported on its own
# (bench/results/2026-11-22-cifar10-resnet56/summary.md): its MANC selection on globally pooled features
# depresses several methods there, so folding it in needs that settled first.
ADVICE_RUNS = re.compile(r"-(cnn|irnn|mlp)$")


def build(results: Path = RESULTS) -> dict:
    runs = {}
    for path in sorted(results.glob("*/results.json")):
        if not ADVICE_RUNS.search(path.parent.name):
            continue
        doc = json.loads(path.read_text())
        params = doc["params"]
        attacks = list(params["attacks"])
        rates: dict[str, dict[str, list[float | None]]] = {}
        for row in doc["detection"]:
            if int(row["ns"]) != QUERIES:
                continue
            per_method = rates.setdefault(row["spec"], {}).setdefault(row["method"], [None] * len(attacks))
            per_method[attacks.index(row["attack"])] = round(float(row["rate"]), 4)
        runs[path.parent.name] = {
            "model": str(doc["model"]["source"]),
            "data": f"{params['data']['name']} ({params['data']['train']} train / {params['data']['test']} test)",
            "attacks": attacks,
            "rates": rates,
        }
    return {"format": FORMAT, "queries": QUERIES, "source": "bench/results/*/results.json (python bench/method_advice.py)", "runs": runs}


def render(table: dict) -> str:
    """Indented JSON with every list on one line (one line per method and spec: readable diffs)."""
    text = json.dumps(table, indent=1, sort_keys=True)
    return re.sub(r"\[\n\s*([^\[\]{}]*?)\n\s*\]", lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args()
    text = render(build())
    if args.check:
        same = TABLE.exists() and TABLE.read_text() == text
        print("up to date" if same else f"{TABLE} differs from bench/results")
        return 0 if same else 1
    TABLE.write_text(text)
    print(f"wrote {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
