"""CLI commands for served models: ``serve``, ``history`` and ``watch``; helpers shared with ``verify``.

``watch`` re-verifies an endpoint on a schedule and records every run in the history:

* TAMPERED: runs ``--hook`` (if any) and exits 1 at once;
* INCONCLUSIVE (the endpoint did not answer usably): prints a warning, runs ``--hook`` on the
  first INCONCLUSIVE run of a streak, and keeps watching; with ``--max-inconclusive M`` it exits
  2 after M INCONCLUSIVE runs in a row;
* after ``--count N`` runs it exits 0 if the last run was INTACT and 2 if it was INCONCLUSIVE.

The hook is a shell command run with these environment variables: ``TAMPERPROBE_VERDICT``,
``TAMPERPROBE_SUMMARY``, ``TAMPERPROBE_ENDPOINT``, ``TAMPERPROBE_PROTOCOL``,
``TAMPERPROBE_FINGERPRINT`` (id), ``TAMPERPROBE_FINGERPRINT_FILE``, ``TAMPERPROBE_MARKERS``,
``TAMPERPROBE_MISMATCHED``, ``TAMPERPROBE_FAILED``, ``TAMPERPROBE_RUN_ID`` (history run id, empty
with ``--no-history``), ``TAMPERPROBE_RUN`` (1, 2, ... within this watch) and ``TAMPERPROBE_TIME``
(UTC ISO). A failing hook is reported and does not stop the watch.
"""

from __future__ import annotations

import json
import re
from datetime import UTC
from pathlib import Path
from typing import List, Optional

import typer

from ._common import console, err_console, fail, handled

# --------------------------------------------------------------------------- helpers


def parse_headers(items: list[str] | None) -> dict[str, str]:
    """``["X-Key: v", ...]`` -> {"X-Key": "v"}; raises UsageError on an item without a colon."""
    from ..errors import UsageError

    out: dict[str, str] = {}
    for item in items or []:
        k, sep, v = str(item).partition(":")
        if not sep or not k.strip():
            raise UsageError(f"bad --header {item!r}: expected Name:value")
        out[k.strip()] = v.strip()
    return out


def parse_size(text: str | int) -> int:
    """``8MiB``, ``512KiB``, ``1MB``, ``1000000`` -> bytes."""
    from ..errors import UsageError

    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*", str(text).lower())
    if not m:
        raise UsageError(f"bad size {text!r}: use e.g. 8MiB, 512KiB or a number of bytes")
    unit = (m.group(2) or "b").rstrip("b") or ""
    mult = {"": 1, "k": 1000, "ki": 1024, "m": 1000**2, "mi": 1024**2, "g": 1000**3, "gi": 1024**3}[unit]
    return int(float(m.group(1)) * mult)


def parse_duration(text: str) -> float:
    """``30s``, ``10m``, ``1h``, ``1h30m``, ``90`` (seconds) -> seconds."""
    from ..served.history import parse_duration as _parse

    return _parse(text)


def endpoint_options_to_target(
    endpoint: str,
    protocol: str = "kserve",
    *,
    fp=None,
    model_name: str | None = None,
    header: list[str] | None = None,
    token_env: str | None = None,
    timeout: float = 10.0,
    retries: int = 3,
    batch_size: int = 1,
    delay: float = 0.0,
    insecure: bool = False,
    template: str | Path | None = None,
    seed: int | None = None,
):
    """Build the client for ``verify``/``watch`` from CLI option values (``template`` is a file or inline JSON).

    With ``fp`` the fingerprint's input spec and class count are passed on, so answers with
    another number of classes are failures.
    """
    from ..served.clients import make_client

    return make_client(
        protocol,
        endpoint,
        model_name=model_name,
        headers=parse_headers(header),
        token_env=token_env,
        timeout=timeout,
        retries=retries,
        batch_size=batch_size,
        delay=delay,
        seed=seed,
        verify_tls=not insecure,
        template=None if template is None else str(template),
        input_spec=None if fp is None else fp.input_spec,
        classes=None if fp is None else fp.classes,
    )


# --------------------------------------------------------------------------- verify


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
            target = endpoint_options_to_target(
                endpoint,
                protocol,
                fp=fp,
                model_name=model_name,
                header=header,
                token_env=token_env,
                timeout=timeout,
                retries=retries,
                batch_size=batch_size,
                delay=delay,
                insecure=insecure,
                template=template,
                seed=seed,
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
        "verdict": report.verdict,
        "summary": report.summary(),
        "target": report.target,
        "output_spec": report.output_spec,
        "fingerprint": report.fingerprint_id,
        "seconds": round(report.seconds, 4),
        "tolerance": report.tolerance,
        "markers": [
            {
                "index": m.index,
                "status": m.status,
                "expected": str(m.expected),
                "observed": None if m.observed is None else str(m.observed),
                "detail": m.failure or m.detail,
                "latency": m.latency,
            }
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


# --------------------------------------------------------------------------- serve


def serve_cmd(
    model: str = typer.Argument(..., help="Model: .pt (TorchScript), .pt2 (torch.export), .onnx or package.module:attribute."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    name: str = typer.Option("model", "--name", help="Model name in the URLs (/v2/models/NAME/infer)."),
    output_spec: str = typer.Option("logits", "--output-spec", help="What responses reveal: top1, topk:K, top1-prob:N, probs:N, logits."),
    token: Optional[str] = typer.Option(None, "--token", help="Require Authorization: Bearer TOKEN (health endpoints stay open)."),
    token_env: Optional[str] = typer.Option(None, "--token-env", help="Read the bearer token from this environment variable instead."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Input shape without the batch axis, e.g. 1,28,28."),
    fingerprint: Optional[Path] = typer.Option(None, "--fingerprint", help="Take the input shape from this fingerprint."),
    weights: Optional[str] = typer.Option(None, "--weights", help=".safetensors or state_dict file for a package.module:attribute model."),
    max_batch: int = typer.Option(64, "--max-batch", help="Largest batch accepted in one request."),
    max_body: str = typer.Option("8MiB", "--max-body", help="Largest request body accepted (e.g. 8MiB, 512KiB)."),
) -> None:
    """Serve a model over the Open Inference Protocol (KServe v2 REST, as Triton and MLServer do).

    Input shape: --input-shape, else the fingerprint's, else the ONNX/.pt2 file's; a TorchScript
    file or module:attr needs one of the first two.
    """
    with handled():
        import os

        from ..errors import UsageError
        from ..models import load_model
        from ..server.app import ModelHolder, create_app, infer_input_spec

        if token and token_env:
            fail("give --token or --token-env, not both")
        if token_env:
            token = os.environ.get(token_env)
            if not token:
                fail(f"environment variable {token_env} is not set or empty")
        if not 0 <= port <= 65535:
            raise UsageError("--port must be between 0 and 65535")
        loaded = load_model(model, weights)
        spec = infer_input_spec(loaded, input_shape, fingerprint)
        holder = ModelHolder(loaded, spec)
        app = create_app(holder, name=name, output_spec=output_spec, token=token, max_batch=max_batch, max_body=parse_size(max_body))
        if host not in ("127.0.0.1", "localhost", "::1") and not token:
            err_console.print("[yellow]warning:[/] listening beyond localhost without --token: anyone who can reach it can query the model")
        shown = f"[{host}]" if ":" in host else host
        console.print(
            f"serving {model} as '{name}' ({holder.classes} classes, input {list(holder.input_shape)}, output spec {output_spec}) "
            f"at http://{shown}:{port}/v2/models/{name}/infer{' (token required)' if token else ''}",
            highlight=False,
        )
        import uvicorn

        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", lifespan="off")).run()


# --------------------------------------------------------------------------- history


def history_cmd(
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Only runs whose target contains this text."),
    verdict: Optional[str] = typer.Option(None, "--verdict", help="Only INTACT, TAMPERED or INCONCLUSIVE runs."),
    fingerprint: Optional[str] = typer.Option(None, "--fingerprint", help="Only runs of fingerprints whose id starts with this."),
    since: Optional[str] = typer.Option(None, "--since", help="Only runs since an ISO time or a duration ago (24h, 7d)."),
    limit: int = typer.Option(50, "--limit", help="At most this many runs, newest first."),
    run: Optional[int] = typer.Option(None, "--run", help="Show the markers of this run instead."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    history_path: Optional[Path] = typer.Option(None, "--history", help="SQLite history file (default: user data dir or $TAMPERPROBE_HISTORY)."),
) -> None:
    """List past verifications recorded by verify and watch."""
    with handled():
        from rich.table import Table

        from ..served import history

        if verdict and verdict.upper() not in ("INTACT", "TAMPERED", "INCONCLUSIVE"):
            fail(f"bad --verdict {verdict!r}: INTACT, TAMPERED or INCONCLUSIVE")
        if run is not None:
            rows = history.markers(run, path=history_path)
            if not rows:
                fail(f"no run {run} in the history")
            if as_json:
                console.print_json(json.dumps(rows))
                return
            table = Table(title=f"run {run}")
            for col in ("#", "status", "expected", "observed", "latency", "detail"):
                table.add_column(col)
            for r in rows:
                style = {"match": "green", "MISMATCH": "red"}.get(r["status"], "yellow")
                lat = "-" if r["latency"] is None else f"{r['latency'] * 1000:.0f} ms"
                table.add_row(str(r["index"]), f"[{style}]{r['status']}[/]", r["expected"] or "", r["observed"] or "-", lat, r["detail"] or "")
            console.print(table)
            return
        rows = history.runs(history_path, target=endpoint, verdict=verdict, fingerprint=fingerprint, since=since, limit=limit)
        if as_json:
            console.print_json(json.dumps(rows))
            return
        if not rows:
            console.print("no runs recorded" + (" match these filters" if any((endpoint, verdict, fingerprint, since)) else ""))
            return
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
            colour = {"INTACT": "green", "TAMPERED": "red"}.get(r["verdict"], "yellow")
            target = re.sub(r"^(\w+):https?://", r"\1:", r["target"])
            table.add_row(
                str(r["id"]),
                r["time"][5:19].replace("T", " "),
                f"[{colour}]{r['verdict']}[/]",
                f"{r['mismatched']}/{r['markers']}",
                str(r["failed"]),
                r["output_spec"],
                r["fingerprint"][:8],
                target,
            )
        console.print(table)


# --------------------------------------------------------------------------- watch


def run_hook(command: str, env_vars: dict[str, str], timeout: float = 60.0) -> str | None:
    """Run the hook through the shell with ``env_vars`` added; None on success, else a one-line problem."""
    import os
    import subprocess

    try:
        proc = subprocess.run(command, shell=True, env={**os.environ, **env_vars}, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"hook timed out after {timeout:g} s"
    except OSError as exc:
        return f"hook could not start: {exc}"
    return None if proc.returncode == 0 else f"hook exited with status {proc.returncode}"


def watch_cmd(
    fp_path: Path = typer.Argument(..., metavar="FP", help="Fingerprint file."),
    endpoint: str = typer.Option(..., "--endpoint", help="URL of the served model."),
    protocol: str = typer.Option("kserve", "--protocol", help="API dialect: kserve|torchserve|tfserving|json."),
    every: str = typer.Option("10m", "--every", help="Interval between runs: 30s, 10m, 1h, 1h30m."),
    count: int = typer.Option(0, "--count", help="Stop after this many runs (0: forever)."),
    output_spec: Optional[str] = typer.Option(None, "--output-spec", help="What the API reveals (default: the fingerprint's)."),
    hook: Optional[str] = typer.Option(None, "--hook", help="Shell command run on TAMPERED and when INCONCLUSIVE starts (env TAMPERPROBE_*)."),
    max_inconclusive: int = typer.Option(0, "--max-inconclusive", help="Exit 2 after this many INCONCLUSIVE runs in a row (0: never)."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Model name on the server."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="Override the fingerprint's tolerance."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N markers."),
    header: Optional[List[str]] = typer.Option(None, "--header", help="Extra HTTP header K:V (repeatable)."),
    token_env: Optional[str] = typer.Option(None, "--token-env", help="Environment variable holding a bearer token."),
    timeout: float = typer.Option(10.0, "--timeout", help="Connect/read timeout per request, seconds."),
    retries: int = typer.Option(3, "--retries", help="Retries on connection errors, 5xx and 429."),
    batch_size: int = typer.Option(1, "--batch-size", help="Markers per request."),
    delay: float = typer.Option(0.0, "--delay", help="Random delay up to this many seconds between requests."),
    insecure: bool = typer.Option(False, "--insecure", help="Do not verify TLS certificates."),
    template: Optional[Path] = typer.Option(None, "--template", help="Request/response template for --protocol json."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the request order (default: a fresh order each run)."),
    history_path: Optional[Path] = typer.Option(None, "--history", help="SQLite history file."),
    no_history: bool = typer.Option(False, "--no-history", help="Do not record the runs."),
) -> None:
    """Re-verify an endpoint on a schedule. Exit 1 on the first TAMPERED; INCONCLUSIVE keeps watching (see --max-inconclusive)."""
    with handled():
        import time
        from datetime import datetime

        from ..fingerprint import load
        from ..served.verify import INCONCLUSIVE, INTACT, TAMPERED, verify

        interval = parse_duration(every)
        if count < 0 or max_inconclusive < 0:
            fail("--count and --max-inconclusive must be >= 0")
        fp = load(fp_path)
        target = endpoint_options_to_target(
            endpoint,
            protocol,
            fp=fp,
            model_name=model_name,
            header=header,
            token_env=token_env,
            timeout=timeout,
            retries=retries,
            batch_size=batch_size,
            delay=delay,
            insecure=insecure,
            template=template,
            seed=seed,
        )
        from ..served.clients import protocol_name

        proto = protocol_name(protocol)
        runs_done, streak, last = 0, 0, None
        next_start = time.monotonic()
        while True:
            pause = next_start - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            next_start = max(next_start + interval, time.monotonic())
            report = verify(fp, target, output_spec, tolerance=tolerance, limit=limit)
            runs_done += 1
            run_id = None
            if not no_history:
                from ..served import history

                run_id = history.record(report, protocol=proto, path=history_path)
            now = datetime.now(UTC).isoformat(timespec="seconds")
            colour = {INTACT: "green", TAMPERED: "bold red"}.get(report.verdict, "yellow")
            console.print(
                f"{now}  [{colour}]{report.summary()}[/]  ({report.seconds:.2f} s){'' if run_id is None else f'  run {run_id}'}", highlight=False
            )
            streak = streak + 1 if report.verdict == INCONCLUSIVE else 0
            if hook and (report.verdict == TAMPERED or (report.verdict == INCONCLUSIVE and streak == 1)):
                problem = run_hook(
                    hook,
                    {
                        "TAMPERPROBE_VERDICT": report.verdict,
                        "TAMPERPROBE_SUMMARY": report.summary(),
                        "TAMPERPROBE_ENDPOINT": endpoint,
                        "TAMPERPROBE_PROTOCOL": proto,
                        "TAMPERPROBE_FINGERPRINT": report.fingerprint_id,
                        "TAMPERPROBE_FINGERPRINT_FILE": str(fp_path),
                        "TAMPERPROBE_MARKERS": str(len(report.markers)),
                        "TAMPERPROBE_MISMATCHED": str(report.mismatched),
                        "TAMPERPROBE_FAILED": str(report.failed),
                        "TAMPERPROBE_RUN_ID": "" if run_id is None else str(run_id),
                        "TAMPERPROBE_RUN": str(runs_done),
                        "TAMPERPROBE_TIME": now,
                    },
                )
                if problem:
                    err_console.print(f"[yellow]warning:[/] {problem}", highlight=False)
            last = report.verdict
            if report.verdict == TAMPERED:
                raise typer.Exit(1)
            if report.verdict == INCONCLUSIVE:
                err_console.print("[yellow]warning:[/] no usable answer from the endpoint; still watching", highlight=False)
                if max_inconclusive and streak >= max_inconclusive:
                    fail(f"{streak} INCONCLUSIVE runs in a row", 2)
            if count and runs_done >= count:
                raise typer.Exit(0 if last == INTACT else 2)


def register(app: typer.Typer) -> None:
    app.command()(verify)
    app.command("serve")(serve_cmd)
    app.command("history")(history_cmd)
    app.command("watch")(watch_cmd)
