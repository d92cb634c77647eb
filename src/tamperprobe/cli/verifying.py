"""CLI commands that verify a served model: ``verify`` (once) and ``watch`` (on a schedule).

Each body builds a ``served.session.Session`` (``_settings``, ``_verify_target``,
``_endpoint_target``) and drives it (``served.watch.watch`` for ``watch``): plan, draw, query,
compare, alarm, record live there once. The endpoint options are declared once below.

What both keep to:

* **The alarm first.** The verdict is printed and the exit code fixed before the history is
  written; a history that cannot be written is a one-line warning. ``watch`` does the same for
  each run, the hook included (``served.watch``). Printing cannot cost the alarm: a stdout that
  cannot encode the report gets the verdict as plain ASCII (``_show``).
* **Fingerprints are authenticated** (``--trust-key``, ``--allow-unsigned``, ``--decrypt-key``,
  ``_options.load_fingerprint_from_options``) before any marker is sent; a forged, untrusted or
  altered file exits 3 and never reaches the endpoint.
* **Remote text is inert.** Whatever the endpoint said is printed through ``_shown`` (control
  characters escaped, rich markup escaped), and the last line of a verification is the verdict
  in tamperprobe's own words (``Report.headline``), never text from the server.
* **No secrets on argv.** Tokens come from ``--token-env`` or ``--token-file``; a credential passed
  in ``--header`` or in the ``--endpoint`` URL is warned about.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
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
    ExpectOption,
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
    from ..served.session import Run, Settings
    from ..served.targets import Target
    from ..served.verify import Report
    from ..served.watch import WatchResult

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
ClientProfileOption = Annotated[
    Optional[str],
    typer.Option(
        "--client-profile",
        help="Send every request exactly as this client would: python-requests (default), python-requests-session, tritonclient, curl, or a profile file (JSON).",
    ),
]
TemplateOption = Annotated[Optional[str], typer.Option("--template", help="Request/response template for --protocol json (a file or inline JSON).")]
RequestSeedOption = Annotated[Optional[int], typer.Option("--seed", help="Seed of the request order (default: a fresh order each run).")]
VerifySpecOption = Annotated[Optional[str], typer.Option("--output-spec", help="What the API reveals (default: the fingerprint's).")]
ToleranceOption = Annotated[Optional[float], typer.Option("--tolerance", help="Override the fingerprint's tolerance (logit units).")]
LimitOption = Annotated[Optional[int], typer.Option("--limit", help="Use only the first N markers (--model only; an endpoint gets --per-run).")]
NoHistoryOption = Annotated[bool, typer.Option("--no-history", help="Do not record in the history.")]
AllowWeakerSpecOption = Annotated[
    bool,
    typer.Option("--allow-weaker-spec", help="Accept an --output-spec that reveals less than the fingerprint's (detects less; warned on every run)."),
]
TrustedModelOption = Annotated[
    bool,
    typer.Option(
        "--trusted-model",
        help="The --model file is the owner's own copy: send it every marker. Without it a model file is treated as the suspect party's and gets --per-run markers from the pool.",
    ),
]
LocalModelOption = Annotated[Optional[str], typer.Option("--model", help="Verify a local model file (or package.module:attribute).")]
EveryOption = Annotated[str, typer.Option("--every", help="Interval between runs: 30s, 10m, 1h, 1h30m.")]
CountOption = Annotated[int, typer.Option("--count", help="Stop after this many runs (0: forever).")]
HookOption = Annotated[Optional[str], typer.Option("--hook", help="Shell command run on TAMPERED and when INCONCLUSIVE starts (env TAMPERPROBE_*).")]
MaxInconclusiveOption = Annotated[int, typer.Option("--max-inconclusive", help="Exit 2 after this many INCONCLUSIVE runs in a row (0: never).")]
HoldTamperedOption = Annotated[
    bool,
    typer.Option(
        "--hold-tampered", help="After TAMPERED keep running (metrics stay at tamperprobe_tampered 1) until stopped (SIGTERM, Ctrl-C); then exit 1."
    ),
]
MetricsPortOption = Annotated[
    Optional[int], typer.Option("--metrics-port", help="Serve Prometheus metrics on this port (/metrics; 0 picks a free one).")
]
MetricsHostOption = Annotated[str, typer.Option("--metrics-host", help="Address of the metrics server.")]
EventLogOption = Annotated[Optional[Path], typer.Option("--event-log", help="Append one JSON object per run to this file.")]


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
    from .._util import parse_duration
    from ..served.clients import make_client

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
        profile=o.get("client_profile"),
        seed=o["seed"],
        input_spec=fp.input_spec,
        classes=fp.classes,
    )


def _settings(o: Mapping[str, Any], protocol: str) -> Settings:
    """The session settings from the options' values (``ctx.params`` of verify or watch)."""
    from ..served.session import Settings

    return Settings(
        output_spec=o["output_spec"],
        tolerance=o["tolerance"],
        allow_weaker_spec=o["allow_weaker_spec"],
        per_run=o["per_run"],
        decoys=o["decoys"],
        allow_repeat=o["allow_repeat"],
        limit=o.get("limit"),
        record=not o["no_history"],
        history_path=o["history_path"],
        protocol=protocol,
        hook=o.get("hook"),
    )


def _verify_target(fp: Fingerprint, o: Mapping[str, Any]) -> Target:
    """``--model`` (a suspect party's file unless ``--trusted-model``) or ``--endpoint``, as a target."""
    from ..models import load_model, parse_model_args
    from ..served.targets import LocalTarget

    if o["model"] is None:
        if o["trusted_model"]:
            fail("--trusted-model applies to --model: an endpoint is always the party under suspicion")
        return _endpoint_target(fp, o)
    dev = use_runtime(o["threads"], o["device"])
    # a program from the suspect party (TorchScript, .pt2) runs in a sandboxed child; the owner's own copy in process
    loaded = load_model(o["model"], o["weights"], model_args=parse_model_args(o["model_arg"]), device=dev, sandbox=not o["trusted_model"])
    return LocalTarget(loaded, input_spec=fp.input_spec, threads=o["threads"], trusted=o["trusted_model"])


def _plain(text: str) -> None:
    """``text`` as one ASCII line on stdout (else stderr), past any console: the alarm when rich cannot print."""
    data = (text + "\n").encode("ascii", "backslashreplace")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
            stream.buffer.write(data)
            stream.buffer.flush()
            return
        except Exception:  # noqa: BLE001, S112 - try the next stream; the exit code and the record follow regardless
            continue


def _show(print_it: Callable[[], None], report: Report) -> None:
    """Print with ``print_it``; when that fails (a stdout that cannot encode the report, a closed pipe) the verdict as plain ASCII."""
    try:
        print_it()
    except Exception:  # noqa: BLE001 - whatever broke the console, the alarm is still shown
        _plain(report.headline())


def _show_verify(as_json: bool) -> Callable[[Run], None]:
    def show(run: Run) -> None:
        r = run.report
        _show((lambda: console.print_json(json.dumps(r.to_json()))) if as_json else (lambda: print_report(r)), r)

    return show


_COLOURS = {"INTACT": "green", "TAMPERED": "red"}


# --------------------------------------------------------------------------- verify


def verify(
    ctx: typer.Context,
    fp_path: FingerprintArgument,
    model: LocalModelOption = None,
    trusted_model: TrustedModelOption = False,
    weights: WeightsOption = None,
    model_arg: ModelArgOption = None,
    endpoint: EndpointOption = None,
    protocol: ProtocolOption = "kserve",
    model_name: ModelNameOption = None,
    output_spec: VerifySpecOption = None,
    allow_weaker_spec: AllowWeakerSpecOption = False,
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
    client_profile: ClientProfileOption = None,
    seed: RequestSeedOption = None,
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    trust_key: TrustKeyOption = None,
    allow_unsigned: AllowUnsignedOption = False,
    decrypt_key: DecryptKeyOption = None,
    expect: ExpectOption = None,
    history_path: HistoryOption = None,
    no_history: NoHistoryOption = False,
    as_json: JsonOption = False,
) -> None:
    """Verify a model (local file or served endpoint) against a fingerprint.

    An endpoint, or a --model file from the suspect party, gets --per-run markers (and --decoys)
    drawn fresh from the fingerprint's pool, recorded in the history before they are sent and
    never sent again; a used-up pool is refused (exit 2). A --model file with --trusted-model gets
    every marker. Exit 0 INTACT, 1 TAMPERED, 2 error/INCONCLUSIVE, 3 fingerprint not authentic.
    The verdict is printed and the exit code fixed before the run is written to the history.
    """
    with handled():
        from ..served.clients import protocol_name
        from ..served.session import Session

        if (model is None) == (endpoint is None):
            fail("give exactly one of --model or --endpoint")
        fp = load_fingerprint_from_options(fp_path, trust_key, allow_unsigned, decrypt_key, expect)
        settings = _settings(ctx.params, "local" if model is not None else protocol_name(protocol))
        Session.check_settings(fp, settings, suspect=model is None or not trusted_model)  # before a sandboxed model is started
        target = _verify_target(fp, ctx.params)
        session = Session(fp, target, settings, fingerprint_file=fp_path, on_run=_show_verify(as_json), on_warning=_warn)
        report = session.run_once().report
    raise typer.Exit(report.exit_code)


def print_report(report: Report, max_rows: int = 40) -> None:
    """The per-marker table, the first failure, and last the verdict in tamperprobe's own words (no remote text)."""
    from rich.table import Table

    vouched = f"signed by key {report.signer}" if report.signer else "UNSIGNED"
    table = Table(title=_shown(f"{report.target} · {report.output_spec} · fingerprint {report.fingerprint_id} · {vouched}"))
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


# --------------------------------------------------------------------------- watch


def _print_run(run: Run, endpoint: str | None = None) -> None:
    r = run.report
    colour = {"INTACT": "green", "TAMPERED": "bold red"}.get(r.verdict, "yellow")
    left = "" if r.runs_left is None else f", {r.runs_left} runs left"
    who = "" if endpoint is None else f"{_shown(endpoint, 128)}  "
    console.print(f"{run.time}  {who}[{colour}]{escape(r.headline())}[/]  ({r.seconds:.2f} s{left})", highlight=False, soft_wrap=True)


class _RunReporter:
    """What happens to each watch run before its hook: printed (a line, or JSON with --json), then the metrics and
    the event log updated; a failing event log is a warning, never a lost verdict."""

    def __init__(self, endpoint: str, metrics: Any, log: Any, as_json: bool) -> None:
        self.endpoint, self.metrics, self.log, self.as_json = endpoint, metrics, log, as_json

    def __call__(self, run: Run, endpoint: str | None = None) -> None:
        """Report ``run``; ``endpoint`` (a fleet's entry name) labels the line, the metrics and the event, else the watch's endpoint."""
        label = endpoint or self.endpoint
        extra = {} if endpoint is None else {"endpoint": endpoint}
        if self.as_json:
            _show(
                lambda: print(json.dumps({"run": run.number, "time": run.time, **extra, **run.report.to_json()}, sort_keys=True), flush=True),
                run.report,
            )
        else:
            _show(lambda: _print_run(run, endpoint), run.report)
        if self.metrics is not None:
            self.metrics.update(run, label)
        if self.log is not None:
            try:
                self.log.write(run, label)
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


def _watch_options(o: Mapping[str, Any], protocol: str) -> dict[str, Any]:
    """``served.watch.watch``'s keyword arguments from the options' values (``ctx.params``)."""
    s = _settings(o, protocol)
    stops = {k: o[k] for k in ("every", "count", "max_inconclusive", "hold_tampered", "endpoint")}
    return {**stops, **{f: getattr(s, f) for f in s.__dataclass_fields__ if f != "limit"}, "fingerprint_file": o["fp_path"]}


def _holding(result: WatchResult) -> None:
    err_console.print(
        "TAMPERED: holding (metrics keep tamperprobe_tampered at 1) until stopped with SIGTERM or Ctrl-C", style="bold red", highlight=False
    )


def watch_cmd(
    ctx: typer.Context,
    fp_path: FingerprintArgument,
    endpoint: EndpointOption,
    protocol: ProtocolOption = "kserve",
    every: EveryOption = "10m",
    count: CountOption = 0,
    output_spec: VerifySpecOption = None,
    allow_weaker_spec: AllowWeakerSpecOption = False,
    hook: HookOption = None,
    max_inconclusive: MaxInconclusiveOption = 0,
    hold_tampered: HoldTamperedOption = False,
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
    client_profile: ClientProfileOption = None,
    seed: RequestSeedOption = None,
    trust_key: TrustKeyOption = None,
    allow_unsigned: AllowUnsignedOption = False,
    decrypt_key: DecryptKeyOption = None,
    expect: ExpectOption = None,
    history_path: HistoryOption = None,
    no_history: NoHistoryOption = False,
    metrics_port: MetricsPortOption = None,
    metrics_host: MetricsHostOption = "127.0.0.1",
    event_log: EventLogOption = None,
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
        from ..served.watch import interrupts, watch

        fp = load_fingerprint_from_options(fp_path, trust_key, allow_unsigned, decrypt_key, expect)
        target = _endpoint_target(fp, ctx.params)
        on_run = _run_reporter(endpoint or target.name, metrics_port, metrics_host, event_log, as_json)
        on_pool = lambda state: err_console.print(_shown(state.describe()), highlight=False, soft_wrap=True)  # noqa: E731
        with interrupts(), on_run:  # SIGTERM (a service manager stopping it) is a clean stop, as Ctrl-C
            result = watch(
                fp, target, **_watch_options(ctx.params, protocol_name(protocol)), on_run=on_run, on_warning=_warn, on_pool=on_pool, on_hold=_holding
            )
        if result.interrupted:
            console.print(f"stopped: {_shown(result.reason)}", highlight=False, soft_wrap=True)
        elif result.gave_up:
            fail(result.reason, result.exit_code)
        raise typer.Exit(result.exit_code)
