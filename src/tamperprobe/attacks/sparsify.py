"""Sparsifying attacks (weight-only; work on TorchScript and torch.export modules too).

``floor`` (TamperNN's flooring): every parameter entry with |w| below a threshold is set to
0. Default threshold (``threshold=none``): ``relative`` (0.05) times each tensor's standard
deviation, which zeroes about 4 % of the entries of a roughly Gaussian tensor; an absolute
``threshold`` applies to all tensors instead.
``prune``: global L1 unstructured pruning of the weight matrices / kernels (dim >= 2) at
``ratio`` (default 0.1) with ``torch.nn.utils.prune.global_unstructured`` followed by
``prune.remove``. TorchScript modules cannot be re-parametrised; for them the same global
smallest-|w| mask is computed and applied directly (identical result).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from .base import Attack, Context, float_parameters, is_script, register


@register
class Floor(Attack):
    name = "floor"
    summary = "set small weights (|w| < threshold) to zero"
    defaults = {"threshold": None, "relative": 0.05}

    def apply(self, model: nn.Module, ctx: Context, p: dict[str, Any]) -> nn.Module:
        thr = p["threshold"]
        if thr is not None and float(thr) < 0 or float(p["relative"]) < 0:
            raise UsageError("floor thresholds must be >= 0")
        with torch.no_grad():
            for _, t in float_parameters(model):
                if thr is not None:
                    level = float(thr)
                elif t.numel() > 1:
                    level = float(p["relative"]) * float(t.float().std())
                else:
                    continue
                t.masked_fill_(t.abs() < level, 0.0)
        return model


def global_l1_mask(tensors: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """Masks zeroing the round(ratio * total) smallest-|w| entries over all tensors together."""
    flat = torch.cat([t.detach().abs().flatten() for t in tensors])
    k = int(round(ratio * flat.numel()))
    keep = torch.ones_like(flat)
    if k:
        keep[torch.topk(flat, k, largest=False).indices] = 0.0
    out, start = [], 0
    for t in tensors:
        out.append(keep[start : start + t.numel()].view_as(t))
        start += t.numel()
    return out


@register
class Prune(Attack):
    name = "prune"
    summary = "global L1 unstructured pruning of the weights at a ratio (made permanent)"
    defaults = {"ratio": 0.1}

    def apply(self, model: nn.Module, ctx: Context, p: dict[str, Any]) -> nn.Module:
        ratio = float(p["ratio"])
        if not 0.0 <= ratio <= 1.0:
            raise UsageError(f"prune ratio must lie in [0, 1], got {ratio}")
        named = float_parameters(model, matrices_only=True)
        if not named:
            raise UsageError("the model has no weight matrices to prune")
        if is_script(model):
            with torch.no_grad():
                for (_, t), m in zip(named, global_l1_mask([t for _, t in named], ratio)):
                    t.mul_(m)
            return model
        from torch.nn.utils import prune

        pairs = []
        for name, _ in named:
            owner, _, attr = name.rpartition(".")
            pairs.append((model.get_submodule(owner) if owner else model, attr))
        prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured, amount=ratio)
        for mod, attr in pairs:
            prune.remove(mod, attr)
        return model
