"""Does the default label-only margin clear the benign floor on the CIFAR-10 ResNet-56? (session 3)

Fingerprints the pretrained ResNet-56 (``../shared/models/cifar10_resnet56``) for a top-1 API with
the default method (``crossed``), once with the default margin rule (δ raised to 10 benign floors
when 1e-4 is below that) and once with ``--param delta=1e-4`` forced, and runs every marker
through ONNX Runtime at batch sizes 1 and 64 and through torch eager at batch size 1, counting
markers whose top-1 label differs from the recorded one (benign flips: each is a false alarm).

    python bench/margin_floor.py --size 60 --out bench/results/margin-floor.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _cifar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=60)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from tamperprobe.models import TorchModel, load_model, save_model
    from tamperprobe.owner.generate import create_fingerprint

    module = _cifar.load_resnet56()
    data = _cifar.load_cifar10()
    model = TorchModel(module, "cifar10_resnet56")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        onnx = load_model(save_model(module, Path(d) / "r56.onnx", data.x[:2]))
        for label, params in (("default rule", {}), ("delta=1e-4 forced", {"delta": 1e-4})):
            t = time.perf_counter()
            fp = create_fingerprint(model, data, output_spec="top1", size=a.size, bag=a.size, decoys=0, params=params, seed=0)
            took = time.perf_counter() - t
            labels = fp.logits.argmax(axis=1)
            flips = {
                "onnx b64": int((onnx.logits(fp.inputs, batch_size=64).argmax(axis=1) != labels).sum()),
                "onnx b1": int((onnx.logits(fp.inputs, batch_size=1).argmax(axis=1) != labels).sum()),
                "torch b1": int((model.logits(fp.inputs, batch_size=1).argmax(axis=1) != labels).sum()),
            }
            raised = fp.extra.get("delta_raised")
            floor = fp.extra["benign_noise"]["floor"]
            rows.append(
                f"| {label} | {fp.generator['params']['delta']:.3g} | {floor:.3g} | {fp.tolerance:.3g} | "
                f"{'yes' if raised else 'no'} | {took:.0f} s | {len(fp)} | {flips['onnx b64']} / {flips['onnx b1']} / {flips['torch b1']} |"
            )
            print(rows[-1], flush=True)
    text = "\n".join(
        [
            "# The label-only margin against the benign floor (CIFAR-10 ResNet-56)",
            "",
            f"`python bench/margin_floor.py --size {a.size}`: a top-1 fingerprint of the pretrained ResNet-56 with the default",
            "method (`crossed`), bag = size, no decoys, one torch thread on a shared 2-core machine. Benign flips: markers whose",
            "top-1 label differs from the recorded one under ONNX Runtime (batch 64 / batch 1) and torch eager at batch 1.",
            "",
            "| margin | δ | benign floor on the markers | τ | δ raised | fingerprint time | markers | benign flips (ONNX b64 / ONNX b1 / torch b1) |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(text)
    if a.out is not None:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
