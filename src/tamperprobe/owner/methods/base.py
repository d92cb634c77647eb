"""The shape every marker generator shares.

A generator takes the white-box model and natural data and returns a *bag* of candidate
markers; a selector (``tamperprobe.owner.selection``) then keeps ``size`` of them.

A method is a small class on the plug-in convention of ``tamperprobe._params``:

* keyword-only constructor arguments are its hyper-parameters; ``__init__`` only stores each
  under its own name, so ``get_params()``, ``repr()`` and the fingerprint record read them back;
* ``constraints`` declares what each accepts, and ``_check_together`` (optional) the rules that
  tie several together; ``validated()`` applies both;
* ``_generate(model, data, bag, rng, progress)`` is the method itself.

``Method.generate`` is the template every caller uses (like foolbox's ``run``): it validates
the parameters once, checks the shared preconditions once (a bag of at least one, natural
data to start from, the model's torch weights when ``needs_weights``), and then calls
``_generate`` on a copy of the object holding the validated, coerced values, so that the
method reads ``self.epsilon`` as the float it was declared to be. Nothing is stored on the
object during a call; a method with per-call state keeps it in a local object of its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, final

import numpy as np

from ..._params import Configurable
from ..._registry import first_line as first_line  # a method's one-line description
from ..._util import Progress
from ...data import Dataset, InputSpec
from ...errors import UsageError
from ...models import Model


@dataclass(frozen=True)
class Encoding:
    """How a bag's inputs (and seeds) are sent when they are not the model's float inputs: 8-bit pixels over ``[low, high]``.

    A value u decodes to ``u / 255 · (high − low) + low`` in float32 (``InputSpec.decode``); the
    fingerprint records it (``record``) so that the served side sends the same bytes.
    """

    dtype: str
    low: float
    high: float

    def spec(self, shape: tuple[int, ...]) -> InputSpec:
        """The ``InputSpec`` of one input of ``shape`` sent this way."""
        return InputSpec(tuple(shape), self.dtype, float(self.low), float(self.high))

    def decode(self, x: np.ndarray) -> np.ndarray:
        """The model-domain float32 inputs for a batch ``x`` as sent."""
        return self.spec(tuple(np.shape(x)[1:])).decode(x)

    def record(self) -> dict[str, Any]:
        """The fingerprint's ``input_encoding`` entry."""
        from ..markers import UINT8_DECODE

        return {"dtype": self.dtype, "low": float(self.low), "high": float(self.high), "decode": UINT8_DECODE}


@dataclass
class Bag:
    """Candidate markers: ``inputs`` exactly as they would be sent, ``seeds`` their natural starting points.

    ``groups`` ties markers that must be kept together (e.g. the two halves of a boundary
    pair): selection keeps or drops a group whole. ``None`` means every marker stands alone.
    ``info`` holds per-candidate statistics (arrays of length len(inputs)) and summaries.
    ``encoding`` says how ``inputs`` are sent when they are not float model inputs (``None``:
    they are); ``decoded()`` gives the model-domain inputs either way.
    """

    inputs: np.ndarray
    seeds: np.ndarray
    groups: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    encoding: Encoding | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    def decoded(self) -> np.ndarray:
        """The inputs in the model's domain (float32): decoded when the bag has an ``encoding``."""
        if self.encoding is not None:
            return self.encoding.decode(self.inputs)
        return np.asarray(self.inputs, dtype=np.float32)

    def take(self, idx: np.ndarray) -> Bag:
        idx = np.asarray(idx, dtype=np.int64)
        info = {k: (v[idx] if isinstance(v, np.ndarray) and len(v) == len(self.inputs) else v) for k, v in self.info.items()}
        groups = None if self.groups is None else self.groups[idx]
        return Bag(self.inputs[idx], self.seeds[idx], groups, info, self.encoding)


def _no_progress(done: int, total: int, what: str = "", /) -> None:
    return None


class Method(Configurable, ABC):
    """Base of every marker generator (see the module doc); the first docstring line is its one-line description."""

    #: Generation reads or differentiates the model's torch weights (not possible for ONNX).
    needs_weights: ClassVar[bool] = False

    def validated(self) -> dict[str, Any]:
        """Every hyper-parameter checked and coerced (``constraints``, then ``_check_together``); raises UsageError."""
        params = super().validated()
        self._check_together(params)
        return params

    def _check_together(self, params: dict[str, Any]) -> None:
        """Rules that tie several (validated) parameters together; raise UsageError. None by default."""

    @final
    def generate(self, model: Model, data: Dataset, bag: int, rng: np.random.Generator, progress: Progress | None = None) -> Bag:
        """Return a bag of (up to) ``bag`` candidate markers within the data's input range."""
        params = self.validated()
        if isinstance(bag, bool) or int(bag) != bag or bag < 1:
            raise UsageError(f"the bag size must be at least 1, got {bag}")
        if len(data) == 0:
            raise UsageError(f"data set {data.name} is empty: {self.name} markers start from natural inputs")
        if self.needs_weights:
            model.require_torch(f"{self.name} markers")
        checked: Callable[..., Method] = type(self)
        return checked(**params)._generate(model, data, int(bag), rng, progress or _no_progress)

    @abstractmethod
    def _generate(self, model: Model, data: Dataset, bag: int, rng: np.random.Generator, progress: Progress) -> Bag:
        """The method: called by ``generate`` with validated parameters and checked preconditions."""
