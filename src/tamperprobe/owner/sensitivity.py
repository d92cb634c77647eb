"""VerIDeep's sensitivity of a model's output to its weights.

For an input ``x`` and parameters ``W`` of interest, ``S(x) = sum_i ||d f_i(W, x) / dW||_F^2``, where
``f`` is the softmax of the logits (or the logits). A *sensitive sample* maximises S: a small change
of ``W`` then moves the output a lot, so tampering shows in the answers.

Two routes, the same on every model format (``nn.Module``, TorchScript, ``torch.export``):

* **Output layer** (the default W): with ``z = W h + b`` and ``J = df/dz``,
  ``S = ||J||_F^2 * (||h||^2 + 1)``; the penultimate vectors ``h`` come from a forward pre-hook on an
  ``nn.Linear`` or off one batched backward through the last matmul (the same values, bit for bit),
  and ``||J||_F^2`` is computed in float64 without cancellation (``jacobian_norm``), so confident
  predictions keep full precision;
* **Any parameters** (``--param params=...``): per sample, in chunks of classes of at most
  ``CHUNK_ELEMENTS`` gradient numbers, so memory stays bounded whatever the number of classes.

``naive_sensitivity`` is the float64 reference the tests compare against; ``Sensitivity.penultimate``
also gives MANC the output layer's input on every format (``features``). The derivation is in
``docs/design/sensitivity.md``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from .._torch import as_logits, last_linear, only_call, quiet, recording
from ..errors import UsageError
from ..models import Model

Output = Literal["softmax", "logits"]
OUTPUTS = ("softmax", "logits")
Autocast = Literal["bf16"]
AUTOCASTS = ("bf16",)

#: Gradient numbers held at once by the any-parameter route (one chunk of classes for one sample).
CHUNK_ELEMENTS = 1 << 22
#: Samples per forward pass on the output-layer route (or the number of classes, if larger).
RECOVERY_ROWS = 256


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


def _candidate_layer(named: Mapping[str, torch.Tensor], params: Sequence[str]) -> _Layer | None:
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
    frozen = [t for t in tensors if not t.requires_grad]
    try:
        for t in frozen:
            t.requires_grad_(True)
        yield
    finally:
        for t in frozen:
            t.requires_grad_(False)


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


def _softmax_parts(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 ``p``, the top probability and class (keepdim), the non-top probabilities (0 at the top) and ``1 - p_top`` as their sum."""
    p = torch.log_softmax(z.double(), dim=-1).exp()
    p_top, top = p.max(dim=-1, keepdim=True)
    others = p.scatter(-1, top, 0.0)
    return p, p_top, top, others, others.sum(-1, keepdim=True)


def _softmax_norm(z: torch.Tensor, *, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``||J||_F^2`` (B,) of the softmax at logits ``z`` (B, C) in float64 and, with ``grad``, its gradient (B, C).

    With ``t`` the top class, ``o`` the other probabilities (0 at the top), ``r = 1 - p_t`` their
    sum and ``q = sum_{j!=t} p_j^2``, every term below is non-negative or formed from small terms,
    so nothing cancels when ``p_t`` is near 1:

        ||J||^2 = p_t^2 (r^2 + 2 q) + q^2 + sum_{j!=t} o_j^2 (1 - 2 o_j)      (o_j <= 1/2)

    (from ``sum_i p_i^2 (1 - p_i)^2 + sum_{i!=j} p_i^2 p_j^2``). The gradient is
    ``d_j = p_j (g_j - sum_i p_i g_i)`` with ``g = dN/dp``, ``g_j = 2 p_j (1 - 3 p_j + 2 sum_i p_i^2)``,
    rearranged at the top class as ``g_t = 2 p_t (r (1 - 2 p_t) + 2 q)`` and
    ``d_t = p_t (r g_t - sum_{j!=t} o_j g_j)``. Fused ops (``addcmul``, ``rsub`` with ``alpha``)
    keep the count of small kernels down: on a tiny network each costs as much as a layer.
    """
    _, p_top, top, o, r = _softmax_parts(z)
    sq = o.square()
    q = sq.sum(-1, keepdim=True)
    top_sq = p_top.square()
    off_top = (sq * torch.rsub(o, 1.0, alpha=2.0)).sum(-1, keepdim=True)
    norm = (torch.addcmul(q.square(), top_sq, torch.add(r.square(), q, alpha=2.0)) + off_top).squeeze(-1)
    if not grad:
        return norm, None
    half = o * torch.rsub(o, 1.0, alpha=3.0).add_(q + top_sq, alpha=2.0)  # g_j / 2 off the top, 0 at the top
    half_rest = (o * half).sum(-1, keepdim=True)
    half_top = p_top * torch.addcmul(q + q, r, torch.rsub(p_top, 1.0, alpha=2.0))
    mean = torch.addcmul(half_rest, p_top, half_top)  # sum_i p_i g_i / 2
    d = (o * (half - mean)).scatter(-1, top, p_top * (r * half_top - half_rest)).mul_(2.0)
    return norm, d


def jacobian_norm(z: torch.Tensor, output: str = "softmax") -> torch.Tensor:
    """``||df/dz||_F^2`` per row of logits ``z`` (B, C), in float64.

    For the softmax ``J = diag(p) - p p^T`` and ``||J||_F^2 = sum_i p_i^2 ((1 - p_i)^2 + sum_{j!=i} p_j^2)``.
    Summing ``p_i^2 - 2 p_i^3 + p_i^2 ||p||^2`` instead cancels when one class takes almost all
    the probability; ``_softmax_norm`` keeps every term accurate to float64 rounding. For logits
    ``J = I`` and the norm is the number of classes.
    """
    if output == "logits":
        return torch.full(z.shape[:1], float(z.shape[-1]), dtype=torch.float64, device=z.device)
    return _softmax_norm(z, grad=False)[0]


class _Terms(NamedTuple):
    """``S = ||J||_F^2 * factor`` for the output-layer route, and what its gradient needs; float64, detached."""

    value: torch.Tensor  # S (B,)
    norm: torch.Tensor  # ||J||_F^2 (B,)
    factor: torch.Tensor  # ||h||^2 [weight] + 1 [bias] (B,)
    d_norm: torch.Tensor | None  # d||J||_F^2/dz (B, C); None for logits, where the norm is constant
    h64: torch.Tensor | None  # h (B, H) when the weight is chosen

    def cotangents(self, grad: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``grad * dS/dz`` and ``grad * dS/dh`` in float64 (``grad`` None: 1), None where S does not depend on it.

        ``dS/dz = factor * d||J||^2/dz`` and ``dS/dh = 2 ||J||^2 h``.
        """
        dz = dh = None
        if self.d_norm is not None:
            dz = (self.factor if grad is None else grad * self.factor)[:, None] * self.d_norm
        if self.h64 is not None:
            dh = (2.0 * self.norm if grad is None else 2.0 * grad * self.norm)[:, None] * self.h64
        return dz, dh


def _output_layer_terms(z: torch.Tensor, h: torch.Tensor, use_weight: bool, use_bias: bool, softmax: bool) -> _Terms:
    """S of the output-layer route from logits ``z`` (B, C) and penultimate ``h`` (B, H), with its gradient's parts."""
    h64 = h.detach().double() if use_weight else None
    if h64 is not None:
        factor = torch.linalg.vecdot(h64, h64)
    else:
        factor = torch.zeros(z.shape[:1], dtype=torch.float64, device=z.device)
    if use_bias:
        factor.add_(1.0)
    if softmax:
        norm, d_norm = _softmax_norm(z.detach(), grad=True)
    else:
        norm, d_norm = jacobian_norm(z, "logits"), None
    return _Terms(norm * factor, norm, factor, d_norm, h64)


class _OutputLayerSensitivity(torch.autograd.Function):
    """``S = ||J||_F^2 * (||h||^2 [weight] + 1 [bias])`` from logits ``z`` and penultimate ``h``, in float64.

    One graph node with a closed-form backward (``_Terms.cotangents``) instead of the two dozen
    small ops autograd would record. ``Sensitivity.value_and_grad`` needs no node at all: it
    hands the same cotangents to one backward pass.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, h: torch.Tensor, use_weight: bool, use_bias: bool, softmax: bool) -> torch.Tensor:
        terms = _output_layer_terms(z, h, use_weight, use_bias, softmax)
        ctx.terms, ctx.dtypes = terms, (z.dtype, h.dtype)
        return terms.value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dz, dh = ctx.terms.cotangents(grad)
        z_dtype, h_dtype = ctx.dtypes
        return None if dz is None else dz.to(z_dtype), None if dh is None else dh.to(h_dtype), None, None, None


def _jacobian_rows(z: torch.Tensor, rows: slice, output: str) -> torch.Tensor:
    """Rows ``rows`` of ``df/dz`` (k, C) for one sample's logits ``z`` (C,), accurate as in ``jacobian_norm``, in z's dtype."""
    c = z.shape[-1]
    idx = torch.arange(c, device=z.device)[rows]
    if output == "logits":
        return (idx[:, None] == torch.arange(c, device=z.device)[None, :]).to(z.dtype)
    p, _, top, _, rest = _softmax_parts(z)
    one_minus = (1.0 - p).scatter(-1, top, rest)  # 1 - p_i, the top's as a sum of small terms
    block = -p[idx, None] * p[None, :]  # J_ik = -p_i p_k off the diagonal
    block = block.scatter(1, idx[:, None], (p[idx] * one_minus[idx])[:, None])  # J_ii = p_i (1 - p_i)
    return block.to(z.dtype)


# ---------------------------------------------------------------------------- the two routes


class Sensitivity:
    """S for one model, one set of parameters W and one output: checked once, then run on any batch.

    ``sensitivity`` and ``sensitivity_and_grad`` build one per call; an ascent builds one, enters
    ``session`` once and calls ``value_and_grad`` every step.
    """

    def __init__(self, model: Model, params: Sequence[str], output: Output = "softmax") -> None:
        self.model = model
        self.module = _check(model, params, output)
        self.output = output
        named = dict(self.module.named_parameters())
        self.plist = [named[k] for k in params]
        self.layer = _candidate_layer(named, params)
        self.weight = named[self.layer.weight] if self.layer is not None else None
        self.bias = named[self.layer.bias] if self.layer is not None and self.layer.bias is not None else None
        self._linear = self._hookable_layer()
        self._cotangents: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}
        self._checked = False  # W h + b == z held on a batch: the logits are that layer's output
        self._in_session = False

    def _hookable_layer(self) -> nn.Linear | None:
        """The ``nn.Linear`` that owns W, when the model runs it as a module (hooks see its input)."""
        if self.layer is None or not self.model.hookable:
            return None
        try:
            sub = self.module.get_submodule(_split(self.layer.weight)[0])
        except AttributeError:
            return None
        return sub if isinstance(sub, nn.Linear) and sub.weight is self.weight else None

    @contextmanager
    def session(self) -> Iterator[None]:
        """Grad mode on and torch's chatter off for a run of calls; ``value_and_grad`` inside skips that set-up.

        Entering ``quiet`` costs about 10 µs, a tenth of the fixed cost of a step on a tiny
        network: an ascent enters it once, not once per step.
        """
        if self._in_session and torch.is_grad_enabled():
            yield
            return
        outer, self._in_session = self._in_session, True
        try:
            with torch.enable_grad(), quiet():
                yield
        finally:
            self._in_session = outer

    # -- output-layer route

    def _cotangent(self, rows: int, classes: int, like: torch.Tensor) -> torch.Tensor:
        """(K, B, C) with a one at [b // C, b, b % C]: batch entry k reads samples kC .. kC + C - 1."""
        key = (rows, classes, like.dtype, like.device)
        if key not in self._cotangents:
            k = -(-rows // classes)
            b = torch.arange(rows, device=like.device)
            cot = torch.zeros((k, rows, classes), dtype=like.dtype, device=like.device)
            cot[b // classes, b, b % classes] = 1.0
            self._cotangents = {key: cot}  # one shape at a time: batch sizes change rarely
        return self._cotangents[key]

    def _hooked(self, x: torch.Tensor, autocast: str | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Logits and the input of the output ``nn.Linear`` (``_torch.recording``, ``only_call`` rule); None unless it is (B, H).

        ``h`` is the tensor the network computed, with its graph: no backward pass is needed to
        read it. It is returned as the layer multiplied it (autocast rounds it to the logits'
        dtype) in W's dtype, as the backward route gives it.
        """
        assert self._linear is not None and self.weight is not None
        with recording(self._linear, "input") as seen, _autocast(x, autocast):
            z = as_logits(self.model.forward(x))
        h = only_call(seen, z.shape[0])
        if not isinstance(h, torch.Tensor) or h.shape != (z.shape[0], self.weight.shape[1]) or z.shape[1] != self.weight.shape[0]:
            return None
        return z, h.to(z.dtype).to(self.weight.dtype)

    def _recovered(self, x: torch.Tensor, create_graph: bool, autocast: str | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Logits and ``h`` recovered by one backward pass with batched cotangents (any format; see the module doc)."""
        weight = self.weight
        assert weight is not None
        with _grad_on([weight]):
            with _autocast(x, autocast):
                z = as_logits(self.model.forward(x))
            rows, classes = z.shape
            if classes != weight.shape[0] or rows == 0 or not z.requires_grad:
                return None
            cot = self._cotangent(rows, classes, z)
            (g,) = torch.autograd.grad(z, weight, cot, is_grads_batched=True, create_graph=create_graph, allow_unused=True)
        if g is None:
            return None
        return z, g.reshape(cot.shape[0] * classes, -1)[:rows]

    def _agrees(self, z: torch.Tensor, h: torch.Tensor) -> bool:
        """``W h + b == z`` up to the rounding of the logits' dtype, in float64."""
        assert self.weight is not None
        with torch.no_grad():
            w64, h64, z64 = self.weight.detach().double(), h.detach().double(), z.detach().double()
            expect, scale = h64 @ w64.T, h64.abs() @ w64.abs().T
            if self.bias is not None:
                b64 = self.bias.detach().double()
                expect, scale = expect + b64, scale + b64.abs()
            tol = 64 * float(torch.finfo(z.dtype).eps) * (scale + z64.abs()) + 1e-30
            return bool(((z64 - expect).abs() <= tol).all())

    def penultimate(self, x: torch.Tensor, *, create_graph: bool, autocast: str | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Logits ``z`` (B, C) and penultimate vectors ``h`` (B, H) with ``z = W h + b``, or None if z is not that.

        On a hookable model whose W belongs to an ``nn.Linear``, ``h`` is that layer's input,
        read by a hook; otherwise (TorchScript, ``torch.export``, or when the hook does not see
        exactly one call) it comes from one backward pass through the last matmul (see the
        module doc), with ``create_graph`` keeping its graph back to ``x``. The check
        ``W h + b == z`` allows the rounding of the logits' dtype; it runs in the model's own
        precision until one batch passes, since whether the logits are the layer's output is a
        property of the model (an ascent calls this with the same model every step). Under
        autocast, an unchecked model is first checked on the same batch without it.
        """
        if self.weight is None:
            return None
        if autocast is not None and not self._checked and self.penultimate(x, create_graph=False) is None:
            return None
        hooked = self._linear is not None
        found = self._hooked(x, autocast) if hooked else self._recovered(x, create_graph, autocast)
        if found is not None and (self._checked or self._agrees(*found)):
            self._checked = True
            return found
        if hooked:  # the hook saw something else than the logits' layer input: the backward route from now on
            self._linear = None
            return self.penultimate(x, create_graph=create_graph, autocast=autocast)
        return None

    def _pairs(self, x: torch.Tensor, autocast: str | None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """``(z, h)`` of the output-layer route for the batch, in pieces; None when W is not the output layer's.

        The backward route runs in pieces of ``max(RECOVERY_ROWS, C)`` samples: its batched
        matmuls cost ``B^2 H`` for a piece of ``B`` samples, linear in the bag this way. The hook
        route reads the whole batch at once.
        """
        if self.weight is None or x.shape[0] == 0:
            return None
        pairs = []
        lo = 0
        while lo < x.shape[0]:
            rows = x.shape[0] if self._linear is not None else max(RECOVERY_ROWS, self.weight.shape[0])
            found = self.penultimate(x if lo == 0 and rows >= x.shape[0] else x[lo : lo + rows], create_graph=True, autocast=autocast)
            if found is None:
                return None
            pairs.append(found)
            lo += rows
        return pairs

    def _terms(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[_Terms]:
        assert self.layer is not None
        layer, softmax = self.layer, self.output == "softmax"
        return [_output_layer_terms(z, h, layer.use_weight, layer.use_bias, softmax) for z, h in pairs]

    # -- any-parameter route

    def _class_chunks(self, xb: torch.Tensor, autocast: str | None) -> Iterator[torch.Tensor]:
        """For one sample ``xb`` (1, ...): partial sums of S over chunks of classes, each a float64 scalar.

        Each chunk backpropagates the rows ``J_i`` of the output Jacobian as batched cotangents
        through the logits (with a graph for a later backward); the forward graph is kept until
        the last chunk.
        """
        with _autocast(xb, autocast):
            z = as_logits(self.model.forward(xb))[0]
        if not z.requires_grad:  # neither W nor the input reaches the output
            yield 0.0 * z.double().sum()
            return
        numel = max(1, sum(p.numel() for p in self.plist))
        step = max(1, min(z.shape[0], CHUNK_ELEMENTS // numel))
        for lo in range(0, z.shape[0], step):
            cot = _jacobian_rows(z, slice(lo, lo + step), self.output)
            grads = torch.autograd.grad(z, self.plist, cot, is_grads_batched=True, create_graph=True, retain_graph=True, allow_unused=True)
            yield sum((g.double().square().sum() for g in grads if g is not None), 0.0 * z.double().sum())

    # -- entry points

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample ``S(x)`` (B,), float64, differentiable with respect to ``x`` (see ``sensitivity``)."""
        with self.session():
            pairs = self._pairs(x, None)
            if pairs is not None:
                assert self.layer is not None
                layer, softmax = self.layer, self.output == "softmax"
                parts = [_OutputLayerSensitivity.apply(z, h, layer.use_weight, layer.use_bias, softmax) for z, h in pairs]
                return parts[0] if len(parts) == 1 else torch.cat(parts)
            with _grad_on(self.plist):
                out = [torch.stack(list(self._class_chunks(x[b : b + 1], None))).sum() for b in range(x.shape[0])]
        return torch.stack(out) if out else x.new_zeros((0,), dtype=torch.float64)

    def value_and_grad(self, x: torch.Tensor, *, autocast: Autocast | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``S(x)`` (B,) float64 and ``dS/dx`` (x's shape and dtype), detached (see ``sensitivity_and_grad``).

        On the output-layer route S is computed from detached ``z`` and ``h``, and one backward
        pass takes its cotangents (``_Terms.cotangents``) from ``z`` and ``h`` to ``x``: no
        graph node for S, no second backward.
        """
        xv = x.detach().requires_grad_(True)
        with self.session():
            pairs = self._pairs(xv, autocast)
            if pairs is not None:
                outputs, cotangents = [], []
                terms = self._terms(pairs)
                for (z, h), t in zip(pairs, terms, strict=True):
                    dz, dh = t.cotangents()
                    for out, cot in ((z, dz), (h, dh)):
                        if cot is not None:
                            outputs.append(out)
                            cotangents.append(cot.to(out.dtype))
                s = terms[0].value if len(terms) == 1 else torch.cat([t.value for t in terms])
                grad = torch.autograd.grad(outputs, xv, cotangents, allow_unused=True)[0] if outputs else None
                return s, torch.zeros_like(xv) if grad is None else grad
            values = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            grad = torch.zeros_like(xv)
            with _grad_on(self.plist):
                for b in range(x.shape[0]):
                    xb = x[b : b + 1].detach().requires_grad_(True)
                    for part in self._class_chunks(xb, autocast):
                        (g,) = torch.autograd.grad(part, xb, retain_graph=True, allow_unused=True)
                        values[b] += part.detach()
                        if g is not None:
                            grad[b] += g[0]
        return values, grad


def sensitivity(model: Model, x: torch.Tensor, params: Sequence[str], output: Output = "softmax") -> torch.Tensor:
    """Per-sample ``S(x)`` of shape (B,), float64, differentiable with respect to ``x``.

    The output-layer route when ``params`` are the output layer's weight and/or bias, else the
    any-parameter route, whose graph grows with the number of classes: for an ascent with
    bounded memory use ``sensitivity_and_grad``.
    """
    return Sensitivity(model, params, output)(x)


def sensitivity_and_grad(
    model: Model, x: torch.Tensor, params: Sequence[str], output: Output = "softmax", *, autocast: Autocast | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``S(x)`` (B,) float64 and ``dS/dx`` (x's shape and dtype), detached; what one ascent step needs.

    ``autocast="bf16"`` runs the network under bfloat16 autocast (the probability terms stay
    float64). The any-parameter route differentiates every chunk of classes as soon as it is
    summed, so its memory does not grow with the number of classes.
    """
    return Sensitivity(model, params, output).value_and_grad(x, autocast=autocast)


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
            z = as_logits(module(x[b : b + 1].to(plist[0].device).double()))[0]
            if output == "softmax":
                off = 1.0 - torch.eye(z.shape[0], dtype=z.dtype, device=z.device)
                f = 1.0 / (1.0 + (torch.exp(z[None, :] - z[:, None]) * off).sum(-1))
            else:
                f = z
            total = 0.0 * f.sum()
            for i in range(f.shape[0]):
                grads = torch.autograd.grad(f[i], plist, create_graph=True, retain_graph=True, allow_unused=True)
                total = total + sum((g.square().sum() for g in grads if g is not None), z.new_zeros(()))
            out.append(total)
    return torch.stack(out) if out else x.new_zeros((0,), dtype=torch.float64)
