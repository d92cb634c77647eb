"""Owner-side commands: ``fingerprint``, ``calibrate``, ``inspect``. Each body wires options to library calls."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..owner.methods import method_descriptions
from ._common import console, err_console, handled, progress_bar
from ._options import (
    AllowUnsignedOption,
    DataOption,
    DecryptKeyOption,
    EncryptKeyOption,
    FingerprintArgument,
    HighOption,
    LowOption,
    ModelArgument,
    ParamOption,
    PassphraseEnvOption,
    SeedOption,
    SignKeyOption,
    TrustKeyOption,
    UnsignedOption,
    WeightsOption,
    load_fingerprint_from_options,
    save_fingerprint_from_options,
)


def _method_help() -> str:
    listed = "; ".join(f"{name}: {text}" for name, text in method_descriptions().items())
    return f"Marker generator, one of: {listed}."


MethodOption = Annotated[str, typer.Option("--method", help=_method_help())]


def fingerprint(
    model: ModelArgument,
    data: DataOption,
    out: Annotated[Path, typer.Option("--out", help="Fingerprint file to write (keep it secret).")],
    weights: WeightsOption = None,
    method: MethodOption = "sensitive",
    select: Annotated[str, typer.Option("--select", help="Selection from the bag: manc or random.")] = "manc",
    size: Annotated[int, typer.Option("--size", help="Number of markers kept (the query budget).")] = 10,
    bag: Annotated[int, typer.Option("--bag", help="Number of candidates generated before selection.")] = 100,
    seed: SeedOption = 0,
    output_spec: Annotated[
        str, typer.Option("--output-spec", help="What the API will reveal: top1, topk:K, top1-prob:N, probs:N, logits.")
    ] = "logits",
    tolerance: Annotated[float, typer.Option("--tolerance", help="Benign numerical noise accepted (logit units).")] = 3e-5,
    layer: Annotated[
        Optional[str], typer.Option("--layer", help="Layer whose active neurons MANC covers (default: input of the last linear layer).")
    ] = None,
    low: LowOption = None,
    high: HighOption = None,
    noise: Annotated[
        Optional[Path],
        typer.Option("--noise", help="Noise report from `tamperprobe calibrate`: sets the boundary margin and refuses one below it."),
    ] = None,
    param: ParamOption = None,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Estimate detection against simulated int8, fp16, flooring and weight noise.")
    ] = True,
    sign_key: SignKeyOption = None,
    unsigned: UnsignedOption = False,
    passphrase_env: PassphraseEnvOption = None,
    encrypt_key: EncryptKeyOption = None,
) -> None:
    """Generate a fingerprint from the real weights (owner side), signed with your key."""
    with handled():
        from .._params import parse_kv
        from ..data import load_data
        from ..models import load_model
        from ..owner.calibrate import load_noise, noise_settings
        from ..owner.generate import create_fingerprint
        from ..owner.methods import get_method

        params = parse_kv(param)
        if noise is not None:
            params, tolerance = noise_settings(load_noise(noise), method, params, tolerance)
        generator = get_method(method, **params)
        m = load_model(model, weights)
        ds = load_data(data, low=low, high=high)
        with progress_bar(f"generating {method} markers") as update:
            fp = create_fingerprint(
                m,
                ds,
                method=generator,
                select=select,
                size=size,
                bag=bag,
                seed=seed,
                output_spec=output_spec,
                tolerance=tolerance,
                layer=layer,
                progress=update,
            )
        how = save_fingerprint_from_options(fp, out, sign_key, unsigned, passphrase_env, encrypt_key)
        chosen = fp.generator["selection"]
        if chosen != select:
            err_console.print(f"[yellow]warning:[/] {chosen}", highlight=False, soft_wrap=True)
        console.print(
            f"wrote {out}: {len(fp)} markers ({method}, {chosen.split(' ')[0]} of {bag}), id {fp.id}, output spec {fp.output_spec}, {how}",
            highlight=False,
        )
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


def inspect(
    fp_path: FingerprintArgument,
    png: Annotated[Optional[Path], typer.Option("--png", help="Save a grid of seed inputs beside the generated markers.")] = None,
    trust_key: TrustKeyOption = None,
    allow_unsigned: AllowUnsignedOption = False,
    decrypt_key: DecryptKeyOption = None,
) -> None:
    """Summarise a fingerprint file (after checking its signature)."""
    with handled():
        from ..describe import describe, save_grid

        fp = load_fingerprint_from_options(fp_path, trust_key, allow_unsigned, decrypt_key)
        console.print(describe(fp))
        if png is not None:
            save_grid(fp, png)
            console.print(f"wrote {png}")


def calibrate(
    model: ModelArgument,
    data: DataOption,
    runtimes: Annotated[
        Optional[List[str]],
        typer.Option(
            "--runtimes",
            help="Runtimes to compare with eager batch 64 (repeatable or comma-separated): "
            "batchN, threadsN, torchscript, export, onnx. Default: batch1,batch64,threads1,threads2,torchscript,onnx.",
        ),
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Report file (default: MODEL.noise.json next to the model).")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Number of data inputs to run.")] = 256,
    weights: WeightsOption = None,
    seed: SeedOption = 0,
    safety: Annotated[float, typer.Option("--safety", help="Suggested δ = safety × noise floor.")] = 10.0,
    low: LowOption = None,
    high: HighOption = None,
) -> None:
    """Measure max |Δlogit| between runtimes (batch sizes, threads, TorchScript, ONNX): the noise floor for δ."""
    with handled():
        from rich.table import Table

        from ..data import load_data
        from ..models import load_model
        from ..owner import calibrate as cal

        names = cal.parse_runtimes(runtimes)
        m = load_model(model, weights)
        ds = load_data(data, low=low, high=high)
        report = cal.measure_noise(m, ds.x, names, samples=samples, seed=seed)
        path = cal.save_noise(report, out if out is not None else cal.default_noise_path(model))

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
