"""Boundary markers of the pretrained CIFAR-10 ResNet-56 read INTACT through ONNX Runtime under the default tolerance.

The CIFAR-10 campaign once saw a false alarm: a boundary marker's logits moved under ONNX Runtime by more than
the fixed tolerance of the time. The fingerprint's tolerance now follows the benign floor it measures. This
checks, on the third-party ResNet-56 of ``../shared/models/cifar10_resnet56`` (200 of the shared CIFAR-10 test
images), that a boundary fingerprint made with the defaults reads INTACT through ONNX Runtime under logits,
top1 and probs:4, whole-batch and one input at a time, and that an fp16 copy exported to ONNX reads TAMPERED.
It was a test; it moved here because it takes 30-45 s of a 2-core machine and needs files the test suite must
not need. ``tests/test_tolerance.py`` keeps the property on an in-suite deep model
(``test_label_only_markers_get_a_margin_above_the_benign_floor_on_a_deep_model`` for boundary-family markers
through ONNX Runtime, ``test_deep_model_reads_intact_through_other_runtimes_under_the_default_tolerance``).

    OMP_NUM_THREADS=1 python bench/resnet56_onnx_tolerance.py --out bench/results/resnet56-onnx-tolerance.md

Exit 0 when every verdict is the expected one, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

import _cifar


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/resnet56-onnx-tolerance.md"))
    args = ap.parse_args()

    import torch

    from tamperprobe.attacks import get_attack
    from tamperprobe.data import Dataset
    from tamperprobe.models import TorchModel, save_model
    from tamperprobe.owner import calibrate as cal
    from tamperprobe.owner.generate import create_fingerprint
    from tamperprobe.served.targets import LocalTarget
    from tamperprobe.served.verify import INTACT, TAMPERED, verify

    torch.set_num_threads(1)
    missing = _cifar.available()
    if missing:
        print(f"CIFAR-10 model or data not found: {missing}", file=sys.stderr)
        return 2
    module, full = _cifar.load_resnet56(), _cifar.load_cifar10()
    data = Dataset(full.x[:200], full.y[:200], "cifar10[200]", 0.0, 1.0)
    start = time.perf_counter()
    fp = create_fingerprint(TorchModel(module), data, method="boundary", select="random", size=10, bag=10, decoys=10, seed=0)
    made = time.perf_counter() - start
    noise = fp.extra["benign_noise"]
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx = save_model(module, Path(tmp) / "resnet56.onnx", data.x[:2])
        for spec in ("logits", "top1", "probs:4"):
            for how, target in (("whole batch", {}), ("batch size 1", {"batch_size": 1})):
                rows.append((f"intact ONNX, {spec}, {how}", INTACT, verify(fp, LocalTarget(onnx, **target), spec).verdict))
        tampered = get_attack("fp16").run(module, seed=0).model
        fp16 = save_model(tampered, Path(tmp) / "fp16.onnx", data.x[:2])
        rows.append(("fp16 copy as ONNX, logits", TAMPERED, verify(fp, LocalTarget(fp16), "logits").verdict))
    checks = [
        ("tolerance = tolerance_from_noise(measured floor)", fp.tolerance == cal.tolerance_from_noise(noise["floor"])),
        ("ONNX Runtime among the measured runtimes", "onnx" in noise["runtimes"]),
    ]
    ok = all(want == got for _, want, got in rows) and all(good for _, good in checks)
    lines = [
        "# Boundary markers of the CIFAR-10 ResNet-56 through ONNX Runtime",
        "",
        f"`OMP_NUM_THREADS=1 python bench/resnet56_onnx_tolerance.py` ({dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}; "
        f"load average {os.getloadavg()[0]:.1f} at the end; torch {torch.__version__}). The pretrained third-party ResNet-56 of "
        "`../shared/models/cifar10_resnet56`, 200 shared CIFAR-10 test images; `create_fingerprint(method='boundary', select='random', "
        "size=10, bag=10, decoys=10, seed=0)` with the default tolerance and margin. This was a test of the suite until 2026-12-06 "
        "(moved here for its 30-45 s; the docstring names the in-suite tests that keep the property).",
        "",
        f"- fingerprint made in {made:.1f} s; measured benign floor {noise['floor']:.3g} over {', '.join(noise['runtimes'])}; "
        f"tolerance {fp.tolerance:.3g}; margin {fp.generator['params'].get('delta')}",
        "",
        "| check | expected | got |",
        "|---|---|---|",
        *(f"| {what} | {want} | {got} |" for what, want, got in rows),
        *(f"| {what} | yes | {'yes' if good else 'NO'} |" for what, good in checks),
        "",
        f"**All as expected: {'yes' if ok else 'NO'}**",
        "",
    ]
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
