"""Marker generators, one module per method, behind ``methods.base.Method``.

Adding a method is one new module with a ``Method`` subclass and one line in ``REGISTRY``
(name -> ``"module:Class"``); the command line's ``--method`` help and ``--param`` parsing,
``create_fingerprint`` and the evaluation all read the registry. Modules are imported only
when their method is asked for, so listing the names imports no torch.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from ..._params import build
from ...errors import UsageError
from .base import Bag, Method, first_line

REGISTRY: dict[str, str] = {
    "sensitive": "tamperprobe.owner.methods.sensitive:SensitiveSamples",
    "natural": "tamperprobe.owner.methods.natural:Natural",
    "grid": "tamperprobe.owner.methods.grid:Grid",
    "wght": "tamperprobe.owner.methods.wght:Wght",
    "badv": "tamperprobe.owner.methods.badv:Badv",
    "boundary": "tamperprobe.owner.methods.boundary:Boundary",
    "crossed": "tamperprobe.owner.methods.crossed:Crossed",
    "matched": "tamperprobe.owner.methods.matched:MarginMatched",
    "noise": "tamperprobe.owner.methods.transforms:NoiseMarkers",
    "rotation": "tamperprobe.owner.methods.transforms:RotationMarkers",
    "distortion": "tamperprobe.owner.methods.transforms:DistortionMarkers",
}


def method_names() -> list[str]:
    """Every registered method name, in registry order."""
    return list(REGISTRY)


def method_class(name: str) -> type[Method]:
    """The ``Method`` subclass registered as ``name``; UsageError for an unknown name."""
    if name not in REGISTRY:
        raise UsageError(f"unknown method {name!r}: choose one of {', '.join(REGISTRY)}")
    module, _, attr = REGISTRY[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise UsageError(f"method {name!r} is registered as {REGISTRY[name]}, which is not a Method")
    return cls


def method_descriptions() -> dict[str, str]:
    """Name -> one-line description (the first line of each class docstring), for help texts.

    A module not imported yet is read as source, not imported, so that ``--help`` stays quick
    and free of torch (the sensitive method's module imports it).
    """
    out = {}
    for name, ref in REGISTRY.items():
        module, _, attr = ref.partition(":")
        if module in sys.modules:
            doc = getattr(getattr(sys.modules[module], attr, None), "__doc__", None)
        else:
            doc = _class_docstring(module, attr)
        out[name] = first_line(doc) or name
    return out


def _class_docstring(module: str, attr: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
        source = Path(spec.origin).read_text(encoding="utf-8") if spec is not None and spec.origin else ""
    except (ImportError, OSError, ValueError):
        return None
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == attr:
            return ast.get_docstring(node)
    return None


def get_method(method: str | Method, **params: Any) -> Method:
    """A validated marker generator: a registered name built with ``params``, or a ``Method`` instance as is.

    With a name, ``params`` may be text (``{"delta": "1e-4"}`` from the command line) or typed
    values; each is coerced by the constructor's annotation and unknown keys are refused. An
    instance already holds its parameters, so passing ``params`` with one is a UsageError.
    Bad values raise UsageError here rather than during generation.
    """
    if isinstance(method, Method):
        if params:
            raise UsageError(f"parameters {', '.join(params)} given with a {type(method).__name__} instance: set them in its constructor")
        method.validated()
        return method
    if not isinstance(method, str):
        raise UsageError(f"a method is a name or a Method instance, not {type(method).__name__}")
    built: Method = build(method_class(method), params)
    return built


__all__ = ["REGISTRY", "Bag", "Method", "get_method", "method_class", "method_descriptions", "method_names"]
