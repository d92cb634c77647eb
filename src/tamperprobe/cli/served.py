"""CLI commands of the served side: ``verify``, ``serve``, ``history`` and ``watch``.

Each body wires options to a library call: ``served.verify.verify``, ``server.app.serve``,
``served.history`` and ``served.watch.watch``. The endpoint options of ``verify`` and ``watch``
are declared once below and reach the client through ``_endpoint_target``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, List, Optional

import typer
from rich.markup import escape

from ..served.clients import protocol_help
from ._common import console, err_console, fail, handled
from ._options import FingerprintArgument, HistoryOption, JsonOption, ModelArgument, ThreadsOption, WeightsOption

if TYPE_CHECKING:
    from ..fingerprint import Fingerprint
    from ..served.clients import HTTPTarget
    from ..served.targets import Target
    from ..served.verify import Report
    from ..served.watch import WatchRun

# --------------------------------------------------------------------------- options, each declared once

EndpointOption = Annotated[Optional[str], typer.Option("--endpoint", help="URL of the served model's prediction API.")]
ProtocolOption = Annotated[str, typer.Option("--protocol", help=f"API dialect of --endpoint. {protocol_help()}.")]
ModelNameOption = Annotated[
    Optional[str], typer.Option("--model-name", help="Model name on the server (default: the model URL's, the server's only model, or 'model').")
]
HeaderOption = Annotated[Optional[List[str]], typer.Option("--header", help="Extra HTTP header Name:value (repeatable).")]
TokenEnvOption = Annotated[Optional[str], typer.Option("--token-env", help="Environment variable holding the bearer token.")]
TimeoutOption = Annotated[float, typer.Option("--timeout", help="Connect/read timeout per request, seconds.")]
RetriesOption = Annotated[int, typer.Option("--retries", help="Retries on connection errors, 5xx and 429.")]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", help="Markers per request (1 looks like ordinary traffic).")]
DelayOption = Annotated[float, typer.Option("--delay", help="Random delay up to this many seconds between requests.")]
InsecureOption = Annotated[bool, typer.Option("--insecure", help="Do not verify TLS certificates.")]
TemplateOption = Annotated[Optional[str], typer.Option("--template", help="Request/response template for --protocol json (a file or inline JSON).")]
RequestSeedOption = Annotated[Optional[int], typer.Option("--seed", help="Seed of the request order (default: a fresh order each run).")]
VerifySpecOption = Annotated[Optional[str], typer.Option("--output-spec", help="What the API reveals (default: the fingerprint's).")]
ToleranceOption = Annotated[Optional[float], typer.Option("--tolerance", help="Override the fingerprint's tolerance (logit units).")]
LimitOption = Annotated[Optional[int], typer.Option("--limit", help="Use only the first N markers.")]
NoHistoryOption = Annotated[bool, typer.Option("--no-history", help="Do not record in the history.")]


def _endpoint_target(fp: Fingerprint, o: Mapping[str, Any]) -> HTTPTarget:
    """The client for ``--endpoint`` from the endpoint options' values (``ctx.params`` of verify or watch).

    The fingerprint's input spec and class count go with it, so answers with another number of
    classes are failures.
    """
    from ..served.clients import make_client

    return make_client(
        o["protocol"],
        o["endpoint"],
        model_name=o["model_name"],
        headers=o["header"],
        token_env=o["token_env"],
        timeout=o["timeout"],
        retries=o["retries"],
        batch_size=o["batch_size"],
        delay=o["delay"],
        verify_tls=not o["insecure"],
        template=o["template"],
        seed=o["seed"],
        input_spec=fp.input_spec,
        classes=fp.classes,
    )


def _warn(text: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False)


_COLOURS = {"INTACT": "green", "TAMPERED": "red"}


# --------------------------------------------------------------------------- verify


def verify(
    ctx: typer.Context,
    fp_path: FingerprintArgument,
    model: Annotated[Optional[str], typer.Option("--model", help="Verify a local model file (or package.module:attribute).")] = None,
    weights: WeightsOption = None,
    endpoint: EndpointOption = None,
    protocol: ProtocolOption = "kserve",
    model_name: ModelNameOption = None,
    output_spec: VerifySpecOption = None,
    tolerance: ToleranceOption = None,
    limit: LimitOption = None,
    header: HeaderOption = None,
    token_env: TokenEnvOption = None,
    timeout: TimeoutOption = 10.0,
    retries: RetriesOption = 3,
    batch_size: BatchSizeOption = 1,
    delay: DelayOption = 0.0,
    insecure: InsecureOption = False,
    template: TemplateOption = None,
    seed: RequestSeedOption = None,
    threads: ThreadsOption = None,
    history_path: HistoryOption = None,
    no_history: NoHistoryOption = False,
    as_json: JsonOption = False,
) -> None:
    """Verify a model (local file or served endpoint) against a fingerprint. Exit 0 INTACT, 1 TAMPERED, 2 error/INCONCLUSIVE."""
    with handled():
        from ..fingerprint import load
        from ..models import load_model
        from ..served import history
        from ..served.clients import protocol_name
        from ..served.targets import LocalTarget
        from ..served.verify import verify as run_verify

        if (model is None) == (endpoint is None):
            fail("give exactly one of --model or --endpoint")
        fp = load(fp_path)
        if model is not None:
            target: Target = LocalTarget(load_model(model, weights), input_spec=fp.input_spec, threads=threads)
        else:
            target = _endpoint_target(fp, ctx.params)
        report = run_verify(fp, target, output_spec, tolerance=tolerance, limit=limit)
        if not no_history:
            history.record(report, protocol="local" if model is not None else protocol_name(protocol), path=history_path)
        if as_json:
            console.print_json(json.dumps(report.to_json()))
        else:
            print_report(report)
        raise typer.Exit(report.exit_code)


def print_report(report: Report, max_rows: int = 40) -> None:
    from rich.table import Table

    table = Table(title=escape(f"{report.target} · {report.output_spec} · fingerprint {report.fingerprint_id}"))
    for col in ("#", "expected", "observed", "status", "detail"):
        table.add_column(col)
    shown = sorted(report.markers, key=lambda m: (m.ok, m.index))[:max_rows]
    for m in sorted(shown, key=lambda m: m.index):
        style = "green" if m.ok else ("yellow" if m.failure else "red")
        observed = "-" if m.observed is None else str(m.observed)
        table.add_row(str(m.index), escape(str(m.expected)), escape(observed), f"[{style}]{m.status}[/]", escape(m.failure or m.detail))
    console.print(table)
    if len(report.markers) > max_rows:
        console.print(f"({len(report.markers) - max_rows} more markers not shown)")
    colour = _COLOURS.get(report.verdict, "yellow")
    console.print(f"[bold {colour}]{escape(report.summary())}[/]  ({report.seconds:.2f} s)", highlight=False)


# --------------------------------------------------------------------------- serve


def serve_cmd(
    model: ModelArgument,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0 exposes it to the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8080,
    name: Annotated[str, typer.Option("--name", help="Model name in the URLs (/v2/models/NAME/infer).")] = "model",
    output_spec: Annotated[str, typer.Option("--output-spec", help="What responses reveal: top1, topk:K, top1-prob:N, probs:N, logits.")] = "logits",
    token: Annotated[Optional[str], typer.Option("--token", help="Require Authorization: Bearer TOKEN (health endpoints stay open).")] = None,
    token_env: TokenEnvOption = None,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", help="Input shape without the batch axis, e.g. 1,28,28.")] = None,
    fingerprint: Annotated[Optional[Path], typer.Option("--fingerprint", help="Take the input spec from this fingerprint.")] = None,
    weights: WeightsOption = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Largest batch accepted in one request.")] = 64,
    max_body: Annotated[str, typer.Option("--max-body", help="Largest request body accepted (e.g. 8MiB, 512KiB).")] = "8MiB",
) -> None:
    """Serve a model over the Open Inference Protocol (KServe v2 REST, as Triton and MLServer do).

    Input shape: --input-shape, else the fingerprint's, else the ONNX/.pt2 file's; a TorchScript
    file or module:attr needs one of the first two.
    """
    with handled():
        from .._util import env_secret
        from ..server.app import serve

        if token and token_env:
            fail("give --token or --token-env, not both")
        serve(
            model,
            host=host,
            port=port,
            name=name,
            output_spec=output_spec,
            token=env_secret(token_env) if token_env else token,
            weights=weights,
            input_shape=input_shape,
            fingerprint=fingerprint,
            max_batch=max_batch,
            max_body=max_body,
            on_ready=lambda text: console.print(text, highlight=False),
            on_warning=_warn,
        )


# --------------------------------------------------------------------------- history


def history_cmd(
    endpoint: Annotated[Optional[str], typer.Option("--endpoint", help="Only runs whose target contains this text.")] = None,
    verdict: Annotated[Optional[str], typer.Option("--verdict", help="Only INTACT, TAMPERED or INCONCLUSIVE runs.")] = None,
    fingerprint: Annotated[Optional[str], typer.Option("--fingerprint", help="Only runs of fingerprints whose id starts with this.")] = None,
    since: Annotated[Optional[str], typer.Option("--since", help="Only runs since an ISO time or a duration ago (24h, 7d).")] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many runs, newest first.")] = 50,
    run: Annotated[Optional[int], typer.Option("--run", help="Show the markers of this run instead.")] = None,
    as_json: JsonOption = False,
    history_path: HistoryOption = None,
) -> None:
    """List past verifications recorded by verify and watch."""
    with handled():
        from ..served import history

        if verdict and verdict.upper() not in ("INTACT", "TAMPERED", "INCONCLUSIVE"):
            fail(f"bad --verdict {verdict!r}: INTACT, TAMPERED or INCONCLUSIVE")
        if run is not None:
            rows = history.markers(run, path=history_path)
            if not rows:
                fail(f"no run {run} in the history")
        else:
            rows = history.runs(history_path, target=endpoint, verdict=verdict, fingerprint=fingerprint, since=since, limit=limit)
        if as_json:
            console.print_json(json.dumps(rows))
        elif run is not None:
            _print_markers(run, rows)
        elif rows:
            _print_runs(rows)
        else:
            console.print("no runs recorded" + (" match these filters" if any((endpoint, verdict, fingerprint, since)) else ""))


def _print_markers(run: int, rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title=f"run {run}")
    for col in ("#", "status", "expected", "observed", "latency", "detail"):
        table.add_column(col)
    for r in rows:
        style = {"match": "green", "MISMATCH": "red"}.get(r["status"], "yellow")
        lat = "-" if r["latency"] is None else f"{r['latency'] * 1000:.0f} ms"
        table.add_row(
            str(r["index"]), f"[{style}]{r['status']}[/]", escape(r["expected"] or ""), escape(r["observed"] or "-"), lat, escape(r["detail"] or "")
        )
    console.print(table)


def _print_runs(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="verification history (newest first, times UTC)", box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    for col, kw in (
        ("run", {"justify": "right"}),
        ("time", {}),
        ("verdict", {"min_width": 12}),
        ("changed", {"justify": "right"}),
        ("failed", {"justify": "right"}),
        ("spec", {}),
        ("fp", {}),
    ):
        table.add_column(col, no_wrap=True, **kw)
    table.add_column("target", overflow="fold", min_width=12)
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["time"][5:19].replace("T", " "),
            f"[{_COLOURS.get(r['verdict'], 'yellow')}]{r['verdict']}[/]",
            f"{r['mismatched']}/{r['markers']}",
            str(r["failed"]),
            r["output_spec"],
            r["fingerprint"][:8],
            escape(re.sub(r"^(\w+):https?://", r"\1:", r["target"])),
        )
    console.print(table)


# --------------------------------------------------------------------------- watch


def _print_run(run: WatchRun) -> None:
    r = run.report
    colour = {"INTACT": "green", "TAMPERED": "bold red"}.get(r.verdict, "yellow")
    recorded = "" if run.run_id is None else f"  run {run.run_id}"
    console.print(f"{run.time}  [{colour}]{escape(r.summary())}[/]  ({r.seconds:.2f} s){recorded}", highlight=False)


def watch_cmd(
    ctx: typer.Context,
    fp_path: FingerprintArgument,
    endpoint: EndpointOption,
    protocol: ProtocolOption = "kserve",
    every: Annotated[str, typer.Option("--every", help="Interval between runs: 30s, 10m, 1h, 1h30m.")] = "10m",
    count: Annotated[int, typer.Option("--count", help="Stop after this many runs (0: forever).")] = 0,
    output_spec: VerifySpecOption = None,
    hook: Annotated[
        Optional[str], typer.Option("--hook", help="Shell command run on TAMPERED and when INCONCLUSIVE starts (env TAMPERPROBE_*).")
    ] = None,
    max_inconclusive: Annotated[int, typer.Option("--max-inconclusive", help="Exit 2 after this many INCONCLUSIVE runs in a row (0: never).")] = 0,
    model_name: ModelNameOption = None,
    tolerance: ToleranceOption = None,
    limit: LimitOption = None,
    header: HeaderOption = None,
    token_env: TokenEnvOption = None,
    timeout: TimeoutOption = 10.0,
    retries: RetriesOption = 3,
    batch_size: BatchSizeOption = 1,
    delay: DelayOption = 0.0,
    insecure: InsecureOption = False,
    template: TemplateOption = None,
    seed: RequestSeedOption = None,
    history_path: HistoryOption = None,
    no_history: NoHistoryOption = False,
) -> None:
    """Re-verify an endpoint on a schedule. Exit 1 on the first TAMPERED; INCONCLUSIVE keeps watching (see --max-inconclusive).

    --hook runs a shell command on TAMPERED and on the first INCONCLUSIVE run of a streak, with
    TAMPERPROBE_VERDICT, _SUMMARY, _ENDPOINT, _PROTOCOL, _FINGERPRINT, _FINGERPRINT_FILE,
    _MARKERS, _MISMATCHED, _FAILED, _RUN_ID, _RUN and _TIME in its environment.
    """
    with handled():
        from ..fingerprint import load
        from ..served.clients import protocol_name
        from ..served.watch import watch

        fp = load(fp_path)
        result = watch(
            fp,
            _endpoint_target(fp, ctx.params),
            every=every,
            count=count,
            max_inconclusive=max_inconclusive,
            output_spec=output_spec,
            tolerance=tolerance,
            limit=limit,
            hook=hook,
            record=not no_history,
            history_path=history_path,
            protocol=protocol_name(protocol),
            endpoint=endpoint,
            fingerprint_file=fp_path,
            on_run=_print_run,
            on_warning=_warn,
        )
        if result.gave_up:
            fail(result.reason, result.exit_code)
        raise typer.Exit(result.exit_code)


def register(app: typer.Typer) -> None:
    app.command()(verify)
    app.command("serve")(serve_cmd)
    app.command("history")(history_cmd)
    app.command("watch")(watch_cmd)
