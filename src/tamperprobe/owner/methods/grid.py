"""TamperNN's GRID markers: random-bit inputs, every pixel at the low or the high end of the range.

Such inputs lie far from the data; their labels are arbitrary and often carried by small
margins, which makes them somewhat more sensitive than natural inputs. ``p_high`` is the
probability that a pixel is set to ``high``.
"""

from __future__ import annotations

import numpy as np

from ..._params import Interval
from ..._util import Progress
from ...data import Dataset
from ...models import Model
from .base import Bag, Method


class Grid(Method):
    """TamperNN GRID: random-bit inputs, each pixel at the low or the high end of the range.

    ``p_high`` is the probability of the high end.
    """

    name = "grid"
    constraints = {"p_high": Interval(0.0, 1.0)}

    def __init__(self, *, p_high: float = 0.5) -> None:
        self.p_high = p_high

    def _generate(self, model: Model, data: Dataset, bag: int, rng: np.random.Generator, progress: Progress) -> Bag:
        shape = (bag, *data.x.shape[1:])
        bits = rng.random(shape) < self.p_high
        x = np.where(bits, np.float32(data.high), np.float32(data.low)).astype(np.float32)
        labels = model.logits(x).argmax(axis=1)
        progress(bag, bag)
        return Bag(x, x.copy(), None, {"label": labels.astype(np.int64)})
