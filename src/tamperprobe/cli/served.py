"""CLI commands of the served side: ``verify``, ``serve``, ``history`` and ``watch``.

Each body wires options to a library call: ``served.verify.verify``, ``server.app.serve``,
``served.history`` and ``served.watch.watch``. The endpoint options of ``verify`` and ``watch``
are declared once below and reach the client through ``_endpoint_target``.

What every served-side command keeps to:

* **The alarm first.** ``verify`` prints the verdict and fixes its exit code before it writes
  the history; a history that cannot be written is a one-line warning (``_record``). ``watch``
  does the same for each run, the hook included (``served.watch``).
* **Fingerprints are authenticated** (``--trust-key``, ``--allow-unsigned``, ``--decrypt-key``,
  ``_options.load_fingerprint_from_options``) before any marker is sent; a forged or untrusted
  file exits 3 and never reaches the endpoint.
* **Remote text is inert.** Whatever the endpoint said is printed through ``_shown`` (control
  characters escaped, rich markup escaped), and the last line of a verification is the verdict
  in tamperprobe's own words (``Report.headline``), never text from the server.
* **No secrets on argv.** Tokens come from ``--token-env`` or ``--token-file``; ``serve --token``
  is refused; a credential passed in ``--header`` or in the ``--endpoint`` URL is warned about.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, List, Optional

import typer
from rich.markup import escape

from ..served.clients import protocol_help
from ._common import console, err_console, fail, handled
from ._options import (
    AllowUnsignedOption,
    DecryptKeyOption,
    DeviceOption,
    FingerprintArgument,
    HistoryOption,
    JsonOption,
    ModelArgOption,
    ThreadsOption,
    TrustKeyOption,
    WeightsOption,
    load_fingerprint_from_options,
    use_runtime,
)

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
HeaderOption = Annotated[
    Optional[List[str]], typer.Option("--header", help="Extra HTTP header Name:value (repeatable; not for secrets: argv shows in ps).")
]
TokenEnvOption = Annotated[Optional[str], typer.Option("--token-env", help="Environment variable holding the bearer token.")]
TokenFileOption = Annotated[Optional[Path], typer.Option("--token-file", help="File holding the bearer token (one line).")]
TimeoutOption = Annotated[float, typer.Option("--timeout", help="Time limit of each request attempt, whole answer included, seconds.")]
DeadlineOption = Annotated[
    str, typer.Option("--deadline", help="Time limit of a whole --endpoint run, retries and waits included (30s, 5m); then INCONCLUSIVE.")
]
RetriesOption = Annotated[int, typer.Option("--retries", help="Retries on connection errors, 5xx and 429.")]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", help="Markers per request (1 looks like ordinary traffic).")]
DelayOption = Annotated[float, typer.Option("--delay", help="Pause of this many seconds after each request before the next.")]
SpreadOption = Annotated[
    Optional[str],
    typer.Option("--spread", help="Send the requests of a run at random times over this duration (30s, 10m; within --deadline)."),
]
PerRunOption = Annotated[
    Optional[int],
    typer.Option("--per-run", help="Markers drawn fresh from the fingerprint's pool per run (default: the fingerprint's, else 10; whole pairs)."),
]
DecoysOption = Annotated[
    Optional[float],
    typer.Option(
        "--decoys",
        help="Decoys (natural inputs with known answers) per marker mixed into each run (default: 1, or as many as last as long as the markers).",
    ),
]
AllowRepeatOption = Annotated[
    bool,
    typer.Option("--allow-repeat", help="Re-send markers when the pool has no fresh ones, or without a history (warned on every run, recorded)."),
]
InsecureOption = Annotated[bool, typer.Option("--insecure", help="Do not verify TLS certificates.")]
CACertOption = Annotated[Optional[Path], typer.Option("--ca-cert", help="Verify the endpoint's TLS certificate against these CA certificates (PEM).")]
TemplateOption = Annotated[Optional[str], typer.Option("--template", help="Request/response template for --protocol json (a file or inline JSON).")]
RequestSeedOption = Annotated[Optional[int], typer.Option("--seed", help="Seed of the request order (default: a fresh order each run).")]
VerifySpecOption = Annotated[Optional[str], typer.Option("--output-spec", help="What the API reveals (default: the fingerprint's).")]
ToleranceOption = Annotated[Optional[float], typer.Option("--tolerance", help="Override the fingerprint's tolerance (logit units).")]
LimitOption = Annotated[Optional[int], typer.Option("--limit", help="Use only the first N markers (--model only; an endpoint gets --per-run).")]
NoHistoryOption = Annotated[bool, typer.Option("--no-history", help="Do not record in the history.")]


def _shown(text: Any, limit: int = 2000) -> str:
    """Text for the terminal: made inert (control characters escaped) and rich markup escaped."""
    from ..served.untrusted import clean

    return escape(clean(text, limit))


def _warn(text: str) -> None:
    err_console.print(f"[yellow]warning:[/] {_shown(text)}", highlight=False, soft_wrap=True)


def _warn_secrets_on_argv(o: Mapping[str, Any]) -> None:
    """Warn about credentials given on the command line, where every user of the machine can read them."""
    from urllib.parse import parse_qsl, urlsplit

    from ..served.credentials import is_credential_header

    for h in o.get("header") or []:
        name = str(h).partition(":")[0].strip()
        if is_credential_header(name):
            _warn(f"--header {name} puts a secret on the command line, which other users can read (ps): use --token-env or --token-file")
    try:
        parts = urlsplit(str(o.get("endpoint") or ""))
        secret_query = any(is_credential_header(k) for k, _ in parse_qsl(parts.query))
        has_password = bool(parts.password)
    except ValueError:
        return
    if has_password or secret_query:
        _warn("the --endpoint URL holds credentials, which other users can read (ps): use --token-env or --token-file")


def _endpoint_target(fp: Fingerprint, o: Mapping[str, Any]) -> HTTPTarget:
    """The client for ``--endpoint`` from the endpoint options' values (``ctx.params`` of verify or watch).

    The fingerprint's input spec and class count go with it, so answers with another number of
    classes are failures.
    """
    from ..served.clients import make_client
    from ..served.history import parse_duration

    _warn_secrets_on_argv(o)
    return make_client(
        o["protocol"],
        o["endpoint"],
        model_name=o["model_name"],
        headers=o["header"],
        token_env=o["token_env"],
        token_file=o["token_file"],
        timeout=o["timeout"],
        deadline=parse_duration(o["deadline"]),
        retries=o["retries"],
        batch_size=o["batch_size"],
        delay=o["delay"],
        spread=parse_duration(o["spread"]) if o.get("spread") is not None else 0.0,
        verify_tls=not o["insecure"],
        ca_file=None if o["ca_cert"] is None else str(o["ca_cert"]),
        template=o["template"],
        seed=o["seed"],
        input_spec=fp.input_spec,
        classes=fp.classes,
    )


def _record(report: Report, protocol: str, history_path: Path | None) -> None:
    """Write ``report`` to the history after the verdict is out; any failure (or an interrupt) is a warning, never a changed exit code."""
    from ..served import history

    try:
        history.record(report, protocol=protocol, path=history_path)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the verdict stands whatever the history does
        from .._util import one_line

        _warn(f"the run was not recorded in the history: {one_line(exc, 300) if str(exc) else type(exc).__name__}")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a service manager stopping ``watch``) handled like Ctrl-C: a clean stop."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_COLOURS = {"INTACT": "green", "TAMPERED": "red"}


# --------------------------------------------------------------------------- verify


def verify(
    ctx: typer.Context,
    fp_path: FingerprintArgument,
    model: Annotated[Optional[str], typer.Option("--model", help="Verify a local model file (or package.module:attribute).")] = None,
    weights: WeightsOption = None,
    model_arg: ModelArgOption = None,
    endpoint: EndpointOption = None,
    protocol: ProtocolOption = "kserve",
    model_name: ModelNameOption = None,
    output_spec: VerifySpecOption = None,
    tolerance: ToleranceOption = None,
    limit: LimitOption = None,
    per_run: PerRunOption = None,
    decoys: DecoysOption = None,
    allow_repeat: AllowRepeatOption = False,
    header: HeaderOption = None,
    token_env: TokenEnvOption = None,
    token_file: TokenFileOption = None,
    timeout: TimeoutOption = 10.0,
    deadline: DeadlineOption = "5m",
    retries: RetriesOption = 3,
    batch_size: BatchSizeOption = 1,
    delay: DelayOption = 0.0,
    spread: SpreadOption = None,
    insecure: InsecureOption = False,
    ca_cert: CACertOption = None,
    template: TemplateOption = None,
    seed: RequestSeedOption = None,
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    trust_key: TrustKeyOption = None,
    allow_unsigned: AllowUnsignedOption = False,
    decrypt_key: DecryptKeyOption = None,
    history_path: HistoryOption = None,
    no_history: NoHistoryOption = False,
    as_json: JsonOption = False,
) -> None:
    """Verify a model (local file or served endpoint) against a fingerprint.

    An endpoint gets --per-run markers (and --decoys) drawn fresh from the fingerprint's pool,
    recorded in the history before they are sent and never sent again; a used-up pool is refused
    (exit 2). A local --model file gets every marker. Exit 0 INTACT, 1 TAMPERED, 2
    error/INCONCLUSIVE, 3 fingerprint not authentic. The verdict is printed and the exit code
    fixed before the run is written to the history.
    """
    with handled():
        from ..models import load_model, parse_model_args
        from ..served import pool
        from ..served.clients import protocol_name
        from ..served.targets import LocalTarget
        from ..served.verify import comparison
        from ..served.verify import verify as run_verify

        if (model is None) == (endpoint is None):
            fail("give exactly one of --model or --endpoint")
        fp = load_fingerprint_from_options(fp_path, trust_key, allow_unsigned, decrypt_key)
        if model is not None:
            if per_run is not None or decoys is not None or allow_repeat:
                fail("--per-run, --decoys and --allow-repeat apply to --endpoint: a local model file is checked with every marker")
            loaded = load_model(model, weights, model_args=parse_model_args(model_arg), device=use_runtime(threads, device))
            target: Target = LocalTarget(loaded, input_spec=fp.input_spec, threads=threads)
            report = run_verify(fp, target, output_spec, tolerance=tolerance, limit=limit)
        else:
            if limit is not None:
                fail("--limit applies to --model: an endpoint gets --per-run markers drawn fresh from the pool")
            target = _endpoint_target(fp, ctx.params)
            plan = pool.plan(fp, per_run, decoys)
            comparison(fp, output_spec, tolerance)  # bad options are refused before any marker is drawn
            pool.check_schedule(target, plan.queries)
            drawn = pool.draw(fp, plan, path=history_path, record=not no_history, allow_repeat=allow_repeat, target=target.name)
            report = run_verify(fp, target, output_spec, tolerance=tolerance, draw=drawn)
        if as_json:
            console.print_json(json.dumps(report.to_json()))
        else:
            print_report(report)
    if not no_history:
        _record(report, "local" if model is not None else protocol_name(protocol), history_path)
    raise typer.Exit(report.exit_code)


def print_report(report: Report, max_rows: int = 40) -> None:
    """The per-marker table, the first failure, and last the verdict in tamperprobe's own words (no remote text)."""
    from rich.table import Table

    table = Table(title=_shown(f"{report.target} · {report.output_spec} · fingerprint {report.fingerprint_id}"))
    for col in ("#", "expected", "observed", "status", "detail"):
        table.add_column(col)
    # the report's order (markers by index, then decoys, shown as d3), failures and mismatches first when cut
    shown = sorted(enumerate(report.markers), key=lambda km: (km[1].ok, km[0]))[:max_rows]
    for _, m in sorted(shown, key=lambda km: km[0]):
        style = "green" if m.ok else ("yellow" if m.failure else "red")
        observed = "-" if m.observed is None else str(m.observed)
        number = f"d{m.index}" if m.kind == "decoy" else str(m.index)
        table.add_row(number, _shown(m.expected), _shown(observed), f"[{style}]{m.status}[/]", _shown(m.failure or m.detail, 300))
    console.print(table)
    if len(report.markers) > max_rows:
        console.print(f"({len(report.markers) - max_rows} more markers not shown)")
    first = report.first_failure()
    if first:
        console.print(f"first failure: {_shown(first)}", highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {_shown(note, 400)}", highlight=False, soft_wrap=True)
    if report.runs_left is not None:
        console.print(f"pool: {report.runs_left} more runs like this one before its markers are used up", highlight=False)
    colour = _COLOURS.get(report.verdict, "yellow")
    console.print(f"[bold {colour}]{escape(report.headline())}[/]  ({report.seconds:.2f} s)", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- serve


def serve_cmd(
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
        from ..models import load_model, parse_model_args
        from ..served.credentials import read_token
        from ..server.app import serve
        from ..server.guard import Limits

        if token is not None:
            fail("--token is not accepted: a token on the command line is visible to every user (ps); use --token-env VAR or --token-file FILE")
        if (model is None) == (model_repository is None):
            fail("give a model to serve or --model-repository DIR (one of them)")
        if model_repository is not None and (fingerprint or weights or model_arg):
            fail("--model-repository takes no --fingerprint, --weights or --model-arg: each model is DIR/<name>/model.pt|pt2|onnx")
        if eager and model_repository is None:
            fail("--eager applies to --model-repository only")
        fp = None if fingerprint is None else load_fingerprint_from_options(fingerprint, trust_key, allow_unsigned, decrypt_key)
        limits = Limits(
            max_connections=max_connections,
            max_concurrent=max_concurrent,
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            idle_timeout=idle_timeout,
        )
        # with a factory's arguments or a device the model is loaded here; the server takes a loaded model as it is
        dev = use_runtime(threads, device)
        preload = model is not None and (bool(model_arg) or device is not None)
        to_serve: Any = load_model(model, weights, model_args=parse_model_args(model_arg), device=dev) if preload else model
        serve(
            to_serve,
            host=host,
            port=port,
            name=name,
            output_spec=output_spec,
            token=read_token(token_env, token_file),
            weights=None if preload else weights,
            input_shape=input_shape,
            fingerprint=fp,
            max_batch=max_batch,
            max_body=max_body,
            limits=limits,
            tls_cert=tls_cert,
            tls_key=tls_key,
            on_ready=lambda text: console.print(escape(text), highlight=False, soft_wrap=True),
            on_warning=_warn,
            model_repository=model_repository,
            eager=eager,
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
        from ..served import history
        from ..served.untrusted import clean

        if verdict and verdict.upper() not in ("INTACT", "TAMPERED", "INCONCLUSIVE"):
            fail(f"bad --verdict {verdict!r}: INTACT, TAMPERED or INCONCLUSIVE")
        if pool_use:
            if run is not None:
                fail("give --pool or --run, not both")
            rows = history.pool_usage(history_path, fingerprint)
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


# --------------------------------------------------------------------------- watch


def _print_run(run: WatchRun) -> None:
    r = run.report
    colour = {"INTACT": "green", "TAMPERED": "bold red"}.get(r.verdict, "yellow")
    left = "" if r.runs_left is None else f", {r.runs_left} runs left"
    console.print(f"{run.time}  [{colour}]{escape(r.headline())}[/]  ({r.seconds:.2f} s{left})", highlight=False, soft_wrap=True)


class _RunReporter:
    """What happens to each watch run before its hook: printed (a line, or JSON with --json), then the metrics and
    the event log updated; a failing event log is a warning, never a lost verdict."""

    def __init__(self, endpoint: str, metrics: Any, log: Any, as_json: bool) -> None:
        self.endpoint, self.metrics, self.log, self.as_json = endpoint, metrics, log, as_json

    def __call__(self, run: WatchRun) -> None:
        if self.as_json:
            print(json.dumps({"run": run.number, "time": run.time, **run.report.to_json()}, sort_keys=True), flush=True)
        else:
            _print_run(run)
        if self.metrics is not None:
            self.metrics.update(run, self.endpoint)
        if self.log is not None:
            try:
                self.log.write(run, self.endpoint)
            except OSError as exc:
                _warn(f"event log {self.log.path}: {exc.strerror or exc}")

    def __enter__(self) -> _RunReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        for part in (self.metrics, self.log):
            if part is not None:
                part.close()


def _run_reporter(endpoint: str, metrics_port: int | None, metrics_host: str, event_log: Path | None, as_json: bool) -> _RunReporter:
    from ..errors import UsageError
    from ..served.monitor import EventLog, Metrics

    if metrics_port is not None and not 0 <= metrics_port <= 65535:
        raise UsageError("--metrics-port must be between 0 and 65535")
    log = EventLog(event_log) if event_log is not None else None
    metrics = Metrics(metrics_port, metrics_host) if metrics_port is not None else None
    if metrics is not None:
        err_console.print(f"metrics at http://{metrics_host}:{metrics.port}/metrics", highlight=False)
    return _RunReporter(endpoint, metrics, log, as_json)


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
    per_run: PerRunOption = None,
    decoys: DecoysOption = None,
    allow_repeat: AllowRepeatOption = False,
    header: HeaderOption = None,
    token_env: TokenEnvOption = None,
    token_file: TokenFileOption = None,
    timeout: TimeoutOption = 10.0,
    deadline: DeadlineOption = "5m",
    retries: RetriesOption = 3,
    batch_size: BatchSizeOption = 1,
    delay: DelayOption = 0.0,
    spread: SpreadOption = None,
    insecure: InsecureOption = False,
    ca_cert: CACertOption = None,
    template: TemplateOption = None,
    seed: RequestSeedOption = None,
    trust_key: TrustKeyOption = None,
    allow_unsigned: AllowUnsignedOption = False,
    decrypt_key: DecryptKeyOption = None,
    history_path: HistoryOption = None,
    no_history: NoHistoryOption = False,
    metrics_port: Annotated[
        Optional[int], typer.Option("--metrics-port", help="Serve Prometheus metrics on this port (/metrics; 0 picks a free one).")
    ] = None,
    metrics_host: Annotated[str, typer.Option("--metrics-host", help="Address of the metrics server.")] = "127.0.0.1",
    event_log: Annotated[Optional[Path], typer.Option("--event-log", help="Append one JSON object per run to this file.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Re-verify an endpoint on a schedule. Exit 1 on the first TAMPERED; INCONCLUSIVE keeps watching (see --max-inconclusive).

    Each run draws --per-run fresh markers (and --decoys) from the fingerprint's pool, never
    re-sending one; the watch says how many runs the pool has left and stops with exit 2 when it
    is used up. Each run prints its verdict, then runs --hook (on TAMPERED and on the first
    INCONCLUSIVE run of a streak), then is written to the history. The hook sees TAMPERPROBE_VERDICT, _SUMMARY,
    _ENDPOINT (without credentials), _PROTOCOL, _FINGERPRINT, _FINGERPRINT_FILE, _SIGNER, _MARKERS,
    _DECOYS, _MISMATCHED, _FAILED, _RUN, _TIME and _RUNS_LEFT. --deadline bounds each run. Ctrl-C (or SIGTERM) stops
    cleanly with a summary: exit 0 if the last complete run was INTACT, 2 if it was INCONCLUSIVE
    or none completed.
    """
    with handled():
        from ..served.clients import protocol_name
        from ..served.watch import watch

        fp = load_fingerprint_from_options(fp_path, trust_key, allow_unsigned, decrypt_key)
        target = _endpoint_target(fp, ctx.params)
        on_run = _run_reporter(endpoint or target.name, metrics_port, metrics_host, event_log, as_json)
        with _sigterm_as_interrupt(), on_run:
            result = watch(
                fp,
                target,
                every=every,
                count=count,
                max_inconclusive=max_inconclusive,
                output_spec=output_spec,
                tolerance=tolerance,
                per_run=per_run,
                decoys=decoys,
                allow_repeat=allow_repeat,
                hook=hook,
                record=not no_history,
                history_path=history_path,
                protocol=protocol_name(protocol),
                endpoint=endpoint,
                fingerprint_file=fp_path,
                on_run=on_run,
                on_warning=_warn,
                on_pool=lambda state: err_console.print(_shown(state.describe()), highlight=False, soft_wrap=True),
            )
        if result.interrupted:
            console.print(f"stopped: {_shown(result.reason)}", highlight=False, soft_wrap=True)
        elif result.gave_up:
            fail(result.reason, result.exit_code)
        raise typer.Exit(result.exit_code)


def register(app: typer.Typer) -> None:
    app.command()(verify)
    app.command("serve")(serve_cmd)
    app.command("history")(history_cmd)
    app.command("watch")(watch_cmd)
