"""The ``tamperprobe`` command line. Exit codes: 0 INTACT (or success), 1 TAMPERED, 2 error or INCONCLUSIVE."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import List, Optional

import typer

from ._common import console, err_console, fail, handled, progress_bar

app = typer.Typer(
    name="tamperprobe",
    help="Prove, through its prediction API alone, that a served classifier is still the one you shipped.\n\n"
    "Exit codes: 0 INTACT / success, 1 TAMPERED, 2 usage error, runtime error or INCONCLUSIVE.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


@app.command()
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
    noise: Optional[Path] = typer.Option(None, "--noise", help="Noise report from `tamperprobe calibrate`: sets the boundary margin and refuses one below it."),
    param: Optional[List[str]] = typer.Option(None, "--param", help="Generator hyper-parameter key=value (repeatable), e.g. epsilon=0.1."),
    check: bool = typer.Option(True, "--check/--no-check", help="Estimate detection against simulated int8, fp16, flooring and weight noise."),
) -> None:
    """Generate a fingerprint from the real weights (owner side)."""
    with handled():
        from ..data import load_data
        from ..fingerprint import save
        from ..owner.generate import create_fingerprint
        from ..models import load_model

        params = _parse_params(param)
        m = load_model(model, weights)
        ds = load_data(data, low=low, high=high)
        if noise is not None:
            params, tolerance = _apply_noise(noise, method, params, tolerance)
        with progress_bar(f"generating {method} markers") as update:
            fp = create_fingerprint(
                m, ds, method=method, select=select, size=size, bag=bag, seed=seed, output_spec=output_spec,
                tolerance=tolerance, layer=layer, params=params, progress=update,
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
        table.add_row(f"{r['attack']} (seed {r['seed']})", f"{r['p']:.2f}", "detects" if r["detected"] else "[red]misses[/]",
                      f"{r['confidence']:.4f}")
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


@app.command()
def verify(
    fp_path: Path = typer.Argument(..., metavar="FP", help="Fingerprint file."),
    model: Optional[str] = typer.Option(None, "--model", help="Verify a local model file (or package.module:attribute)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Weights for --model."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Verify a served model at this URL."),
    protocol: str = typer.Option("kserve", "--protocol", help="API dialect of --endpoint: kserve|torchserve|tfserving|json."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Model name on the server (default: the server's only model / 'model')."),
    output_spec: Optional[str] = typer.Option(None, "--output-spec", help="What the API reveals (default: the fingerprint's)."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="Override the fingerprint's tolerance (logit units)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N markers."),
    header: Optional[List[str]] = typer.Option(None, "--header", help="Extra HTTP header K:V (repeatable)."),
    token_env: Optional[str] = typer.Option(None, "--token-env", help="Environment variable holding a bearer token."),
    timeout: float = typer.Option(10.0, "--timeout", help="Connect/read timeout per request, seconds."),
    retries: int = typer.Option(3, "--retries", help="Retries on connection errors, 5xx and 429."),
    batch_size: int = typer.Option(1, "--batch-size", help="Markers per request (1 looks like ordinary traffic)."),
    delay: float = typer.Option(0.0, "--delay", help="Random delay up to this many seconds between requests."),
    insecure: bool = typer.Option(False, "--insecure", help="Do not verify TLS certificates."),
    template: Optional[str] = typer.Option(None, "--template", help="Request/response template for --protocol json (a file or inline JSON)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the request order."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads for a local model."),
    history_path: Optional[Path] = typer.Option(None, "--history", help="SQLite history file (default: user data dir or $TAMPERPROBE_HISTORY)."),
    no_history: bool = typer.Option(False, "--no-history", help="Do not record this run."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Verify a model (local file or served endpoint) against a fingerprint. Exit 0 INTACT, 1 TAMPERED, 2 error/INCONCLUSIVE."""
    with handled():
        from ..fingerprint import load
        from ..served.verify import verify as run_verify

        if (model is None) == (endpoint is None):
            fail("give exactly one of --model or --endpoint")
        fp = load(fp_path)
        if model is not None:
            from ..models import load_model
            from ..served.targets import LocalTarget

            target = LocalTarget(load_model(model, weights), input_spec=fp.input_spec, threads=threads)
            proto = "local"
        else:
            from .served import endpoint_options_to_target

            target = endpoint_options_to_target(
                endpoint, protocol, fp=fp, model_name=model_name, header=header, token_env=token_env, timeout=timeout,
                retries=retries, batch_size=batch_size, delay=delay, insecure=insecure, template=template, seed=seed,
            )
            proto = protocol
        report = run_verify(fp, target, output_spec, tolerance=tolerance, limit=limit)
        if not no_history:
            from ..served import history

            history.record(report, protocol=proto, path=history_path)
        if as_json:
            console.print_json(json.dumps(report_to_json(report)))
        else:
            print_report(report)
        raise typer.Exit(report.exit_code)


def report_to_json(report) -> dict:
    return {
        "verdict": report.verdict, "summary": report.summary(), "target": report.target, "output_spec": report.output_spec,
        "fingerprint": report.fingerprint_id, "seconds": round(report.seconds, 4), "tolerance": report.tolerance,
        "markers": [
            {"index": m.index, "status": m.status, "expected": str(m.expected), "observed": None if m.observed is None else str(m.observed),
             "detail": m.failure or m.detail, "latency": m.latency}
            for m in report.markers
        ],
    }


def print_report(report, max_rows: int = 40) -> None:
    from rich.table import Table

    table = Table(title=f"{report.target} · {report.output_spec} · fingerprint {report.fingerprint_id}")
    for col in ("#", "expected", "observed", "status", "detail"):
        table.add_column(col)
    shown = sorted(report.markers, key=lambda m: (m.ok, m.index))[:max_rows]
    for m in sorted(shown, key=lambda m: m.index):
        style = "green" if m.ok else ("yellow" if m.failure else "red")
        table.add_row(str(m.index), str(m.expected), "-" if m.observed is None else str(m.observed), f"[{style}]{m.status}[/]", m.failure or m.detail)
    console.print(table)
    if len(report.markers) > max_rows:
        console.print(f"({len(report.markers) - max_rows} more markers not shown)")
    colour = {"INTACT": "bold green", "TAMPERED": "bold red"}.get(report.verdict, "bold yellow")
    console.print(f"[{colour}]{report.summary()}[/]  ({report.seconds:.2f} s)", highlight=False)


@app.command()
def inspect(
    fp_path: Path = typer.Argument(..., metavar="FP", help="Fingerprint file."),
    png: Optional[Path] = typer.Option(None, "--png", help="Save a grid of seed inputs beside the generated markers."),
) -> None:
    """Summarise a fingerprint file."""
    with handled():
        from ..fingerprint import load
        from ..describe import describe, save_grid

        fp = load(fp_path)
        console.print(describe(fp))
        if png is not None:
            save_grid(fp, png)
            console.print(f"wrote {png}")


@app.command()
def demo(
    fresh: bool = typer.Option(False, "--fresh", help="Retrain the demo model instead of using the cached one."),
    seed: int = typer.Option(0, "--seed", help="Seed of the demo."),
) -> None:
    """Train a small CNN, fingerprint it, serve it over HTTP, and verify it intact and tampered."""
    with handled():
        from ..demo import run_demo

        ok = run_demo(fresh=fresh, seed=seed, console=console)
        raise typer.Exit(0 if ok else 2)


def _register_extensions() -> None:
    for name in ("served", "attack", "calibrate", "evaluate"):
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.{name}":
                continue
            raise
        module.register(app)


_register_extensions()


def main() -> None:
    try:
        app()
    except SystemExit:
        raise
    except Exception as exc:  # last resort: never a traceback for the user
        err_console.print(f"[bold red]error:[/] internal error: {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
