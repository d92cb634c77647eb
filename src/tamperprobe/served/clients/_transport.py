"""An httpx transport that cannot be stretched: every socket operation fits in the time left.

httpx's timeouts bound each read, not a whole answer, so a server that sends one byte a second
(in the status line, the headers or the body) keeps a request alive for as long as it likes.
Here the transport runs on httpcore's own connection pool with a network backend whose every
connect, read, write and TLS handshake gets at most the time left on a ``Clock`` (the earlier of
the attempt's end and the run's deadline); once none is left, the operation fails with a
timeout. ``http.HTTPTarget`` sets the clock before each attempt.

The stream also writes each request head exactly as the client profile gave it: h11 puts Host
first whatever the order given, so the head's lines are put back in the given order
(``ordered_head``); and after a head with ``Expect: 100-continue`` the body waits, as curl's does,
until the server says something or ``EXPECT_WAIT`` passes. ``tls_context`` shapes the ClientHello
like the profile's client's, and ``decompress`` reads every Content-Encoding a profile may accept
within the response cap.

Only public httpx and httpcore interfaces are used: ``httpx.BaseTransport`` and
``httpx.SyncByteStream``, ``httpcore.ConnectionPool(network_backend=...)``,
``httpcore.NetworkBackend`` and ``httpcore.NetworkStream``. httpcore's exceptions are raised
again as httpx's of the same name, as ``httpx.HTTPTransport`` does.
"""

from __future__ import annotations

import contextlib
import math
import ssl
import time
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore
import httpx

from ...errors import UsageError

EXPECT_WAIT = 1.0  # seconds a client waits for "100 Continue" before sending the body anyway (curl's default)


class Clock:
    """When the current attempt and the current run end (``time.monotonic`` seconds; ``inf``: no limit).

    It also carries the header order of the request being sent (``head_order``): h11 writes Host
    first whatever the order given, while a client such as tritonclient's writes it after its own
    headers; the stream puts the head's lines back in the order given (``ordered_head``).
    """

    def __init__(self) -> None:
        self.run_end = math.inf
        self.attempt_end = math.inf
        self.head_order: list[bytes] | None = None

    def left(self) -> float:
        """Seconds left before the earlier of the two ends."""
        return min(self.run_end, self.attempt_end) - time.monotonic()

    def run_left(self) -> float:
        return self.run_end - time.monotonic()

    def bound(self, timeout: float | None, error: type[Exception]) -> float:
        """``timeout`` cut to the time left; ``error`` when none is left."""
        left = self.left()
        if left <= 0:
            raise error("no time left for this request")
        return left if timeout is None else min(timeout, left)


class _BoundedStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, clock: Clock) -> None:
        self._inner = inner
        self._clock = clock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._clock.bound(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self._clock.head_order is not None and buffer.endswith(b"\r\n\r\n"):
            buffer = ordered_head(buffer, self._clock.head_order)
            self._clock.head_order = None  # the head goes out once; what follows is the body
            self._inner.write(buffer, self._clock.bound(timeout, httpcore.WriteTimeout))
            if b"\r\nexpect: 100-continue\r\n" in buffer.lower():
                self._await_continue()
            return
        self._inner.write(buffer, self._clock.bound(timeout, httpcore.WriteTimeout))

    def _await_continue(self) -> None:
        """As curl does after ``Expect: 100-continue``: hold the body until the server says something, at most 1 s."""
        import select

        sock = self._inner.get_extra_info("socket")
        wait = min(EXPECT_WAIT, max(0.0, self._clock.left()))
        if sock is not None and wait > 0:
            select.select([sock], [], [], wait)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname, self._clock.bound(timeout, httpcore.ConnectTimeout))
        return _BoundedStream(inner, self._clock)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def ordered_head(head: bytes, order: list[bytes]) -> bytes:
    """A request head with its header lines in ``order`` (lower-case names); unchanged unless its names are exactly those."""
    lines = head[:-4].split(b"\r\n")
    by_name: dict[bytes, bytes] = {}
    for line in lines[1:]:
        by_name.setdefault(line.split(b":", 1)[0].strip().lower(), line)
    if len(by_name) != len(lines) - 1 or sorted(by_name) != sorted(order):
        return head
    return b"\r\n".join([lines[0], *(by_name[name] for name in order)]) + b"\r\n\r\n"


class _BoundedBackend(httpcore.NetworkBackend):
    def __init__(self, clock: Clock) -> None:
        self._inner = httpcore.SyncBackend()
        self._clock = clock

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        bounded = self._clock.bound(timeout, httpcore.ConnectTimeout)
        return _BoundedStream(self._inner.connect_tcp(host, port, bounded, local_address, socket_options), self._clock)

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        bounded = self._clock.bound(timeout, httpcore.ConnectTimeout)
        return _BoundedStream(self._inner.connect_unix_socket(path, bounded, socket_options), self._clock)

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, min(seconds, self._clock.left())))


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    """httpcore's exceptions as httpx's of the same name (``httpx.TransportError`` if there is none)."""
    try:
        yield
    except Exception as exc:
        if not type(exc).__module__.startswith("httpcore"):
            raise
        mapped = getattr(httpx, type(exc).__name__, None)
        if not (isinstance(mapped, type) and issubclass(mapped, httpx.TransportError)):
            mapped = httpx.TransportError
        raise mapped(str(exc)) from exc


class _ResponseStream(httpx.SyncByteStream):
    def __init__(self, stream: Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _httpx_errors():
            yield from self._stream

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class BoundedTransport(httpx.BaseTransport):
    """HTTP/1.1 over an httpcore pool whose sockets never wait longer than ``clock`` allows."""

    def __init__(self, clock: Clock, ssl_context: ssl.SSLContext | None, *, keep_alive: bool = True) -> None:
        self._clock = clock
        # keep_alive False: a new connection for every request, as a client that opens one per call (requests.post, curl)
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            network_backend=_BoundedBackend(clock),
            max_connections=4,
            max_keepalive_connections=4 if keep_alive else 0,
            keepalive_expiry=5.0,
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)  # a sync client sends sync streams
        req = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        self._clock.head_order = [name.lower() for name, _ in request.headers.raw]
        try:
            with _httpx_errors():
                resp = self._pool.handle_request(req)
        finally:
            self._clock.head_order = None
        assert isinstance(resp.stream, Iterable)
        return httpx.Response(status_code=resp.status, headers=resp.headers, stream=_ResponseStream(resp.stream), extensions=resp.extensions)

    def close(self) -> None:
        self._pool.close()


class _NoALPN(ssl.SSLContext):
    """A context that offers no ALPN: httpcore sets ``http/1.1`` on every context, a client without ALPN never does."""

    def set_alpn_protocols(self, alpn_protocols: Iterable[str]) -> None:
        return None


TLS_STYLES = ("httpx", "urllib3", "no-alpn")


def tls_context(verify: bool, ca_file: str | None = None, style: str = "httpx") -> ssl.SSLContext:
    """The TLS context of a client: certificates checked against ``ca_file`` (else the certifi bundle), or not at all.

    ``style`` shapes the ClientHello like a known client's: ``httpx`` Python's default context
    (ALPN ``http/1.1``), ``urllib3`` as requests' urllib3 builds it (no session ticket, post-handshake
    authentication offered), ``no-alpn`` Python's default context without ALPN (gevent's, tritonclient's).
    """
    ref = ssl.create_default_context()
    ctx = (_NoALPN if style == "no-alpn" else ssl.SSLContext)(ssl.PROTOCOL_TLS_CLIENT)
    ctx.options, ctx.verify_flags, ctx.minimum_version = ref.options, ref.verify_flags, ref.minimum_version
    if style == "urllib3":
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_TICKET
        ctx.post_handshake_auth = True
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if ca_file is None:
        import certifi

        ca_file = certifi.where()
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot read CA certificates from {ca_file}: {getattr(exc, 'strerror', None) or exc}") from None
    return ctx


# --------------------------------------------------------------------------- response bodies, decoded within a cap


def _brotli() -> Any:
    try:
        import brotli
    except ImportError:
        return None
    try:  # the output limit (brotli >= 1.2) is what keeps a small body from expanding without bound
        brotli.Decompressor().process(b"", output_buffer_limit=1)
    except TypeError:
        return None
    return brotli


def _zstd() -> Any:
    for name in ("compression.zstd", "backports.zstd"):
        try:
            import importlib

            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def decodable(encoding: str) -> bool:
    """Whether a response in Content-Encoding ``encoding`` can be decoded within a size cap here."""
    e = encoding.strip().lower()
    if e in ("gzip", "deflate", "identity"):
        return True
    if e == "br":
        return _brotli() is not None
    if e == "zstd":
        return _zstd() is not None
    return False


class TooLarge(Exception):
    """A decoded body beyond the cap."""


def decompress(body: bytes, encoding: str, cap: int) -> bytes:
    """``body`` decoded from ``encoding`` (gzip, deflate, br, zstd), at most ``cap`` bytes:
    ``TooLarge`` beyond it, ``ValueError`` for a body that does not decode."""
    import zlib

    e = encoding.strip().lower()
    try:
        if e in ("gzip", "deflate"):
            out = zlib.decompressobj(16 + zlib.MAX_WBITS if e == "gzip" else zlib.MAX_WBITS).decompress(body, cap + 1)
        elif e == "br" and _brotli() is not None:
            out = _brotli().Decompressor().process(body, output_buffer_limit=cap + 1)
        elif e == "zstd" and _zstd() is not None:
            out = _zstd().ZstdDecompressor().decompress(body, max_length=cap + 1)
        else:
            raise ValueError(f"unsupported Content-Encoding '{encoding}'")
    except ValueError:
        raise
    except Exception as exc:  # zlib.error, brotli.error, ZstdError
        raise ValueError(f"bad {e} body") from exc
    if len(out) > cap:
        raise TooLarge
    return bytes(out)
