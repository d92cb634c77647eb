"""The one home of the small torch helpers every stage uses.

Running a network and reading its logits (``as_logits``, ``module_logits``), finding its last
linear layer (``last_linear``), reading a layer's activations with a hook (``layer_activations``),
accuracy, and silencing torch's deprecation
chatter for our own calls (``quiet``). Importing this module imports torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ModelLoadError, UsageError


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the deprecation and tracer warnings torch prints for our own calls (TorchScript, export, ONNX)."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning, UserWarning):
            warnings.filterwarnings("ignore", message=".*deprecated.*", category=category)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


@contextmanager
def quiet_all() -> Iterator[None]:
    """Silence every warning (exporters' chatter while writing a model in another format)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def as_logits(out: Any) -> torch.Tensor:
    """The logits tensor (batch, classes) of a model's output (a tensor, or the first of a tuple or dict)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ModelLoadError("the model must return logits of shape (batch, classes)")
    return out


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """A standard contiguous float32 tensor for a batch, whatever the array's strides.

    NumPy calls an array with a size-1 axis contiguous whatever that axis' stride, and fancy
    indexing of a (N, 1, H, W) array can give it stride 1, so the batch *also* looks channels-last
    to torch: convolutions then answer channels-last and a model's ``.view`` fails. Such a batch is
    copied into the standard layout.
    """
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= size
    if tuple(reversed(expected)) != t.stride():
        t = torch.empty(t.shape, dtype=t.dtype).copy_(t)
    return t


def module_logits(module: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """float32 logits (N, C) of a plain module on ``x``, without gradients."""
    outs = []
    with torch.no_grad(), quiet():
        for i in range(0, len(x), max(1, batch_size)):
            outs.append(as_logits(module(to_tensor(x[i : i + batch_size]))).float().cpu().numpy())
    if not outs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outs).astype(np.float32, copy=False)


def predict(module: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Top-1 labels of a module on ``x``."""
    z = module_logits(module, x, batch_size)
    return z.argmax(axis=1) if len(z) else np.zeros(0, dtype=np.int64)


def accuracy(labels_or_logits: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose label (or argmax of logits) equals ``y``; NaN for no rows."""
    a = np.asarray(labels_or_logits)
    labels = a.argmax(axis=1) if a.ndim == 2 else a
    y = np.asarray(y)
    return float((labels == y).mean()) if len(y) else float("nan")


def margin_gradient(module: nn.Module, x: np.ndarray, cls: np.ndarray, other: np.ndarray, chunk: int = 256) -> np.ndarray:
    """∂(z_cls − z_other)/∂x per row of model-domain inputs ``x``, as a float64 array of x's shape."""
    out = []
    for i in range(0, len(x), max(1, chunk)):
        xt = to_tensor(x[i : i + chunk]).requires_grad_(True)
        rows = torch.arange(xt.shape[0])
        a = torch.from_numpy(np.asarray(cls[i : i + chunk], dtype=np.int64))
        b = torch.from_numpy(np.asarray(other[i : i + chunk], dtype=np.int64))
        with torch.enable_grad():
            z = as_logits(module(xt)).float()
            (g,) = torch.autograd.grad((z[rows, a] - z[rows, b]).sum(), xt)
        out.append(g.double().numpy())
    return np.concatenate(out) if out else np.zeros(np.shape(x))


def last_linear(module: nn.Module) -> tuple[str, nn.Linear] | None:
    """The last ``nn.Linear`` in module (registration) order, with its qualified name; None if there is none."""
    found = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            found = (name, sub)
    return found


def layer_activations(module: nn.Module, x: np.ndarray | torch.Tensor, layer: str | None = None, *, batch_size: int = 256) -> np.ndarray:
    """Activations (N, units) of a layer, flattened per sample, as float32.

    ``layer=None`` takes the *input* of the last ``nn.Linear`` (the penultimate features);
    otherwise ``layer`` names a submodule whose *output* is taken. Raises ``UsageError`` when
    the module has no such layer or it cannot be hooked (TorchScript, ``torch.export``).
    """
    if layer is None:
        last = last_linear(module) if isinstance(module, nn.Module) and not isinstance(module, torch.jit.ScriptModule) else None
        if last is None:
            raise UsageError("cannot find a layer to read activations from (no hookable nn.Linear): pass a layer or use --select random")
        target, pre = last[1], True
    else:
        subs = dict(module.named_modules())
        if layer not in subs or layer == "":
            names = [n for n in subs if n]
            raise UsageError(f"unknown layer {layer!r}: valid names are {', '.join(names) or '(none)'}; or use --select random")
        target, pre = subs[layer], False
    grabbed: list[torch.Tensor] = []

    def take(value: object) -> None:
        while isinstance(value, (tuple, list)) and value:
            value = value[0]
        if isinstance(value, torch.Tensor):
            grabbed.append(value.detach().reshape(value.shape[0], -1).float())

    try:
        if pre:
            handle = target.register_forward_pre_hook(lambda _m, args: take(args))
        else:
            handle = target.register_forward_hook(lambda _m, _a, out: take(out))
    except Exception:
        raise UsageError(f"cannot hook layer {layer!r} of this model: use --select random") from None
    xt = x.detach() if isinstance(x, torch.Tensor) else to_tensor(np.asarray(x))
    rows = []
    try:
        with torch.no_grad(), quiet():
            for i in range(0, xt.shape[0], max(1, batch_size)):
                grabbed.clear()
                chunk = xt[i : i + batch_size].contiguous()
                module(chunk)
                if not grabbed or grabbed[-1].shape[0] != chunk.shape[0]:
                    raise UsageError(f"layer {layer!r} yields no per-sample activations in this model: pick another layer or use --select random")
                rows.append(grabbed[-1].cpu().numpy())
    finally:
        handle.remove()
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(rows).astype(np.float32, copy=False)


def set_training(module: nn.Module, mode: bool) -> None:
    """``module.train(mode)``, skipped for modules that cannot switch (torch.export's GraphModule raises)."""
    try:
        module.train(mode)
    except NotImplementedError:  # torch.export's GraphModule: no mode-dependent layers to switch
        pass


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode; every submodule's training flag is restored afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    set_training(module, False)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
