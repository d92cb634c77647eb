"""What keeps the reference server up under abuse: connection limits, timeouts, authentication first.

``Limits`` holds the knobs (``serve`` exposes the main ones as options). They are enforced here:

* **Connections** (``protocol_class``: uvicorn's h11 protocol, subclassed, and over TLS asyncio's
  TLS protocol, made by the guard at accept instead of by uvicorn): a connection is counted from
  the moment it is accepted, TLS handshake included, and at most ``max_connections`` are open at
  once. A connection beyond that evicts the oldest connection that is only waiting for a request
  (in its TLS handshake, idle, or sending its headers slowly); if every connection is busy with a
  request, the new one is closed. So a flood of slow or silent connections cannot lock health
  probes or real clients out. The event loop accepts at most ``backlog`` connections in one burst
  before their protocols run, so ``serve`` keeps ``max_connections + backlog`` (and a reserve)
  below the open-file limit, lowering ``max_connections`` if it must: the process never runs out
  of file descriptors (an accept failing with EMFILE would stall every new connection for a second).
  ``header_timeout``: a connection must finish its TLS handshake and deliver a complete request
  line and headers within this many seconds of its accept (or of its previous response);
  ``body_timeout``: the body within this many seconds of the headers; ``idle_timeout``: a
  kept-alive connection is closed after this many idle seconds. A connection that misses a
  deadline is closed. A request head is at most ``max_header_bytes`` (h11 bounds a head that
  arrives in pieces, the guard one that arrives whole: 400), and a chunked body has at most
  ``max_chunks`` chunks plus one per KiB of its data (400): h11 handles each chunk as an event,
  so a stream of 1-byte chunks would otherwise keep the event loop busy with one connection.
* **Lingering close** (the same protocol): a connection closed right after an error response
  while the client is still sending its request (413 for a body over the cap, 401 before the
  body, h11's 400 for a malformed request or oversized headers, a 500 before the body was read)
  is not closed at once: closing a socket with unread bytes makes the kernel send a TCP reset,
  and a reset can make the client discard the response before it reads it (RFC 9112, 9.6). So
  the server shuts down its writing side (``SHUT_WR``; over TLS, which has no half-close, it
  keeps the connection open instead), reads and discards what still arrives until the client
  closes, at most ``linger_bytes`` bytes and ``linger_timeout`` seconds, whichever comes first,
  then closes. The bounds cost a slow or endless client one connection (not a thread: the
  event loop reads and discards) for at most ``linger_timeout`` seconds; a lingering connection
  has had its answer, so the connection cap evicts it like one waiting for a request. Closes
  without a response (the deadlines above, eviction) and closes after a request that was read
  whole do not linger: there is no response to lose, or no unread byte to cause a reset.
* **Authentication before routing** (``TokenGuard``, an ASGI middleware): with a token, every
  path except the health probes answers 401 before the router sees the request, so unknown
  paths, trailing-slash redirects (switched off anyway) or model names reveal nothing and no
  request body of an unauthenticated client is read.
* **Work** (``app.py``): an inference request's body is read first, then the request waits up to
  ``queue_timeout`` seconds for one of ``max_concurrent`` slots (503 with Retry-After after
  that): a client that sends headers and then its body slowly, or never, holds no slot. The
  bytes of the bodies held at once are bounded by ``BodyBudget`` (``max_concurrent`` bodies of
  the largest size; 503 beyond). JSON parsing, the model and the response are computed on
  ``workers`` threads, never on the event loop, so health probes stay fast while large bodies
  are parsed; a response is at most ``max_response`` bytes and names each output once (400).

Why not another ASGI server: granian and hypercorn, measured under the same attacks, keep their
own event loop free of 1-byte chunks and refuse large heads, but neither counts connections in
their TLS handshake nor evicts waiting connections, and both ran out of file descriptors under
pre-handshake stalls (``bench/results/server-compare.md``).
"""

from __future__ import annotations

import hmac
import json
import math
import ssl
from dataclasses import dataclass, fields
from typing import Any

from ..errors import UsageError

HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


@dataclass(frozen=True)
class Limits:
    """Connection and work limits of the server (see the module doc)."""

    max_connections: int = 1000
    backlog: int = 128  # connections accepted in one burst (and the listen queue): open files may reach max_connections + backlog
    max_concurrent: int = 16
    workers: int = 2
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: int = 5
    queue_timeout: float = 10.0
    max_header_bytes: int = 16 << 10
    max_chunks: int = 64  # chunks of a chunked body at most, plus one per KiB of data it carries
    max_response: int = 32 << 20  # bytes of a response body at most
    linger_timeout: float = 2.0  # lingering close: seconds at most, after an error response, spent discarding a request's rest
    linger_bytes: int = 8 << 20  # ... and bytes at most (as many as the default body cap lets an accepted request send)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UsageError(f"server limit {f.name.replace('_', '-')} must be a finite number > 0, got {value!r}")


class _CloseHook:
    """A transport as uvicorn sees it: the transport itself, except that ``close()`` calls ``on_close``."""

    def __init__(self, transport: Any, on_close: Any) -> None:
        self._transport = transport
        self._on_close = on_close
        self._closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        self._closed = True
        self._on_close()

    def is_closing(self) -> bool:
        return self._closed or bool(self._transport.is_closing())


def _connection_class(limits: Limits) -> type:
    """h11's server connection, refusing what h11 lets through: a request head over ``max_header_bytes`` when it
    arrives whole (h11 bounds only an incomplete one), and a chunked body of more chunks than ``max_chunks`` plus
    one per KiB of its data. A refusal is h11's ``RemoteProtocolError``: uvicorn answers it with a 400 and closes."""
    import h11

    class GuardedConnection(h11.Connection):
        _chunks = 0
        _bytes = 0

        def next_event(self) -> Any:
            event: Any = super().next_event()
            kind = type(event)
            if kind is h11.Data and event.chunk_start:
                self._chunks += 1
                self._bytes += len(event.data)
                if self._chunks > limits.max_chunks + self._bytes // 1024:
                    raise h11.RemoteProtocolError(f"more than {limits.max_chunks} chunks plus one per KiB of data")
            elif kind is h11.Data:
                self._bytes += len(event.data)
            elif kind is h11.Request:
                self._chunks = self._bytes = 0
                size = len(event.method) + len(event.target) + 12 + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if size > limits.max_header_bytes:
                    raise h11.RemoteProtocolError(f"request head of {size} bytes is over the limit of {limits.max_header_bytes}", 431)
            return event

    return GuardedConnection


def protocol_class(limits: Limits, tls: ssl.SSLContext | None = None) -> Any:
    """The protocol factory uvicorn runs (its ``http`` setting): uvicorn's h11 protocol with the connection cap, the
    deadlines, the request-head and chunk bounds and the lingering close of ``limits``; with ``tls``, behind asyncio's
    TLS protocol made here at accept, so that a connection is counted and its header deadline runs from accept,
    TLS handshake included (uvicorn's own TLS would create the protocol only once the handshake is done)."""
    import asyncio.sslproto

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    connection_class = _connection_class(limits)
    live: set[Any] = set()  # every accepted connection of this server, handshaking or not

    class GuardedH11Protocol(H11Protocol):
        _phase: str | None = None  # "headers", "body", "linger" or None (see _watch and _linger)
        _since = 0.0
        _timer: Any = None
        _tcp: Any = None  # the socket's transport, from accept on (over TLS, below the TLS protocol)
        _raw: Any = None  # the transport uvicorn talks to; it gets it behind a _CloseHook, so that every close comes to _close
        _drained = 0  # bytes discarded while lingering

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.conn = connection_class(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)

        def accepted(self, tcp: Any) -> None:
            """The connection was accepted (before any TLS handshake): counted, and its header deadline starts."""
            self._tcp = tcp
            live.add(self)
            self._set_phase("headers")
            self._admit()

        def connection_made(self, transport: Any) -> None:
            if self._tcp is None:  # plain TCP: accepted now
                self.accepted(transport)
            self._raw = transport
            hook: Any = _CloseHook(transport, self._close)  # duck-typed: every other attribute is the transport's
            super().connection_made(hook)
            self._watch()

        def data_received(self, data: bytes) -> None:
            if self._phase == "linger":  # the answer is out: the rest of the request is read only to be discarded
                self._drained += len(data)
                if self._drained > limits.linger_bytes:
                    self._raw.abort()
                return
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            self.gone()
            super().connection_lost(exc)

        def gone(self) -> None:
            self._cancel()
            live.discard(self)

        def _admit(self) -> None:
            if len(live) <= limits.max_connections:
                return
            waiting = [c for c in live if c is not self and c._phase in ("headers", "linger") and not c._tcp.is_closing()]
            victim = min(waiting, key=lambda c: c._since) if waiting else self
            victim._drop()

        def _drop(self) -> None:
            if self.transport is not None:
                self.transport.close()
            else:  # still in its TLS handshake: no response to send
                self._tcp.abort()

        def _close(self) -> None:
            """Every close of the connection, uvicorn's and ours: lingers after an error response sent before the request was read."""
            ours, theirs = self.conn.our_state, self.conn.their_state
            answered_early = ours in (h11.MUST_CLOSE, h11.CLOSED) and theirs in (h11.SEND_BODY, h11.ERROR)
            if self._phase != "linger" and answered_early and not self._raw.is_closing():
                self._linger()
            else:
                self._raw.close()  # a second close (server shutdown, eviction) ends a lingering one now

        def _linger(self) -> None:
            """Stop writing, then discard what arrives until the client closes or a bound of ``limits`` is reached (the module doc)."""
            self._cancel()
            if self.cycle is not None and not self.cycle.response_complete:  # h11's 400 answered a request the application still reads:
                self.cycle.disconnected = True  # it ends now, as at connection_lost, and frees its slot
                self.cycle.message_event.set()
            self._phase, self._since = "linger", self.loop.time()
            self._timer = self.loop.call_later(limits.linger_timeout, self._raw.abort)
            try:
                if self._raw.can_write_eof():  # plain TCP: the response is flushed first, then SHUT_WR
                    self._raw.write_eof()
            except OSError:  # the client is gone already
                self._raw.abort()
                return
            self._raw.resume_reading()  # uvicorn may have paused reading while the application did not read the body

        def _watch(self) -> None:
            """Keep one timer for the phase the peer is in: sending headers, sending a body, or neither."""
            if self._phase == "linger":
                return
            state = self.conn.their_state
            phase = "headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
            if phase != self._phase:
                self._set_phase(phase)

        def _set_phase(self, phase: str | None) -> None:
            self._cancel()
            self._phase, self._since = phase, self.loop.time()
            if phase is not None:
                self._timer = self.loop.call_later(limits.header_timeout if phase == "headers" else limits.body_timeout, self._expire)

        def _cancel(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expire(self) -> None:
            self._timer = None
            if self.transport is None:  # the TLS handshake took the whole header deadline
                self._tcp.abort()
            elif not self.transport.is_closing():
                self.transport.close()

    class GuardedTLS(asyncio.sslproto.SSLProtocol):
        """asyncio's server-side TLS protocol, telling the guarded protocol of the accept and of a close before the handshake ended.

        Its read buffer is 32 KiB (two TLS records) instead of asyncio's 256 KiB, allocated per connection at accept:
        a thousand connections that never finish their handshake would otherwise hold 256 MiB."""

        max_size = 32 << 10

        def __init__(self, loop: Any, app: GuardedH11Protocol) -> None:
            options: Any = {"waiter": None, "server_side": True, "ssl_handshake_timeout": limits.header_timeout}  # nothing awaits a handshake
            super().__init__(loop, app, tls, **options)  # type: ignore[arg-type]  # tls is set whenever this class is used
            self._guarded = app

        def connection_made(self, transport: Any) -> None:
            self._guarded.accepted(transport)
            super().connection_made(transport)

        def connection_lost(self, exc: BaseException | None) -> None:
            self._guarded.gone()  # the application protocol hears of it only if its handshake ended
            super().connection_lost(exc)

    def make(*args: Any, **kwargs: Any) -> Any:
        protocol = GuardedH11Protocol(*args, **kwargs)
        return protocol if tls is None else GuardedTLS(protocol.loop, protocol)

    make.live = live  # type: ignore[attr-defined]  # for tests and the load test: the count the cap applies to
    return make


class BodyBudget:
    """Bytes of request bodies the server holds at once, from the first byte read until the response.

    Bodies are read before a request takes one of the ``max_concurrent`` slots (so that a client
    sending its body slowly holds no slot), so the slots no longer bound the memory bodies take:
    this does. ``take`` counts bytes into a request's tally (a one-item list), or refuses them when
    the total would pass ``limit``; ``give_back`` returns a request's tally. Event-loop only.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, tally: list[int], n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        tally[0] += n
        return True

    def give_back(self, tally: list[int]) -> None:
        self.used -= tally[0]
        tally[0] = 0


class TokenGuard:
    """ASGI middleware: ``Authorization: Bearer <token>`` on every path but the health probes, checked before routing."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") not in HEALTH_PATHS and not self._authorized(scope):
            body = json.dumps({"error": "missing or invalid bearer token"}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"www-authenticate", b"Bearer")]
            headers.append((b"connection", b"close"))  # an unauthenticated body is not worth reading to keep the connection
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: dict) -> bool:
        values = [v for k, v in scope.get("headers", []) if k == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, value = values[0].partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self._token)


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file limit towards ``wanted`` (up to the hard limit); returns the soft limit now in force."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else int(soft)
