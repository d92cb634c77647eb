"""What verification talks to: anything that answers prediction requests.

A local model and a remote endpoint implement the same small interface, so ``verify``
does not know which it is talking to. ``query`` returns a ``QueryResult``: one entry per
input, in order, an ``Answer`` or a ``QueryFailure`` saying why that marker got no usable
answer, and the seconds the request carrying each input took (None where not measured).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..data import InputSpec
from ..errors import UsageError
from ..models import load_model
from ..outputs import Answer, OutputSpec


@dataclass(frozen=True)
class QueryFailure:
    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class QueryResult:
    """What a target answered: ``answers[i]`` and ``latencies[i]`` belong to input ``i``."""

    answers: tuple[Answer | QueryFailure, ...]
    latencies: tuple[float | None, ...]

    @classmethod
    def of(cls, answers: Sequence[Answer | QueryFailure], latencies: Sequence[float | None] | None = None) -> QueryResult:
        """A result from sequences; no latencies means none were measured."""
        return cls(tuple(answers), tuple(latencies) if latencies is not None else (None,) * len(answers))

    @classmethod
    def failed(cls, n: int, reason: str) -> QueryResult:
        """``n`` inputs that all failed for the same reason."""
        return cls.of([QueryFailure(reason)] * n)


@runtime_checkable
class Target(Protocol):
    name: str

    def query(self, inputs: np.ndarray, spec: OutputSpec) -> QueryResult:
        """Ask for one answer per input, as an API following ``spec`` would give it."""
        ...


class LocalTarget:
    """A model run in-process: computes logits and reveals what ``spec`` allows.

    ``model`` is a ``Model`` or anything ``load_model`` takes (an ``nn.Module``, a file, a reference).
    """

    def __init__(self, model: Any, *, input_spec: InputSpec | None = None, batch_size: int = 64, threads: int | None = None) -> None:
        self.model = load_model(model)
        self.input_spec = input_spec
        self.batch_size = batch_size
        self.threads = threads
        self.name = f"local:{self.model.source}"

    def query(self, inputs: np.ndarray, spec: OutputSpec) -> QueryResult:
        if np.asarray(inputs).dtype == np.uint8:
            if self.input_spec is None or self.input_spec.dtype != "uint8":
                raise UsageError("8-bit markers need the fingerprint's input spec to decode them (LocalTarget(input_spec=...))")
            inputs = self.input_spec.decode(inputs)
        logits = self.model.logits(inputs, batch_size=self.batch_size, threads=self.threads)
        answers: list[Answer | QueryFailure] = []
        for row in logits:
            if not np.isfinite(row).all():
                answers.append(QueryFailure("model returned NaN or infinite logits"))
            else:
                answers.append(spec.reveal(row))
        return QueryResult.of(answers)
