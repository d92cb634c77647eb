"""Tampering attacks on a white-box model: one class per attack behind ``base.Attack``.

>>> from tamperprobe.attacks import run_attack
>>> from tamperprobe.attacks.trojan import Trojan
>>> result = run_attack("trojan", module, data, seed=0, epochs=5)       # doctest: +SKIP
>>> result = run_attack(Trojan(epochs=5), module, data, seed=0)         # the same, as an instance  # doctest: +SKIP
>>> result.acc_before, result.acc_after, result.success, result.changed   # doctest: +SKIP

``REGISTRY`` (a ``_registry.Registry``) maps each name to its class, imported on first use (so
listing the names imports no torch). Adding an attack is one new module with an ``Attack``
subclass plus one line in ``REGISTRY``. See ``base`` for the data split and the meaning of each result field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from .._util import Progress
    from ..data import Dataset
    from .base import Attack, AttackResult

REGISTRY: Registry[Attack] = Registry(
    "attack",
    {  # name -> "module:Class", in the documented order
        "trojan": "tamperprobe.attacks.trojan:Trojan",
        "trojan-neuron": "tamperprobe.attacks.trojan:TrojanNeuron",
        "poison-generic": "tamperprobe.attacks.poison:PoisonGeneric",
        "poison-specific": "tamperprobe.attacks.poison:PoisonSpecific",
        "int8": "tamperprobe.attacks.quantize:Int8",
        "int8-channel": "tamperprobe.attacks.quantize:Int8Channel",
        "dynamic-int8": "tamperprobe.attacks.quantize:DynamicInt8",
        "fp16": "tamperprobe.attacks.quantize:FP16",
        "bf16": "tamperprobe.attacks.quantize:BF16",
        "floor": "tamperprobe.attacks.sparsify:Floor",
        "prune": "tamperprobe.attacks.sparsify:Prune",
        "finetune": "tamperprobe.attacks.finetune:Finetune",
        "watermark": "tamperprobe.attacks.finetune:Watermark",
        "noise": "tamperprobe.attacks.noise:Noise",
    },
    base="tamperprobe.attacks.base:Attack",
    summary=lambda cls: cls.summary(),
)


def attack_names() -> list[str]:
    """Every attack name, in the documented order."""
    return REGISTRY.names()


def attack_class(name: str) -> type[Attack]:
    """The class registered as ``name``; UsageError naming the choices when there is none."""
    return REGISTRY.cls(name)


def describe_attacks() -> dict[str, str]:
    """Each attack's one-line description, by name (imports the attack modules)."""
    return REGISTRY.describe()


def get_attack(attack: str | Attack, params: dict[str, Any] | None = None) -> Attack:
    """A validated attack: ``attack`` itself, or the class named ``attack`` built from ``params``.

    Text values (from the command line) are coerced by the constructor's annotations, unknown
    keys are refused and every value is checked by the class's ``constraints``, for a name and
    an instance alike. An instance takes no ``params``: they belong in its constructor.
    """
    return REGISTRY.build(attack, params)


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
