"""VerIDeep's sensitivity of a model's output to its weights, and the penultimate activations for MANC.

For an input ``x`` and parameters ``W`` of interest, the sensitivity is

    S(x) = sum_i || d f_i(W, x) / dW ||_F^2

where ``f`` is the softmax of the logits (or the logits themselves) and the norm runs over
every chosen parameter tensor. A *sensitive sample* maximises S: a small change of ``W``
then moves the output a lot, so tampering shows in the answers.

Two routes, the same on every model format (``nn.Module``, TorchScript, ``torch.export``):

* **Output layer** (the default W: the last layer's weight and/or bias). When the logits are
  ``z = W h + b``, ``df_i/dW_kl = J_ik h_l`` and ``df_i/db_k = J_ik`` with ``J = df/dz``, so

      S = ||J||_F^2 * (||h||^2 [if W is chosen] + 1 [if b is chosen]).

  The penultimate vectors ``h`` are read off one backward pass: ``dz/dW`` under a cotangent
  that gives sample ``b`` the class ``b mod C`` of batch entry ``b div C`` has ``h_b`` in that
  row (``dL/dW = G^T h``). With ``K = ceil(B / C)`` batched cotangents this costs one backward
  through the last matmul only and ``K·C·H ≈ (B + C)·H`` numbers, never ``C^2``; ``h`` keeps
  its graph back to the input. The route checks ``W h + b == z`` (to the rounding of the
  logits' dtype) and is not taken when the logits are not that layer's output.
  ``||J||_F^2`` is computed in float64 from the logits in a form without cancellation
  (``jacobian_norm``), so confident predictions (top probability near 1) keep full precision.
* **Any parameters** (``--param params=...``): one sample at a time, the gradients of the
  output under the cotangents ``J_i`` (row ``i`` of ``J``, computed in float64 like above; the
  identity for logits) in chunks of classes sized so that a chunk's gradients hold at most
  ``CHUNK_ELEMENTS`` numbers. ``sensitivity_and_grad`` differentiates each chunk as soon as it
  is summed, so memory stays bounded by one sample's forward pass plus one chunk whatever the
  number of classes; ``sensitivity`` keeps every chunk's graph for a later backward.

``naive_sensitivity`` is the reference the tests compare against: a float64 copy of the model,
one plain backward per sample and per class. ``activations`` gives MANC the penultimate vectors
from the same backward pass as the output-layer route, so MANC works on every format.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .._torch import as_logits, last_linear, layer_activations, quiet, to_tensor
from ..errors import UsageError
from ..models import Model

Output = Literal["softmax", "logits"]
OUTPUTS = ("softmax", "logits")
Autocast = Literal["bf16"]
AUTOCASTS = ("bf16",)

#: Gradient numbers held at once by the any-parameter route (one chunk of classes for one sample).
CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------- parameters


def _prefixed(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _split(name: str) -> tuple[str, str]:
    prefix, _, leaf = name.rpartition(".")
    return prefix, leaf


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
    weights = [n for n, p in named.items() if _split(n)[1].endswith("weight") and p.dim() == 2]
    if not weights:
        raise UsageError(f"cannot find a last layer (no 2-D weight): pass parameter names, one of {', '.join(named) or '(none)'}")
    prefix = _split(weights[-1])[0]
    bias = _prefixed(prefix, "bias")
    return [weights[-1], bias] if bias in named else [weights[-1]]


@dataclass(frozen=True)
class _Layer:
    """A candidate output layer: its 2-D weight, its bias (if any), and which of the two are chosen."""

    weight: str
    bias: str | None
    use_weight: bool
    use_bias: bool


def _candidate_layer(named: dict[str, torch.Tensor], params: Sequence[str]) -> _Layer | None:
    """The layer ``params`` belong to when they are the weight and/or bias of one layer with a 2-D weight."""
    prefixes = {_split(p)[0] for p in params}
    leaves = {_split(p)[1] for p in params}
    if len(prefixes) != 1 or not leaves <= {"weight", "bias"}:
        return None
    prefix = prefixes.pop()
    weight, bias = _prefixed(prefix, "weight"), _prefixed(prefix, "bias")
    if weight not in named or named[weight].dim() != 2:
        return None
    has_bias = bias in named and named[bias].shape == named[weight].shape[:1]
    if "bias" in leaves and not has_bias:
        return None
    return _Layer(weight, bias if has_bias else None, "weight" in leaves, "bias" in leaves)


# ---------------------------------------------------------------------------- shared pieces


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


def _autocast(x: torch.Tensor, autocast: str | None) -> Any:
    if autocast is None:
        return nullcontext()
    if autocast not in AUTOCASTS:
        raise UsageError(f"unknown autocast {autocast!r}: choose {' or '.join(AUTOCASTS)}")
    return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)


def _check(model: Model, params: Sequence[str], output: str) -> nn.Module:
    if output not in OUTPUTS:
        raise UsageError(f"unknown output {output!r}: choose softmax or logits")
    module = model.require_torch("sensitivity")
    named = dict(module.named_parameters())
    missing = [p for p in params if p not in named]
    if not params or missing:
        raise UsageError(f"unknown parameter(s) {', '.join(missing) or '(none given)'}: valid names are {', '.join(named)}")
    return module


def _softmax_terms(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 ``p``, the mask of non-top classes, ``1 - p_i`` without cancellation, and ``sum_{j != top} p_j^2``."""
    p = torch.log_softmax(z.double(), dim=-1).exp()
    top = p.argmax(dim=-1, keepdim=True)
    others = torch.ones_like(p, dtype=torch.bool).scatter(-1, top, False)
    p_others = torch.where(others, p, torch.zeros_like(p))
    s_top = p_others.sum(-1, keepdim=True)  # 1 - p_top as a sum of small terms
    one_minus = torch.where(others, 1.0 - p, s_top)
    sq_others = (p_others * p_others).sum(-1, keepdim=True)
    return p, others, one_minus, sq_others


def jacobian_norm(z: torch.Tensor, output: str = "softmax") -> torch.Tensor:
    """``||df/dz||_F^2`` per row of logits ``z`` (B, C), in float64, differentiable.

    For the softmax ``J = diag(p) - p p^T`` and ``||J||_F^2 = sum_i p_i^2 ((1 - p_i)^2 + sum_{j!=i} p_j^2)``.
    Summing ``p_i^2 - 2 p_i^3 + p_i^2 ||p||^2`` instead cancels when one class takes almost
    all the probability; here ``1 - p_top`` is the sum of the other probabilities and
    ``sum_{j!=i} p_j^2`` is built from the non-top squares (``sum_{j!=top} p_j^2 - p_i^2 + p_top^2``
    for a non-top ``i``), so every term is accurate to float64 rounding. For logits ``J = I``
    and the norm is the number of classes.
    """
    if output == "logits":
        return torch.full(z.shape[:1], float(z.shape[-1]), dtype=torch.float64, device=z.device) + 0.0 * z.double().sum(-1)
    p, others, one_minus, sq_others = _softmax_terms(z)
    p_top_sq = torch.where(others, torch.zeros_like(p), p * p).sum(-1, keepdim=True)
    rest_sq = torch.where(others, sq_others - p * p + p_top_sq, sq_others)
    return (p * p * (one_minus * one_minus + rest_sq)).sum(-1)


def _jacobian_rows(z: torch.Tensor, rows: slice, output: str) -> torch.Tensor:
    """Rows ``rows`` of ``df/dz`` (k, C) for one sample's logits ``z`` (C,), accurate as in ``jacobian_norm``, in z's dtype."""
    c = z.shape[-1]
    idx = torch.arange(c, device=z.device)[rows]
    if output == "logits":
        return (idx[:, None] == torch.arange(c, device=z.device)[None, :]).to(z.dtype)
    p, _, one_minus, _ = _softmax_terms(z[None])
    p, one_minus = p[0], one_minus[0]
    block = -p[idx, None] * p[None, :]  # J_ik = -p_i p_k off the diagonal
    diag = p[idx] * one_minus[idx]  # J_ii = p_i (1 - p_i)
    block = block.scatter(1, idx[:, None], diag[:, None])
    return block.to(z.dtype)


def _float_eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0


# ---------------------------------------------------------------------------- output-layer route


def _penultimate(
    model: Model, module: nn.Module, x: torch.Tensor, layer: _Layer, *, create_graph: bool, autocast: str | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Logits ``z`` (B, C) and penultimate vectors ``h`` (B, H) with ``z = W h + b``, or None if z is not that.

    ``h`` comes from one backward pass through the last matmul (see the module doc); with
    ``create_graph`` it keeps its graph back to ``x``. The check ``W h + b == z`` allows the
    rounding of the logits' dtype (bfloat16 under autocast).
    """
    named = dict(module.named_parameters())
    weight = named[layer.weight]
    with _grad_on([weight]):
        with _autocast(x, autocast):
            z = as_logits(model.forward(x))
        rows, classes = z.shape
        if classes != weight.shape[0] or rows == 0 or not z.requires_grad:
            return None
        k = -(-rows // classes)
        b = torch.arange(rows, device=z.device)
        cot = torch.zeros((k, rows, classes), dtype=z.dtype, device=z.device)
        cot[b // classes, b, b % classes] = 1.0
        (g,) = torch.autograd.grad(z, weight, cot, is_grads_batched=True, create_graph=create_graph, allow_unused=True)
    if g is None:
        return None
    h = g.reshape(k * classes, -1)[:rows]
    with torch.no_grad():
        w64, h64 = weight.detach().double(), h.detach().double()
        expect, scale = h64 @ w64.T, h64.abs() @ w64.abs().T
        if layer.bias is not None:
            b64 = named[layer.bias].detach().double()
            expect, scale = expect + b64, scale + b64.abs()
        tol = 64 * _float_eps(z.dtype) * (scale + z.detach().double().abs()) + 1e-30
        if not bool(((z.detach().double() - expect).abs() <= tol).all()):
            return None
    return z, h


def _head_sensitivity(z: torch.Tensor, h: torch.Tensor, layer: _Layer, output: str) -> torch.Tensor:
    factor = torch.zeros(z.shape[:1], dtype=torch.float64, device=z.device)
    if layer.use_weight:
        factor = factor + h.double().square().sum(-1)
    if layer.use_bias:
        factor = factor + 1.0
    return jacobian_norm(z, output) * factor


def _output_layer(
    model: Model, module: nn.Module, x: torch.Tensor, params: Sequence[str], output: str, autocast: str | None = None
) -> torch.Tensor | None:
    """S by the output-layer route, differentiable; None when ``params`` are not the output layer's."""
    layer = _candidate_layer(dict(module.named_parameters()), params)
    if layer is None:
        return None
    found = _penultimate(model, module, x, layer, create_graph=True, autocast=autocast)
    if found is None:
        return None
    return _head_sensitivity(*found, layer, output)


# ---------------------------------------------------------------------------- any-parameter route


def _chunk_size(plist: Sequence[torch.Tensor], classes: int) -> int:
    numel = max(1, sum(p.numel() for p in plist))
    return max(1, min(classes, CHUNK_ELEMENTS // numel))


def _class_chunks(
    model: Model, xb: torch.Tensor, plist: Sequence[torch.Tensor], output: str, *, create_graph: bool, autocast: str | None = None
) -> Iterator[torch.Tensor]:
    """For one sample ``xb`` (1, ...): partial sums of S over chunks of classes, each a float64 scalar.

    Each chunk backpropagates the rows ``J_i`` of the output Jacobian as batched cotangents
    through the logits; the forward graph is kept until the last chunk.
    """
    with _autocast(xb, autocast):
        z = as_logits(model.forward(xb))[0]
    if not z.requires_grad:  # no chosen parameter reaches the output
        yield 0.0 * z.double().sum()
        return
    step = _chunk_size(plist, z.shape[0])
    for lo in range(0, z.shape[0], step):
        cot = _jacobian_rows(z, slice(lo, lo + step), output)
        grads = torch.autograd.grad(z, plist, cot, is_grads_batched=True, create_graph=create_graph, retain_graph=True, allow_unused=True)
        yield sum((g.double().square().sum() for g in grads if g is not None), 0.0 * z.double().sum())


# ---------------------------------------------------------------------------- public entry points


def sensitivity(model: Model, x: torch.Tensor, params: Sequence[str], output: Output = "softmax") -> torch.Tensor:
    """Per-sample ``S(x)`` of shape (B,), float64, differentiable with respect to ``x``.

    The output-layer route when ``params`` are the output layer's weight and/or bias, else the
    any-parameter route, whose graph grows with the number of classes: for an ascent with
    bounded memory use ``sensitivity_and_grad``.
    """
    module = _check(model, params, output)
    named = dict(module.named_parameters())
    with torch.enable_grad(), quiet():
        s = _output_layer(model, module, x, params, output)
        if s is not None:
            return s
        plist = [named[k] for k in params]
        with _grad_on(plist):
            out = [torch.stack(list(_class_chunks(model, x[b : b + 1], plist, output, create_graph=True))).sum() for b in range(x.shape[0])]
    return torch.stack(out) if out else x.new_zeros((0,), dtype=torch.float64)


def sensitivity_and_grad(
    model: Model, x: torch.Tensor, params: Sequence[str], output: Output = "softmax", *, autocast: Autocast | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``S(x)`` (B,) float64 and ``dS/dx`` (x's shape and dtype), detached; what one ascent step needs.

    ``autocast="bf16"`` runs the network under bfloat16 autocast (the probability terms stay
    float64). The any-parameter route differentiates every chunk of classes as soon as it is
    summed, so its memory does not grow with the number of classes.
    """
    module = _check(model, params, output)
    named = dict(module.named_parameters())
    xv = x.detach().requires_grad_(True)
    with torch.enable_grad(), quiet():
        s = _output_layer(model, module, xv, params, output, autocast)
        if s is not None:
            (grad,) = torch.autograd.grad(s.sum(), xv, allow_unused=True)
            return s.detach(), torch.zeros_like(xv) if grad is None else grad
        plist = [named[k] for k in params]
        values = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        grad = torch.zeros_like(xv)
        with _grad_on(plist):
            for b in range(x.shape[0]):
                xb = x[b : b + 1].detach().requires_grad_(True)
                for part in _class_chunks(model, xb, plist, output, create_graph=True, autocast=autocast):
                    (g,) = torch.autograd.grad(part, xb, retain_graph=True, allow_unused=True)
                    values[b] += part.detach()
                    if g is not None:
                        grad[b] += g[0]
    return values, grad


def naive_sensitivity(model: Model, x: torch.Tensor, params: Sequence[str], output: Output = "softmax") -> torch.Tensor:
    """Reference S(x) in float64: a float64 copy of the model, one plain backward per sample and per class.

    The softmax is written as ``f_i = 1 / (1 + sum_{k != i} exp(z_k - z_i))``, the ``k = i`` terms
    masked out: the plain autograd backward of that form has no ``1 - p`` cancellation, so the
    reference stays exact for confident inputs.
    """
    module = copy.deepcopy(_check(model, params, output)).double()
    named = dict(module.named_parameters())
    plist = [named[k] for k in params]
    out = []
    with torch.enable_grad(), quiet(), _grad_on(plist):
        for b in range(x.shape[0]):
            z = as_logits(module(x[b : b + 1].double()))[0]
            if output == "softmax":
                off = 1.0 - torch.eye(z.shape[0], dtype=z.dtype)
                f = 1.0 / (1.0 + (torch.exp(z[None, :] - z[:, None]) * off).sum(-1))
            else:
                f = z
            total = 0.0 * f.sum()
            for i in range(f.shape[0]):
                grads = torch.autograd.grad(f[i], plist, create_graph=True, retain_graph=True, allow_unused=True)
                total = total + sum((g.square().sum() for g in grads if g is not None), torch.zeros((), dtype=torch.float64))
            out.append(total)
    return torch.stack(out) if out else x.new_zeros((0,), dtype=torch.float64)


# ---------------------------------------------------------------------------- activations


def penultimate(model: Model, x: np.ndarray | torch.Tensor, *, batch_size: int = 256) -> np.ndarray | None:
    """The input ``h`` (N, H) of the output layer ``z = W h + b`` as float32, on any format; None if there is none.

    The output layer is the default sensitivity layer (``resolve_params(module, None)``); ``h``
    comes from the output-layer route's backward pass, so no hook is needed.
    """
    module = model.require_torch("activation-based selection")
    try:
        params = resolve_params(module, None)
    except UsageError:
        return None
    layer = _candidate_layer(dict(module.named_parameters()), params)
    if layer is None:
        return None
    xt = x.detach() if isinstance(x, torch.Tensor) else to_tensor(np.asarray(x))
    rows = []
    with torch.enable_grad(), quiet():
        for i in range(0, xt.shape[0], max(1, batch_size)):
            found = _penultimate(model, module, xt[i : i + batch_size].contiguous(), layer, create_graph=False)
            if found is None:
                return None
            rows.append(found[1].detach().float().cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def activations(model: Model, x: np.ndarray | torch.Tensor, layer: str | None = None, *, batch_size: int = 256) -> np.ndarray:
    """Activations (B, units) of a layer, for MANC.

    By default the input of the output layer (the penultimate features, ``penultimate``), on
    every model format; a hookable model whose logits are not a linear layer's output gives the
    input of its last ``nn.Linear`` instead (``_torch.layer_activations``). ``layer`` names a
    submodule whose *output* is taken (flattened per sample), for hookable models only.
    Raises ``UsageError`` when neither applies.
    """
    module = model.require_torch("activation-based selection")
    if layer is None:
        found = penultimate(model, x, batch_size=batch_size)
        if found is not None:
            return found
    if not model.hookable:
        what = "the output is not a linear layer's" if layer is None else f"layer {layer!r} cannot be hooked"
        raise UsageError(f"cannot read layer activations of this {model.format} model ({what}): use --select random")
    return layer_activations(module, x, layer, batch_size=batch_size)
