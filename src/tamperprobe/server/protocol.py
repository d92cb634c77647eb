"""The guard's protocol: uvicorn's h11 protocol with the limits of ``guard.Limits`` (see ``guard.py``'s module doc).

Imported only when a server starts (``guard.protocol_class``), since it imports uvicorn: the
``serve`` extra. ``Guard`` is the state of one server (its limits, its TLS context, the set of its
open connections) and the protocol factory uvicorn calls at every accept (its ``http`` setting).
"""

from __future__ import annotations

import asyncio.sslproto
import ssl
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .guard import Limits


class GuardedConnection(h11.Connection):
    """h11's server connection, refusing what h11 lets through: a request head over ``max_header_bytes`` when it
    arrives whole (h11 bounds only an incomplete one), and a chunked body of more chunks than ``max_chunks`` plus
    one per KiB of its data. A refusal is h11's ``RemoteProtocolError``: uvicorn answers it with a 400 and closes."""

    def __init__(self, limits: Limits) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self._limits = limits
        self._chunks = 0
        self._bytes = 0

    def next_event(self) -> Any:
        event: Any = super().next_event()
        kind = type(event)
        if kind is h11.Data:
            self._bytes += len(event.data)
            if event.chunk_start:
                self._chunks += 1
                if self._chunks > self._limits.max_chunks + self._bytes // 1024:
                    raise h11.RemoteProtocolError(f"more than {self._limits.max_chunks} chunks plus one per KiB of data")
        elif kind is h11.Request:
            self._chunks = self._bytes = 0
            size = len(event.method) + len(event.target) + 12 + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if size > self._limits.max_header_bytes:
                raise h11.RemoteProtocolError(f"request head of {size} bytes is over the limit of {self._limits.max_header_bytes}", 431)
        return event


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


class Guard:
    """One server's guard: the protocol factory uvicorn calls at each accept (``http=``), and the connections it holds.

    With ``tls``, the factory returns asyncio's TLS protocol wrapping the guarded one, made here at
    accept, so that a connection is counted and its header deadline runs from accept, TLS handshake
    included (uvicorn's own TLS would create the protocol only once the handshake is done).
    """

    def __init__(self, limits: Limits, tls: ssl.SSLContext | None = None) -> None:
        self.limits = limits
        self.tls = tls
        self.live: set[GuardedH11Protocol] = set()  # every accepted connection of this server, handshaking or not

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        protocol = GuardedH11Protocol(self, *args, **kwargs)
        return protocol if self.tls is None else GuardedTLS(protocol.loop, protocol, self.tls, self.limits)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the connection cap, the deadlines, the head and chunk bounds and the lingering close."""

    _phase: str | None = None  # "headers", "body", "linger" or None (see _watch and _linger)
    _since = 0.0
    _timer: Any = None
    _tcp: Any = None  # the socket's transport, from accept on (over TLS, below the TLS protocol)
    _raw: Any = None  # the transport uvicorn talks to; it gets it behind a _CloseHook, so that every close comes to _close
    _drained = 0  # bytes discarded while lingering

    def __init__(self, guard: Guard, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = guard
        self._limits = guard.limits
        self.conn = GuardedConnection(guard.limits)

    def accepted(self, tcp: Any) -> None:
        """The connection was accepted (before any TLS handshake): counted, and its header deadline starts."""
        self._tcp = tcp
        self._guard.live.add(self)
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
            if self._drained > self._limits.linger_bytes:
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
        self._guard.live.discard(self)

    def _admit(self) -> None:
        live = self._guard.live
        if len(live) <= self._limits.max_connections:
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
        """Stop writing, then discard what arrives until the client closes or a bound of the limits is reached (guard.py's doc)."""
        self._cancel()
        if self.cycle is not None and not self.cycle.response_complete:  # h11's 400 answered a request the application still reads:
            self.cycle.disconnected = True  # it ends now, as at connection_lost, and frees what it holds
            self.cycle.message_event.set()
        self._phase, self._since = "linger", self.loop.time()
        self._timer = self.loop.call_later(self._limits.linger_timeout, self._raw.abort)
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
            timeout = self._limits.header_timeout if phase == "headers" else self._limits.body_timeout
            self._timer = self.loop.call_later(timeout, self._expire)

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

    def __init__(self, loop: Any, app: GuardedH11Protocol, tls: ssl.SSLContext, limits: Limits) -> None:
        options: Any = {"waiter": None, "server_side": True, "ssl_handshake_timeout": limits.header_timeout}  # nothing awaits a handshake
        super().__init__(loop, app, tls, **options)
        self._guarded = app

    def connection_made(self, transport: Any) -> None:
        self._guarded.accepted(transport)
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guarded.gone()  # the application protocol hears of it only if its handshake ended
        super().connection_lost(exc)
