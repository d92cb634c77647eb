"""Marker generators, one module per method, behind ``methods.base.Method``.

Adding a method is one new module with a ``Method`` subclass and one line in ``REGISTRY``
(name -> ``"module:Class"``, a ``_registry.Registry``); the command line's ``--method`` help and
``--param`` parsing, ``create_fingerprint`` and the evaluation all read the registry. Modules are
imported only when their method is asked for, so listing the names imports no torch.
"""

from __future__ import annotations

from typing import Any

from ..._registry import Registry
from .base import Bag, Encoding, Method, first_line

REGISTRY: Registry[Method] = Registry(
    "method",
    {
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
    },
    base=Method,
)


def method_names() -> list[str]:
    """Every registered method name, in registry order."""
    return REGISTRY.names()


def method_class(name: str) -> type[Method]:
    """The ``Method`` subclass registered as ``name``; UsageError for an unknown name."""
    return REGISTRY.cls(name)


def method_descriptions() -> dict[str, str]:
    """Name -> one-line description (the first line of each class docstring, read without importing), for help texts."""
    return REGISTRY.describe()


def get_method(method: str | Method, **params: Any) -> Method:
    """A validated marker generator: a registered name built with ``params``, or a ``Method`` instance as is.

    With a name, ``params`` may be text (``{"delta": "1e-4"}`` from the command line) or typed
    values; each is coerced by the constructor's annotation and unknown keys are refused. An
    instance already holds its parameters, so passing ``params`` with one is a UsageError.
    Bad values raise UsageError here rather than during generation.
    """
    return REGISTRY.build(method, params)


__all__ = ["REGISTRY", "Bag", "Encoding", "Method", "first_line", "get_method", "method_class", "method_descriptions", "method_names"]
