"""Owner-side commands: ``fingerprint``, ``calibrate``, ``inspect``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List, Optional

import typer

from ._common import console, err_console, fail, handled, progress_bar


def _parse_params(items: list[str] | None) -> dict:
    """``key=value`` pairs; values are read as JSON when they parse (numbers, true/false, lists), else as strings."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"bad --param {item!r}: expected key=value")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def fingerprint(
    model: str = typer.Argument(..., help="Model: .pt (TorchScript), .pt2 (torch.export) or package.module:attribute."),
    data: str = typer.Option(..., "--data", help="Natural inputs: .npz with x (and y), an IDX folder, or digits / mnist5k."),
    out: Path = typer.Option(..., "--out", help="Fingerprint file to write (keep it secret)."),
    weights: Optional[str] = typer.Option(None, "--weights", help=".safetensors or state_dict file for the model."),
    method: str = typer.Option("sensitive", "--method", help="Marker generator: natural|grid|wght|badv|sensitive|boundary."),
    select: str = typer.Option("manc", "--select", help="Selection from the bag: manc or random."),
    size: int = typer.Option(10, "--size", help="Number of markers kept (the query budget)."),
    bag: int = typer.Option(100, "--bag", help="Number of candidates generated before selection."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random choice."),
    output_spec: str = typer.Option("logits", "--output-spec", help="What the API will reveal: top1, topk:K, top1-prob:N, probs:N, logits."),
    tolerance: float = typer.Option(3e-5, "--tolerance", help="Benign numerical noise accepted (logit units)."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Layer whose active neurons MANC covers (default: input of the last linear layer)."),
    low: Optional[float] = typer.Option(None, "--low", help="Lower end of the input range (default: inferred from the data)."),
    high: Optional[float] = typer.Option(None, "--high", help="Upper end of the input range (default: inferred from the data)."),
    noise: Optional[Path] = typer.Option(
        None, "--noise", help="Noise report from `tamperprobe calibrate`: sets the boundary margin and refuses one below it."
    ),
    param: Optional[List[str]] = typer.Option(None, "--param", help="Generator hyper-parameter key=value (repeatable), e.g. epsilon=0.1."),
    check: bool = typer.Option(True, "--check/--no-check", help="Estimate detection against simulated int8, fp16, flooring and weight noise."),
) -> None:
    """Generate a fingerprint from the real weights (owner side)."""
    with handled():
        from ..data import load_data
        from ..fingerprint import save
        from ..models import load_model
        from ..owner.generate import create_fingerprint

        params = _parse_params(param)
        m = load_model(model, weights)
        ds = load_data(data, low=low, high=high)
        if noise is not None:
            params, tolerance = _apply_noise(noise, method, params, tolerance)
        with progress_bar(f"generating {method} markers") as update:
            fp = create_fingerprint(
                m,
                ds,
                method=method,
                select=select,
                size=size,
                bag=bag,
                seed=seed,
                output_spec=output_spec,
                tolerance=tolerance,
                layer=layer,
                params=params,
                progress=update,
            )
        save(fp, out)
        chosen = fp.generator["selection"]
        if chosen != select:
            err_console.print(f"[yellow]warning:[/] {chosen}", highlight=False, soft_wrap=True)
        console.print(f"wrote {out}: {len(fp)} markers ({method}, {chosen.split(' ')[0]} of {bag}), id {fp.id}, output spec {fp.output_spec}")
        console.print(f"query budget: {len(fp)} prediction requests per verification")
        if check:
            _print_self_check(m, fp)


def _print_self_check(model, fp) -> None:
    from rich.table import Table

    from ..owner.budget import self_check

    rows = self_check(model, fp)
    unit = "pairs" if fp.groups is not None else "markers"
    table = Table(title=f"expected detection under {fp.output_spec} (simulated on the owner's model)")
    for col in ("attack", f"{unit} changed (p)", "this fingerprint", f"confidence with {rows[0]['units']} {unit}"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            f"{r['attack']} (seed {r['seed']})", f"{r['p']:.2f}", "detects" if r["detected"] else "[red]misses[/]", f"{r['confidence']:.4f}"
        )
    console.print(table)


def _apply_noise(noise: Path, method: str, params: dict, tolerance: float) -> tuple[dict, float]:
    """Set δ (boundary markers) and the tolerance from a calibrate report; refuse a δ below the noise floor."""
    from ..owner import calibrate

    report = calibrate.load_noise(noise)
    floor = calibrate.delta_from_noise(report, 1.0)
    tolerance = max(tolerance, 2.0 * floor)
    if method == "boundary":
        if "delta" in params:
            calibrate.check_delta(float(params["delta"]), report)
        else:
            params["delta"] = max(calibrate.delta_from_noise(report, 10.0), 2.0 * tolerance)
        if float(params["delta"]) <= tolerance:
            fail(f"boundary margin delta={params['delta']} must exceed the comparison tolerance {tolerance:.3g}")
    return params, tolerance


def inspect(
    fp_path: Path = typer.Argument(..., metavar="FP", help="Fingerprint file."),
    png: Optional[Path] = typer.Option(None, "--png", help="Save a grid of seed inputs beside the generated markers."),
) -> None:
    """Summarise a fingerprint file."""
    with handled():
        from ..describe import describe, save_grid
        from ..fingerprint import load

        fp = load(fp_path)
        console.print(describe(fp))
        if png is not None:
            save_grid(fp, png)
            console.print(f"wrote {png}")


def default_noise_path(model: str) -> Path:
    """``MODEL.noise.json`` next to a model file; for ``package.module:attr`` a file in the working folder."""
    p = Path(model)
    if p.exists() and p.is_file():
        return p.with_name(p.name + ".noise.json")
    return Path(re.sub(r"[^A-Za-z0-9_.-]+", "_", model) + ".noise.json")


def calibrate(
    model: str = typer.Argument(..., help="Model: .pt (TorchScript), .pt2, .onnx or package.module:attribute."),
    data: str = typer.Option(..., "--data", help="Natural inputs: .npz with x, an IDX folder, or digits / mnist5k."),
    runtimes: Optional[List[str]] = typer.Option(
        None,
        "--runtimes",
        help="Runtimes to compare with eager batch 64 (repeatable or comma-separated): "
        "batchN, threadsN, torchscript, export, onnx. Default: batch1,batch64,threads1,threads2,torchscript,onnx.",
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

        from ..data import load_data
        from ..errors import UsageError
        from ..models import load_model
        from ..owner import calibrate as cal
        from ..owner.methods.natural import sample_indices

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


def register(app: typer.Typer) -> None:
    app.command()(fingerprint)
    app.command()(calibrate)
    app.command()(inspect)
