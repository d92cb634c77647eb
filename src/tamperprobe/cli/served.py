"""CLI commands of the served side: ``verify`` and ``watch`` (from ``cli.verifying``), ``serve`` and ``history``.

Each body wires options to a library call: ``server.app.serve`` and ``served.history``; ``verify``
and ``watch`` drive a ``served.session.Session`` (``cli.verifying``). Remote text is made inert
(``_shown``) before it is printed, and ``serve --token`` is refused: a token on the command line
is visible to every user (``--token-env``, ``--token-file``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from ._common import console, fail, handled
from ._options import (
    AllowUnsignedOption,
    DecryptKeyOption,
    DeviceOption,
    HistoryOption,
    JsonOption,
    ModelArgOption,
    ThreadsOption,
    TrustKeyOption,
    WeightsOption,
    load_fingerprint_from_options,
    use_runtime,
)
from .verifying import _COLOURS, _warn, verify, watch_cmd

# --------------------------------------------------------------------------- serve


def serve_cmd(
    ctx: typer.Context,
    model: Annotated[
        Optional[str],
        typer.Argument(help="Model: .pt (TorchScript), .pt2 (torch.export), .onnx, or package.module:attribute (none with --model-repository)."),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0 exposes it to the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8080,
    name: Annotated[str, typer.Option("--name", help="Model name in the URLs (/v2/models/NAME/infer).")] = "model",
    output_spec: Annotated[str, typer.Option("--output-spec", help="What responses reveal: top1, topk:K, top1-prob:N, probs:N, logits.")] = "logits",
    token_env: Annotated[
        Optional[str],
        typer.Option("--token-env", help="Require Authorization: Bearer TOKEN, TOKEN in this environment variable (health stays open)."),
    ] = None,
    token_file: Annotated[Optional[Path], typer.Option("--token-file", help="Require Authorization: Bearer TOKEN, TOKEN in this file.")] = None,
    token: Annotated[Optional[str], typer.Option("--token", hidden=True)] = None,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", help="Input shape without the batch axis, e.g. 1,28,28.")] = None,
    fingerprint: Annotated[Optional[Path], typer.Option("--fingerprint", help="Take the input spec from this fingerprint.")] = None,
    trust_key: TrustKeyOption = None,
    allow_unsigned: AllowUnsignedOption = False,
    decrypt_key: DecryptKeyOption = None,
    weights: WeightsOption = None,
    model_arg: ModelArgOption = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Largest batch accepted in one request.")] = 64,
    max_body: Annotated[str, typer.Option("--max-body", help="Largest request body accepted (e.g. 8MiB, 512KiB).")] = "8MiB",
    max_connections: Annotated[
        int, typer.Option("--max-connections", help="Open connections at most (beyond: the oldest one waiting for a request is closed).")
    ] = 1000,
    max_concurrent: Annotated[
        int, typer.Option("--max-concurrent", help="Inference requests read and processed at once (others wait, then 503).")
    ] = 16,
    header_timeout: Annotated[float, typer.Option("--header-timeout", help="Seconds a client has to send a request's headers.")] = 10.0,
    body_timeout: Annotated[float, typer.Option("--body-timeout", help="Seconds a client has to send a request's body.")] = 30.0,
    idle_timeout: Annotated[int, typer.Option("--idle-timeout", help="Seconds an idle kept-alive connection stays open.")] = 5,
    tls_cert: Annotated[Optional[Path], typer.Option("--tls-cert", help="Serve HTTPS with this certificate (PEM; with --tls-key).")] = None,
    tls_key: Annotated[Optional[Path], typer.Option("--tls-key", help="Private key of --tls-cert (PEM).")] = None,
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    model_repository: Annotated[
        Optional[Path],
        typer.Option(
            "--model-repository",
            help="Serve every model of this folder (DIR/<name>/model.pt|pt2|onnx, optional config.toml) at /v2/models/<name>.",
        ),
    ] = None,
    eager: Annotated[bool, typer.Option("--eager", help="With --model-repository: load every model at start, not on first use.")] = False,
) -> None:
    """Serve a model over the Open Inference Protocol (KServe v2 REST, as Triton and MLServer do).

    Input shape: --input-shape, else the fingerprint's, else the ONNX/.pt2 file's; a TorchScript
    file or module:attr needs one of the first two. With --model-repository, each model's
    config.toml may set output_spec, input_shape and max_batch (the options are the defaults).
    """
    with handled():
        _serve(ctx.params)


def _serve(p: dict[str, Any]) -> None:
    """``serve`` with its checked options: one model, or a model repository."""
    from ..models import load_model, parse_model_args
    from ..served.credentials import read_token
    from ..server.app import serve
    from ..server.guard import Limits
    from ._common import err_console

    model, model_repository, fingerprint, weights, model_arg = p["model"], p["model_repository"], p["fingerprint"], p["weights"], p["model_arg"]
    if p["token"] is not None:
        fail("--token is not accepted: a token on the command line is visible to every user (ps); use --token-env VAR or --token-file FILE")
    if (model is None) == (model_repository is None):
        fail("give a model to serve or --model-repository DIR (one of them)")
    if model_repository is not None and (fingerprint or weights or model_arg):
        fail("--model-repository takes no --fingerprint, --weights or --model-arg: each model is DIR/<name>/model.pt|pt2|onnx")
    if p["eager"] and model_repository is None:
        fail("--eager applies to --model-repository only")
    fp = None if fingerprint is None else load_fingerprint_from_options(fingerprint, p["trust_key"], p["allow_unsigned"], p["decrypt_key"])
    limits = Limits(**{k: p[k] for k in ("max_connections", "max_concurrent", "header_timeout", "body_timeout", "idle_timeout")})
    # with a factory's arguments or a device the model is loaded here; the server takes a loaded model as it is
    dev = use_runtime(p["threads"], p["device"])
    preload = model is not None and (bool(model_arg) or p["device"] is not None)
    to_serve: Any = load_model(model, weights, model_args=parse_model_args(model_arg), device=dev) if preload else model
    serve(
        to_serve,
        **{k: p[k] for k in ("host", "port", "name", "output_spec", "input_shape", "max_batch", "max_body", "tls_cert", "tls_key", "eager")},
        token=read_token(p["token_env"], p["token_file"]),
        weights=None if preload else weights,
        fingerprint=fp,
        limits=limits,
        on_ready=lambda text: console.print(escape(text), highlight=False, soft_wrap=True),
        on_warning=_warn,
        model_repository=model_repository,
        on_event=lambda text: err_console.print(escape(text), highlight=False, soft_wrap=True),
    )


# --------------------------------------------------------------------------- history


def history_cmd(
    endpoint: Annotated[Optional[str], typer.Option("--endpoint", help="Only runs whose target contains this text.")] = None,
    verdict: Annotated[Optional[str], typer.Option("--verdict", help="Only INTACT, TAMPERED or INCONCLUSIVE runs.")] = None,
    fingerprint: Annotated[Optional[str], typer.Option("--fingerprint", help="Only runs of fingerprints whose id starts with this.")] = None,
    since: Annotated[Optional[str], typer.Option("--since", help="Only runs since an ISO time or a duration ago (24h, 7d).")] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many runs, newest first.")] = 50,
    run: Annotated[Optional[int], typer.Option("--run", help="Show the markers of this run instead.")] = None,
    pool_use: Annotated[bool, typer.Option("--pool", help="Show the pool ledger instead: markers and decoys drawn per fingerprint.")] = False,
    as_json: JsonOption = False,
    history_path: HistoryOption = None,
) -> None:
    """List past verifications recorded by verify and watch (or, with --pool, what each fingerprint's pool has used)."""
    with handled():
        from ..served import history, ledger
        from ..served.untrusted import clean

        if verdict and verdict.upper() not in ("INTACT", "TAMPERED", "INCONCLUSIVE"):
            fail(f"bad --verdict {verdict!r}: INTACT, TAMPERED or INCONCLUSIVE")
        if pool_use:
            if run is not None:
                fail("give --pool or --run, not both")
            rows = ledger.pool_usage(history_path, fingerprint)
            if as_json:
                console.print_json(json.dumps(rows))
            elif rows:
                _print_pool(rows)
            else:
                console.print("no markers drawn" + (" for this fingerprint" if fingerprint else ""))
            return
        if run is not None:
            rows = history.markers(run, path=history_path)
            if not rows:
                fail(f"no run {run} in the history")
        else:
            rows = history.runs(history_path, target=endpoint, verdict=verdict, fingerprint=fingerprint, since=since, limit=limit)
        # rows written by an older tamperprobe may hold raw remote text: made inert whatever the output
        rows = [{k: clean(v, 4000) if isinstance(v, str) else v for k, v in r.items()} for r in rows]
        if as_json:
            console.print_json(json.dumps(rows))
        elif run is not None:
            _print_markers(run, rows)
        elif rows:
            _print_runs(rows)
        else:
            console.print("no runs recorded" + (" match these filters" if any((endpoint, verdict, fingerprint, since)) else ""))


def _print_pool(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="pool ledger: markers and decoys drawn (each is never sent again; times UTC)")
    for col in ("fingerprint", "markers", "decoys", "draws", "first", "last"):
        table.add_column(col, no_wrap=col == "fingerprint")
    for r in rows:
        first, last = (escape(str(r[k])[:19].replace("T", " ")) for k in ("first", "last"))
        table.add_row(escape(str(r["fingerprint"])), str(r["markers"]), str(r["decoys"]), str(r["draws"]), first, last)
    console.print(table)
    console.print("runs left: tamperprobe inspect FP (or the line watch prints)", highlight=False)


def _print_markers(run: int, rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title=f"run {run}")
    for col in ("#", "status", "expected", "observed", "latency", "detail"):
        table.add_column(col)
    for r in rows:
        style = {"match": "green", "MISMATCH": "red"}.get(r["status"], "yellow")
        lat = "-" if r["latency"] is None else f"{r['latency'] * 1000:.0f} ms"
        table.add_row(
            f"d{r['index']}" if r.get("kind") == "decoy" else str(r["index"]),
            f"[{style}]{escape(str(r['status']))}[/]",
            escape(r["expected"] or ""),
            escape(r["observed"] or "-"),
            lat,
            escape(r["detail"] or ""),
        )
    console.print(table)


def _signed(row: dict) -> str:
    if row.get("signer"):
        return str(row["signer"])[:8]
    return "UNSIGNED" if "not signed" in str(row.get("notes") or "") else "-"


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
        ("signer", {}),
    ):
        table.add_column(col, no_wrap=True, **kw)
    table.add_column("target", overflow="fold", min_width=12)
    if console.width < 120:  # too narrow for a table with the target: two lines a run, nothing cut
        console.print("verification history (newest first, times UTC)", style="bold")
        for r in rows:
            colour = _COLOURS.get(r["verdict"], "yellow")
            console.print(
                f"{r['id']:>4}  {escape(str(r['time'])[5:19].replace('T', ' '))}  [{colour}]{escape(str(r['verdict']))}[/]  "
                f"{r['mismatched']}/{r['markers'] + (r.get('decoys') or 0)} changed, {r['failed']} failed  {escape(str(r['output_spec']))}  "
                f"fp {escape(str(r['fingerprint'])[:8])}  signer {escape(_signed(r))}",
                highlight=False,
                soft_wrap=False,
                overflow="fold",
            )
            console.print("      " + escape(_short_target(r)), highlight=False, overflow="fold")
        return
    for r in rows:
        table.add_row(
            str(r["id"]),
            escape(str(r["time"])[5:19].replace("T", " ")),
            f"[{_COLOURS.get(r['verdict'], 'yellow')}]{escape(str(r['verdict']))}[/]",
            f"{r['mismatched']}/{r['markers'] + (r.get('decoys') or 0)}",
            str(r["failed"]),
            escape(str(r["output_spec"])),
            escape(str(r["fingerprint"])[:8]),
            escape(_signed(r)),
            escape(_short_target(r)),
        )
    console.print(table)


def _short_target(row: dict) -> str:
    import re

    return re.sub(r"^(\w+):https?://", r"\1:", str(row["target"]))


def register(app: typer.Typer) -> None:
    app.command()(verify)
    app.command("serve")(serve_cmd)
    app.command("history")(history_cmd)
    app.command("watch")(watch_cmd)
