"""Fingerprint generation at 1,000 classes: cost and peak memory against the same body with 10 outputs.

Bodies (random weights; BatchNorm statistics set by one pass over the inputs in training mode,
so activations have sensible scales; cost does not depend on the values):

* ``resnet18``: a ResNet-18-sized network (basic blocks [2, 2, 2, 2], 64–512 channels, 7×7 stem)
  on 3×224×224 inputs (the first CIFAR-10 test images, upsampled);
* ``resnet56``: the CIFAR-10 ResNet-56 body of ``../shared/models/cifar10_resnet56/model_def.py``
  on 3×32×32 CIFAR-10 test images.

Each case runs ``create_fingerprint`` (generation, MANC selection, recording the logits) in a fresh
subprocess, so that its peak resident memory (``ru_maxrss``) is its own; cases are interleaved and
repeated (``boundary`` cases once: about two minutes each on the ResNet-18 body). The ``sensitive``
cases run a fixed number of ascent steps with early stopping off, so that 10 and 1,000 classes do
the same work; ``boundary`` runs with its defaults on a small bag.

Acceptance (issue 11): ``sensitive`` at 1,000 classes costs at most 1.5× the cost at 10 classes on
the same body, and stays under 2 GB peak for a bag of 100 on the ResNet-56 body.

    python bench/sensitivity_classes.py --out bench/results/sensitivity-classes.md
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESNET = SHARED / "models" / "cifar10_resnet56"
CIFAR = SHARED / "data" / "cifar10" / "test1017_uint8.npz"

# name -> (body, classes, method, bag, size, method parameters)
CASES: dict[str, tuple[str, int, str, int, int, dict[str, object]]] = {
    "resnet56-10-sensitive": ("resnet56", 10, "sensitive", 100, 10, {"steps": 10, "patience": 0}),
    "resnet56-1000-sensitive": ("resnet56", 1000, "sensitive", 100, 10, {"steps": 10, "patience": 0}),
    "resnet18-10-sensitive": ("resnet18", 10, "sensitive", 16, 8, {"steps": 4, "patience": 0}),
    "resnet18-1000-sensitive": ("resnet18", 1000, "sensitive", 16, 8, {"steps": 4, "patience": 0}),
    "resnet56-10-boundary": ("resnet56", 10, "boundary", 20, 10, {}),
    "resnet56-1000-boundary": ("resnet56", 1000, "boundary", 20, 10, {}),
    "resnet18-10-boundary": ("resnet18", 10, "boundary", 8, 4, {}),
    "resnet18-1000-boundary": ("resnet18", 1000, "boundary", 8, 4, {}),
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _resnet18(classes: int) -> Any:
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else nn.Identity()
            )

        def forward(self, x: Any) -> Any:
            out = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
            return (out + self.down(x)).relu()

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def run_case(name: str) -> dict[str, Any]:
    """One case in this process: build, generate, report seconds and memory."""
    import torch

    from tamperprobe.data import Dataset
    from tamperprobe.models import TorchModel
    from tamperprobe.owner.generate import create_fingerprint

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    body, classes, method, bag, size, params = CASES[name]
    torch.manual_seed(0)
    images = np.load(CIFAR)["x"][: max(bag, 32)].astype(np.float32) / 255.0
    if body == "resnet18":
        module = _resnet18(classes)
        x = torch.nn.functional.interpolate(torch.from_numpy(images), size=224, mode="bilinear", align_corners=False).clamp(0, 1).numpy()
    else:
        sys.path.insert(0, str(RESNET))
        import model_def

        module = model_def.ResNet56Cifar(num_classes=classes)
        x = images
    for m in module.modules():  # BatchNorm statistics from the inputs, weights untouched
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    module.train()
    with torch.no_grad():
        module(torch.from_numpy(x[:32]))
    module.eval()
    data = Dataset(np.ascontiguousarray(x), None, f"cifar{x.shape[-1]}", 0.0, 1.0)
    model = TorchModel(module, f"{body}-{classes}")
    before = _rss_mb()
    t = time.perf_counter()
    fp = create_fingerprint(model, data, method=method, size=size, bag=bag, seed=0, params=params)
    seconds = time.perf_counter() - t
    return {
        "case": name,
        "seconds": seconds,
        "peak_mb": _rss_mb(),
        "before_mb": before,
        "markers": len(fp),
        "selection": fp.generator["selection"],
        "parameters": sum(p.numel() for p in module.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="run one case in this process and print its JSON line")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)), flush=True)
        return
    names = args.cases.split(",")
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    t0 = time.monotonic()
    for rep in range(args.repeats):
        for n in names:
            if rep > 0 and CASES[n][2] == "boundary":  # minutes each on the ResNet-18 body: once
                continue
            proc = subprocess.run([sys.executable, __file__, "--case", n], capture_output=True, text=True)
            if proc.returncode != 0:
                results[n].append({"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"})
            else:
                results[n].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rep, n, results[n][-1], flush=True)
    import torch

    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    lines = [
        f"# Fingerprint generation at 1,000 classes ({datetime.now(UTC).date()})",
        "",
        f"`python bench/sensitivity_classes.py {' '.join(sys.argv[1:])}` at {head}: {platform.machine()}, 1 torch thread, "
        f"torch {torch.__version__}, every case in its own subprocess, {args.repeats} interleaved repeats (boundary once); "
        f"{time.monotonic() - t0:.0f} s in all. Seconds: `create_fingerprint` (generation, MANC selection, recorded "
        "logits). Peak: the subprocess's maximum resident memory (`ru_maxrss`, includes Python, torch and the model); "
        "before: the same just before `create_fingerprint`. Machine shared with other jobs: compare ratios.",
        "",
        "| case | parameters | bag | method parameters | min s | median s | ÷ 10 classes | peak MB | before MB | markers | selection |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for n in names:
        ok = [r for r in results[n] if "error" not in r]
        body, classes, method, bag, _, params = CASES[n]
        if not ok:
            lines.append(f"| {n} | | {bag} | {params} | error: {results[n][-1]['error']} | | | | | | |")
            continue
        secs = [float(r["seconds"]) for r in ok]
        base = n.replace(f"-{classes}-", "-10-")
        ratio = ""
        if classes != 10 and results.get(base):
            base_ok = [float(r["seconds"]) for r in results[base] if "error" not in r]
            ratio = f"{min(secs) / min(base_ok):.2f}" if base_ok else ""
        peak = max(float(r["peak_mb"]) for r in ok)
        before = max(float(r["before_mb"]) for r in ok)
        lines.append(
            f"| {n} | {int(ok[0]['parameters']):,} | {bag} | {params or 'defaults'} | {min(secs):.1f} | {float(np.median(secs)):.1f} | {ratio} | "
            f"{peak:.0f} | {before:.0f} | {ok[0]['markers']} | {ok[0]['selection']} |"
        )
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
