"""The shape every marker generator shares.

A generator takes the white-box model and natural data and returns a *bag* of candidate
markers; a selector (``tamperprobe.owner.selection``) then keeps ``size`` of them. Constructor
arguments are keyword-only hyper-parameters and are all recorded in the fingerprint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ...data import Dataset
from ...models import Model

Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class Bag:
    """Candidate markers: ``inputs`` exactly as they would be sent, ``seeds`` their natural starting points.

    ``groups`` ties markers that must be kept together (e.g. the two halves of a boundary
    pair): selection keeps or drops a group whole. ``None`` means every marker stands alone.
    ``info`` holds per-candidate statistics (arrays of length len(inputs)) and summaries.
    """

    inputs: np.ndarray
    seeds: np.ndarray
    groups: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, idx: np.ndarray) -> Bag:
        idx = np.asarray(idx, dtype=np.int64)
        info = {k: (v[idx] if isinstance(v, np.ndarray) and len(v) == len(self.inputs) else v) for k, v in self.info.items()}
        groups = None if self.groups is None else self.groups[idx]
        return Bag(self.inputs[idx], self.seeds[idx], groups, info)


class Method(ABC):
    name: ClassVar[str]

    def __init__(self, **params: Any) -> None:
        self._params = dict(params)

    def params(self) -> dict[str, Any]:
        """Every hyper-parameter, as recorded in the fingerprint."""
        return dict(self._params)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    @abstractmethod
    def generate(self, model: Model, data: Dataset, bag: int, rng: np.random.Generator, progress: Progress | None = None) -> Bag:
        """Return a bag of ``bag`` candidate markers within the data's input range."""
