"""Loading and running models: the white-box side and the local runtimes.

A model is named by a TorchScript file (``.pt``, ``.ts``, ``.jit``, from ``torch.jit.save``),
a ``torch.export`` program (``.pt2``), an ONNX file (``.onnx``, run by onnxruntime, for
serving and verification only), or ``package.module:attribute`` naming an ``nn.Module``, a
class or a factory. Optional weights come from ``.safetensors`` or a state_dict file read
with ``weights_only=True``; nothing is ever unpickled with arbitrary code.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelLoadError, UsageError

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".torchscript")


@contextmanager
def _quiet():
    """Silence the TorchScript deprecation warnings of torch >= 2.9 for our own calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
        yield


def _digest_arrays(items: list[tuple[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for name, arr in sorted(items, key=lambda kv: kv[0]):
        arr = np.ascontiguousarray(arr)
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}\n".encode())
        h.update(arr.tobytes())
    return "sha256:" + h.hexdigest()


@dataclass
class LoadedModel:
    """A model ready to run. ``module`` is set for torch models (white-box), ``session`` for ONNX."""

    source: str
    kind: str  # "module" | "torchscript" | "export" | "onnx"
    module: Any = None
    session: Any = None
    _fixed_batch: bool = False

    @property
    def is_torch(self) -> bool:
        return self.module is not None

    @property
    def functional(self) -> bool:
        """True when ``torch.func.functional_call`` works on the module (not TorchScript)."""
        return self.kind in ("module", "export")

    def require_torch(self, what: str) -> Any:
        if self.module is None:
            raise UsageError(f"{what} needs the model's weights in PyTorch form; {self.source} is {self.kind}")
        return self.module

    def digest(self) -> str:
        """A digest of the weights (parameters and buffers, or ONNX initializers)."""
        if self.session is not None:
            import onnx
            from onnx import numpy_helper

            graph = onnx.load(self.source).graph
            return _digest_arrays([(t.name, numpy_helper.to_array(t)) for t in graph.initializer])
        state = self.module.state_dict()
        return _digest_arrays([(k, v.detach().cpu().contiguous().numpy()) for k, v in state.items()])

    def logits(self, x: np.ndarray, batch_size: int = 256, threads: int | None = None) -> np.ndarray:
        """Run the model on ``x`` (N, ...) and return float32 logits (N, C)."""
        x = np.asarray(x)
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        if self.session is not None:
            return self._onnx_logits(x, batch_size)
        import torch

        old_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            outs = []
            step = 1 if self._fixed_batch else max(1, batch_size)
            with torch.no_grad(), _quiet():
                i = 0
                while i < len(x):
                    chunk = torch.from_numpy(np.ascontiguousarray(x[i : i + step]))
                    try:
                        out = self.module(chunk)
                    except Exception as exc:  # a program exported with a static batch of 1
                        if step > 1 and self.kind == "export" and "Guard failed" in str(exc):
                            self._fixed_batch, step = True, 1
                            continue
                        raise ModelLoadError(f"model {self.source} failed on input of shape {tuple(chunk.shape)}: {_one_line(exc)}") from None
                    outs.append(_as_logits(out).float().cpu().numpy())
                    i += step
            if not outs:
                return np.zeros((0, 0), dtype=np.float32)
            return np.concatenate(outs).astype(np.float32, copy=False)
        finally:
            if threads:
                torch.set_num_threads(old_threads)

    def _onnx_logits(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        inp = self.session.get_inputs()[0]
        fixed = isinstance(inp.shape[0], int) and inp.shape[0] > 0
        step = inp.shape[0] if fixed else max(1, batch_size)
        outs = []
        for i in range(0, len(x), step):
            try:
                outs.append(self.session.run(None, {inp.name: np.ascontiguousarray(x[i : i + step])})[0])
            except Exception as exc:
                raise ModelLoadError(f"onnx model {self.source} failed: {_one_line(exc)}") from None
        return np.concatenate(outs).astype(np.float32, copy=False)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _as_logits(out: Any):
    import torch

    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ModelLoadError("the model must return logits of shape (batch, classes)")
    return out


def load_model(spec: str | os.PathLike, weights: str | os.PathLike | None = None, *, threads: int | None = None) -> LoadedModel:
    """Load a model from a file or a ``package.module:attribute`` reference (see module doc)."""
    text = str(spec)
    path = Path(text)
    if path.exists() and path.is_dir():
        raise ModelLoadError(f"{text} is a folder, not a model file")
    if not path.exists() and _looks_like_reference(text):
        model = _load_reference(text)
    elif not path.exists():
        raise ModelLoadError(f"model file not found: {text}")
    else:
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            model = _load_onnx(path)
        elif suffix == ".pt2":
            model = _load_export(path)
        elif suffix in TORCHSCRIPT_SUFFIXES:
            model = _load_torchscript(path)
        else:
            raise ModelLoadError(
                f"unknown model format {suffix or '(no suffix)'} for {text}: use .pt (TorchScript), .pt2 (torch.export), .onnx, or package.module:attribute"
            )
    if weights is not None:
        if model.module is None:
            raise UsageError("--weights applies to PyTorch models only")
        load_weights(model.module, weights)
    if model.module is not None and model.kind != "export":  # exported programs are already in eval form
        model.module.eval()
    return model


def _looks_like_reference(text: str) -> bool:
    mod, sep, attr = text.partition(":")
    return bool(sep) and bool(attr) and all(p.isidentifier() for p in mod.split(".")) and all(p.isidentifier() for p in attr.split("."))


def _load_reference(text: str) -> LoadedModel:
    import torch

    mod_name, _, attr = text.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as exc:
        raise ModelLoadError(f"cannot import {mod_name}: {_one_line(exc)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"{mod_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if not isinstance(obj, torch.nn.Module):
        if not callable(obj):
            raise ModelLoadError(f"{text} is neither an nn.Module nor a callable that builds one")
        try:
            obj = obj()
        except Exception as exc:
            raise ModelLoadError(f"{text}() failed: {_one_line(exc)}") from None
        if not isinstance(obj, torch.nn.Module):
            raise ModelLoadError(f"{text}() returned {type(obj).__name__}, not an nn.Module")
    return LoadedModel(source=text, kind="module", module=obj)


def _load_torchscript(path: Path) -> LoadedModel:
    import torch

    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path} is not a TorchScript archive (not a zip file; damaged or another format)")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    if not any("/code/" in n or n.startswith("code/") for n in names):
        raise ModelLoadError(
            f"{path} is not a TorchScript program; if it is a state_dict, name the architecture as package.module:attribute and pass this file with --weights"
        )
    try:
        with _quiet():
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(f"cannot load TorchScript {path}: {_one_line(exc)}") from None
    return LoadedModel(source=str(path), kind="torchscript", module=module)


def _load_export(path: Path) -> LoadedModel:
    import torch

    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path} is not a torch.export program (not a zip file; damaged or another format)")
    try:
        with _quiet():
            module = torch.export.load(str(path)).module()
    except Exception as exc:
        raise ModelLoadError(f"cannot load torch.export program {path}: {_one_line(exc)}") from None
    return LoadedModel(source=str(path), kind="export", module=module)


def _load_onnx(path: Path) -> LoadedModel:
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - a core dependency
        raise ModelLoadError("onnxruntime is not installed") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(f"cannot load ONNX model {path}: {_one_line(exc)}") from None
    return LoadedModel(source=str(path), kind="onnx", session=session)


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
            raise ModelLoadError(f"cannot read safetensors {p}: {_one_line(exc)}") from None
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read weights {p} (only plain state_dicts are accepted): {_one_line(exc)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{p} does not hold a state_dict of tensors")
    return state


def load_weights(module, path: str | os.PathLike) -> None:
    state = read_state_dict(path)
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ModelLoadError(f"weights {path} do not fit the model: {_one_line(exc)}") from None


def save_model(module, path: str | os.PathLike, example: np.ndarray) -> Path:
    """Write ``module`` in the format its suffix names (.pt TorchScript, .pt2 export, .onnx, .safetensors)."""
    import torch

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    ex = torch.from_numpy(np.ascontiguousarray(example[:2]).astype(np.float32))
    suffix = p.suffix.lower()
    with _quiet():
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(p))
        elif suffix in TORCHSCRIPT_SUFFIXES:
            torch.jit.save(torch.jit.trace(module, ex, check_trace=False), str(p))
        elif suffix == ".pt2":
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            ep = torch.export.export(module, (ex,), dynamic_shapes=({0: batch},))
            torch.export.save(ep, str(p))
        elif suffix == ".onnx":
            torch.onnx.export(
                module, (ex,), str(p), input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
            )
        else:
            raise UsageError(f"cannot write a model as {suffix or '(no suffix)'}: use .pt, .pt2, .onnx or .safetensors")
    return p
