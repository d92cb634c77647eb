"""``tamperprobe calibrate``: measure the runtime noise floor that boundary markers must exceed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import typer

from ._common import console, handled


def default_noise_path(model: str) -> Path:
    """``MODEL.noise.json`` next to a model file; for ``package.module:attr`` a file in the working folder."""
    p = Path(model)
    if p.exists() and p.is_file():
        return p.with_name(p.name + ".noise.json")
    return Path(re.sub(r"[^A-Za-z0-9_.-]+", "_", model) + ".noise.json")


def register(app: typer.Typer) -> None:
    @app.command()
    def calibrate(
        model: str = typer.Argument(..., help="Model: .pt (TorchScript), .pt2, .onnx or package.module:attribute."),
        data: str = typer.Option(..., "--data", help="Natural inputs: .npz with x, an IDX folder, or digits / mnist5k."),
        runtimes: Optional[List[str]] = typer.Option(
            None, "--runtimes", help="Runtimes to compare with eager batch 64 (repeatable or comma-separated): "
            "batchN, threadsN, torchscript, export, onnx. Default: batch1,batch64,threads1,threads2,torchscript,onnx."
        ),
        out: Optional[Path] = typer.Option(None, "--out", help="Report file (default: MODEL.noise.json next to the model)."),
        samples: int = typer.Option(256, "--samples", help="Number of data inputs to run."),
        weights: Optional[str] = typer.Option(None, "--weights", help=".safetensors or state_dict file for the model."),
        seed: int = typer.Option(0, "--seed", help="Seed of the input sample."),
        safety: float = typer.Option(10.0, "--safety", help="Suggested δ = safety × noise floor."),
        low: Optional[float] = typer.Option(None, "--low", help="Lower end of the input range."),
        high: Optional[float] = typer.Option(None, "--high", help="Upper end of the input range."),
    ) -> None:
        """Measure max |Δlogit| between runtimes (batch sizes, threads, TorchScript, ONNX): the noise floor for δ."""
        with handled():
            import numpy as np
            from rich.table import Table

            from ..owner import calibrate as cal
            from ..data import load_data
            from ..errors import UsageError
            from ..owner.methods.natural import sample_indices
            from ..models import load_model

            if samples < 1:
                raise UsageError("--samples must be at least 1")
            names = cal.parse_runtimes(runtimes)
            m = load_model(model, weights)
            ds = load_data(data, low=low, high=high)
            idx = sample_indices(len(ds.x), min(samples, len(ds.x)), np.random.default_rng(seed))
            report = cal.measure_noise(m, ds.x[idx], names)
            path = out if out is not None else default_noise_path(model)
            cal.save_noise(report, path)

            table = Table(title=f"{model} · {report.samples} inputs · reference {report.reference}")
            for col in ("runtime", "max |Δlogit|", "mean |Δlogit|", "label changes"):
                table.add_column(col)
            for name, r in report.runtimes.items():
                table.add_row(name, f"{r.max_abs:.3g}", f"{r.mean_abs:.3g}", str(r.label_changes))
            for name, why in report.skipped.items():
                table.add_row(name, "-", "-", f"[yellow]skipped: {why}[/]")
            console.print(table)
            console.print(
                f"noise floor {report.floor:.3g} logits; suggested δ = {safety:g} × floor = {cal.delta_from_noise(report, safety):.3g}",
                highlight=False,
            )
            console.print(f"wrote {path}")
