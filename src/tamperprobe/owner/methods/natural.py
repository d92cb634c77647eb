"""TamperNN's NATURAL markers: inputs drawn at random from the natural data.

The baseline of Merrer & Trédan (TamperNN, 2019): a marker is a data sample, unchanged. Its
top-1 label flips only under a large tampering, so these markers are weak with a label-only
API; they serve as the control every other method is compared against.
"""

from __future__ import annotations

import numpy as np

from ..._util import Progress
from ...data import Dataset
from ...models import Model
from ..markers import sample_indices
from .base import Bag, Method


class Natural(Method):
    """TamperNN SM: inputs drawn from the natural data.

    ``replace=True`` allows repeats even when the data is large enough.
    """

    name = "natural"

    def __init__(self, *, replace: bool = False) -> None:
        self.replace = replace

    def _generate(self, model: Model, data: Dataset, bag: int, rng: np.random.Generator, progress: Progress) -> Bag:
        if self.replace:
            idx = rng.integers(0, len(data.x), size=bag).astype(np.int64)
        else:
            idx = sample_indices(len(data.x), bag, rng)
        x = np.ascontiguousarray(data.x[idx], dtype=np.float32)
        labels = model.logits(x).argmax(axis=1)
        progress(bag, bag)
        return Bag(x, x.copy(), None, {"index": idx, "label": labels.astype(np.int64)})
