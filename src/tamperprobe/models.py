"""Loading and running models: the white-box side and the local runtimes.

A model is named by a TorchScript file (``.pt``, ``.ts``, ``.jit``, from ``torch.jit.save``),
a ``torch.export`` program (``.pt2``), an ONNX file (``.onnx``, run by onnxruntime, for
serving and verification only), ``package.module:attribute`` naming an ``nn.Module``, a
class or a factory, or an ``nn.Module`` object passed directly. Optional weights come from
``.safetensors`` or a state_dict file read with ``weights_only=True``; nothing is ever
unpickled with arbitrary code.

Every stage sees a model through the small ``Model`` protocol: ``TorchModel`` (an eager
module), ``ScriptedModel`` (TorchScript), ``ExportedModel`` (``torch.export``) and
``OnnxModel`` implement it; what a stage may do with one is a property of the class
(``module`` is None for ONNX, ``hookable``), never a string to compare.

A file from the party under suspicion is loaded with ``sandbox=True``: TorchScript and
``torch.export`` programs then run in a locked-down child process (``_sandbox``), and a ``.pt2``
archive is only ever read through ``_pt2``'s strict check and rebuild.

A torch model runs on the device its weights live on (``load_model(..., device="cuda")``):
``forward`` moves a batch there and ``logits`` hands back CPU float32 arrays, so callers never
need to know where the model runs.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from ._util import one_line
from .errors import ModelLoadError, UsageError

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".torchscript")


def _digest_arrays(items: list[tuple[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for name, arr in sorted(items, key=lambda kv: kv[0]):
        arr = np.ascontiguousarray(arr)
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}\n".encode())
        h.update(arr.tobytes())
    return "sha256:" + h.hexdigest()


def _reason(exc: BaseException) -> str:
    """One line saying why a model failed: TorchScript puts the reason on the last line of its report."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "TorchScript" in lines[0]:
        return one_line(lines[-1])
    return one_line(exc)


@runtime_checkable
class Model(Protocol):
    """What every stage needs of a model: run it, name it, digest its weights.

    ``module`` is the ``torch.nn.Module`` for white-box work (generation, attacks, MANC) and
    ``None`` for a model only a runtime can run (ONNX); ``forward`` runs a torch model on a batch
    tensor with autograd. ``format`` names the form for messages.
    """

    source: str
    format: ClassVar[str]
    hookable: ClassVar[bool]

    @property
    def module(self) -> Any: ...

    @property
    def device(self) -> Any: ...

    def require_torch(self, what: str) -> Any: ...

    def forward(self, chunk: Any) -> Any: ...

    def logits(self, x: np.ndarray, batch_size: int = 256, threads: int | None = None) -> np.ndarray: ...

    def digest(self) -> str: ...


class TorchModel:
    """An eager ``nn.Module``: white-box and hookable."""

    format: ClassVar[str] = "module"
    hookable: ClassVar[bool] = True  # forward hooks on submodules see the computation

    def __init__(self, module: Any, source: str | None = None) -> None:
        self._module = module
        self.source = source if source is not None else f"<{type(module).__name__}>"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r})"

    @property
    def module(self) -> Any:
        return self._module

    def require_torch(self, what: str) -> Any:
        """The module, for white-box work (every torch model has one)."""
        return self._module

    @property
    def device(self) -> Any:
        """The ``torch.device`` the weights live on (batches are moved there)."""
        from ._torch import module_device

        return module_device(self._module)

    def to(self, device: Any) -> TorchModel:
        """Move the weights to ``device`` (a ``torch.device``); returns this model."""
        moved = self._module.to(device)
        if moved is not None:
            self._module = moved
        return self

    def _place(self, chunk: Any) -> Any:
        """``chunk`` on the model's device (autograd follows the copy back to the caller's tensor)."""
        device = self.device
        return chunk if chunk.device == device else chunk.to(device)

    def digest(self) -> str:
        """A digest of the weights (parameters and buffers)."""
        state = self._module.state_dict()
        return _digest_arrays([(k, v.detach().cpu().contiguous().numpy()) for k, v in state.items()])

    def forward(self, chunk: Any) -> Any:
        """Run the module on a batch tensor (moved to the model's device), under whatever autograd mode the caller set."""
        return self._module(self._place(chunk))

    def logits(self, x: np.ndarray, batch_size: int = 256, threads: int | None = None) -> np.ndarray:
        """Run the model on ``x`` (N, ...) and return float32 logits (N, C); batches are contiguous float32 tensors."""
        import torch

        from ._torch import as_logits, quiet, to_tensor

        old_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            outs = []
            with torch.no_grad(), quiet():
                for i in range(0, len(x), max(1, batch_size)):
                    chunk = to_tensor(np.asarray(x[i : i + batch_size]))
                    try:
                        out = self.forward(chunk)
                    except Exception as exc:
                        raise ModelLoadError(f"model {self.source} failed on input of shape {tuple(chunk.shape)}: {_reason(exc)}") from None
                    outs.append(as_logits(out).float().cpu().numpy())
            if not outs:
                return np.zeros((0, 0), dtype=np.float32)
            return np.concatenate(outs).astype(np.float32, copy=False)
        finally:
            if threads:
                torch.set_num_threads(old_threads)


class ScriptedModel(TorchModel):
    """A TorchScript program: white-box weights, but no submodule hooks."""

    format: ClassVar[str] = "torchscript"
    hookable: ClassVar[bool] = False

    def forward(self, chunk: Any) -> Any:
        """Run the program; with autograd on, in TorchScript's simple executor.

        The optimising executor fuses the backward into graph nodes that batched cotangents
        (``autograd.grad(..., is_grads_batched=True)``) cannot run; the simple one records
        every op for autograd like eager mode.
        """
        import torch

        chunk = self._place(chunk)
        if not torch.is_grad_enabled():
            return self._module(chunk)
        with torch.jit.optimized_execution(False):
            return self._module(chunk)


class ExportedModel(TorchModel):
    """A ``torch.export`` program: not hookable; one exported with a static batch of 1 runs row by row."""

    format: ClassVar[str] = "export"
    hookable: ClassVar[bool] = False

    def __init__(self, module: Any, source: str | None = None) -> None:
        super().__init__(module, source)
        self._fixed_batch = False

    def forward(self, chunk: Any) -> Any:
        import torch

        chunk = self._place(chunk)
        if not self._fixed_batch:
            try:
                return self._module(chunk)
            except Exception as exc:
                if chunk.shape[0] == 1 or "Guard failed" not in str(exc):
                    raise
                self._fixed_batch = True
        return torch.cat([self._module(chunk[i : i + 1]) for i in range(chunk.shape[0])])


class OnnxModel:
    """An ONNX file run by onnxruntime: black-box only (serving, calibration, verification)."""

    format: ClassVar[str] = "onnx"
    hookable: ClassVar[bool] = False

    def __init__(self, session: Any, source: str) -> None:
        self.session = session
        self.source = source

    def __repr__(self) -> str:
        return f"OnnxModel({self.source!r})"

    @property
    def module(self) -> None:
        return None

    @property
    def device(self) -> Any:
        """The CPU (the session's provider decides where onnxruntime runs; inputs are NumPy arrays)."""
        import torch

        return torch.device("cpu")

    def require_torch(self, what: str) -> Any:
        raise UsageError(f"{what} needs the model's weights in PyTorch form; {self.source} is onnx")

    def forward(self, chunk: Any) -> Any:
        """Not available: an ONNX model runs only through ``logits``."""
        return self.require_torch("running the model with autograd")

    def digest(self) -> str:
        """A digest of the ONNX initializers."""
        from ._extras import require

        onnx = require("onnx", "an ONNX model's digest")
        numpy_helper = require("onnx.numpy_helper")
        graph = onnx.load(self.source).graph
        return _digest_arrays([(t.name, numpy_helper.to_array(t)) for t in graph.initializer])

    def logits(self, x: np.ndarray, batch_size: int = 256, threads: int | None = None) -> np.ndarray:
        """float32 logits (N, C); a model with a fixed batch size runs in steps of that size."""
        x = np.asarray(x)
        inp = self.session.get_inputs()[0]
        fixed = isinstance(inp.shape[0], int) and inp.shape[0] > 0
        step = inp.shape[0] if fixed else max(1, batch_size)
        outs = []
        for i in range(0, len(x), step):
            try:
                outs.append(self.session.run(None, {inp.name: np.ascontiguousarray(x[i : i + step], dtype=np.float32)})[0])
            except Exception as exc:
                raise ModelLoadError(f"onnx model {self.source} failed: {one_line(exc)}") from None
        if not outs:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(outs).astype(np.float32, copy=False)


def load_model(
    spec: Any, weights: str | os.PathLike | None = None, *, model_args: dict[str, Any] | None = None, device: Any = None, sandbox: bool = False
) -> Model:
    """Load a model from a file, a ``package.module:attribute`` reference or an ``nn.Module`` (see module doc).

    ``device`` (``cpu``, ``cuda``, ``cuda:N`` or a ``torch.device``; default: where the weights are,
    the CPU for files) is where a torch model runs; an unavailable device is a ``UsageError``. An
    ONNX model runs on onnxruntime's CPU provider, or its CUDA provider for a CUDA device. A
    ``Model`` passes through (moved when ``device`` is given; ``weights`` then must be None).

    ``sandbox=True`` is for a file from the party under suspicion: a TorchScript or ``torch.export``
    file then loads and runs only in a locked-down child process (``_sandbox.SandboxedModel``:
    logits only, on the CPU); ONNX files and references load as usual (an ONNX file cannot run code,
    and a reference names the caller's own code).
    """
    if sandbox and isinstance(spec, (str, os.PathLike)) and Path(spec).suffix.lower() in (*TORCHSCRIPT_SUFFIXES, ".pt2") and Path(spec).is_file():
        return _load_sandboxed(Path(spec), weights, device)
    if device is not None:
        from ._torch import resolve_device

        device = resolve_device(device)
    if _is_sandboxed(spec):
        if weights is not None or (device is not None and device.type != "cpu"):
            raise UsageError(f"{spec.source} runs in a sandbox on the CPU: --weights and --device do not apply")
        return spec
    if isinstance(spec, (TorchModel, OnnxModel)):
        if weights is not None:
            raise UsageError("weights apply to a model named by file or reference, not to a loaded model")
        if device is not None and isinstance(spec, TorchModel):
            spec.to(device)
        elif device is not None and device.type != "cpu":
            raise UsageError(f"{spec.source} was loaded for the CPU: load the ONNX file again with device={str(device)!r}")
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        import torch

        if not isinstance(spec, torch.nn.Module):
            raise UsageError(f"cannot load a model from {type(spec).__name__}: give a file, package.module:attribute or an nn.Module")
        loaded = TorchModel(spec)
        if weights is not None:
            load_weights(spec, weights)
        spec.eval()
        return loaded if device is None else loaded.to(device)
    text = str(spec)
    path = Path(text)
    if path.exists() and path.is_dir():
        raise ModelLoadError(f"{text} is a folder, not a model file")
    if model_args and not (not path.exists() and _looks_like_reference(text)):
        raise UsageError("--model-arg applies to a package.module:attribute model")
    if not path.exists() and _looks_like_reference(text):
        model = _load_reference(text, weights, model_args)
    elif not path.exists():
        raise ModelLoadError(f"model file not found: {text}")
    else:
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            model = _load_onnx(path, device)
        elif suffix == ".pt2":
            model = _load_export(path)
        elif suffix in TORCHSCRIPT_SUFFIXES:
            model = _load_torchscript(path, device)
        elif suffix in (".safetensors", ".bin", ".ckpt"):
            raise ModelLoadError(
                f"{text} looks like a weights file, not a model: name the architecture as package.module:attribute and pass this file with --weights"
            )
        else:
            raise ModelLoadError(
                f"unknown model format {suffix or '(no suffix)'} for {text}: use .pt (TorchScript), .pt2 (torch.export), .onnx, or package.module:attribute"
            )
    if weights is not None:
        if model.module is None:
            raise UsageError("--weights applies to PyTorch models only")
        load_weights(model.module, weights)
    if model.module is not None and not isinstance(model, ExportedModel):  # exported programs are already in eval form
        model.module.eval()
    if device is not None and isinstance(model, TorchModel):
        model.to(device)
    return model


def _is_sandboxed(spec: Any) -> bool:
    from ._sandbox import SandboxedModel

    return isinstance(spec, SandboxedModel)


def _load_sandboxed(path: Path, weights: Any, device: Any) -> Model:
    """A suspect's TorchScript or ``torch.export`` file, run in ``_sandbox``'s child process."""
    from ._sandbox import SandboxedModel

    if weights is not None:
        raise UsageError(f"{path} runs in a sandbox: --weights applies to a package.module:attribute model")
    if device is not None and str(device) != "cpu":
        raise UsageError(f"{path} runs in a sandbox on the CPU: use --device cpu")
    model: Model = SandboxedModel(path)
    return model


def _looks_like_reference(text: str) -> bool:
    mod, sep, attr = text.partition(":")
    return bool(sep) and bool(attr) and all(p.isidentifier() for p in mod.split(".")) and all(p.isidentifier() for p in attr.split("."))


def _load_reference(text: str, weights: Any = None, model_args: dict[str, Any] | None = None) -> Model:
    """Import ``package.module:attribute``: an ``nn.Module`` instance, or a class or factory called with ``model_args``.

    A class builds a randomly initialised network, so it is refused without ``weights``: a verdict
    about random weights would be a false alarm. Factories and instances may load their own weights.
    """
    import inspect

    import torch

    mod_name, _, attr = text.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as exc:
        raise ModelLoadError(f"cannot import {mod_name}: {one_line(exc)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"{mod_name} has no attribute {attr}")
        obj = getattr(obj, part)
    args = dict(model_args or {})
    if isinstance(obj, torch.nn.Module):
        if args:
            raise UsageError(f"{text} is a model instance: --model-arg applies to a class or factory")
        return TorchModel(obj, text)
    if not callable(obj):
        raise ModelLoadError(f"{text} is neither an nn.Module nor a callable that builds one")
    if inspect.isclass(obj) and issubclass(obj, torch.nn.Module) and weights is None:
        raise UsageError(
            f"{text} is a class: built without --weights it has random weights and every verdict would be wrong; "
            "pass --weights FILE (or name a factory or instance that loads its own weights)"
        )
    try:
        built = obj(**args)
    except TypeError as exc:
        raise UsageError(
            f"{text}({', '.join(f'{k}={v!r}' for k, v in args.items())}) failed: {one_line(exc)} (set arguments with --model-arg key=value)"
        ) from None
    except Exception as exc:
        raise ModelLoadError(f"{text}() failed: {one_line(exc)}") from None
    if not isinstance(built, torch.nn.Module):
        raise ModelLoadError(f"{text}() returned {type(built).__name__}, not an nn.Module")
    return TorchModel(built, text)


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``--model-arg key=value`` texts as keyword arguments: JSON values (numbers, true/false, null, lists) or plain text."""
    import json

    from ._params import parse_kv

    out: dict[str, Any] = {}
    for key, value in parse_kv(items, "--model-arg").items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _load_torchscript(path: Path, device: Any = None) -> Model:
    import torch

    from ._torch import quiet

    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path} is not a TorchScript archive (not a zip file; damaged or another format)")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    if not any("/code/" in n or n.startswith("code/") for n in names):
        raise ModelLoadError(
            f"{path} is not a TorchScript program; if it is a state_dict, name the architecture as package.module:attribute and pass this file with --weights"
        )
    try:
        with quiet():
            # map_location also moves the constants a trace recorded, which ``.to`` would leave behind
            module = torch.jit.load(str(path), map_location=device if device is not None else "cpu")
    except Exception as exc:
        raise ModelLoadError(f"cannot load TorchScript {path}: {one_line(exc)}") from None
    return ScriptedModel(module, str(path))


def check_pt2_archive(path: Path) -> None:
    """Refuse a ``torch.export`` archive holding anything but the plain parts of one program (see ``_pt2``)."""
    from ._pt2 import approved_parts

    approved_parts(path, Path(path).read_bytes())


def _load_export(path: Path) -> Model:
    """A ``.pt2`` program; torch reads only an archive rebuilt from the parts the check approved (``_pt2``)."""
    from ._pt2 import load_pt2

    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path} is not a torch.export program (not a zip file; damaged or another format)")
    return ExportedModel(load_pt2(path), str(path))


def _load_onnx(path: Path, device: Any = None) -> Model:
    from ._extras import require

    ort = require("onnxruntime", f"the ONNX model {path}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers: list[Any] = ["CPUExecutionProvider"]
    if device is not None and device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UsageError(f"--device {device}: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu), or use --device cpu")
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:
        raise ModelLoadError(f"cannot load ONNX model {path}: {one_line(exc)}") from None
    return OnnxModel(session, str(path))


def read_state_dict(path: str | os.PathLike) -> dict:
    """Read a state_dict from ``.safetensors`` or a torch file, without arbitrary unpickling."""
    import torch

    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"weights file not found: {p}")
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as exc:
            raise ModelLoadError(f"cannot read safetensors {p}: {one_line(exc)}") from None
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read weights {p} (only plain state_dicts are accepted): {one_line(exc)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{p} does not hold a state_dict of tensors")
    return state


def _names(items: list[str], cap: int = 6) -> str:
    shown = ", ".join(items[:cap])
    return shown + (f", … ({len(items) - cap} more)" if len(items) > cap else "")


def load_weights(module: Any, path: str | os.PathLike) -> None:
    """Load a state_dict file into ``module``; a mismatch lists missing, unexpected and mis-shaped keys in one line."""
    state = read_state_dict(path)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_names(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} of another shape: {_names(shapes, 3)}")
        raise ModelLoadError(f"weights {path} do not fit {type(module).__name__}: " + "; ".join(parts))
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ModelLoadError(f"weights {path} do not fit {type(module).__name__}: {one_line(exc)}") from None


def save_state_dict(module: Any, path: str | os.PathLike) -> Path:
    """Write a module's weights as ``.safetensors`` (atomically)."""
    from safetensors.torch import save_file

    from ._util import atomic_write

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def save_model(module: Any, path: str | os.PathLike, example: np.ndarray) -> Path:
    """Write ``module`` in the format its suffix names (.pt TorchScript, .pt2 export, .onnx, .safetensors).

    A program (.pt, .pt2, .onnx) returns the logits tensor alone: a model whose output is a dict, a
    Hugging Face ``ModelOutput`` or a tuple is written as ``_torch.LogitsOnly`` of it.
    """
    import torch

    from ._torch import logits_module, module_device, quiet

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if module_device(module).type != "cpu":  # a file is written for the CPU (a trace would bake in the device)
        import copy

        module = copy.deepcopy(module).cpu()
    module = module.eval()
    ex = torch.from_numpy(np.ascontiguousarray(example[:2]).astype(np.float32))
    suffix = p.suffix.lower()
    with quiet():
        if suffix != ".safetensors":  # a program of the logits alone, for a model returning a dict, ModelOutput or tuple
            module = logits_module(module, ex)
        if suffix == ".safetensors":
            save_state_dict(module, p)
        elif suffix in TORCHSCRIPT_SUFFIXES:
            torch.jit.save(torch.jit.trace(module, ex, check_trace=False), str(p))
        elif suffix == ".pt2":
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            ep = torch.export.export(module, (ex,), dynamic_shapes=({0: batch},))
            torch.export.save(ep, str(p))
        elif suffix == ".onnx":
            torch.onnx.export(
                module,
                (ex,),
                str(p),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                dynamo=False,
            )
        else:
            raise UsageError(f"cannot write a model as {suffix or '(no suffix)'}: use .pt, .pt2, .onnx or .safetensors")
    return p
