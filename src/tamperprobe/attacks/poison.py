"""Data poisoning: relabel the target class's training samples and fine-tune.

``poison-generic``: every training sample of ``target`` gets a random other label (seeded);
success = share of ``target`` evaluation samples the model now gets wrong.
``poison-specific``: every training sample of ``target`` is relabelled ``to`` (default
target + 1 mod classes); success = share of ``target`` evaluation samples classified ``to``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from ..errors import UsageError
from .base import Attack, Context, check_class, fit, labelled, predict, register, rng_for


def _target_rows(ctx: Context, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = labelled(ctx.train)
    rows = np.flatnonzero(y == target)
    if len(rows) == 0:
        raise UsageError(f"the training data holds no sample of class {target}")
    return x, y.copy(), rows


def _eval_rows(ctx: Context, target: int):
    ds = ctx.eval
    if ds is None or ds.y is None:
        return None
    keep = np.asarray(ds.y) == target
    return ds.x[keep] if keep.any() else None


@register
class PoisonGeneric(Attack):
    name = "poison-generic"
    summary = "the target class's training samples get random wrong labels; fine-tune"
    defaults = {"target": 0, "epochs": 10, "lr": 1e-3, "batch_size": 64}
    needs_data = True
    random = True

    def apply(self, model: nn.Module, ctx: Context, p: dict[str, Any]) -> nn.Module:
        classes = ctx.classes or 2
        if classes < 2:
            raise UsageError("poisoning needs a model with at least two classes")
        target = p["target"] = check_class("target", p["target"], classes)
        x, y, rows = _target_rows(ctx, target)
        wrong = rng_for(ctx.seed, 3).integers(0, classes - 1, size=len(rows))
        y[rows] = wrong + (wrong >= target)
        fit(model, x, y, p, ctx.seed)
        return model

    def success(self, model: nn.Module, ctx: Context, p: dict[str, Any]) -> float | None:
        xs = _eval_rows(ctx, p["target"])
        return None if xs is None else float((predict(model, xs) != p["target"]).mean())


@register
class PoisonSpecific(Attack):
    name = "poison-specific"
    summary = "the target class's training samples are relabelled to one chosen class; fine-tune"
    defaults = {"target": 0, "to": None, "epochs": 10, "lr": 1e-3, "batch_size": 64}
    needs_data = True
    random = True

    def apply(self, model: nn.Module, ctx: Context, p: dict[str, Any]) -> nn.Module:
        classes = ctx.classes or 2
        target = p["target"] = check_class("target", p["target"], classes)
        to = (target + 1) % classes if p["to"] is None else p["to"]
        to = p["to"] = check_class("to", to, classes)
        if to == target:
            raise UsageError("poison-specific needs to != target")
        x, y, rows = _target_rows(ctx, target)
        y[rows] = to
        fit(model, x, y, p, ctx.seed)
        return model

    def success(self, model: nn.Module, ctx: Context, p: dict[str, Any]) -> float | None:
        xs = _eval_rows(ctx, p["target"])
        return None if xs is None else float((predict(model, xs) == p["to"]).mean())
