"""``tamperprobe train`` and ``tamperprobe attack``: make zoo models and tampered copies of them.

``attack`` writes the tampered model in the input's format: TorchScript in -> TorchScript
out (``.pt``), torch.export ``.pt2`` -> ``.pt2``, ``package.module:attribute`` (+ weights) ->
``.safetensors`` weights for the same reference (``.pt``/``.pt2``/``.onnx`` also work when
``--data`` gives an example input).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

try:  # the shared console of the main CLI, when present
    from ._common import console, handled
except ImportError:  # pragma: no cover - standalone use
    import contextlib

    from rich.console import Console

    console = Console()

    @contextlib.contextmanager
    def handled():  # type: ignore[no-redef]
        yield


def _parse_params(items: list[str] | None) -> dict[str, str]:
    from ..errors import UsageError

    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"bad --param {item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _example_input(module, data) -> "object | None":
    """An example batch: from the data, else from a torch.export module's input placeholder."""
    import numpy as np

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


def check_output(kind: str, source_kind: str, out: Path) -> None:
    """Refuse, before any work, an output format the attacked model cannot be written in."""
    from ..errors import UsageError
    from ..models import TORCHSCRIPT_SUFFIXES

    suffix = out.suffix.lower()
    if source_kind == "torchscript" and suffix not in TORCHSCRIPT_SUFFIXES:
        raise UsageError(f"a TorchScript model is written back as TorchScript: give --out a .pt file, not {suffix or 'no suffix'}")
    if source_kind == "export" and suffix != ".pt2":
        raise UsageError(f"a torch.export model is written back as torch.export: give --out a .pt2 file, not {suffix or 'no suffix'}")
    if suffix not in (*TORCHSCRIPT_SUFFIXES, ".pt2", ".onnx", ".safetensors"):
        raise UsageError(f"cannot write a model as {suffix or '(no suffix)'}: use .pt, .pt2, .onnx or .safetensors")
    if kind == "dynamic-int8" and suffix not in TORCHSCRIPT_SUFFIXES:
        raise UsageError("a dynamic-int8 model holds packed int8 layers and can only be written as TorchScript: give --out a .pt file")


def write_attacked(module, kind: str, source_kind: str, out: Path, data) -> None:
    """Write ``module`` (the attacked copy) to ``out`` in a format compatible with ``source_kind``."""
    import torch

    from ..attacks.base import quiet
    from ..errors import UsageError
    from ..models import save_model

    check_output(kind, source_kind, out)
    suffix = out.suffix.lower()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with quiet():
            if isinstance(module, torch.jit.ScriptModule):
                torch.jit.save(module, str(out))
                return
            if suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(out))
                return
            example = _example_input(module, data)
            if example is None:
                raise UsageError(f"writing {suffix} needs an example input: pass --data")
            save_model(module, out, example)
    except UsageError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise UsageError(f"cannot write the attacked model as {suffix}: {text[0][:200] if text else type(exc).__name__}") from None


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        arch: str = typer.Argument(..., help="Architecture from the zoo: mlp, cnn, irnn or perceptron."),
        data: str = typer.Option(..., "--data", help="Labelled data: .npz with x and y, an IDX folder, or digits / mnist5k."),
        out: Path = typer.Option(..., "--out", help="Model file to write: .pt (TorchScript), .pt2 (torch.export), .onnx or .safetensors."),
        epochs: int = typer.Option(20, "--epochs", help="Training epochs."),
        lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
        seed: int = typer.Option(0, "--seed", help="Seed of the split, the initialisation and the batch order."),
        test_fraction: float = typer.Option(0.25, "--test-fraction", help="Share of the data held out for the test accuracy."),
    ) -> None:
        """Train a zoo model on labelled data and write it in the format of --out's suffix."""
        with handled():
            import numpy as np
            import torch

            from .. import zoo
            from ..data import load_data
            from ..errors import DataError, UsageError
            from ..models import save_model
            from ..train import accuracy, fit

            if arch not in zoo.ARCHITECTURES:
                raise UsageError(f"unknown architecture {arch!r}: choose one of {', '.join(zoo.ARCHITECTURES)}")
            if not 0.0 < test_fraction < 1.0:
                raise UsageError(f"--test-fraction must lie in (0, 1), got {test_fraction}")
            if epochs < 1 or lr <= 0:
                raise UsageError("--epochs must be >= 1 and --lr > 0")
            ds = load_data(data)
            if ds.y is None:
                raise DataError(f"{data} has no labels: training needs y")
            tr, te = ds.split(test_fraction, seed=seed)
            if len(tr) == 0 or len(te) == 0:
                raise DataError(f"{data}: too few samples ({len(ds)}) to split off a test set")
            classes = int(np.max(ds.y)) + 1
            torch.manual_seed(seed)
            module = zoo.build(arch, tuple(ds.x.shape[1:]), classes)
            fit(module, tr.x, tr.y, epochs=epochs, lr=lr, seed=seed)
            console.print(f"{arch} on {ds.name}: train accuracy {accuracy(module, tr.x, tr.y):.4f}, test accuracy {accuracy(module, te.x, te.y):.4f} ({len(te)} held out)")
            save_model(module, out, tr.x)
            console.print(f"wrote {out}")

    @app.command("attack")
    def attack_cmd(
        model: str = typer.Argument(..., help="Model: .pt (TorchScript), .pt2 (torch.export) or package.module:attribute."),
        kind: str = typer.Option(..., "--kind", help="Attack: trojan, trojan-neuron, poison-generic, poison-specific, int8, int8-channel, dynamic-int8, fp16, bf16, floor, prune, finetune, watermark, noise."),
        out: Path = typer.Option(..., "--out", help="Where to write the tampered model (same format as the input; .safetensors for package.module:attribute)."),
        data: Optional[str] = typer.Option(None, "--data", help="Labelled data: the attack's training data and (25 % held out) the evaluation split."),
        eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Separate evaluation data (then all of --data is the attack's)."),
        weights: Optional[str] = typer.Option(None, "--weights", help=".safetensors or state_dict file for the model."),
        seed: int = typer.Option(0, "--seed", help="Seed of every random choice of the attack."),
        param: Optional[List[str]] = typer.Option(None, "--param", help="Attack parameter key=value (repeatable), e.g. ratio=0.2."),
    ) -> None:
        """Tamper with a model (trojan, poisoning, quantization, pruning, fine-tuning, noise ...) and write the copy."""
        with handled():
            from ..attacks import REGISTRY, run_attack
            from ..data import load_data
            from ..errors import UsageError
            from ..models import load_model

            if kind not in REGISTRY:
                raise UsageError(f"unknown attack {kind!r}: choose one of {', '.join(REGISTRY)}")
            params = _parse_params(param)
            if "seed" in params:
                raise UsageError("give the seed with --seed, not --param seed=...")
            if Path(model).exists() and out.exists() and out.resolve() == Path(model).resolve():
                raise UsageError("--out would overwrite the input model; choose another file")
            loaded = load_model(model, weights)
            if loaded.module is None:
                raise UsageError(f"attacks need the model's weights in PyTorch form; {loaded.source} is {loaded.format}")
            check_output(kind, loaded.format, out)
            ds = load_data(data) if data is not None else None
            ev = load_data(eval_data) if eval_data is not None else None
            result = run_attack(kind, loaded.module, ds, seed=seed, eval_data=ev, **params)
            write_attacked(result.model, kind, loaded.format, out, ds if ds is not None else ev)
            shown = ", ".join(f"{k}={v}" for k, v in result.params.items())
            console.print(f"attack {kind} on {loaded.source}: {shown}", highlight=False)
            console.print(f"  accuracy before {_fmt(result.acc_before)}  after {_fmt(result.acc_after)}", highlight=False)
            console.print(f"  success         {_fmt(result.success)}", highlight=False)
            console.print(f"  changed weights {result.changed}", highlight=False)
            console.print(f"wrote {out}", highlight=False)
