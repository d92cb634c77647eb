"""Sparsifying attacks (weight-only; work on TorchScript and torch.export modules too)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .._params import Interval
from ..errors import UsageError
from .base import Attack, Context, float_parameters, is_script


class Floor(Attack):
    """TamperNN's flooring: set small weights (|w| < threshold) to zero.

    Default threshold (``threshold=none``): ``relative`` (0.05) times each tensor's standard
    deviation, which zeroes about 4 % of the entries of a roughly Gaussian tensor; an absolute
    ``threshold`` applies to all tensors instead.
    """

    name = "floor"
    constraints: ClassVar[dict[str, Any]] = {"threshold": Interval(0, None), "relative": Interval(0, None)}

    def __init__(self, *, threshold: float | None = None, relative: float = 0.05) -> None:
        self.threshold = threshold
        self.relative = relative

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        with torch.no_grad():
            for _, t in float_parameters(model):
                if self.threshold is not None:
                    level = self.threshold
                elif t.numel() > 1:
                    level = self.relative * float(t.float().std())
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


class Prune(Attack):
    """Global L1 unstructured pruning of the weight matrices / kernels (dim >= 2) at a ratio, made permanent.

    ``torch.nn.utils.prune.global_unstructured`` followed by ``prune.remove``. TorchScript modules
    cannot be re-parametrised; for them the same global smallest-|w| mask is computed and applied
    directly (identical result).
    """

    name = "prune"
    constraints: ClassVar[dict[str, Any]] = {"ratio": Interval(0, 1)}

    def __init__(self, *, ratio: float = 0.1) -> None:
        self.ratio = ratio

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        named = float_parameters(model, matrices_only=True)
        if not named:
            raise UsageError("the model has no weight matrices to prune")
        if is_script(model):
            with torch.no_grad():
                for (_, t), m in zip(named, global_l1_mask([t for _, t in named], self.ratio)):
                    t.mul_(m)
            return model
        from torch.nn.utils import prune

        pairs = []
        for name, _ in named:
            owner, _, attr = name.rpartition(".")
            pairs.append((model.get_submodule(owner) if owner else model, attr))
        prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured, amount=self.ratio)
        for mod, attr in pairs:
            prune.remove(mod, attr)
        return model
