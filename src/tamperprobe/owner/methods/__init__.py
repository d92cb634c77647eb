"""Marker generators, one module per method, behind ``methods.base.Method``."""

from __future__ import annotations

from ...errors import UsageError
from .base import Bag, Method

_REGISTRY: dict[str, str] = {
    "sensitive": "tamperprobe.owner.methods.sensitive:SensitiveSamples",
    "natural": "tamperprobe.owner.methods.natural:Natural",
    "grid": "tamperprobe.owner.methods.grid:Grid",
    "wght": "tamperprobe.owner.methods.wght:Wght",
    "badv": "tamperprobe.owner.methods.badv:Badv",
    "boundary": "tamperprobe.owner.methods.boundary:Boundary",
    "noise": "tamperprobe.owner.methods.transforms:NoiseMarkers",
    "rotation": "tamperprobe.owner.methods.transforms:RotationMarkers",
    "distortion": "tamperprobe.owner.methods.transforms:DistortionMarkers",
}


def method_names() -> list[str]:
    return list(_REGISTRY)


def get_method(name: str, **params) -> Method:
    """Build the generator called ``name`` with keyword hyper-parameters."""
    import importlib

    if name not in _REGISTRY:
        raise UsageError(f"unknown method {name!r}: choose one of {', '.join(_REGISTRY)}")
    mod, _, cls = _REGISTRY[name].partition(":")
    klass = getattr(importlib.import_module(mod), cls)
    try:
        return klass(**params)
    except TypeError as exc:
        raise UsageError(f"bad parameters for method {name}: {exc}") from None


__all__ = ["Bag", "Method", "get_method", "method_names"]
