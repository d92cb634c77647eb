"""What MANC covers: one activation vector per marker, read the same way on every model format.

By default MANC covers the input ``h`` of the output layer ``z = W h + b`` (``penultimate``),
except when the output layer reads **globally pooled features**: then it covers the map that was
pooled, the last layer that still has spatial extent (``pooled_map``). The reason is in the
units: after a global average pool of ReLU channels nearly every channel is positive on every
marker, so "active" (> 0) hardly tells markers apart, while the map before the pool keeps where
each channel fired (``bench/results/verideep-table6.md`` measures both).

The rule, the same on every format:

1. ``h`` is the output layer's input: read by a hook or one backward pass on the torch formats
   (``Sensitivity.penultimate``), by exposing the first input of the last ``Gemm``/``MatMul`` as
   an extra output on ONNX.
2. The candidate map ``A`` is the result of the last operation of the forward pass that holds
   more numbers per sample than ``h`` and has at least three axes (batch, channels, positions).
   On the torch formats every aten operation is watched by a dispatch mode, so an
   ``nn.Module``, a TorchScript archive and a ``torch.export`` program give the same tensor; on
   ONNX it is the last node output of rank ≥ 3 before that ``Gemm``/``MatMul``, by shape inference.
3. ``A`` replaces ``h`` only when it pools to ``h``: its mean or its maximum over the positions
   (channels first, ``(B, C, ...)``, or last, ``(B, ..., C)``) equals ``h`` to float32 rounding.
   Anything else (a flatten, a hidden fully connected layer, a pooled map followed by more
   layers) keeps ``h``: the check is on the numbers, not on layer names.

``layer`` (``--layer``) overrides the rule: the output of a named submodule on a hookable model,
or a named tensor of an ONNX graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .._torch import layer_activations, quiet, to_tensor
from .._util import one_line
from ..errors import UsageError
from ..models import Model
from .sensitivity import Sensitivity, resolve_params

#: Relative agreement a pooled map needs with ``h`` (float32 sums in another order differ by far less).
POOL_RTOL = 1e-4


@dataclass(frozen=True)
class Coverage:
    """The activations MANC covers (``values``, one row per marker) and which layer they come from (``what``)."""

    values: np.ndarray
    what: str


# ---------------------------------------------------------------------------- torch formats


class _LastWide(TorchDispatchMode):
    """Keeps the result of the last aten operation with rank ≥ 3, ``batch`` rows and more than ``width`` numbers per row."""

    def __init__(self, batch: int, width: int) -> None:
        super().__init__()
        self.batch, self.width = batch, width
        self.last: torch.Tensor | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(first, torch.Tensor) and first.dim() >= 3 and first.shape[0] == self.batch and first[0].numel() > self.width:
            self.last = first
        return out


def _torch_penultimate(model: Model, xt: torch.Tensor, batch_size: int) -> np.ndarray | None:
    try:
        route = Sensitivity(model, resolve_params(model.require_torch("activation-based selection"), None))
    except UsageError:
        return None
    rows = []
    with torch.enable_grad(), quiet():
        for i in range(0, xt.shape[0], max(1, batch_size)):
            found = route.penultimate(xt[i : i + batch_size].contiguous(), create_graph=False)
            if found is None:
                return None
            rows.append(found[1].detach().float().cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def _torch_last_wide(model: Model, xt: torch.Tensor, width: int, batch_size: int) -> np.ndarray | None:
    """The last wide map (N, ...) of every batch, or None when a batch has none or the watched run fails (``h`` stays)."""
    rows = []
    try:
        with torch.no_grad(), quiet():
            for i in range(0, xt.shape[0], max(1, batch_size)):
                chunk = xt[i : i + batch_size].contiguous().to(model.device)
                watch = _LastWide(chunk.shape[0], width)
                with watch:
                    model.forward(chunk)
                if watch.last is None:
                    return None
                rows.append(watch.last.detach().float().cpu().numpy())
    except Exception:  # an operator the dispatch mode cannot watch: the rule falls back to h, which was read without it
        return None
    return np.concatenate(rows) if rows else None


# ---------------------------------------------------------------------------- ONNX


class _OnnxTaps:
    """An ONNX model's graph with the output layer's input ``h`` and the last wide map ``A`` as extra outputs."""

    def __init__(self, model: Any, layer: str | None = None) -> None:
        from .._extras import require

        onnx = require("onnx", "activation-based selection on an ONNX model")
        ort = require("onnxruntime", "activation-based selection on an ONNX model")
        proto = onnx.load(model.source)
        graph = proto.graph
        try:
            inferred = onnx.shape_inference.infer_shapes(proto).graph
        except Exception:
            inferred = graph
        dims: dict[str, list[int | None]] = {}
        for vi in [*inferred.value_info, *inferred.input, *inferred.output]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                dims[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        produced = [o for node in graph.node for o in node.output if o]
        self.h_name: str | None = None
        self.a_name: str | None = None
        if layer is not None:
            if layer not in produced:
                shown = ", ".join(produced[-8:])
                raise UsageError(
                    f"unknown layer {layer!r} for this onnx model: name a tensor of its graph (the last ones: {shown}); or use --select random"
                )
            self.a_name = layer
        else:
            self._find(graph, dims)
        wanted = [n for n in (self.h_name, self.a_name) if n]
        existing = {o.name for o in graph.output}
        graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in wanted if n not in existing)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(proto.SerializeToString(), sess_options=opts, providers=model.session.get_providers())
        except Exception as exc:
            raise UsageError(f"cannot read activations of this onnx model ({one_line(exc)}): use --select random") from None
        self.input = self.session.get_inputs()[0].name
        self.names = [o.name for o in self.session.get_outputs()]

    def _find(self, graph: Any, dims: dict[str, list[int | None]]) -> None:
        nodes = list(graph.node)
        last = max((i for i, n in enumerate(nodes) if n.op_type in ("Gemm", "MatMul")), default=None)
        if last is None or len(dims.get(nodes[last].input[0], [0, 0])) != 2:
            return
        self.h_name = nodes[last].input[0]
        width = dims.get(self.h_name, [None, None])[1]
        for node in nodes[:last]:
            for out in node.output:
                shape = dims.get(out)
                if shape is None or len(shape) < 3:
                    continue
                per_row = [d for d in shape[1:] if d is not None]
                if width is None or len(per_row) < len(shape) - 1 or int(np.prod(per_row)) > width:
                    self.a_name = out

    def run(self, x: np.ndarray, batch_size: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``h`` (N, H) and ``A`` (N, ...) as float32, None for the ones this graph does not have."""
        hs, maps = [], []
        for i in range(0, len(x), max(1, batch_size)):
            try:
                got = self.session.run(None, {self.input: np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)})
            except Exception as exc:
                raise UsageError(f"cannot read activations of this onnx model ({one_line(exc)}): use --select random") from None
            outs = dict(zip(self.names, got))
            if self.h_name:
                hs.append(np.asarray(outs[self.h_name], dtype=np.float32))
            if self.a_name:
                maps.append(np.asarray(outs[self.a_name], dtype=np.float32))
        return (np.concatenate(hs) if hs else None), (np.concatenate(maps) if maps else None)


# ---------------------------------------------------------------------------- the rule


def pooled_map(a: np.ndarray, h: np.ndarray) -> np.ndarray | None:
    """``a`` (N, ...) flattened per row, channels first, when its mean or max over the positions is ``h`` (N, H); else None."""
    if a.ndim < 3 or h.ndim != 2 or a.shape[0] != h.shape[0] or len(a) == 0:
        return None
    n, width = h.shape
    layouts = []
    if a.shape[1] == width:
        layouts.append(a.reshape(n, width, -1))
    if a.shape[-1] == width:
        layouts.append(np.moveaxis(a.reshape(n, -1, width), 1, 2))
    h64 = h.astype(np.float64)
    tol = POOL_RTOL * (np.abs(h64) + float(np.abs(a).max(initial=0.0))) + 1e-30
    for units in layouts:
        if units.shape[-1] < 2:
            continue
        for pool in (units.mean(axis=-1, dtype=np.float64), units.max(axis=-1).astype(np.float64)):
            if (np.abs(pool - h64) <= tol).all():
                return np.ascontiguousarray(units.reshape(n, -1), dtype=np.float32)
    return None


def _covered(h: np.ndarray | None, a: np.ndarray | None) -> Coverage | None:
    if h is None:
        return None
    pooled = pooled_map(a, h) if a is not None else None
    if pooled is not None:
        return Coverage(pooled, f"the map pooled into the output layer's input ({'×'.join(map(str, a.shape[1:]))})")  # type: ignore[union-attr]
    return Coverage(h, f"the output layer's input ({h.shape[1]} units)")


def penultimate(model: Model, x: np.ndarray | torch.Tensor, *, batch_size: int = 256) -> np.ndarray | None:
    """The input ``h`` (N, H) of the output layer ``z = W h + b`` as float32, on any format; None if there is none."""
    if model.format == "onnx":
        return _OnnxTaps(model).run(np.asarray(x), batch_size)[0]
    xt = x.detach() if isinstance(x, torch.Tensor) else to_tensor(np.asarray(x))
    return _torch_penultimate(model, xt, batch_size)


def coverage(model: Model, x: np.ndarray | torch.Tensor, layer: str | None = None, *, batch_size: int = 256) -> Coverage:
    """The activations MANC covers by default (see the module doc), or those of ``layer``; ``UsageError`` when none can be read."""
    if model.format == "onnx":
        taps = _OnnxTaps(model, layer)
        h, a = taps.run(np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x), batch_size)
        if layer is not None and a is not None:
            return Coverage(np.ascontiguousarray(a.reshape(len(a), -1)), f"tensor {layer!r}")
        found = _covered(h, a)
        if found is None:
            raise UsageError(
                "cannot read this onnx model's output-layer input (no Gemm or MatMul on a (batch, features) tensor): use --select random"
            )
        return found
    module = model.require_torch("activation-based selection")
    xt = x.detach() if isinstance(x, torch.Tensor) else to_tensor(np.asarray(x))
    if layer is None:
        h = _torch_penultimate(model, xt, batch_size)
        if h is not None:
            a = _torch_last_wide(model, xt, h.shape[1], batch_size) if len(h) else None
            found = _covered(h, a)
            assert found is not None
            return found
    if not model.hookable:
        what = "the output is not a linear layer's" if layer is None else f"layer {layer!r} cannot be hooked"
        raise UsageError(f"cannot read layer activations of this {model.format} model ({what}): use --select random")
    values = layer_activations(module, xt, layer, batch_size=batch_size)
    return Coverage(values, "the input of the last nn.Linear" if layer is None else f"layer {layer!r}")


def activations(model: Model, x: np.ndarray | torch.Tensor, layer: str | None = None, *, batch_size: int = 256) -> np.ndarray:
    """The activations (N, units) MANC covers: ``coverage(...).values``."""
    return coverage(model, x, layer, batch_size=batch_size).values
