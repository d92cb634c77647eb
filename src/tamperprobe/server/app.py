"""Serve a classifier over the Open Inference Protocol (KServe v2 REST, as Triton and MLServer speak it).

Endpoints
---------

==========================================  ==================================================
``GET  /v2/health/live``                    200 ``{"live": true}``       (always open)
``GET  /v2/health/ready``                   200 ``{"ready": true}``      (always open)
``GET  /v2``                                server metadata: name, version, extensions
``POST /v2/repository/index``               ``[{"name", "version", "state"[, "reason"]}]``
``POST /v2/repository/models/{name}/load``  load a repository's model now (``{}``)
``POST /v2/repository/models/{name}/unload``  unload it (it loads again on next use)
``GET  /v2/models/{name}[/versions/1]``     model metadata: name, versions, platform, inputs, outputs
``GET  /v2/models/{name}[/versions/1]/ready``  200 ``{"name", "ready": true}``
``POST /v2/models/{name}[/versions/1]/infer``  inference
==========================================  ==================================================

One model, or every model of a model repository (``repository.py``: ``DIR/<name>/model.*`` and
an optional ``config.toml``), each under its own name, loaded on first use (a model's metadata,
readiness or inference request loads it; 503 with the reason if it cannot load).

With a token (``--token-env`` / ``--token-file``), every path except ``/v2/health/*`` needs
``Authorization: Bearer <token>`` and answers 401 otherwise, checked before routing
(``guard.TokenGuard``): liveness and readiness probes of an orchestrator carry no credentials,
and they reveal nothing about the model. Paths are matched exactly: there is no trailing-slash
redirect (which would echo the Host header), a path with a trailing slash is a 404.

The request and its checks are ``infer.py``'s; the tensors, output names and the
classification extension ``tamperprobe.oip``'s (clients rely on them); the served model and
its input spec ``holder.py``'s; connection limits, timeouts and the token check ``guard.py``'s.
An inference request's body is read first (``max_body`` bytes at most, within ``body_timeout``;
the bytes of all bodies held at once are bounded by ``guard.BodyBudget``, 503 beyond), so that a
client sending its body slowly or never holds no slot; then the request waits for one of
``max_concurrent`` slots (503 with Retry-After after ``queue_timeout``) and everything else runs
off the event loop: a body of ``LARGE_BODY`` bytes or more is parsed in a parser process (one
``json.loads`` of megabytes holds the interpreter for hundreds of milliseconds, which no thread
could hide from the event loop and its health probes), a smaller one on the worker threads, where
the model runs and the response is written too.

Errors are ``{"error": "..."}``: 400 for bad input (malformed JSON, wrong datatype, shape
not matching the model's input, batch above the cap, NaN/inf, unknown output, bad
classification, an output named twice, a response over ``Limits.max_response``, a request head
over ``Limits.max_header_bytes``, a chunked body of too many chunks), 401 without the token, 404
for an unknown model, version or path, 408 for a body not sent within ``body_timeout``, 413 for a
body above the cap (by Content-Length or by actual size), 503 when busy, 500 if the model
itself fails. Bad input never takes the server down. An error answered before the body was read
closes the connection with a lingering close (``guard.py``), so a client still sending reads it.

``serve`` runs the server until interrupted (the ``serve`` command), optionally with TLS
(``tls_cert``/``tls_key``); ``ServerThread`` runs it on 127.0.0.1 in a background thread
(tests, the demo).
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from typing import Any

import numpy as np
from fastapi import Request  # resolved at module level: the route annotations below refer to it
from starlette.requests import ClientDisconnect

from .. import oip
from .._util import one_line
from ..data import InputSpec
from ..errors import ModelLoadError, TamperprobeError, UsageError
from ..fingerprint import Fingerprint
from ..models import Model
from ..outputs import OutputSpec
from .guard import BodyBudget, Limits, TokenGuard, protocol_class, raise_fd_limit, tls_context
from .holder import ModelHolder, Shape, make_holder, platform
from .infer import INPUT_NAME, BadRequest, build_response, decode_inputs, parse_compact, parse_infer_request
from .repository import Repository, Served, Single, rss_mib, served

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_BODY = 8 << 20  # bytes
LARGE_BODY = 1 << 20  # bodies from this size on are parsed in the parser process
VERSION = "1"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_CLOSE = {"Connection": "close"}


def create_app(
    holder: ModelHolder | None = None,
    *,
    name: str = "model",
    output_spec: str | OutputSpec = "logits",
    token: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body: int = DEFAULT_MAX_BODY,
    limits: Limits | None = None,
    catalog: Single | Repository | None = None,
) -> Any:
    """The ASGI application serving ``holder`` under model name ``name``, or every model of ``catalog``.

    ``app.state.executor`` holds the worker threads once the first request came, ``app.state.parser`` the
    parser process once the first large body came, ``app.state.loader`` the thread that loads a repository's
    models (``shutdown(app)`` stops them).
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    limits = limits or Limits()
    if catalog is None:
        if holder is None:
            raise UsageError("give a model holder or a catalog")
        catalog = Single(served(name, holder, output_spec, max_batch))
    if max_body < 1024:
        raise UsageError("max body must be >= 1024 bytes")
    if token is not None and not token.strip():
        raise UsageError("an empty token protects nothing: give none or a real one")
    app = FastAPI(title="tamperprobe model server", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.state.catalog = catalog
    app.state.executor = app.state.parser = app.state.loader = None
    app.state.limits = limits
    if token is not None:
        app.add_middleware(TokenGuard, token=token.strip())

    def error(message: str, status: int = 400, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    resolve = _add_model_routes(app, catalog, error)

    _add_infer_route(app, resolve, error, limits, max_body)
    return app


def _add_infer_route(app: Any, resolve: Callable[..., Any], error: Callable[..., Any], limits: Limits, max_body: int) -> None:
    """The inference route: the body first (bounded by ``BodyBudget``), then a slot, then the work off the event loop."""
    from fastapi.responses import Response

    slots = asyncio.Semaphore(limits.max_concurrent)
    budget = BodyBudget(limits.max_concurrent * max_body)

    def executor() -> ThreadPoolExecutor:
        if app.state.executor is None:
            app.state.executor = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="tamperprobe-infer")
        return app.state.executor

    def parser() -> ProcessPoolExecutor:
        if app.state.parser is None:
            app.state.parser = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return app.state.parser

    async def process(m: Served, header_length: str | None, body: bytes) -> tuple[bytes, dict[str, str]]:
        """Parse (in the parser process for a large body), decode, run and answer, off the event loop."""
        loop = asyncio.get_running_loop()
        if len(body) >= LARGE_BODY:
            try:
                parsed = await loop.run_in_executor(parser(), parse_compact, body, header_length, m.holder.input_shape, m.max_batch)
            except BrokenProcessPool:
                app.state.parser = None  # a parser that died (killed, out of memory) is started again next time
                raise BadRequest("server busy: the request parser restarted, retry later", 503, {"Retry-After": "1"}) from None
            del body
            job = functools.partial(_run_request, m, None, None, parsed, limits.max_response)
        else:
            job = functools.partial(_run_request, m, body, header_length, None, limits.max_response)
        return await loop.run_in_executor(executor(), job)

    @app.post("/v2/models/{model_name}/infer")
    @app.post("/v2/models/{model_name}/versions/{version}/infer")
    async def infer(request: Request, model_name: str, version: str | None = None):
        m = await resolve(model_name, version)
        held = [0]  # body bytes this request holds in the budget
        acquired = False
        try:
            # no slot is held while a body arrives: slow senders cannot starve real requests
            body = await _read_body(request, held, max_body, budget, limits.body_timeout)
            try:
                async with asyncio.timeout(limits.queue_timeout):
                    await slots.acquire()
                    acquired = True
            except TimeoutError:
                if not acquired:
                    return error("server busy: too many requests in progress, retry later", 503, {"Retry-After": "1"})
            content, headers = await process(m, request.headers.get(oip.HEADER_LENGTH), body)
        finally:
            if acquired:
                slots.release()
            budget.give_back(held)
        return Response(content, media_type="application/octet-stream" if headers else "application/json", headers=headers)


async def _read_body(request: Request, held: list[int], max_body: int, budget: BodyBudget, timeout: float) -> bytes:
    """The whole body, read before the request takes a slot; its bytes count against ``budget`` (``held``) from the first one."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_large = int(declared) > max_body
        except ValueError:
            raise BadRequest("bad Content-Length", 400, _CLOSE) from None
        if too_large:
            raise BadRequest(f"request body of {int(declared)} bytes exceeds the limit of {max_body}", 413, _CLOSE)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):  # the guard closes a slow body's connection too; this ends its task
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise BadRequest(f"request body exceeds the limit of {max_body} bytes", 413, _CLOSE)
                if not budget.take(held, len(chunk)):
                    raise BadRequest("server busy: too many request bodies arriving at once, retry later", 503, {"Retry-After": "1", **_CLOSE})
                chunks.append(chunk)
    except TimeoutError:
        raise BadRequest(f"request body not received within {timeout:g} s", 408, _CLOSE) from None
    except ClientDisconnect:
        raise BadRequest("client disconnected", 400, _CLOSE) from None
    return b"".join(chunks)


def _run_request(
    m: Served, body: bytes | None, header_length: str | None, parsed: tuple[dict, np.ndarray] | None, max_response: int
) -> tuple[bytes, dict[str, str]]:
    """Everything after the body arrived (or was parsed), on a worker thread: decode, run the model, write the response."""
    holder = m.holder
    req, x = parsed if parsed is not None else parse_infer_request(body or b"", header_length, holder.input_shape, m.max_batch)
    x = decode_inputs(holder.input_spec, x)
    model = holder.model  # one snapshot for the whole request
    try:
        logits = model.logits(x)
    except ModelLoadError as exc:
        raise BadRequest(f"model failed: {one_line(exc)}", 500) from None
    if logits.ndim != 2 or logits.shape != (x.shape[0], holder.classes):
        raise BadRequest(f"model returned shape {list(logits.shape)}, expected [{x.shape[0]}, {holder.classes}]", 500)
    if not np.isfinite(logits).all():
        raise BadRequest("model produced NaN or infinite outputs", 500)
    return build_response(req, logits, m.spec, m.name, VERSION, max_response)


def _add_error_handlers(app: Any, error: Callable[..., Any]) -> None:
    """Every error as ``{"error": ...}``: ours (``BadRequest``), the framework's 404/405 and validation errors, and 500."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(BadRequest)
    async def _bad(_request, exc: BadRequest):
        return error(str(exc), exc.status, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc: StarletteHTTPException):
        msg = "not found" if exc.status_code == 404 else str(exc.detail)
        return error(msg, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, exc: RequestValidationError):
        return error(f"invalid request: {exc.errors()[:1]}", 400)

    @app.exception_handler(Exception)
    async def _internal(_request, exc: Exception):
        return error(f"internal error: {type(exc).__name__}", 500)


def _add_model_routes(app: Any, catalog: Single | Repository, error: Callable[..., Any]) -> Callable[..., Any]:
    """The error handlers and every route but inference; returns ``resolve(name, version)``, the served model of a request
    (loaded on a loader thread if needed: 404 for an unknown name or version, 503 for a model that fails to load)."""
    from .. import __version__

    _add_error_handlers(app, error)

    async def load(model_name: str, action: Callable[[str], Any]) -> Any:
        if app.state.loader is None:
            app.state.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tamperprobe-load")
        try:
            return await asyncio.get_running_loop().run_in_executor(app.state.loader, action, model_name)
        except KeyError:
            raise BadRequest(f"unknown model {model_name!r}", 404) from None
        except TamperprobeError as exc:
            raise BadRequest(one_line(exc), 503) from None

    async def resolve(model_name: str, version: str | None = None) -> Served:
        if version not in (None, "", VERSION):
            raise BadRequest(f"unknown version {version!r} of model {model_name!r}", 404)
        return catalog.loaded(model_name) or await load(model_name, catalog.get)

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": True}

    @app.get("/v2")
    async def server_metadata():
        return {"name": "tamperprobe", "version": __version__, "extensions": ["classification", "binary_tensor_data", "model_repository"]}

    @app.post("/v2/repository/index")
    async def repository_index():
        out = []
        for n in catalog.names():
            state, reason = catalog.state(n)
            out.append({"name": n, "version": VERSION, "state": state, **({"reason": reason} if reason else {})})
        return out

    @app.post("/v2/repository/models/{model_name}/load")
    async def repository_load(model_name: str):
        await load(model_name, catalog.load)
        return {}

    @app.post("/v2/repository/models/{model_name}/unload")
    async def repository_unload(model_name: str):
        await load(model_name, catalog.unload)
        return {}

    @app.get("/v2/models/{model_name}")
    @app.get("/v2/models/{model_name}/versions/{version}")
    async def model_metadata(model_name: str, version: str | None = None):
        m = await resolve(model_name, version)
        h = m.holder
        return {
            "name": m.name,
            "versions": [VERSION],
            "platform": platform(h.model),
            "inputs": [{"name": INPUT_NAME, "datatype": oip.datatype_of(h.input_spec.dtype), "shape": [-1, *h.input_shape]}],
            "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in oip.output_layout(m.spec, h.classes)],
        }

    @app.get("/v2/models/{model_name}/ready")
    @app.get("/v2/models/{model_name}/versions/{version}/ready")
    async def model_ready(model_name: str, version: str | None = None):
        m = await resolve(model_name, version)
        return {"name": m.name, "ready": True}

    return resolve


def shutdown(app: Any) -> None:
    """Stop the worker threads, the parser process and the loader thread of an application made by ``create_app``."""
    for attr in ("executor", "parser", "loader"):
        pool = getattr(app.state, attr, None)
        setattr(app.state, attr, None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- running it


def parse_size(text: str | int) -> int:
    """``8MiB``, ``512KiB``, ``1MB``, ``1000000`` -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*", str(text).lower())
    if not m:
        raise UsageError(f"bad size {text!r}: use e.g. 8MiB, 512KiB or a number of bytes")
    unit = (m.group(2) or "b").rstrip("b") or ""
    mult = {"": 1, "k": 1000, "ki": 1024, "m": 1000**2, "mi": 1024**2, "g": 1000**3, "gi": 1024**3}[unit]
    return int(float(m.group(1)) * mult)


def _uvicorn_config(app: Any, limits: Limits, *, log_level: str, tls: ssl.SSLContext | None, **kw: Any) -> Any:
    """uvicorn's configuration with the hardening of ``guard.py`` (protocol, timeouts, header cap); TLS is the guard's
    protocol's, not uvicorn's (``guard.protocol_class``: connections are counted and timed from accept)."""
    import uvicorn

    return uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="off",
        http=protocol_class(limits, tls),
        timeout_keep_alive=limits.idle_timeout,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=5,
        backlog=limits.backlog,
        **kw,
    )


def serve(
    model: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    name: str = "model",
    output_spec: str | OutputSpec = "logits",
    token: str | None = None,
    weights: str | os.PathLike | None = None,
    input_spec: InputSpec | None = None,
    input_shape: Shape | None = None,
    fingerprint: Fingerprint | str | os.PathLike | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body: int | str = DEFAULT_MAX_BODY,
    limits: Limits | None = None,
    tls_cert: str | os.PathLike | None = None,
    tls_key: str | os.PathLike | None = None,
    log_level: str = "info",
    on_ready: Callable[[str], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    model_repository: str | os.PathLike | None = None,
    eager: bool = False,
    on_event: Callable[[str], None] | None = None,
) -> None:
    """Serve ``model`` (or every model of ``model_repository``) on ``host:port`` until interrupted (blocking).
    See the module doc for the protocol, ``repository.py`` for a repository.

    ``model`` is anything ``holder.make_holder`` takes; ``max_body`` a number of bytes or a size
    such as ``8MiB``; ``limits`` the connection and work limits (``guard.Limits``). Before
    listening, ``on_warning`` hears about a server reachable beyond localhost without a token or
    without TLS, and about a connection cap lowered to fit the open-file limit; ``on_ready`` gets a
    line naming the model(s), the URL and the resident memory. With a repository, ``output_spec``,
    ``input_shape`` and ``max_batch`` are the defaults of models whose config.toml leaves them out,
    its models load on first use unless ``eager``, and ``on_event`` hears one line per load.
    """
    import uvicorn  # noqa: F401 - first: a missing server extra is reported before any work

    from ._stopping import PromptServer

    warn = on_warning or (lambda _text: None)
    if not 0 <= port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    limits = limits or Limits()
    tls = tls_context(tls_cert, tls_key)
    catalog = _catalog(model, model_repository, eager, on_event, weights, input_spec, input_shape, fingerprint, output_spec, name, max_batch)
    reserve = limits.backlog + 64  # a burst of accepts, the listening socket, logs, worker pipes
    fds = raise_fd_limit(limits.max_connections + reserve + 64)
    if fds < limits.max_connections + reserve:
        limits = replace(limits, max_connections=max(16, fds - reserve))
        warn(f"the open-file limit is {fds}: at most {limits.max_connections} connections (raise it with ulimit -n)")
    app = create_app(catalog=catalog, token=token, max_body=parse_size(max_body), limits=limits)
    if host not in LOCAL_HOSTS:
        if not token:
            warn("listening beyond localhost without a token: anyone who can reach it can query the model")
        if tls is None:
            warn("listening beyond localhost without TLS: requests, answers and the token travel unencrypted (--tls-cert/--tls-key)")
    scheme = "https" if tls else "http"
    if on_ready is not None:
        shown = f"[{host}]" if ":" in host else host
        rss = rss_mib()
        memory = f", RSS {rss:.0f} MiB" if rss is not None else ""
        if isinstance(catalog, Single):
            m = catalog.model
            what = f"{m.holder.model.source} as '{m.name}' ({m.holder.classes} classes, input {list(m.holder.input_shape)}, output spec {m.spec}{memory})"
            where = f"/v2/models/{m.name}/infer"
        else:
            loaded = sum(catalog.loaded(n) is not None for n in catalog.names())
            what = f"{len(catalog.names())} models from {catalog.root} ({loaded} loaded{'' if eager else ', the others on first use'}{memory})"
            where = "/v2/models/<name>/infer"
        on_ready(f"serving {what} at {scheme}://{shown}:{port}{where}{' (token required)' if token else ''}")
    try:
        PromptServer(_uvicorn_config(app, limits, host=host, port=port, log_level=log_level, tls=tls)).run()
    finally:
        shutdown(app)


def _catalog(
    model: Any,
    repo: Any,
    eager: bool,
    on_event: Any,
    weights: Any,
    input_spec: Any,
    input_shape: Any,
    fingerprint: Any,
    spec: Any,
    name: str,
    batch: int,
) -> Single | Repository:
    if repo is None:
        if model is None:
            raise UsageError("give a model to serve, or --model-repository DIR")
        holder = make_holder(model, weights=weights, input_spec=input_spec, input_shape=input_shape, fingerprint=fingerprint)
        return Single(served(name, holder, spec, batch))
    if model is not None or weights is not None or fingerprint is not None or input_spec is not None:
        raise UsageError("a model repository takes no model argument, weights or fingerprint: each model is DIR/<name>/model.pt|pt2|onnx")
    catalog = Repository(repo, output_spec=spec, input_shape=input_shape, max_batch=batch, on_event=on_event)
    if eager:
        catalog.load_all()
    return catalog


class ServerThread:
    """Run the model server on 127.0.0.1 in a background thread (tests, the demo).

    ``with ServerThread(model, input_shape=(1, 8, 8)) as srv: ... srv.url ... srv.holder.swap(m2)``.
    ``model`` is anything ``holder.make_holder`` takes (a path, a ``Model``, a ``ModelHolder``), or None
    with ``model_repository`` (a folder of models, ``repository.py``);
    ``port=0`` picks a free port; ``tls_cert``/``tls_key`` serve HTTPS.
    """

    def __init__(
        self,
        model: Any,
        *,
        name: str = "model",
        output_spec: str | OutputSpec = "logits",
        token: str | None = None,
        input_spec: InputSpec | None = None,
        input_shape: Shape | None = None,
        fingerprint: Fingerprint | str | os.PathLike | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_body: int = DEFAULT_MAX_BODY,
        limits: Limits | None = None,
        tls_cert: str | os.PathLike | None = None,
        tls_key: str | os.PathLike | None = None,
        log_level: str = "warning",
        start_timeout: float = 20.0,
        model_repository: str | os.PathLike | None = None,
        eager: bool = False,
    ) -> None:
        catalog = _catalog(model, model_repository, eager, None, None, input_spec, input_shape, fingerprint, output_spec, name, max_batch)
        self.catalog = catalog
        self.holder: Any = catalog.model.holder if isinstance(catalog, Single) else None  # one model's holder (None for a repository)
        self.name = name
        self.limits = limits or Limits()
        self.app = create_app(catalog=catalog, token=token, max_body=max_body, limits=self.limits)
        self.host = host
        self._tls = tls_context(tls_cert, tls_key)
        self._port = port
        self._log_level = log_level
        self._start_timeout = start_timeout
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._bound_port: int | None = None

    @property
    def port(self) -> int:
        if self._bound_port is None:
            raise RuntimeError("server not started")
        return self._bound_port

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://{self.host}:{self.port}"

    def swap(self, model: Model) -> Model:
        return self.holder.swap(model)

    def open_connections(self) -> int:
        """Connections the server holds now, TLS handshakes included: what ``Limits.max_connections`` bounds."""
        return len(self._server.config.http.live) if self._server is not None else 0

    def start(self) -> ServerThread:
        from ._stopping import PromptServer

        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so (else ~40 ms per request)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self.host, self._port))
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot listen on {self.host}:{self._port}: {exc.strerror or exc}") from None
        sock.listen(self.limits.backlog)
        self._sock = sock
        self._bound_port = int(sock.getsockname()[1])
        config = _uvicorn_config(self.app, self.limits, log_level=self._log_level, tls=self._tls, access_log=False)
        server = self._server = PromptServer(config)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="tamperprobe-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the model server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.request_exit()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None  # .url stays readable: a stopped server's URL refuses connections
        shutdown(self.app)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_BODY", "Limits", "ServerThread", "create_app", "parse_size", "serve", "shutdown"]
