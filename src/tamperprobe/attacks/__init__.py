"""Tampering attacks on a white-box model: one class per attack behind ``base.Attack``.

>>> from tamperprobe.attacks import run_attack
>>> from tamperprobe.attacks.trojan import Trojan
>>> result = run_attack("trojan", module, data, seed=0, epochs=5)       # doctest: +SKIP
>>> result = run_attack(Trojan(epochs=5), module, data, seed=0)         # the same, as an instance  # doctest: +SKIP
>>> result.acc_before, result.acc_after, result.success, result.changed   # doctest: +SKIP

``REGISTRY`` maps each name to its class, imported on first use (so listing the names imports
no torch). Adding an attack is one new module with an ``Attack`` subclass plus one line in
``_BUILTIN``. See ``base`` for the data split and the meaning of each result field.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    from torch import nn

    from .._util import Progress
    from ..data import Dataset
    from .base import Attack, AttackResult

# name -> "module:Class" in this package, in the documented order
_BUILTIN: dict[str, str] = {
    "trojan": "trojan:Trojan",
    "trojan-neuron": "trojan:TrojanNeuron",
    "poison-generic": "poison:PoisonGeneric",
    "poison-specific": "poison:PoisonSpecific",
    "int8": "quantize:Int8",
    "int8-channel": "quantize:Int8Channel",
    "dynamic-int8": "quantize:DynamicInt8",
    "fp16": "quantize:FP16",
    "bf16": "quantize:BF16",
    "floor": "sparsify:Floor",
    "prune": "sparsify:Prune",
    "finetune": "finetune:Finetune",
    "watermark": "finetune:Watermark",
    "noise": "noise:Noise",
}


class _Registry(MutableMapping[str, "type[Attack]"]):
    """Attack classes by name; an entry given as ``"module:Class"`` is imported when first read."""

    def __init__(self, entries: dict[str, Any]) -> None:
        self._entries: dict[str, Any] = dict(entries)

    def __getitem__(self, name: str) -> type[Attack]:
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, cls = entry.partition(":")
            entry = self._entries[name] = getattr(importlib.import_module(f"{__name__}.{module}"), cls)
        return entry

    def __setitem__(self, name: str, cls: type[Attack]) -> None:
        self._entries[name] = cls

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


REGISTRY: MutableMapping[str, type[Attack]] = _Registry(_BUILTIN)


def attack_names() -> list[str]:
    """Every attack name, in the documented order."""
    return list(REGISTRY)


def attack_class(name: str) -> type[Attack]:
    """The class registered as ``name``; UsageError naming the choices when there is none."""
    if name not in REGISTRY:
        raise UsageError(f"unknown attack {name!r}: choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def describe_attacks() -> dict[str, str]:
    """Each attack's one-line description, by name (imports the attack modules)."""
    return {name: cls.summary() for name, cls in REGISTRY.items()}


def get_attack(attack: str | Attack, params: dict[str, Any] | None = None) -> Attack:
    """An attack instance: ``attack`` itself, or the class named ``attack`` built from ``params``.

    Text values (from the command line) are coerced by the constructor's annotations; unknown
    keys are refused. An instance takes no ``params``: they belong in its constructor.
    """
    from .._params import parse_params
    from .base import Attack

    if isinstance(attack, Attack):
        if params:
            raise UsageError(f"{attack!r} is already built: give its parameters to the constructor, not as {', '.join(params)}")
        return attack
    cls = attack_class(attack)
    return cls(**parse_params(cls, dict(params or {})))


def run_attack(
    attack: str | Attack,
    module: nn.Module,
    data: Dataset | None,
    *,
    seed: int = 0,
    eval_data: Dataset | None = None,
    eval_fraction: float | None = None,
    progress: Progress | None = None,
    **params: Any,
) -> AttackResult:
    """Run ``attack`` (a name with keyword ``params``, or an ``Attack`` instance) on a copy of ``module``.

    ``Attack.run`` is the template; see ``base`` for the data split (``eval_fraction`` None: 0.25)
    and the result fields; ``progress`` hears about the phases and the training steps.
    """
    return get_attack(attack, params).run(module, data, seed=seed, eval_data=eval_data, eval_fraction=eval_fraction, progress=progress)


def __getattr__(name: str) -> Any:
    """``Attack``, ``AttackResult`` and ``count_changed`` from ``base``, imported (with torch) on first use."""
    if name in ("Attack", "AttackResult", "Context", "count_changed"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "REGISTRY",
    "Attack",
    "AttackResult",
    "Context",
    "attack_class",
    "attack_names",
    "count_changed",
    "describe_attacks",
    "get_attack",
    "run_attack",
]
