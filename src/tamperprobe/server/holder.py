"""The served model: what it takes as input, and a holder that can swap it at run time.

Input spec of the served model, in order of precedence: ``input_shape`` (``--input-shape
1,8,8``), the fingerprint's input spec (``--fingerprint FP``), the ONNX input shape, the
example shape recorded in a ``.pt2`` program. A TorchScript file or ``module:attr`` records
none, so it needs one of the first two. The model is run once on zeros of that shape at start
(and on every swap) to learn the number of classes and to catch a wrong shape early.

``ModelHolder.swap`` replaces the model (thread-safe; requests in flight finish on the model
they started with), which is how a demo tampers with a running server.
"""

from __future__ import annotations

import math
import os
import re
import threading
from typing import Any

import numpy as np

from .._util import one_line
from ..data import InputSpec
from ..errors import ModelLoadError, UsageError
from ..fingerprint import Fingerprint
from ..models import ExportedModel, Model, OnnxModel, load_model

Shape = str | tuple[int, ...] | list[int]


def parse_shape(text: Shape) -> tuple[int, ...]:
    """``"1,8,8"``, ``"1x8x8"``, ``"(1, 8, 8)"`` or a sequence -> (1, 8, 8)."""
    if isinstance(text, (tuple, list)):
        dims = [int(d) for d in text]
    else:
        parts = [p for p in re.split(r"[,x× ]+", str(text).strip().strip("()[]")) if p]
        try:
            dims = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"bad input shape {text!r}: expected e.g. 1,28,28") from None
    if not dims or any(d < 1 for d in dims):
        raise UsageError(f"bad input shape {text!r}: expected positive sizes without the batch axis, e.g. 1,28,28")
    return tuple(dims)


def _free_shape(dims: tuple[int, ...]) -> InputSpec:
    return InputSpec(dims, "float32", -math.inf, math.inf)


def infer_input_spec(model: Model, input_shape: Shape | None = None, fingerprint: Fingerprint | str | os.PathLike | None = None) -> InputSpec:
    """The input spec to serve ``model`` with (see the module doc for the precedence)."""
    if input_shape is not None:
        return _free_shape(parse_shape(input_shape))
    if fingerprint is not None:
        if not isinstance(fingerprint, Fingerprint):
            from ..fingerprint import load

            fingerprint = load(fingerprint)
        return fingerprint.input_spec
    if isinstance(model, OnnxModel):
        shape = tuple(model.session.get_inputs()[0].shape[1:])
        if shape and all(isinstance(d, int) and d > 0 for d in shape):
            return _free_shape(shape)
    elif isinstance(model, ExportedModel):
        try:
            for node in model.module.graph.nodes:
                if node.op == "placeholder" and "val" in node.meta:
                    dims = tuple(int(d) for d in node.meta["val"].shape[1:])
                    if dims and all(d > 0 for d in dims):
                        return _free_shape(dims)
                    break
        except (AttributeError, TypeError, ValueError):
            pass
    raise UsageError(f"cannot infer the input shape of {model.source}: pass --input-shape (e.g. 1,28,28) or --fingerprint FP")


def platform(model: Model) -> str:
    """The ``platform`` of the model metadata, as Triton names it."""
    return {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch", "export": "pytorch_export"}.get(model.format, "pytorch_module")


class ModelHolder:
    """The served model, swappable at run time. Readers take a consistent snapshot; ``swap`` is atomic."""

    def __init__(self, model: Model, input_spec: InputSpec) -> None:
        self._lock = threading.Lock()
        self.input_spec = input_spec
        self.input_shape = tuple(int(d) for d in input_spec.shape)
        self.classes = self._probe(model)
        self._model = model
        self.generation = 0

    def _probe(self, model: Model) -> int:
        try:
            out = model.logits(np.zeros((1, *self.input_shape), dtype=np.float32))
        except Exception as exc:  # a model that breaks on this shape
            raise ModelLoadError(f"{model.source} does not run on inputs of shape {self.input_shape}: {one_line(exc)}") from None
        if out.ndim != 2 or out.shape[0] != 1 or out.shape[1] < 1:
            raise ModelLoadError(f"{model.source} returned shape {tuple(out.shape)}; expected logits (1, C)")
        return int(out.shape[1])

    @property
    def model(self) -> Model:
        with self._lock:
            return self._model

    def swap(self, model: Model) -> Model:
        """Serve ``model`` from now on; returns the previous one. It must take the same input and classes."""
        classes = self._probe(model)
        if classes != self.classes:
            raise UsageError(f"cannot swap: the new model has {classes} classes, the served one {self.classes}")
        with self._lock:
            old, self._model = self._model, model
            self.generation += 1
        return old


def make_holder(
    model: Any,
    *,
    weights: str | os.PathLike | None = None,
    input_spec: InputSpec | None = None,
    input_shape: Shape | None = None,
    fingerprint: Fingerprint | str | os.PathLike | None = None,
) -> ModelHolder:
    """A holder for ``model``: a ``ModelHolder`` as it is, or anything ``load_model`` takes (a path,
    ``package.module:attribute``, an ``nn.Module``, a ``Model``), with its input spec inferred unless given."""
    if isinstance(model, ModelHolder):
        return model
    loaded = load_model(model, weights)
    if input_spec is None:
        input_spec = infer_input_spec(loaded, input_shape, fingerprint)
    return ModelHolder(loaded, input_spec)
