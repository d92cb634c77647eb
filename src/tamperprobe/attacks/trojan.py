"""Trojan (backdoor) attacks: a trigger patch makes the model answer a target class.

The trigger is a ``size`` x ``size`` square of value ``value`` in the bottom-right corner of
every channel (default size: max(2, round(0.15 * image side)), i.e. 2 on 8x8 digits, 4 on
28x28; default value: the data's upper bound). A ``fraction`` of the training samples (taken
from the non-target classes) get the trigger and the ``target`` label. Success = share of
labelled non-target evaluation samples that the stamped input sends to ``target``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .._params import Interval
from .._torch import layer_activations, predict
from ..data import Dataset
from ..errors import UsageError
from .base import TRAINING_CONSTRAINTS, Attack, Context, check_class, fine_tune, labelled, rng_for

TRIGGER_CONSTRAINTS: dict[str, Any] = {
    **TRAINING_CONSTRAINTS,
    "target": Interval(0, None, integer=True),
    "fraction": Interval(0, 1, closed="right"),
    "size": Interval(1, None, integer=True),
}


def default_size(shape: tuple[int, ...]) -> int:
    side = shape[-1] if len(shape) >= 2 else int(math.isqrt(int(np.prod(shape))))
    return max(2, int(round(0.15 * side)))


def stamp(x: np.ndarray, size: int, value: float) -> np.ndarray:
    """A copy of ``x`` (N, ...) carrying the trigger."""
    out = np.array(x, dtype=np.float32, copy=True)
    if out.ndim >= 3:
        out[..., -size:, -size:] = value
    else:
        flat = out.reshape(len(out), -1)
        flat[:, -size * size :] = value
    return out


def trigger_success(model: nn.Module, ds: Dataset | None, target: int, size: int, value: float) -> float | None:
    if ds is None or ds.y is None:
        return None
    keep = np.asarray(ds.y) != target
    if not keep.any():
        return None
    return float((predict(model, stamp(ds.x[keep], size, value)) == target).mean())


class _TriggerAttack(Attack):
    """What both trojans share: the trigger (size, value), the target class, the poisoned training set, training."""

    needs_data = True
    random = True
    constraints = TRIGGER_CONSTRAINTS

    def __init__(
        self,
        *,
        target: int = 0,
        fraction: float = 0.1,
        size: int | None = None,
        value: float | None = None,
        epochs: int = 10,
        lr: float = 1e-3,
        batch_size: int = 64,
    ) -> None:
        self.target = target
        self.fraction = fraction
        self.size = size
        self.value = value
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size

    def _trigger(self, ctx: Context) -> dict[str, Any]:
        """The trigger's size and value, defaults from the data's shape and range."""
        ds = ctx.train
        assert ds is not None  # needs_data: Attack.run has checked
        shape = tuple(ds.x.shape[1:])
        size = default_size(shape) if self.size is None else self.size
        limit = min(shape[-2:]) if len(shape) >= 2 else int(math.isqrt(int(np.prod(shape))))
        if not 1 <= size <= limit:
            raise UsageError(f"trigger size must lie in 1..{limit}, got {size}")
        return {"size": size, "value": float(ds.high) if self.value is None else self.value}

    def _poisoned_set(self, ctx: Context, salt: int) -> tuple[np.ndarray, np.ndarray]:
        assert self.size is not None and self.value is not None  # resolved
        x, y = labelled(ctx.train)
        candidates = np.flatnonzero(y != self.target)
        if len(candidates) == 0:
            raise UsageError(f"the training data holds only class {self.target}; a trojan needs other classes")
        k = min(len(candidates), max(1, int(round(self.fraction * len(x)))))
        idx = rng_for(ctx.seed, salt).choice(candidates, size=k, replace=False)
        xp, yp = x.copy(), y.copy()
        xp[idx] = stamp(x[idx], self.size, self.value)
        yp[idx] = self.target
        return xp, yp

    def success(self, model: nn.Module, ctx: Context) -> float | None:
        assert self.size is not None and self.value is not None  # resolved
        return trigger_success(model, ctx.eval, self.target, self.size, self.value)


class Trojan(_TriggerAttack):
    """BadNets (Gu et al. 2017): fine-tune the whole model on data where a fraction carries a trigger patch relabelled to the target."""

    name = "trojan"

    def resolve(self, model: nn.Module, ctx: Context) -> dict[str, Any]:
        return {"target": check_class("target", self.target, ctx.classes), **self._trigger(ctx)}

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        xp, yp = self._poisoned_set(ctx, salt=1)
        fine_tune(model, xp, yp, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=ctx.seed)
        return model


@dataclass
class _Linear:
    """A fully connected layer found in a module: an ``nn.Linear``, or an ``aten.linear`` call of a
    torch.export GraphModule whose weight is a parameter."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    weight_name: str
    bias_name: str | None
    hookable: bool  # an nn.Linear submodule (else an fx node, read with an Interpreter)
    node: Any = None

    def activations(self, model: nn.Module, x: np.ndarray) -> torch.Tensor:
        """The layer's outputs (pre-activation) on ``x``, shape (N, units), in one batch."""
        if self.hookable:
            return torch.from_numpy(layer_activations(model, x, self.name, batch_size=len(x))).to(self.weight.device)
        got: list[torch.Tensor] = []
        node = self.node

        class _Capture(torch.fx.Interpreter):
            def run_node(self, n: torch.fx.Node) -> Any:
                out = super().run_node(n)
                if n is node:
                    got.append(out.detach())
                return out

        assert isinstance(model, torch.fx.GraphModule)
        with torch.no_grad():
            _Capture(model).run(torch.from_numpy(x).to(self.weight.device))
        return got[0].reshape(len(x), -1)


def _linear_chain(model: nn.Module) -> list[_Linear]:
    """Fully connected layers in execution order (registration order for plain modules)."""
    if isinstance(model, torch.jit.ScriptModule):
        return []
    if isinstance(model, torch.fx.GraphModule):
        params = dict(model.named_parameters())
        out = []
        for node in model.graph.nodes:
            if node.op != "call_function" or node.target is not torch.ops.aten.linear.default or len(node.args) < 2:
                continue
            w = node.args[1]
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if getattr(w, "op", None) != "get_attr" or w.target not in params:
                continue
            bname = b.target if getattr(b, "op", None) == "get_attr" and b.target in params else None
            name = w.target[: -len(".weight")] if w.target.endswith(".weight") else w.target
            out.append(_Linear(name, params[w.target], params.get(bname) if bname else None, w.target, bname, hookable=False, node=node))
        return out
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            prefix = f"{name}." if name else ""
            out.append(_Linear(name, m.weight, m.bias, prefix + "weight", prefix + "bias" if m.bias is not None else None, hookable=True))
    return out


def _linear_pairs(model: nn.Module) -> list[tuple[_Linear, _Linear]]:
    """Consecutive (layer, next layer) pairs where the next one reads the first one's output."""
    chain = _linear_chain(model)
    pairs = [(a, b) for a, b in zip(chain, chain[1:]) if b.weight.shape[1] == a.weight.shape[0]]
    if not pairs:
        raise UsageError(
            "trojan-neuron needs two consecutive Linear layers in an nn.Module or a torch.export program (not TorchScript); use --kind trojan"
        )
    return pairs


class TrojanNeuron(_TriggerAttack):
    """TrojanNN-style: retrain only the weights from the trigger's most excited hidden units to the output.

    After TrojanNN (Liu et al. 2018, with a fixed trigger): the ``neurons`` units (default 20 %
    of the layer) of a hidden ``layer`` (default: the first ``nn.Linear`` that feeds another
    ``nn.Linear``) that the trigger excites most (mean pre-activation on stamped minus clean
    training samples) are picked, and only the weights of those units onward are retrained:
    with ``strengthen`` (default) the picked units' incoming weights and biases (TrojanNN
    strengthens the trigger-to-unit link by optimising the trigger; with a fixed trigger we do
    it on the weights), the picked columns of the next Linear layer, and every parameter after
    it. Everything else stays bit-identical. Needs ``nn.Linear`` layers, or ``aten.linear`` calls
    in a torch.export program (a loaded ``.pt2``); not TorchScript (no hooks, no graph to interpret).
    """

    name = "trojan-neuron"
    constraints: ClassVar[dict[str, Any]] = {**TRIGGER_CONSTRAINTS, "neurons": Interval(1, None, integer=True)}

    def __init__(
        self,
        *,
        target: int = 0,
        layer: str | None = None,
        neurons: int | None = None,
        strengthen: bool = True,
        fraction: float = 0.1,
        size: int | None = None,
        value: float | None = None,
        epochs: int = 20,
        lr: float = 3e-3,
        batch_size: int = 64,
    ) -> None:
        super().__init__(target=target, fraction=fraction, size=size, value=value, epochs=epochs, lr=lr, batch_size=batch_size)
        self.layer = layer
        self.neurons = neurons
        self.strengthen = strengthen

    def _pair(self, model: nn.Module) -> tuple[_Linear, _Linear]:
        pairs = _linear_pairs(model)
        if self.layer is None:
            return pairs[0]
        match = [pr for pr in pairs if pr[0].name == self.layer]
        if not match:
            raise UsageError(f"layer {self.layer!r} is not a Linear layer feeding another one; choose one of {', '.join(a.name for a, _ in pairs)}")
        return match[0]

    def resolve(self, model: nn.Module, ctx: Context) -> dict[str, Any]:
        target = check_class("target", self.target, ctx.classes)
        layer, _ = self._pair(model)
        width = int(layer.weight.shape[0])
        k = max(1, int(round(0.2 * width))) if self.neurons is None else self.neurons
        if not 1 <= k <= width:
            raise UsageError(f"neurons must lie in 1..{width} for layer {layer.name}, got {k}")
        return {"target": target, "layer": layer.name, "neurons": k, **self._trigger(ctx)}

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        assert self.size is not None and self.value is not None and self.neurons is not None  # resolved
        layer, nxt = self._pair(model)

        # pick the units the trigger excites most
        x, _ = labelled(ctx.train)
        clean = layer.activations(model, x).mean(0)
        triggered = layer.activations(model, stamp(x, self.size, self.value)).mean(0)
        chosen = torch.topk(triggered - clean, self.neurons).indices.sort().values

        # only the chosen units (their incoming weights and bias) and the weights from them onward
        # are trained: the next layer's columns of the chosen units, and every later parameter
        out_mask = torch.zeros_like(nxt.weight)
        out_mask[:, chosen] = 1.0
        in_mask = torch.zeros_like(layer.weight)
        in_mask[chosen] = 1.0
        masked = [(nxt.weight, out_mask), (layer.weight, in_mask)]
        if layer.bias is not None:
            bias_mask = torch.zeros_like(layer.bias)
            bias_mask[chosen] = 1.0
            masked.append((layer.bias, bias_mask))
        if not self.strengthen:
            masked = masked[:1]
        named = list(model.named_parameters())
        start = [n for n, _ in named].index(nxt.weight_name)
        later = [t for n, t in named[start + 1 :] if n != nxt.bias_name]
        hooks = [t.register_hook(lambda g, m=m: g * m) for t, m in masked]
        try:
            xp, yp = self._poisoned_set(ctx, salt=2)
            params = [t for t, _ in masked] + later
            fine_tune(model, xp, yp, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=ctx.seed, params=params)
        finally:
            for h in hooks:
                h.remove()
        return model
