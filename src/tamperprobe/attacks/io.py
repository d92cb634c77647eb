"""Writing an attacked model back in a form compatible with the model it came from.

A TorchScript model is written back as TorchScript and a ``torch.export`` program as ``.pt2``;
an eager module (``package.module:attribute``) as ``.safetensors`` weights, or traced to any
format ``models.save_model`` writes. ``check_output`` refuses an impossible combination before
any work is done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .._util import one_line
from ..data import Dataset
from ..errors import UsageError
from ..models import TORCHSCRIPT_SUFFIXES, save_model, save_state_dict
from . import attack_class
from .base import Attack

WRITABLE_SUFFIXES = (*TORCHSCRIPT_SUFFIXES, ".pt2", ".onnx", ".safetensors")


def check_output(attack: str | Attack | type[Attack], source_format: str, out: Path) -> None:
    """Refuse, before any work, an output file the attacked model cannot be written to.

    ``source_format`` is the loaded model's ``format`` (``module``, ``torchscript``, ``export``).
    """
    cls = attack_class(attack) if isinstance(attack, str) else attack
    suffix = out.suffix.lower()
    if source_format == "torchscript" and suffix not in TORCHSCRIPT_SUFFIXES:
        raise UsageError(f"a TorchScript model is written back as TorchScript: give --out a .pt file, not {suffix or 'no suffix'}")
    if source_format == "export" and suffix != ".pt2":
        raise UsageError(f"a torch.export model is written back as torch.export: give --out a .pt2 file, not {suffix or 'no suffix'}")
    if suffix not in WRITABLE_SUFFIXES:
        raise UsageError(f"cannot write a model as {suffix or '(no suffix)'}: use .pt, .pt2, .onnx or .safetensors")
    if cls.torchscript_only and suffix not in TORCHSCRIPT_SUFFIXES:
        raise UsageError(f"a {cls.name} model holds packed int8 layers and can only be written as TorchScript: give --out a .pt file")


def example_input(module: Any, data: Dataset | None) -> np.ndarray | None:
    """An example batch for tracing or exporting: from the data, else from a torch.export module's input placeholder."""
    if data is not None and len(data.x):
        return data.x[:2]
    graph = getattr(module, "graph", None)
    for node in getattr(graph, "nodes", []):
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if val is None or not hasattr(val, "shape"):
            continue
        shape = [d if isinstance(d, int) else 2 for d in val.shape]
        return np.zeros(shape, dtype=np.float32)
    return None


def write_attacked(module: Any, attack: str | Attack | type[Attack], source_format: str, out: Path, data: Dataset | None = None) -> Path:
    """Write ``module`` (the attacked copy) to ``out`` in a format compatible with ``source_format``; return the path."""
    import torch

    from .._torch import quiet

    out = Path(out)
    check_output(attack, source_format, out)
    suffix = out.suffix.lower()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with quiet():
            if isinstance(module, torch.jit.ScriptModule):
                torch.jit.save(module, str(out))
                return out
            if suffix == ".safetensors":
                return save_state_dict(module, out)
            example = example_input(module, data)
            if example is None:
                raise UsageError(f"writing {suffix} needs an example input: pass --data")
            return save_model(module, out, example)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"cannot write the attacked model as {suffix}: {one_line(exc, 200)}") from None
