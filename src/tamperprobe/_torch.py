"""The one home of the small torch helpers every stage uses.

Running a network and reading its logits (``as_logits``, ``module_logits``), finding its last
linear layer (``last_linear``), reading a layer's activations with a hook (``layer_activations``),
accuracy, silencing torch's deprecation chatter for our own calls (``quiet``), and where and how
wide a model runs (``use_threads``, ``resolve_device``, ``module_device``). Importing this module
imports torch.

**Threads.** torch starts one intra-op thread per core. On a small machine shared with other
jobs a parallel region waits for its slowest thread, and that thread waits for a core while its
partners spin: on 2 shared cores, torch's default of 2 threads made generation and inference
4–86× slower than one (``bench/results/threads.md``). So the command line runs models on
``DEFAULT_THREADS`` = 1 thread unless told otherwise (``--threads N`` or ``$TAMPERPROBE_THREADS``;
0 keeps torch's default), and ``import tamperprobe`` asks OpenMP to let waiting threads sleep
(``OMP_WAIT_POLICY=PASSIVE``, see the package's ``__init__``), which removes the collapse for any
thread count, library callers' included.

**Devices.** A model lives on one device (``module_device``); every helper here moves its
inputs there and brings outputs back to the CPU as float32, so callers keep handing in and
getting back NumPy arrays whatever the device.
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

#: Torch intra-op threads when neither ``--threads`` nor ``$TAMPERPROBE_THREADS`` says otherwise (see the module doc).
DEFAULT_THREADS = 1
THREADS_ENV = "TAMPERPROBE_THREADS"


def thread_count(threads: int | None = None) -> int:
    """The thread count asked for: ``threads``, else ``$TAMPERPROBE_THREADS``, else ``DEFAULT_THREADS``; 0 means torch's default."""
    import os

    source = "--threads"
    if threads is None:
        text = os.environ.get(THREADS_ENV, "").strip()
        if not text:
            return DEFAULT_THREADS
        source = f"${THREADS_ENV}"
        try:
            threads = int(text)
        except ValueError:
            raise UsageError(f"{source} must be a whole number of threads, got {text!r}") from None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise UsageError(f"{source} must be 0 (torch's default) or a positive number of threads, got {threads!r}")
    return threads


def use_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads as ``thread_count`` resolves ``threads``; returns the count now in effect."""
    n = thread_count(threads)
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a ``torch.device`` (None: cpu); a device this machine lacks is a UsageError."""
    if device is None:
        return torch.device("cpu")
    text = str(device).strip().lower()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise UsageError(f"unknown device {str(device)!r}: use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, but no GPU is visible"
            raise UsageError(f"--device {text}: CUDA is not available on this machine (torch {torch.__version__} is {build}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"--device {text}: this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
    return dev


def module_device(module: Any) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module with neither)."""
    for get in ("parameters", "buffers"):
        items = getattr(module, get, None)
        if items is None:
            continue
        for t in items():
            return t.device
    return torch.device("cpu")


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


def _logits_part(out: Any) -> Any:
    """The part of a model's output that holds the logits: a tensor as it is, the first of a tuple or list,
    a dict's (or Hugging Face ``ModelOutput``'s) ``logits`` entry, else its first value."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = out["logits"] if "logits" in out else next(iter(out.values()))
    return out


def as_logits(out: Any) -> torch.Tensor:
    """The logits tensor (batch, classes) of a model's output (see ``_logits_part``)."""
    out = _logits_part(out)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ModelLoadError("the model must return logits of shape (batch, classes)")
    return out


class LogitsOnly(nn.Module):
    """A module whose output is only the logits tensor of ``model``'s (a dict, ``ModelOutput`` or tuple).

    Tracers and exporters write a program with one tensor output, which every runtime and server
    reads the same way; the wrapped model's parameters keep their names under ``model.``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits_part(self.model(x))


def logits_module(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """``module`` itself when it returns a tensor on ``example``; otherwise ``LogitsOnly(module)`` (checked to give logits)."""
    with torch.no_grad():
        out = module(example)
    if isinstance(out, torch.Tensor):
        return module
    as_logits(out)
    return LogitsOnly(module).eval()


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
    """float32 logits (N, C) of a plain module on ``x`` (run on the module's device), without gradients."""
    outs = []
    device = module_device(module)
    with torch.no_grad(), quiet():
        for i in range(0, len(x), max(1, batch_size)):
            outs.append(as_logits(module(to_tensor(x[i : i + batch_size]).to(device))).float().cpu().numpy())
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
    device = module_device(module)
    for i in range(0, len(x), max(1, chunk)):
        xt = to_tensor(x[i : i + chunk]).to(device).requires_grad_(True)
        rows = torch.arange(xt.shape[0], device=device)
        a = torch.from_numpy(np.asarray(cls[i : i + chunk], dtype=np.int64)).to(device)
        b = torch.from_numpy(np.asarray(other[i : i + chunk], dtype=np.int64)).to(device)
        with torch.enable_grad():
            z = as_logits(module(xt)).float()
            (g,) = torch.autograd.grad((z[rows, a] - z[rows, b]).sum(), xt)
        out.append(g.double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(np.shape(x))


def last_linear(module: nn.Module) -> tuple[str, nn.Linear] | None:
    """The last ``nn.Linear`` in module (registration) order, with its qualified name; None if there is none."""
    found = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            found = (name, sub)
    return found


def _first_tensor(value: object) -> torch.Tensor | None:
    """The tensor a hook sees: ``value`` itself, or the first item of a (nested) tuple or list."""
    while isinstance(value, (tuple, list)) and value:
        value = value[0]
    return value if isinstance(value, torch.Tensor) else None


@contextmanager
def recording(layer: nn.Module, read: str = "input") -> Iterator[list[torch.Tensor | None]]:
    """Record, for every call of ``layer`` inside the block, the tensor it reads (``input``) or returns (``output``).

    The one forward-hook helper: the output-layer route of the sensitivity and ``layer_activations``
    both read layers through it, with the same rule (``only_call``). The tensors keep their graph.
    Raises ``UsageError`` when the layer cannot be hooked.
    """
    seen: list[torch.Tensor | None] = []
    try:
        if read == "input":
            handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(_first_tensor(args)))
        else:
            handle = layer.register_forward_hook(lambda _m, _a, out: seen.append(_first_tensor(out)))
    except Exception:
        raise UsageError("this layer cannot be hooked: use --select random") from None
    try:
        yield seen
    finally:
        handle.remove()


def only_call(seen: list[torch.Tensor | None], batch: int) -> torch.Tensor | None:
    """The capture rule: the tensor of the layer's only call, when it has ``batch`` rows; None otherwise.

    A layer called several times in one forward pass (shared weights, a recurrence) has no single
    activation per sample, and one that saw no per-sample tensor has none either.
    """
    if len(seen) != 1 or seen[0] is None or seen[0].dim() == 0 or seen[0].shape[0] != batch:
        return None
    return seen[0]


def layer_activations(module: nn.Module, x: np.ndarray | torch.Tensor, layer: str | None = None, *, batch_size: int = 256) -> np.ndarray:
    """Activations (N, units) of a layer, flattened per sample, as float32.

    ``layer=None`` takes the *input* of the last ``nn.Linear`` (the penultimate features);
    otherwise ``layer`` names a submodule whose *output* is taken. Read with ``recording`` under
    the ``only_call`` rule. Raises ``UsageError`` when the module has no such layer, it cannot be
    hooked (TorchScript, ``torch.export``), or it does not run exactly once per forward pass.
    """
    if layer is None:
        last = last_linear(module) if isinstance(module, nn.Module) and not isinstance(module, torch.jit.ScriptModule) else None
        if last is None:
            raise UsageError("cannot find a layer to read activations from (no hookable nn.Linear): pass a layer or use --select random")
        target, read = last[1], "input"
    else:
        subs = dict(module.named_modules())
        if layer not in subs or layer == "":
            names = [n for n in subs if n]
            raise UsageError(f"unknown layer {layer!r}: valid names are {', '.join(names) or '(none)'}; or use --select random")
        target, read = subs[layer], "output"
    xt = x.detach() if isinstance(x, torch.Tensor) else to_tensor(np.asarray(x))
    device = module_device(module)
    rows = []
    with recording(target, read) as seen, torch.no_grad(), quiet():
        for i in range(0, xt.shape[0], max(1, batch_size)):
            seen.clear()
            chunk = xt[i : i + batch_size].contiguous().to(device)
            module(chunk)
            got = only_call(seen, chunk.shape[0])
            if got is None:
                raise UsageError(
                    f"layer {layer!r} yields no per-sample activations in this model (it must run once per forward pass): "
                    "pick another layer or use --select random"
                )
            rows.append(got.detach().reshape(got.shape[0], -1).float().cpu().numpy())
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
