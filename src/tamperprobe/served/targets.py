"""What verification talks to: anything that answers prediction requests.

A local model and a remote endpoint implement the same small interface, so ``verify``
does not know which it is talking to. ``query`` returns one entry per input, in order: an
``Answer`` or a ``QueryFailure`` saying why that marker got no usable answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ..data import InputSpec
from ..errors import UsageError
from ..models import Model
from ..outputs import Answer, OutputSpec


@dataclass(frozen=True)
class QueryFailure:
    reason: str

    def __str__(self) -> str:
        return self.reason


@runtime_checkable
class Target(Protocol):
    name: str

    def query(self, inputs: np.ndarray, spec: OutputSpec) -> list[Answer | QueryFailure]:
        """Ask for one answer per input, as an API following ``spec`` would give it."""
        ...


class LocalTarget:
    """A model run in-process: computes logits and reveals what ``spec`` allows."""

    def __init__(self, model: Model, *, input_spec: InputSpec | None = None, batch_size: int = 64, threads: int | None = None) -> None:
        self.model = model
        self.input_spec = input_spec
        self.batch_size = batch_size
        self.threads = threads
        self.name = f"local:{model.source}"

    def query(self, inputs: np.ndarray, spec: OutputSpec) -> list[Answer | QueryFailure]:
        if np.asarray(inputs).dtype == np.uint8:
            if self.input_spec is None or self.input_spec.dtype != "uint8":
                raise UsageError("8-bit markers need the fingerprint's input spec to decode them (LocalTarget(input_spec=...))")
            inputs = self.input_spec.decode(inputs)
        logits = self.model.logits(inputs, batch_size=self.batch_size, threads=self.threads)
        out: list[Answer | QueryFailure] = []
        for row in logits:
            if not np.isfinite(row).all():
                out.append(QueryFailure("model returned NaN or infinite logits"))
            else:
                out.append(spec.reveal(row))
        return out
