"""VerIDeep's sensitivity of a model's output to its weights, and layer activations for MANC.

For an input ``x`` and parameters ``W`` of interest, the sensitivity is

    S(x) = sum_i || d f_i(W, x) / dW ||_F^2

where ``f`` is the softmax of the logits (or the logits themselves) and the norm runs over
every chosen parameter tensor. A *sensitive sample* maximises S: a small change of ``W``
then moves the output a lot, so tampering shows in the answers.

Three ways to compute S for a batch, all differentiable with respect to ``x``:

* **Closed form.** When the chosen parameters are the weight and/or bias of an ``nn.Linear``
  whose output *is* the model output, ``z = W h + b`` and ``f = g(z)``. With ``J = df/dz``,
  ``df_i/dW_kl = J_ik h_l`` and ``df_i/db_k = J_ik``, so summing squares over ``i, k, l``:

      weight only:   S = ||J||_F^2 * ||h||^2
      bias only:     S = ||J||_F^2
      both:          S = ||J||_F^2 * (||h||^2 + 1)

  For the softmax ``J = diag(p) - p p^T`` and
  ``||J||_F^2 = sum_i p_i^2 - 2 sum_i p_i^3 + (sum_i p_i^2)^2``; for logits ``J = I`` and
  ``||J||_F^2 = C`` (the number of classes). One forward pass, no per-class backward.
* **torch.func.** ``vmap`` over samples of ``jacrev`` over the chosen parameters of a
  ``functional_call``: any ``nn.Module`` or ``torch.export`` module.
* **Per-sample loop** (TorchScript, where ``functional_call`` is not allowed): one
  ``autograd.grad`` per sample with ``is_grads_batched=True`` over the class axis.

``naive_sensitivity`` loops over samples and classes with plain autograd; it is the
reference the tests compare against.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from torch import nn

from .._torch import as_logits, last_linear, layer_activations, quiet
from ..errors import UsageError
from ..models import Model

Output = Literal["softmax", "logits"]
Route = Literal["auto", "closed", "func", "loop"]
OUTPUTS = ("softmax", "logits")


# ---------------------------------------------------------------------------- parameters


def _prefixed(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def resolve_params(module: nn.Module, names: list[str] | None) -> list[str]:
    """Names of the parameters of interest; ``None`` means the last layer's weight and bias.

    The last layer is the last ``nn.Linear`` in module order; for modules without one (a
    ``torch.export`` program or TorchScript) it is the last 2-D parameter named ``*weight``,
    plus the bias of the same prefix when there is one.
    """
    named = dict(module.named_parameters())
    if names is not None:
        if isinstance(names, str):
            names = [names]
        chosen = list(dict.fromkeys(str(n) for n in names))
        unknown = [n for n in chosen if n not in named]
        if not chosen or unknown:
            what = f"unknown parameter(s) {', '.join(unknown)}" if unknown else "no parameters given"
            raise UsageError(f"{what}: valid names are {', '.join(named) or '(none)'}")
        return chosen
    last = last_linear(module)
    if last is not None:
        prefix, lin = last
        out = [_prefixed(prefix, "weight")]
        if lin.bias is not None:
            out.append(_prefixed(prefix, "bias"))
        return out
    weights = [n for n, p in named.items() if n.rsplit(".", 1)[-1].endswith("weight") and p.dim() == 2]
    if not weights:
        raise UsageError(f"cannot find a last layer (no 2-D weight): pass parameter names, one of {', '.join(named) or '(none)'}")
    weight = weights[-1]
    prefix = weight.rsplit(".", 1)[0] if "." in weight else ""
    bias = _prefixed(prefix, "bias")
    return [weight, bias] if bias in named else [weight]


# ---------------------------------------------------------------------------- sensitivity


def _squash(logits: torch.Tensor, output: str) -> torch.Tensor:
    return torch.softmax(logits, dim=-1) if output == "softmax" else logits


def _check(model: Model, params: list[str], output: str) -> nn.Module:
    if output not in OUTPUTS:
        raise UsageError(f"unknown output {output!r}: choose softmax or logits")
    module = model.require_torch("sensitivity")
    named = dict(module.named_parameters())
    missing = [p for p in params if p not in named]
    if not params or missing:
        raise UsageError(f"unknown parameter(s) {', '.join(missing) or '(none given)'}: valid names are {', '.join(named)}")
    return module


def sensitivity(model: Model, x: torch.Tensor, params: list[str], output: Output = "softmax", *, path: Route = "auto") -> torch.Tensor:
    """Per-sample ``S(x)`` of shape (B,), differentiable with respect to ``x``.

    ``path`` forces one computation (``closed``, ``func``, ``loop``); ``auto`` takes the
    closed form when it applies, else ``func`` for functional models and ``loop`` otherwise.
    """
    module = _check(model, params, output)
    if path not in ("auto", "closed", "func", "loop"):
        raise UsageError(f"unknown sensitivity path {path!r}: choose auto, closed, func or loop")
    with torch.enable_grad(), quiet():
        if path in ("auto", "closed"):
            s = _closed_form(model, module, x, params, output)
            if s is not None:
                return s
            if path == "closed":
                raise UsageError("the closed form needs the weight/bias of an nn.Linear whose output is the model output")
        if path == "func" or (path == "auto" and model.functional):
            if not model.functional:
                raise UsageError(f"torch.func cannot run a {model.format} model: use path='loop'")
            return _func_sensitivity(module, x, params, output)
        return _loop_sensitivity(module, x, params, output)


def _closed_form(model: Model, module: nn.Module, x: torch.Tensor, params: list[str], output: str) -> torch.Tensor | None:
    """The closed form, or ``None`` when the chosen parameters are not those of the output layer."""
    if not model.hookable:
        return None
    owner = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            own = {_prefixed(name, "weight"): "weight"}
            if sub.bias is not None:
                own[_prefixed(name, "bias")] = "bias"
            if set(params) <= set(own):
                owner = (sub, {own[p] for p in params})
    if owner is None:
        return None
    lin, leaves = owner
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen.append((args[0], out))

    handle = lin.register_forward_hook(hook)
    try:
        logits = as_logits(module(x))
    finally:
        handle.remove()
    if len(seen) != 1:
        return None
    h, z = seen[0]
    if h.dim() != 2 or z.shape != logits.shape or not torch.equal(z, logits):
        return None
    if output == "softmax":
        p = torch.softmax(logits, dim=-1)
        p2 = (p * p).sum(-1)
        jnorm = p2 - 2.0 * (p**3).sum(-1) + p2 * p2
    else:
        jnorm = float(logits.shape[1]) + 0.0 * logits.sum(-1)  # constant, kept on the graph of x
    factor = torch.zeros_like(jnorm)
    if "weight" in leaves:
        factor = factor + (h * h).sum(-1)
    if "bias" in leaves:
        factor = factor + 1.0
    return jnorm * factor


def _func_sensitivity(module: nn.Module, x: torch.Tensor, params: list[str], output: str) -> torch.Tensor:
    """``vmap`` over samples of ``jacrev`` over the chosen parameters (nn.Module, torch.export)."""
    from torch.func import functional_call, jacrev, vmap

    named = dict(module.named_parameters())
    fixed = {k: v.detach() for k, v in named.items() if k not in params}
    chosen = {k: named[k].detach() for k in params}

    def outputs(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        out = functional_call(module, {**fixed, **p}, (xi.unsqueeze(0),))
        return _squash(as_logits(out)[0], output)

    def one(xi: torch.Tensor) -> torch.Tensor:
        jac = jacrev(outputs)(chosen, xi)
        return sum((j * j).sum() for j in jac.values())

    return vmap(one)(x)


@contextmanager
def _grad_on(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily make ``tensors`` require grad (frozen models)."""
    old = [t.requires_grad for t in tensors]
    try:
        for t in tensors:
            t.requires_grad_(True)
        yield
    finally:
        for t, r in zip(tensors, old):
            t.requires_grad_(r)


def _grads(y: torch.Tensor, plist: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``dy/dp`` for each p (zeros where unused), with a graph for a later backward."""
    grads = torch.autograd.grad(y, plist, create_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, plist)]


def _loop_sensitivity(module: nn.Module, x: torch.Tensor, params: list[str], output: str) -> torch.Tensor:
    """One batched-over-classes ``autograd.grad`` per sample (TorchScript fallback).

    TorchScript's optimising executor is switched off so that the backward runs eager ops
    that ``vmap`` can batch; should an op still lack a batching rule, that sample falls back
    to one backward per class.
    """
    named = dict(module.named_parameters())
    plist = [named[k] for k in params]
    out = []
    with _grad_on(plist), torch.jit.optimized_execution(False):
        for b in range(x.shape[0]):
            f = _squash(as_logits(module(x[b : b + 1]))[0], output)
            eye = torch.eye(f.shape[0], dtype=f.dtype, device=f.device)
            try:
                grads: Sequence[torch.Tensor] = torch.autograd.grad(
                    f, plist, grad_outputs=eye, is_grads_batched=True, create_graph=True, allow_unused=True
                )
            except RuntimeError as exc:  # an op without a batching rule: per-class backward for this model
                if "atching rule" not in str(exc):
                    raise
                grads = [torch.stack(g) for g in zip(*(_grads(f[i], plist) for i in range(f.shape[0])))]
            out.append(sum((g * g).sum() for g in grads) + 0.0 * f.sum())
    return torch.stack(out) if out else x.new_zeros((0,))


def naive_sensitivity(model: Model, x: torch.Tensor, params: list[str], output: Output = "softmax") -> torch.Tensor:
    """Reference S(x): plain autograd, one backward per sample and per class."""
    module = _check(model, params, output)
    named = dict(module.named_parameters())
    plist = [named[k] for k in params]
    out = []
    with torch.enable_grad(), quiet(), _grad_on(plist):
        for b in range(x.shape[0]):
            f = _squash(as_logits(module(x[b : b + 1]))[0], output)
            total = 0.0 * f.sum()
            for i in range(f.shape[0]):
                total = total + sum(((g * g).sum() for g in _grads(f[i], plist)), torch.zeros(()))
            out.append(total)
    return torch.stack(out) if out else x.new_zeros((0,))


# ---------------------------------------------------------------------------- activations


def activations(model: Model, x: np.ndarray | torch.Tensor, layer: str | None = None, *, batch_size: int = 256) -> np.ndarray:
    """Activations (B, units) of a layer, for MANC (``_torch.layer_activations``).

    By default the *input* of the last ``nn.Linear`` (the penultimate features); ``layer``
    names a submodule whose *output* is taken (flattened per sample). Models whose submodules
    cannot be hooked (TorchScript, ``torch.export``) raise ``UsageError``.
    """
    module = model.require_torch("activation-based selection")
    if not model.hookable:
        raise UsageError(f"cannot read layer activations of this {model.format} model: use --select random")
    return layer_activations(module, x, layer, batch_size=batch_size)
