"""Boundary markers: how the margin band [≈δ, k·δ] changes label-only detection (MNIST, top-1).

Trains the zoo MLP, CNN and IRNN on 7 000 MNIST images (as ``mnist_campaign.py`` does, fewer
CNN epochs) and runs the evaluation harness with only the ``boundary`` method, for k = 3 and
k = 1.5, against fp16, bf16, int8, weight noise and flooring (2 trials, 2 000 resamples), with
benign re-verification on batch 1 and ONNX Runtime. Prints detection at N_S = 2 and 4.

    python bench/boundary_margin_band.py
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from tamperprobe import zoo
from tamperprobe.data import load_data
from tamperprobe.evaluation import run_evaluation
from tamperprobe.models import TorchModel
from tamperprobe.train import fit

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def main() -> None:
    torch.set_num_threads(1)
    data = load_data(DATA)
    train, _ = data.split(0.3, seed=0)
    print("| model | k | " + " | ".join(f"{a} N_S=2 / 4" for a in ("fp16", "bf16", "int8", "noise", "floor")) + " | false alarms | s |")
    print("|---|---|" + "---|" * 7)
    for arch, epochs in (("mlp", 10), ("cnn", 4), ("irnn", 12)):
        torch.manual_seed(0)
        module = fit(zoo.build(arch, (1, 28, 28)), train.x, train.y, epochs=epochs, lr=1e-3, seed=0)
        model = TorchModel(module, arch)
        for k in (3.0, 1.5):
            t = time.time()
            ev = run_evaluation(
                model,
                data,
                methods=["boundary"],
                attacks=["fp16", "bf16", "int8", "noise", "floor"],
                specs=["top1"],
                trials=2,
                baselines=False,
                method_params={"boundary": {"k": k}},
                resamples=2000,
                runtimes=("batch1", "onnx"),
            )
            rates = {a: v for (_, a), v in ev.detection_table("top1").items()}
            cells = " | ".join(f"{rates[a][1]:.4f} / {rates[a][3]:.4f}" for a in ("fp16", "bf16", "int8", "noise", "floor"))
            print(f"| {arch} | {k} | {cells} | {ev.benign_flagged}/{ev.benign_checks} | {time.time() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
