"""Trojan (backdoor) attacks: a trigger patch makes the model answer a target class.

``trojan`` (BadNets, Gu et al. 2017): a ``fraction`` of the training samples (taken from the
non-target classes) get the trigger and the target label; the whole model is fine-tuned on
the mix. ``trojan-neuron`` (after TrojanNN, Liu et al. 2018, with a fixed trigger): the
``neurons`` units (default 20 % of the layer) of a hidden ``layer`` (default: the first
``nn.Linear`` that feeds another ``nn.Linear``) that the trigger excites most (mean
pre-activation on stamped minus clean training samples) are picked, and only the weights of
those units onward are retrained: with ``strengthen`` (default) the picked units' incoming
weights and biases (TrojanNN strengthens the trigger-to-unit link by optimising the
trigger; with a fixed trigger we do it on the weights), the picked columns of the next
Linear layer, and every parameter after it. Everything else stays bit-identical. Needs
``nn.Linear`` layers, or ``aten.linear`` calls in a torch.export program (a loaded ``.pt2``);
not TorchScript (no hooks, no graph to interpret).

The trigger is a ``size`` x ``size`` square of value ``value`` in the bottom-right corner of
every channel (default size: max(2, round(0.15 * image side)), i.e. 2 on 8x8 digits, 4 on
28x28; default value: the data's upper bound). Success = share of labelled non-target
evaluation samples that the stamped input sends to ``target``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import Dataset
from ..errors import UsageError
from .base import Attack, Context, check_class, fit, keep_modes, labelled, predict, register, rng_for


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


def _trigger_params(ds: Dataset, p: dict[str, Any]) -> tuple[int, float]:
    shape = tuple(ds.x.shape[1:])
    size = default_size(shape) if p.get("size") is None else int(p["size"])
    limit = min(shape[-2:]) if len(shape) >= 2 else int(math.isqrt(int(np.prod(shape))))
    if not 1 <= size <= limit:
        raise UsageError(f"trigger size must lie in 1..{limit}, got {size}")
    value = float(ds.high) if p.get("value") is None else float(p["value"])
    p["size"], p["value"] = size, value
    return size, value


def _poisoned_set(ctx: Context, p: dict[str, Any], target: int, size: int, value: float, salt: int):
    x, y = labelled(ctx.train)
    fraction = float(p["fraction"])
    if not 0.0 < fraction <= 1.0:
        raise UsageError(f"fraction must lie in (0, 1], got {fraction}")
    candidates = np.flatnonzero(y != target)
    if len(candidates) == 0:
        raise UsageError(f"the training data holds only class {target}; a trojan needs other classes")
    k = min(len(candidates), max(1, int(round(fraction * len(x)))))
    idx = rng_for(ctx.seed, salt).choice(candidates, size=k, replace=False)
    xp, yp = x.copy(), y.copy()
    xp[idx] = stamp(x[idx], size, value)
    yp[idx] = target
    return xp, yp


def trigger_success(model: nn.Module, ds: Dataset | None, target: int, size: int, value: float) -> float | None:
    if ds is None or ds.y is None:
        return None
    keep = np.asarray(ds.y) != target
    if not keep.any():
        return None
    return float((predict(model, stamp(ds.x[keep], size, value)) == target).mean())


@register
class Trojan(Attack):
    name = "trojan"
    summary = "BadNets: fine-tune on data where a fraction carries a trigger patch relabelled to the target"
    defaults = {"target": 0, "fraction": 0.1, "size": None, "value": None, "epochs": 10, "lr": 1e-3, "batch_size": 64}
    needs_data = True
    random = True

    def apply(self, model: nn.Module, ctx: Context, p: dict[str, Any]) -> nn.Module:
        target = p["target"] = check_class("target", p["target"], ctx.classes)
        size, value = _trigger_params(ctx.train, p)
        xp, yp = _poisoned_set(ctx, p, target, size, value, salt=1)
        fit(model, xp, yp, p, ctx.seed)
        return model

    def success(self, model: nn.Module, ctx: Context, p: dict[str, Any]) -> float | None:
        return trigger_success(model, ctx.eval, p["target"], p["size"], p["value"])


@dataclass
class _Linear:
    """A fully connected layer found in a module: an ``nn.Linear``, or an ``aten.linear`` call of a
    torch.export GraphModule whose weight is a parameter."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    weight_name: str
    bias_name: str | None
    module: nn.Module | None = None  # the nn.Linear, for a forward hook
    node: Any = None  # the fx node, for an Interpreter

    def activations(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The layer's outputs (pre-activation) on ``x``, shape (N, units)."""
        got: list[torch.Tensor] = []
        with torch.no_grad():
            if self.module is not None:
                handle = self.module.register_forward_hook(lambda _m, _i, out: got.append(out.detach()))
                try:
                    model(x)
                finally:
                    handle.remove()
            else:
                node = self.node

                class _Capture(torch.fx.Interpreter):
                    def run_node(self, n):  # noqa: ANN001
                        out = super().run_node(n)
                        if n is node:
                            got.append(out.detach())
                        return out

                _Capture(model).run(x)
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
            out.append(_Linear(name, params[w.target], params.get(bname) if bname else None, w.target, bname, node=node))
        return out
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            prefix = f"{name}." if name else ""
            out.append(_Linear(name, m.weight, m.bias, prefix + "weight", prefix + "bias" if m.bias is not None else None, module=m))
    return out


@register
class TrojanNeuron(Attack):
    name = "trojan-neuron"
    summary = "TrojanNN-style: retrain only the weights from the trigger's most excited hidden units to the output"
    defaults = {
        "target": 0,
        "layer": None,
        "neurons": None,
        "strengthen": True,
        "fraction": 0.1,
        "size": None,
        "value": None,
        "epochs": 20,
        "lr": 3e-3,
        "batch_size": 64,
    }
    needs_data = True
    random = True

    def apply(self, model: nn.Module, ctx: Context, p: dict[str, Any]) -> nn.Module:
        target = p["target"] = check_class("target", p["target"], ctx.classes)
        chain = _linear_chain(model)
        pairs = [(a, b) for a, b in zip(chain, chain[1:]) if b.weight.shape[1] == a.weight.shape[0]]
        if not pairs:
            raise UsageError(
                "trojan-neuron needs two consecutive Linear layers in an nn.Module or a torch.export program (not TorchScript); use --kind trojan"
            )
        if p["layer"] is None:
            layer, nxt = pairs[0]
        else:
            match = [pr for pr in pairs if pr[0].name == str(p["layer"])]
            if not match:
                raise UsageError(
                    f"layer {p['layer']!r} is not a Linear layer feeding another one; choose one of {', '.join(a.name for a, _ in pairs)}"
                )
            layer, nxt = match[0]
        p["layer"] = layer.name
        width = int(layer.weight.shape[0])
        k = max(1, int(round(0.2 * width))) if p["neurons"] is None else int(p["neurons"])
        if not 1 <= k <= width:
            raise UsageError(f"neurons must lie in 1..{width} for layer {layer.name}, got {k}")
        p["neurons"] = k
        size, value = _trigger_params(ctx.train, p)

        # pick the units the trigger excites most
        x, _ = labelled(ctx.train)
        with keep_modes(model):
            try:
                model.eval()
            except NotImplementedError:  # torch.export GraphModule
                pass
            clean = layer.activations(model, torch.from_numpy(x)).mean(0)
            triggered = layer.activations(model, torch.from_numpy(stamp(x, size, value))).mean(0)
        chosen = torch.topk(triggered - clean, k).indices.sort().values

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
        if not p["strengthen"]:
            masked = masked[:1]
        named = list(model.named_parameters())
        start = [n for n, _ in named].index(nxt.weight_name)
        later = [t for n, t in named[start + 1 :] if n != nxt.bias_name]
        hooks = [t.register_hook(lambda g, m=m: g * m) for t, m in masked]
        try:
            xp, yp = _poisoned_set(ctx, p, target, size, value, salt=2)
            fit(model, xp, yp, p, ctx.seed, params=[t for t, _ in masked] + later)
        finally:
            for h in hooks:
                h.remove()
        return model

    def success(self, model: nn.Module, ctx: Context, p: dict[str, Any]) -> float | None:
        return trigger_success(model, ctx.eval, p["target"], p["size"], p["value"])
