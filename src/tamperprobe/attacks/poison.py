"""Data poisoning: relabel the target class's training samples and fine-tune.

``poison-generic``: success = share of ``target`` evaluation samples the model now gets wrong.
``poison-specific``: success = share of ``target`` evaluation samples classified ``to``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from .._params import Interval
from .._torch import predict
from ..errors import UsageError
from .base import TRAINING_CONSTRAINTS, Attack, Context, check_class, fine_tune, labelled, rng_for

CONSTRAINTS: dict[str, Any] = {**TRAINING_CONSTRAINTS, "target": Interval(0, None, integer=True), "to": Interval(0, None, integer=True)}


def _target_rows(ctx: Context, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = labelled(ctx.train)
    rows = np.flatnonzero(y == target)
    if len(rows) == 0:
        raise UsageError(f"the training data holds no sample of class {target}")
    return x, y.copy(), rows


def _eval_rows(ctx: Context, target: int) -> np.ndarray | None:
    ds = ctx.eval
    if ds is None or ds.y is None:
        return None
    keep = np.asarray(ds.y) == target
    return ds.x[keep] if keep.any() else None


class PoisonGeneric(Attack):
    """The target class's training samples get random wrong labels (seeded); fine-tune."""

    name = "poison-generic"
    needs_data = True
    random = True
    constraints = CONSTRAINTS

    def __init__(self, *, target: int = 0, epochs: int = 10, lr: float = 1e-3, batch_size: int = 64) -> None:
        self.target = target
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size

    def resolve(self, model: nn.Module, ctx: Context) -> dict[str, Any]:
        if (ctx.classes or 2) < 2:
            raise UsageError("poisoning needs a model with at least two classes")
        return {"target": check_class("target", self.target, ctx.classes or 2)}

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        classes = ctx.classes or 2
        x, y, rows = _target_rows(ctx, self.target)
        wrong = rng_for(ctx.seed, 3).integers(0, classes - 1, size=len(rows))
        y[rows] = wrong + (wrong >= self.target)
        fine_tune(model, x, y, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=ctx.seed)
        return model

    def success(self, model: nn.Module, ctx: Context) -> float | None:
        xs = _eval_rows(ctx, self.target)
        return None if xs is None else float((predict(model, xs) != self.target).mean())


class PoisonSpecific(Attack):
    """The target class's training samples are relabelled to one chosen class (to, default target + 1); fine-tune."""

    name = "poison-specific"
    needs_data = True
    random = True
    constraints = CONSTRAINTS

    def __init__(self, *, target: int = 0, to: int | None = None, epochs: int = 10, lr: float = 1e-3, batch_size: int = 64) -> None:
        self.target = target
        self.to = to
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size

    def resolve(self, model: nn.Module, ctx: Context) -> dict[str, Any]:
        classes = ctx.classes or 2
        target = check_class("target", self.target, classes)
        to = check_class("to", (target + 1) % classes if self.to is None else self.to, classes)
        if to == target:
            raise UsageError("poison-specific needs to != target")
        return {"target": target, "to": to}

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        x, y, rows = _target_rows(ctx, self.target)
        y[rows] = self.to
        fine_tune(model, x, y, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=ctx.seed)
        return model

    def success(self, model: nn.Module, ctx: Context) -> float | None:
        xs = _eval_rows(ctx, self.target)
        return None if xs is None else float((predict(model, xs) == self.to).mean())
