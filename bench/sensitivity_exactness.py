"""Exactness of the sensitivity on the pretrained CIFAR-10 ResNet-56, on its most confident inputs.

Compares ``sensitivity_and_grad`` (nn.Module, TorchScript, ``.pt2``; the model in float32) with
``naive_sensitivity`` (a float64 copy of the model, one backward per sample and class) on the 8
test images with the highest top probability and 2 ordinary ones; then the same route on a float64
copy, which isolates the algorithm from float32 rounding in the network; and the float32 closed
form of the revision before (``p2 - 2 p3 + p2^2``) on the same logits. The tests check the same
on the digits CNN (``tests/test_sensitivity.py``); this script needs ``../shared``.

    python bench/sensitivity_exactness.py --out bench/results/sensitivity-exactness.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    sys.path.insert(0, str(SHARED / "models" / "cifar10_resnet56"))
    import model_def

    from tamperprobe.models import ExportedModel, ScriptedModel, TorchModel
    from tamperprobe.owner.sensitivity import jacobian_norm, naive_sensitivity, resolve_params, sensitivity_and_grad

    m = model_def.load()
    xall = torch.from_numpy(np.load(SHARED / "data" / "cifar10" / "test1017_uint8.npz")["x"].astype(np.float32) / 255.0)
    with torch.no_grad():
        z = torch.cat([m(xall[i : i + 256]) for i in range(0, len(xall), 256)]).double()
    rest = -torch.expm1(torch.log_softmax(z, -1).max(-1).values)  # 1 - p_top
    order = torch.argsort(rest)
    idx = torch.cat([order[:8], order[len(order) // 2 : len(order) // 2 + 2]])
    x = xall[idx]
    names = resolve_params(m, None)
    xr = x.clone().requires_grad_(True)
    ref = naive_sensitivity(TorchModel(m), xr, names)
    (g_ref,) = torch.autograd.grad(ref.sum(), xr)
    ref = ref.detach()

    def errors(s: torch.Tensor, g: torch.Tensor) -> str:
        rel = float(((s - ref).abs() / ref).max())
        batch = float((g.double() - g_ref).norm() / g_ref.norm())
        worst = float(((g.double() - g_ref).flatten(1).norm(dim=1) / g_ref.flatten(1).norm(dim=1)).max())
        return f"{rel:.1e} | {batch:.1e} | {worst:.1e}"

    batch = torch.export.Dim("batch", min=1, max=4096)
    models = {
        "nn.Module, float32": TorchModel(m),
        "TorchScript, float32": ScriptedModel(torch.jit.trace(m, x[:2], check_trace=False)),
        ".pt2, float32": ExportedModel(torch.export.export(m, (x[:2],), dynamic_shapes=({0: batch},)).module()),
    }
    rows = ["| model | S: max rel. error | dS/dx: rel. error (batch) | dS/dx: worst sample |", "|---|---:|---:|---:|"]
    for name, model in models.items():
        rows.append(f"| {name} | {errors(*sensitivity_and_grad(model, x, names))} |")
    m64 = copy.deepcopy(m).double()
    rows.append(f"| nn.Module, float64 copy | {errors(*sensitivity_and_grad(TorchModel(m64), x.double(), names))} |")
    with torch.no_grad():
        z32, z64 = m(x).double(), m64(x.double())
    p = torch.softmax(z32.float(), -1)
    p2 = (p * p).sum(-1)
    old = (p2 - 2 * (p**3).sum(-1) + p2 * p2).double()
    old_err = ((old - jacobian_norm(z32)) / jacobian_norm(z32)).abs()
    lines = [
        f"# Sensitivity exactness on the pretrained ResNet-56 ({datetime.now(UTC).date()})",
        "",
        "`python bench/sensitivity_exactness.py`: the default W (last layer's weight and bias), softmax output. Of the 1,017 "
        f"test images {int((rest < 1e-4).sum())} have top probability > 0.9999; the tested ones have 1 − p_top = "
        + ", ".join(f"{v:.1e}" for v in rest[idx].tolist())
        + ". Reference: `naive_sensitivity` (float64 copy, one backward per sample and class).",
        "",
        *rows,
        "",
        f"float32 vs float64 logits on these inputs: max |Δz| = {float((z32 - z64).abs().max()):.1e} (max |z| = {float(z64.abs().max()):.1f}). "
        "S depends on the logit gaps through p_k² ≈ exp(2(z_k − z_top)), so a float32 network alone moves S by about 2·|Δz| "
        "relative: the float32 rows are at the precision of the network's own float32 logits, and the float64 row shows "
        "the route itself is exact in S. (Its dS/dx differs from the reference by about 2e-8 in float64; both are float64 "
        "backward passes through 56 layers, batched against per sample and per class; not investigated further.)",
        "",
        "The float32 closed form of the revision before (||J||² = Σp² − 2Σp³ + (Σp²)²) on the same float32 logits: relative errors "
        + ", ".join(f"{v:.1e}" for v in old_err.tolist())
        + ".",
    ]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
