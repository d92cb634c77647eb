"""TamperNN's GRID markers: random-bit inputs, every pixel at the low or the high end of the range.

Such inputs lie far from the data; their labels are arbitrary and often carried by small
margins, which makes them somewhat more sensitive than natural inputs. ``p_high`` is the
probability that a pixel is set to ``high``.
"""

from __future__ import annotations

import numpy as np

from ...data import Dataset
from ...errors import UsageError
from ...models import Model
from .base import Bag, Method, Progress


class Grid(Method):
    name = "grid"

    def __init__(self, *, p_high: float = 0.5) -> None:
        p_high = float(p_high)
        if not 0.0 <= p_high <= 1.0:
            raise UsageError(f"p_high must lie in [0, 1], got {p_high}")
        super().__init__(p_high=p_high)
        self.p_high = p_high

    def generate(self, model: Model, data: Dataset, bag: int, rng: np.random.Generator, progress: Progress | None = None) -> Bag:
        if bag < 1:
            raise UsageError("bag must be at least 1")
        shape = (bag, *data.x.shape[1:])
        bits = rng.random(shape) < self.p_high
        x = np.where(bits, np.float32(data.high), np.float32(data.low)).astype(np.float32)
        labels = model.logits(x).argmax(axis=1)
        if progress:
            progress(bag, bag)
        return Bag(x, x.copy(), None, {"label": labels.astype(np.int64)})
