"""TamperNN's NATURAL markers: inputs drawn at random from the natural data.

The baseline of Merrer & Trédan (TamperNN, 2019): a marker is a data sample, unchanged. Its
top-1 label flips only under a large tampering, so these markers are weak with a label-only
API; they serve as the control every other method is compared against.
"""

from __future__ import annotations

import numpy as np

from ...data import Dataset
from ...errors import UsageError
from ...models import Model
from .base import Bag, Method, Progress


def sample_indices(n_available: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices into ``range(n_available)``: without replacement while possible, then with."""
    if n_available < 1:
        raise UsageError("the data set is empty")
    if n <= n_available:
        return rng.permutation(n_available)[:n].astype(np.int64)
    extra = rng.integers(0, n_available, size=n - n_available)
    return np.concatenate([rng.permutation(n_available), extra]).astype(np.int64)


class Natural(Method):
    """Random natural inputs (``replace=True`` allows repeats even when the data is large enough)."""

    name = "natural"

    def __init__(self, *, replace: bool = False) -> None:
        super().__init__(replace=bool(replace))
        self.replace = bool(replace)

    def generate(self, model: Model, data: Dataset, bag: int, rng: np.random.Generator, progress: Progress | None = None) -> Bag:
        if bag < 1:
            raise UsageError("bag must be at least 1")
        if self.replace:
            idx = rng.integers(0, len(data.x), size=bag).astype(np.int64)
        else:
            idx = sample_indices(len(data.x), bag, rng)
        x = np.ascontiguousarray(data.x[idx], dtype=np.float32)
        labels = model.logits(x).argmax(axis=1)
        if progress:
            progress(bag, bag)
        return Bag(x, x.copy(), None, {"index": idx, "label": labels.astype(np.int64)})
