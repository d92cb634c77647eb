"""The HTTP transport every endpoint client shares: ``HTTPTarget``.

An ``HTTPTarget`` implements the ``Target`` protocol, so ``verify`` treats a served model like a
local one. On each ``query`` it sends one marker per request in a shuffled order (paced by ``delay``
and ``spread``; ``planned_pauses`` says what that adds), each request exactly as an ordinary client
sends it (``profile``, ``profiles.py``; default python-requests' ``requests.post(url, json=body)``:
that client's headers in its order, its JSON format, its connection reuse, no request id), with the
configured headers, bearer token (``credentials.read_token``) and verified TLS, never following
redirects; ``timeout`` bounds each attempt as a whole, ``deadline`` the whole query (retries,
backoff and Retry-After waits included), and a body is cut off beyond ``max_response_bytes``. URLs are shown through
``credentials.redact_url`` and server text is made inert by ``untrusted.clean``.

Nothing raises out of ``query``: each marker gets an ``Answer`` or a ``QueryFailure`` whose reason
names what went wrong (``connection refused``, ``timed out after T s``, ``deadline of D s reached``,
``HTTP 500: ...``, ``malformed response: ...`` and the others listed in ``docs/design/http-client.md``);
``verify`` turns any of them into INCONCLUSIVE. How a response becomes an answer is ``answers.py``'s.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import numpy as np

from ..._util import one_line
from ...data import InputSpec
from ...errors import UsageError
from ...outputs import Answer, OutputSpec
from ..credentials import Masker, read_token, redact_url
from ..targets import QueryFailure, QueryResult
from ..untrusted import clean
from ._setup import DEFAULT_DEADLINE, DEFAULT_MAX_RESPONSE, Connection, Pacing, RetryPolicy, check_url, client_credentials, parse_headers, split_url
from .answers import Failure, check_answer
from .profiles import Profile, load_profile

__all__ = ["DEFAULT_DEADLINE", "DEFAULT_MAX_RESPONSE", "HTTPResponse", "HTTPTarget", "check_url", "nested", "parse_headers", "redact_url"]


def human_size(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10} KiB"
    return f"{n} bytes"


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) in seconds from now; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if not math.isnan(seconds) else None


def nested(x: np.ndarray) -> list:
    """Inputs as nested JSON lists of exact values: integers for an integer array, else float64 of the (float32) values."""
    arr = np.asarray(x)
    return arr.astype(np.int64 if arr.dtype.kind in "iu" else np.float64).tolist()


@dataclass
class HTTPResponse:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except RecursionError:
            raise Failure("malformed response: JSON nested too deeply") from None
        except (ValueError, UnicodeDecodeError):
            ctype = self.headers.get("content-type", "?") if self.headers is not None else "?"
            raise Failure(f"malformed response: not JSON ({clean(ctype, 60)}): '{clean(self.body.decode(errors='replace'), 80)}'") from None


def _setting(group: str, name: str) -> Any:
    """A read-only attribute that is field ``name`` of the settings object ``group``."""
    return property(lambda self: getattr(getattr(self, group), name), doc=f"``{group}.{name}``")


class HTTPTarget:
    """Base of the endpoint clients: HTTP with retries, limits and a deadline, marker scheduling, failure capture.

    A dialect sets ``protocol``, ``summary`` (for ``--protocol``'s help) and maybe ``aliases``,
    implements ``_query_batch(x, spec) -> list[Answer | QueryFailure]`` (raising ``Failure`` for
    the whole batch), and may override ``_prepare(spec, x)`` (run once per query before the
    markers, e.g. to read metadata) and ``endpoint_url()``. Requests go through ``request``,
    which adds the URL's query string, retries, and keeps every attempt inside the deadline.
    """

    protocol: ClassVar[str] = "http"
    summary: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    takes_template: ClassVar[bool] = False  # True: the dialect is described by a --template
    max_batch: ClassVar[int | None] = None  # None: any batch size; 1: the dialect takes one input per request
    # A model URL of the dialect, as a regex with groups (base URL, model name, version or None):
    # such an endpoint sets the model name and version unless --model-name is given.
    model_url_pattern: ClassVar[str | None] = None
    default_model_name: ClassVar[str | None] = None
    suspect: ClassVar[bool] = True  # the party under suspicion: a session draws it fresh markers (targets.Target)

    def __init__(
        self,
        url: str,
        *,
        model_name: str | None = None,
        headers: Mapping[str, str] | Iterable[str] | None = None,
        token_env: str | None = None,
        token_file: str | os.PathLike | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.2,
        batch_size: int = 1,
        delay: float = 0.0,
        spread: float = 0.0,
        shuffle: bool = True,
        seed: int | None = None,
        verify_tls: bool = True,
        ca_file: str | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE,
        input_spec: InputSpec | None = None,
        classes: int | None = None,
        max_retry_after: float = 10.0,
        deadline: float | None = DEFAULT_DEADLINE,
        profile: str | os.PathLike | Mapping[str, Any] | Profile | None = None,
        transport: Any = None,
    ) -> None:
        import httpx

        from ._transport import BoundedTransport, Clock, tls_context

        raw_url = check_url(url)
        base, self._query_string, auth = split_url(raw_url)
        self.version: str | None = None
        if self.model_url_pattern:
            m = re.match(self.model_url_pattern, base)
            if m:
                base, self.version = m.group(1), m.group(3)
                model_name = model_name or unquote(m.group(2))
            base = base.rstrip("/")
        self.url = check_url(base)
        self.model_name = model_name or self.default_model_name
        no_deadline = deadline is None or (isinstance(deadline, float | int) and math.isinf(deadline))
        self.retry_policy = RetryPolicy(timeout, retries, backoff, max_retry_after, None if no_deadline else deadline)
        self.pacing = Pacing(batch_size, delay, spread, shuffle)
        self.connection = Connection(verify_tls, ca_file, max_response_bytes)
        self.seed = seed
        self.input_spec = input_spec  # the fingerprint's: markers are sent as they are stored (8-bit ones as integers)
        self.classes = classes
        self.profile = load_profile(profile)
        if self.profile.protocols is not None and self.protocol not in self.profile.protocols:
            raise UsageError(f"client profile {self.profile.name} speaks --protocol {' or '.join(self.profile.protocols)} only")
        self._extra, self._basic, secrets = client_credentials(raw_url, auth, headers, read_token(token_env, token_file))
        self._mask = Masker(secrets)
        self._clock = Clock()
        # Redirects are never followed, so a plain-http endpoint never needs TLS: skip loading the CA bundle.
        https = urlsplit(self.url).scheme == "https"
        if transport is None:
            transport = BoundedTransport(
                self._clock, tls_context(verify_tls, ca_file, self.profile.tls) if https else None, keep_alive=self.profile.keep_alive
            )
        # the request's headers are the profile's, set in _send_once; the client adds none of its own (no cookies, no auth)
        self._client = httpx.Client(follow_redirects=False, transport=transport, timeout=httpx.Timeout(self.timeout), trust_env=False)
        self._transport = transport  # requests go to it directly: no redirects, cookies, auth or proxies to apply on the way
        self._unreachable = False
        self._reached = False  # some attempt of the current query got past connecting (its bytes may have reached the server)
        self._set_name()

    # what the client runs on, read from its settings objects (one copy of each value)
    timeout = _setting("retry_policy", "timeout")
    retries = _setting("retry_policy", "retries")
    backoff = _setting("retry_policy", "backoff")
    max_retry_after = _setting("retry_policy", "max_retry_after")
    deadline = _setting("retry_policy", "deadline")
    delay = _setting("pacing", "delay")
    spread = _setting("pacing", "spread")
    shuffle = _setting("pacing", "shuffle")
    verify_tls = _setting("connection", "verify_tls")
    max_response_bytes = _setting("connection", "max_response_bytes")

    @property
    def batch_size(self) -> int:
        """Inputs per request: the pacing's, at most what the dialect takes (``max_batch``)."""
        return self.pacing.batch_size if self.max_batch is None else min(self.pacing.batch_size, self.max_batch)

    def endpoint_url(self) -> str:
        """The URL that names this client in reports and history (subclasses: the model's URL), without secrets."""
        return self.url

    def _set_name(self, url: str | None = None) -> None:
        """``self.name``: the protocol and ``url`` (default ``endpoint_url()``), redacted (a query string shows as ``?key=***``)."""
        url = (url or self.endpoint_url()) + (f"?{self._query_string}" if self._query_string else "")
        self.name = f"{self.protocol}:{redact_url(url)}"

    def requests_for(self, n: int) -> int:
        """How many requests ``n`` inputs take (``batch_size`` per request)."""
        return -(-int(n) // self.batch_size)

    def planned_pauses(self, n: int) -> float:
        """Seconds of deliberate pauses in a query of ``n`` inputs, at most: the spread plus a delay between requests."""
        return self.spread + self.delay * max(0, self.requests_for(n) - 1)

    def pauses(self, n: int) -> float:
        """``planned_pauses``, under the name the ``Target`` protocol declares."""
        return self.planned_pauses(n)

    def weights_digest(self) -> str | None:
        """An endpoint cannot show its weights."""
        return None

    # ------------------------------------------------------------------ Target protocol

    def query(self, inputs: np.ndarray, spec: OutputSpec) -> QueryResult:
        try:
            spec = OutputSpec.parse(spec)
            x = np.asarray(inputs)
        except Exception as exc:  # noqa: BLE001 - query never raises
            return QueryResult.failed(len(inputs), self._reason(f"bad query: {one_line(exc)}"), sent=False)
        self._unreachable = self._reached = False
        self._clock.run_end = time.monotonic() + self.deadline if self.deadline is not None else math.inf
        try:
            result = self._query(x, spec)
            # nothing reached the server only when every attempt failed before a connection was made
            return result if self._reached else QueryResult(result.answers, result.latencies, sent=False)
        finally:
            self._clock.run_end = math.inf

    def _query(self, x: np.ndarray, spec: OutputSpec) -> QueryResult:
        n = len(x)
        rng = np.random.default_rng(self.seed)
        try:
            self._prepare(spec, x)
        except Exception as exc:  # noqa: BLE001 - query never raises
            return QueryResult.failed(n, self._reason(exc))
        results: list[Answer | QueryFailure] = [QueryFailure("no answer returned")] * n
        latencies: list[float | None] = [None] * n
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        begin = time.monotonic()
        slots = np.sort(rng.uniform(0.0, self.spread, self.requests_for(n))) if self.spread > 0 else None
        for b, start in enumerate(range(0, n, self.batch_size)):
            idx = order[start : start + self.batch_size]
            wait = self.delay if b else 0.0
            if slots is not None:
                wait = max(wait, begin + float(slots[b]) - time.monotonic())
            if wait > 0:  # bounded by the deadline: a request past it fails as "deadline reached"
                time.sleep(max(0.0, min(wait, self._clock.run_left())))
            t0 = time.monotonic()
            answers: list[Answer | QueryFailure]
            try:
                answers = list(self._query_batch(x[idx], spec))
                if len(answers) != len(idx):
                    raise Failure(f"malformed response: {len(answers)} answers for {len(idx)} inputs")
            except Exception as exc:  # noqa: BLE001 - query never raises
                answers = [QueryFailure(self._reason(exc))] * len(idx)
            dt = time.monotonic() - t0
            for i, a in zip(idx, answers):
                if isinstance(a, Answer):
                    try:
                        a = check_answer(a, spec, self.classes)
                    except Failure as f:
                        a = QueryFailure(self._reason(f))
                elif isinstance(a, QueryFailure):
                    a = QueryFailure(self._reason(a.reason))
                results[int(i)] = a
                latencies[int(i)] = dt
        return QueryResult.of(results, latencies)

    def _reason(self, exc: BaseException | str) -> str:
        """The failure reason for ``exc`` (a text, a Failure, or a client bug, which reads as a client error),
        with the client's secrets hidden and made inert (``untrusted.clean``): the one exit of every reason."""
        if isinstance(exc, str):
            text = exc
        elif isinstance(exc, Failure):
            text = exc.reason
        else:
            text = f"client error: {one_line(exc, 120, with_type=True)}"
        return clean(self._mask(text), 400)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HTTPTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ hooks

    def _prepare(self, spec: OutputSpec, x: np.ndarray) -> None:
        """Run once per query before any marker (metadata look-ups); raise Failure to fail all markers."""

    def _query_batch(self, x: np.ndarray, spec: OutputSpec) -> list[Answer | QueryFailure]:
        raise NotImplementedError

    # ------------------------------------------------------------------ HTTP with retries, inside the deadline

    def _deadline_reached(self, last: str | None = None, *, retry: bool = False) -> Failure:
        """The failure of a request stopped by the run's deadline (``retry``: a retry would end after it)."""
        text = f"no time for a retry before the deadline of {self.deadline:g} s" if retry else f"deadline of {self.deadline:g} s reached"
        return Failure(f"{text} (last error: {last})" if last else text)

    def request(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        header_length: int | None = None,
        ok_statuses: tuple[int, ...] = (),
    ) -> HTTPResponse:
        """Send with retries; return a 2xx response (or one in ``ok_statuses``); raise Failure otherwise.

        The body is ``json_body`` written as the profile's client writes JSON, or ``content``
        (``header_length``: the JSON part of a binary-extension body); the headers are the profile's.
        """
        import httpx

        if json_body is not None:
            try:
                content = self.profile.dumps(json_body)
            except ValueError:
                raise Failure("cannot send NaN or infinite inputs as JSON") from None
        headers = self._headers(url, content, header_length)
        if self._query_string:
            url += ("&" if "?" in url else "?") + self._query_string
        attempts = 1 if self._unreachable else self.retries + 1
        reason, made = "no attempt made", 0
        unreachable = False
        for attempt in range(attempts):
            if self._clock.run_left() <= 0:
                raise self._deadline_reached(reason if made else None)
            made += 1
            wait = self.backoff * (2**attempt)
            try:
                resp = self._send_once(method, url, content, headers)
            except Failure as f:
                if not f.retryable:
                    raise
                reason, unreachable = f.reason, f.unreachable
            except httpx.HTTPError as exc:  # anything _send_once did not classify
                reason, unreachable = f"HTTP error: {one_line(exc, 120)}", False
            else:
                self._unreachable = unreachable = False
                if 200 <= resp.status < 300 or resp.status in ok_statuses:
                    return resp
                reason = f"HTTP {resp.status}: {self._error_text(resp)}"
                if 300 <= resp.status < 400:
                    loc = resp.headers.get("location", "")
                    raise Failure(f"HTTP {resp.status}: redirect to '{clean(redact_url(loc), 100)}' not followed (give the final URL)")
                if not (resp.status == 429 or resp.status >= 500):
                    raise Failure(reason)
                ra = retry_after_seconds(resp.headers.get("retry-after"))
                if ra is not None and attempt < attempts - 1:
                    if ra > self._clock.run_left():
                        raise Failure(f"{reason} (the server asks to retry after {ra:g} s, beyond the run's deadline)")
                    if ra > self.max_retry_after:
                        raise Failure(f"{reason} (the server asks to retry after {ra:g} s; tamperprobe waits at most {self.max_retry_after:g} s)")
                    wait = ra
            if attempt < attempts - 1:
                if wait >= self._clock.run_left():
                    raise self._deadline_reached(reason, retry=True)
                time.sleep(wait)
        if unreachable:
            self._unreachable = True  # later requests of this query: one attempt each until one gets through
        if made > 1:
            reason = f"{reason} (after {made} attempts)"
        raise Failure(reason)

    def _error_text(self, resp: HTTPResponse) -> str:
        text = resp.body.decode(errors="replace")
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            doc = None
        if isinstance(doc, dict):
            text = next((doc[k] for k in ("error", "message") if isinstance(doc.get(k), str)), text)
        return clean(text, 200) or "(empty body)"

    def _headers(self, url: str, content: bytes | None, header_length: int | None) -> list[tuple[str, str]]:
        """Every header of a request to ``url``, in the profile's order (Host as the client writes it)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        default = 443 if parts.scheme == "https" else 80
        if parts.port is not None and parts.port != default:
            host = f"{host}:{parts.port}"
        length = None if content is None else len(content)
        return self.profile.head(host=host, length=length, extra=self._extra, basic=self._basic, header_length=header_length)

    def _send_once(self, method: str, url: str, content: bytes | None, headers: list[tuple[str, str]]) -> HTTPResponse:
        """One attempt, bounded as a whole by the timeout and the deadline (``_transport.Clock``)."""
        import httpx

        from ._transport import TooLarge, decompress

        self._clock.attempt_end = time.monotonic() + self.timeout
        cap = self.max_response_bytes
        request = self._client.build_request(method, url, content=content)
        request.headers = httpx.Headers(headers)  # exactly these, in this order: nothing httpx would add
        connected = True  # unless the attempt fails while connecting (below): then no request byte was written
        try:
            with contextlib.closing(self._transport.handle_request(request)) as resp:
                declared = resp.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > cap:
                    raise Failure(f"response larger than {human_size(cap)}")
                chunks, size = [], 0
                for chunk in resp.iter_raw():
                    size += len(chunk)
                    if size > cap:
                        raise Failure(f"response larger than {human_size(cap)}")
                    if self._clock.left() <= 0:
                        raise httpx.ReadTimeout("no time left for this request")
                    chunks.append(chunk)
                body = b"".join(chunks)
                encoding = resp.headers.get("content-encoding", "").strip().lower()
                if encoding not in ("", "identity"):
                    try:
                        body = decompress(body, encoding, cap)
                    except TooLarge:
                        raise Failure(f"response larger than {human_size(cap)}") from None
                    except ValueError as exc:
                        raise Failure(f"malformed response: {clean(exc, 80)}") from None
                return HTTPResponse(resp.status_code, resp.headers, body)
        except httpx.TimeoutException as exc:
            connecting = isinstance(exc, httpx.ConnectTimeout)
            connected = not connecting
            if self._clock.run_left() <= 0:
                raise self._deadline_reached() from None
            raise Failure(
                f"timed out after {self.timeout:.1f} s" + (" (connecting)" if connecting else ""), retryable=True, unreachable=True
            ) from None
        except httpx.ConnectError as exc:
            connected = False
            if "refused" in str(exc).lower():
                raise Failure("connection refused", retryable=True, unreachable=True) from None
            raise Failure(f"cannot connect: {one_line(exc, 120)}", retryable=True, unreachable=True) from None
        except httpx.RemoteProtocolError as exc:
            raise Failure(f"connection closed by the server ({one_line(exc, 80)})", retryable=True) from None
        except httpx.TransportError as exc:
            raise Failure(f"transport error: {one_line(exc, 120)}", retryable=True) from None
        finally:
            self._clock.attempt_end = math.inf
            self._reached = self._reached or connected
