"""What verification talks to: anything that answers prediction requests.

A local model and a remote endpoint implement the same small interface, so ``verify``
does not know which it is talking to. ``query`` returns a ``QueryResult``: one entry per
input, in order, an ``Answer`` or a ``QueryFailure`` saying why that marker got no usable
answer, the seconds the request carrying each input took (None where not measured), and
whether anything may have reached the target (``sent``).

A target also declares what a verification session needs to know about it, so that no caller
inspects its class:

``name``              how reports, the history and hooks name it (no secrets)
``deadline``          seconds a whole query may take, retries and pauses included (None: unbounded)
``suspect``           True for the party under suspicion (an endpoint, or a model file it handed
                      over): it gets fresh markers drawn from the pool, never the whole pool
``pauses(n)``         seconds of deliberate pauses a query of ``n`` inputs spends, at most
``weights_digest()``  the digest of the weights it runs, when it can tell (a local file), else None
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
    # False only when nothing can have reached the target (no connection was made): the session then
    # returns the run's markers to the pool; when in doubt a target says True and they stay spent
    sent: bool = True

    @classmethod
    def of(cls, answers: Sequence[Answer | QueryFailure], latencies: Sequence[float | None] | None = None, *, sent: bool = True) -> QueryResult:
        """A result from sequences; no latencies means none were measured."""
        return cls(tuple(answers), tuple(latencies) if latencies is not None else (None,) * len(answers), sent)

    @classmethod
    def failed(cls, n: int, reason: str, *, sent: bool = True) -> QueryResult:
        """``n`` inputs that all failed for the same reason."""
        return cls.of([QueryFailure(reason)] * n, sent=sent)


@runtime_checkable
class Target(Protocol):
    """What verification talks to; every capability a session uses is declared here (see the module doc)."""

    name: str

    @property
    def deadline(self) -> float | None:
        """Seconds a whole query may take, retries and pauses included (None: unbounded)."""
        ...

    @property
    def suspect(self) -> bool:
        """True for the party under suspicion: it gets fresh markers from the pool, never the whole pool."""
        ...

    def query(self, inputs: np.ndarray, spec: OutputSpec) -> QueryResult:
        """Ask for one answer per input, as an API following ``spec`` would give it."""
        ...

    def pauses(self, n: int) -> float:
        """Seconds of deliberate pauses in a query of ``n`` inputs, at most (0 for a target that never pauses)."""
        ...

    def weights_digest(self) -> str | None:
        """The digest of the weights the target runs (``Model.digest``), or None when it cannot tell."""
        ...


class TargetBase:
    """Defaults for a target of one's own: no deadline, no pauses, weights it cannot show, and under suspicion.

    Subclass it and implement ``name`` and ``query``; override what differs. (A target need not
    subclass it: anything with the members of ``Target`` will do.)
    """

    name: str = "target"
    deadline: float | None = None
    suspect: bool = True

    def query(self, inputs: np.ndarray, spec: OutputSpec) -> QueryResult:
        raise NotImplementedError

    def pauses(self, n: int) -> float:
        return 0.0

    def weights_digest(self) -> str | None:
        return None


class LocalTarget(TargetBase):
    """A model run in-process: computes logits and reveals what ``spec`` allows.

    ``model`` is a ``Model`` or anything ``load_model`` takes (an ``nn.Module``, a file, a reference).
    ``trusted``: the owner vouches for the file (their own copy), so a session may send it every
    marker; by default a model file is treated as the suspect party's (``suspect``) and gets fresh
    markers drawn from the pool like an endpoint, since whoever handed it over could keep what it saw.
    """

    def __init__(
        self, model: Any, *, input_spec: InputSpec | None = None, batch_size: int = 64, threads: int | None = None, trusted: bool = False
    ) -> None:
        self.model = load_model(model)
        self.input_spec = input_spec
        self.batch_size = batch_size
        self.threads = threads
        self.suspect = not trusted
        self.name = f"local:{self.model.source}"

    def weights_digest(self) -> str | None:
        return self.model.digest()

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
