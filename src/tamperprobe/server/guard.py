"""What keeps the reference server up under abuse: connection limits, timeouts, authentication first.

``Limits`` holds the knobs (``serve`` exposes the main ones as options). They are enforced here:

* **Connections** (``protocol.py``: uvicorn's h11 protocol, subclassed, and over TLS asyncio's
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
import os
import ssl
from dataclasses import dataclass, fields
from typing import Any

from .._util import one_line
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


def tls_context(tls_cert: str | os.PathLike | None, tls_key: str | os.PathLike | None) -> ssl.SSLContext | None:
    """The server's TLS context for ``tls_cert``/``tls_key`` (both or neither), or None for plain HTTP."""
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("give both --tls-cert and --tls-key, or neither")
    if tls_cert is None or tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(tls_cert), str(tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the TLS certificate {tls_cert} and key {tls_key}: {getattr(exc, 'strerror', None) or one_line(exc)}") from None
    return context


def protocol_class(limits: Limits, tls: ssl.SSLContext | None = None) -> Any:
    """The protocol factory uvicorn runs at every accept (its ``http`` setting): ``protocol.Guard`` (uvicorn's h11
    protocol with the connection cap, the deadlines, the head and chunk bounds and the lingering close of ``limits``;
    with ``tls``, behind asyncio's TLS protocol made at accept). Its ``live`` set holds the open connections."""
    from .protocol import Guard  # imports uvicorn: only when a server starts

    return Guard(limits, tls)


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
