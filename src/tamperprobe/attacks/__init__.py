"""Tampering attacks on a white-box model: one module per family behind one interface.

>>> from tamperprobe.attacks import attack_names, run_attack
>>> result = run_attack("trojan", module, data, seed=0)   # doctest: +SKIP
>>> result.acc_before, result.acc_after, result.success, result.changed   # doctest: +SKIP

Kinds: trojan, trojan-neuron (trojan.py); poison-generic, poison-specific (poison.py);
int8, int8-channel, dynamic-int8, fp16, bf16 (quantize.py); floor, prune (sparsify.py);
finetune, watermark (finetune.py); noise (noise.py). See ``base`` for the data split and
the meaning of each result field.
"""

from __future__ import annotations

from . import finetune as _finetune  # noqa: F401
from . import noise as _noise  # noqa: F401
from . import poison as _poison  # noqa: F401
from . import quantize as _quantize  # noqa: F401
from . import sparsify as _sparsify  # noqa: F401
from . import trojan as _trojan  # noqa: F401  (registration order = the documented order)
from .base import REGISTRY, Attack, AttackResult, attack_names, count_changed, run_attack

__all__ = ["AttackResult", "Attack", "REGISTRY", "attack_names", "count_changed", "run_attack"]
