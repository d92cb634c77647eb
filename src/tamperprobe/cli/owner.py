"""Owner-side commands: ``fingerprint``, ``calibrate``, ``inspect``. Each body wires options to library calls."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, List, Optional

import typer
from rich.markup import escape

from ..owner.methods import method_descriptions
from ._common import console, err_console, handled, print_json, progress_bar
from ._options import (
    AllowUnsignedOption,
    DataOption,
    DecryptKeyOption,
    DeviceOption,
    EncryptKeyOption,
    FingerprintArgument,
    HighOption,
    HistoryOption,
    JsonOption,
    LowOption,
    ModelArgOption,
    ModelArgument,
    ParamOption,
    PassphraseEnvOption,
    SeedOption,
    SignKeyOption,
    ThreadsOption,
    TrustKeyOption,
    UnsignedOption,
    VouchNameOption,
    VouchVersionOption,
    WeightsOption,
    load_fingerprint_from_options,
    save_fingerprint_from_options,
    use_runtime,
)

if TYPE_CHECKING:
    from ..fingerprint import Fingerprint
    from ..owner.generate import Generated


def _method_help() -> str:
    listed = "; ".join(f"{name}: {text}" for name, text in method_descriptions().items())
    return (
        "Marker generator (default: the one that suits --output-spec, crossed pairs for labels, Sensitive-Samples for scores, "
        f"as measured in bench/results), one of: {listed}."
    )


MethodOption = Annotated[Optional[str], typer.Option("--method", help=_method_help(), show_default=False)]
OutputSpecOption = Annotated[str, typer.Option("--output-spec", help="What the API will reveal: top1, topk:K, top1-prob:N, probs:N, logits.")]


def _warn(text: str) -> None:
    err_console.print(f"[bold yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)


SelectOption = Annotated[str, typer.Option("--select", help="Selection from the bag: manc or random.")]
SizeOption = Annotated[int, typer.Option("--size", help="Number of markers kept: the pool that verification runs draw from.")]
FingerprintPerRunOption = Annotated[
    Optional[int], typer.Option("--per-run", help="Markers each verification run draws (the query budget; default on the served side: 10).")
]
FingerprintDecoysOption = Annotated[
    Optional[int],
    typer.Option("--decoys", help="Natural inputs with known answers to mix into runs (default: as many as markers, as the data allows; 0: none)."),
]
BagOption = Annotated[
    Optional[int], typer.Option("--bag", help="Number of candidates generated before selection (default: 100, or --size if larger).")
]
GenerationSeedOption = Annotated[
    Optional[int],
    typer.Option(
        "--seed", help="Seed of the generation (default: drawn from the OS CSPRNG and recorded in the fingerprint; a given one reproduces it)."
    ),
]
FingerprintToleranceOption = Annotated[
    Optional[float],
    typer.Option(
        "--tolerance",
        help="Benign numerical noise accepted (logit units). Default: measured on the markers and decoys "
        "(batch sizes, threads, TorchScript, ONNX Runtime), twice the largest deviation, at least 3e-5.",
        show_default=False,
    ),
]
LayerOption = Annotated[
    Optional[str], typer.Option("--layer", help="Layer whose active neurons MANC covers (default: input of the last linear layer).")
]
NoiseOption = Annotated[
    Optional[Path], typer.Option("--noise", help="Noise report from `tamperprobe calibrate`: sets the boundary margin and refuses one below it.")
]
CheckOption = Annotated[bool, typer.Option("--check/--no-check", help="Estimate detection against simulated int8, fp16, flooring and weight noise.")]


def fingerprint(
    model: ModelArgument,
    data: DataOption,
    out: Annotated[Path, typer.Option("--out", help="Fingerprint file to write (keep it secret).")],
    weights: WeightsOption = None,
    model_arg: ModelArgOption = None,
    method: MethodOption = None,
    select: SelectOption = "manc",
    size: SizeOption = 10,
    per_run: FingerprintPerRunOption = None,
    decoys: FingerprintDecoysOption = None,
    bag: BagOption = None,
    seed: GenerationSeedOption = None,
    output_spec: OutputSpecOption = "logits",
    tolerance: FingerprintToleranceOption = None,
    layer: LayerOption = None,
    low: LowOption = None,
    high: HighOption = None,
    noise: NoiseOption = None,
    param: ParamOption = None,
    check: CheckOption = True,
    sign_key: SignKeyOption = None,
    unsigned: UnsignedOption = False,
    passphrase_env: PassphraseEnvOption = None,
    encrypt_key: EncryptKeyOption = None,
    model_name: VouchNameOption = None,
    model_version: VouchVersionOption = None,
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Generate a fingerprint from the real weights (owner side), signed with your key."""
    with handled():
        from .._params import parse_kv
        from ..data import load_data
        from ..fingerprint import with_identity
        from ..models import load_model, parse_model_args
        from ..owner.calibrate import load_noise
        from ..owner.generate import choose, generate_fingerprint

        with_identity(None, model_name, model_version)  # malformed or half-given identities refused before any work
        # the method, its parameters and why: settled (and bad parameters refused) before the model and data load
        choice = choose(output_spec, method, parse_kv(param), noise=None if noise is None else load_noise(noise), tolerance=tolerance)
        m = load_model(model, weights, model_args=parse_model_args(model_arg), device=use_runtime(threads, device))
        ds = load_data(data, low=low, high=high)
        if choice.reason is not None and not as_json:
            console.print(f"method {escape(choice.reason)}", highlight=False, soft_wrap=True)
        notes = _noted([] if choice.weak is None else [choice.weak])
        with progress_bar(f"generating {choice.name} markers") as update:
            made = generate_fingerprint(
                m,
                ds,
                method=choice,
                select=select,
                size=size,
                bag=bag,
                seed=seed,
                output_spec=output_spec,
                layer=layer,
                progress=update,
                decoys=decoys,
                per_run=per_run,
            )
        made = dataclasses.replace(made, fingerprint=with_identity(made.fingerprint, model_name, model_version))
        fp = made.fingerprint
        notes += _noted(made.margin_warnings)
        how = save_fingerprint_from_options(fp, out, sign_key, unsigned, passphrase_env, encrypt_key)
        notes += _noted(_pool_notes(fp, decoys) + ([made.selection_fallback] if made.selection_fallback else []))
        if not as_json:
            _print_generated(made, out, how)
        rows = _self_check(m, fp) if check else None
        if as_json:
            print_json(_generated_json(made, out, how, notes, rows))
        elif rows is not None:
            _print_self_check(fp, rows, _units_per_run(fp))


def _noted(texts: Any) -> list[str]:
    """Each text warned about on stderr, in order; returned for the JSON output's ``warnings``."""
    for text in texts:
        _warn(text)
    return list(texts)


def _units_per_run(fp: Fingerprint) -> int:
    from ..served import pool

    plan = pool.plan(fp)
    return plan.markers // plan.unit


def _pool_notes(fp: Fingerprint, decoys: int | None) -> list[str]:
    """The note on a fingerprint that got fewer decoys than markers by default (the data had no more)."""
    from ..served import pool

    if decoys is not None or fp.decoys >= len(fp):
        return []
    return [
        f"only {fp.decoys} decoys (the data holds no more natural inputs that fed no marker): runs get {pool.plan(fp).decoys} "
        f"a run by default, so that they last as long as the markers; more data gives more decoys"
    ]


def _print_generated(made: Generated, out: Path, how: str) -> None:
    """What was written, its tolerance, a raised margin and the query budget (each field of ``made`` printed, nothing recomputed)."""
    from ..describe import tolerance_note
    from ..served import pool

    fp = made.fingerprint
    plan = pool.plan(fp)
    console.print(
        f"wrote {out}: {len(fp)} markers and {fp.decoys} decoys ({made.method}, {made.selection} of {made.bag}), "
        f"id {fp.id}, output spec {fp.output_spec}, {how}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"comparison tolerance: {tolerance_note(fp)}", highlight=False)  # wrapped: the note is long
    raised = made.margin_raised
    if raised is not None:
        console.print(
            f"margin: delta raised from {raised.before:g} to {raised.to:g} ({raised.safety:g}x the benign floor "
            f"{raised.floor:.3g} measured on the first markers; they were made again with it)",
            highlight=False,
        )
    with_decoys = f" + {plan.decoys} decoys" if plan.decoys else ""
    console.print(
        f"query budget: {plan.markers} markers{with_decoys} a run, each sent once: {pool.capacity(fp, plan)} runs in the pool",
        highlight=False,
        soft_wrap=True,
    )


def _self_check(model: Any, fp: Fingerprint) -> list[dict]:
    from ..owner.budget import detection_confidence, self_check

    with progress_bar("self-check: simulated tamperings") as update:
        rows = self_check(model, fp, progress=update)
    units = _units_per_run(fp)
    return [{**r, "confidence_per_run": detection_confidence(r["p"], units)} for r in rows]


def _generated_json(made: Generated, out: Path, how: str, notes: list[str], rows: list[dict] | None) -> dict[str, Any]:
    from ..served import pool

    fp = made.fingerprint
    plan = pool.plan(fp)
    return {
        "file": out,
        "id": fp.id,
        "markers": len(fp),
        "method": made.method,
        "method_reason": made.choice.reason,
        "params": fp.generator["params"],
        "selection": fp.generator["selection"],
        "bag": made.bag,
        "seed": made.seed,
        "output_spec": fp.output_spec,
        "tolerance": fp.tolerance,
        "benign_noise": fp.extra.get("benign_noise"),
        "query_budget": plan.markers,
        "decoys": fp.decoys,
        "decoys_per_run": plan.decoys,
        "runs": pool.capacity(fp, plan),
        "signing": how,
        "warnings": notes,
        "self_check": rows,
    }


def _print_self_check(fp, rows: list[dict], units_per_run: int) -> None:
    from rich.table import Table

    unit = "pairs" if fp.groups is not None else "markers"
    table = Table(title=f"expected detection under {fp.output_spec} (simulated on the owner's model)")
    for col in ("attack", f"{unit} changed (p)", "whole pool", f"confidence of a run of {units_per_run} {unit}"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            f"{r['attack']} (seed {r['seed']})",
            f"{r['p']:.2f}",
            "detects" if r["detected"] else "[red]misses[/]",
            f"{r['confidence_per_run']:.4f}",
        )
    console.print(table)


def inspect(
    fp_path: FingerprintArgument,
    png: Annotated[Optional[Path], typer.Option("--png", help="Save a grid of seed inputs beside the generated markers.")] = None,
    trust_key: TrustKeyOption = None,
    allow_unsigned: AllowUnsignedOption = False,
    decrypt_key: DecryptKeyOption = None,
    history_path: HistoryOption = None,
    as_json: JsonOption = False,
) -> None:
    """Summarise a fingerprint file (after checking its signature), with how much of its pool the history records as used."""
    with handled():
        from .._extras import require
        from ..describe import describe, save_grid, summary

        if png is not None:
            require("matplotlib", "inspect --png")
        fp = load_fingerprint_from_options(fp_path, trust_key, allow_unsigned, decrypt_key)
        if png is not None:
            save_grid(fp, png)
        usage = _pool_usage(fp, history_path)
        if as_json:
            print_json({**summary(fp), "pool_usage": usage, "png": png})
            return
        rows = describe(fp)
        if usage is not None:
            rows.append(("pool use", usage["text"]))
        width = max(len(k) for k, _ in rows) + 2
        for key, value in rows:
            console.print(f"[bold]{escape(key.ljust(width))}[/]{escape(value)}", highlight=False, soft_wrap=True)
        if png is not None:
            console.print(f"wrote {png}")


def _pool_usage(fp, history_path: Path | None) -> dict | None:
    """What the history records of ``fp``'s pool (default plan), or None when the fingerprint cannot be drawn from."""
    from ..errors import UsageError
    from ..served import history, pool

    try:
        plan = pool.plan(fp)
    except UsageError:
        return None
    try:
        state = pool.status(fp, plan, history_path)
    except history.HistoryError as exc:
        return {"text": f"history unreadable: {exc}", "error": str(exc)}
    return {
        "text": state.describe().split(": ", 1)[1],
        "used_markers": state.used_markers,
        "used_decoys": state.used_decoys,
        "markers_per_run": plan.markers,
        "decoys_per_run": plan.decoys,
        "runs_left": state.runs_left,
        "runs_total": state.runs_total,
    }


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
    model_arg: ModelArgOption = None,
    seed: SeedOption = 0,
    safety: Annotated[float, typer.Option("--safety", help="Suggested δ = safety × noise floor.")] = 10.0,
    low: LowOption = None,
    high: HighOption = None,
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Measure max |Δlogit| between runtimes (batch sizes, threads, TorchScript, ONNX): the noise floor for δ.

    The reference (eager, batch 64) runs with --threads; the threadsN runtimes with N threads each.
    """
    with handled():
        from rich.table import Table

        from ..data import load_data
        from ..models import load_model, parse_model_args
        from ..owner import calibrate as cal

        names = cal.parse_runtimes(runtimes)
        m = load_model(model, weights, model_args=parse_model_args(model_arg), device=use_runtime(threads, device))
        ds = load_data(data, low=low, high=high)
        with progress_bar("calibrating runtimes") as update:
            report = cal.measure_noise(m, ds.x, names, samples=samples, seed=seed, progress=update)
        path = cal.save_noise(report, out if out is not None else cal.default_noise_path(model))
        delta = cal.delta_from_noise(report, safety)
        if as_json:
            print_json({**report.to_json(), "file": path, "safety": safety, "suggested_delta": delta})
            return

        table = Table(title=f"{model} · {report.samples} inputs · reference {report.reference}")
        for col in ("runtime", "max |Δlogit|", "mean |Δlogit|", "label changes"):
            table.add_column(col, overflow="fold")
        for name, r in report.runtimes.items():
            table.add_row(name, f"{r.max_abs:.3g}", f"{r.mean_abs:.3g}", str(r.label_changes))
        for name, why in report.skipped.items():
            table.add_row(name, "-", "-", f"[yellow]skipped: {escape(why)}[/]")
        console.print(table)
        console.print(f"noise floor {report.floor:.3g} logits; suggested δ = {safety:g} × floor = {delta:.3g}", highlight=False)
        console.print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command()(fingerprint)
    app.command()(calibrate)
    app.command()(inspect)
