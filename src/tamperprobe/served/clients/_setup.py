"""What an endpoint client is built from: its URL, its extra headers and credentials, its settings.

``HTTPTarget.__init__`` calls these; each raises ``UsageError`` with a one-line message for a bad
option and never echoes a value that may be a secret. The settings objects (``RetryPolicy``,
``Pacing``, ``Connection``) are ``_params.Settings``: checked by the plug-ins' constraint machinery.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit, urlunsplit

from ..._params import Interval, Settings
from ...errors import UsageError
from ..credentials import basic_credentials, is_credential_header, redact_url, url_secrets
from ..untrusted import clean

DEFAULT_MAX_RESPONSE = 1 << 20  # bytes of one answer
DEFAULT_DEADLINE = 300.0  # seconds for one verification run

_TOKEN_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "inference-header-content-length"})


def check_url(url: str) -> str:
    try:
        parts = urlsplit(str(url).strip())
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"bad endpoint URL {redact_url(str(url))!r}: expected http://host:port/... or https://...")
    return str(url).strip()


def split_url(url: str) -> tuple[str, str, tuple[str, str] | None]:
    """(the URL without user info, query and fragment; its query; (user, password) or None)."""
    parts = urlsplit(url)
    auth = (unquote(parts.username or ""), unquote(parts.password or "")) if parts.username or parts.password else None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")), parts.query, auth


def parse_headers(headers: Mapping[str, str] | Iterable[str] | None) -> dict[str, str]:
    """Extra request headers from a mapping or ``Name:value`` texts (``--header``); UsageError on a bad one.

    A bad header's value is never echoed (it may be a secret).
    """
    items: list[tuple[str, str]] = []
    if isinstance(headers, Mapping):
        items = [(str(k), str(v)) for k, v in headers.items()]
    else:
        for h in headers or []:
            name, sep, value = str(h).partition(":")
            if not sep:
                raise UsageError("bad header: expected Name:value (a --header without ':')")
            items.append((name, value))
    out: dict[str, str] = {}
    for k, v in items:
        k, v = str(k).strip(), str(v).strip()
        if not _TOKEN_NAME.fullmatch(k) or any(ch in v for ch in "\r\n\0"):
            raise UsageError(f"bad header '{clean(k, 60)}': use Name:value with a token name and a one-line value")
        if k.lower() in _FRAMING:
            raise UsageError(f"--header {k}: the request's framing is the client profile's, not a header to set")
        out[k] = v
    return out


@dataclass(frozen=True)
class RetryPolicy(Settings):
    """How long a client waits and how often it tries again: ``timeout`` per attempt, ``retries`` after the first,
    ``backoff`` before the first retry (doubled each time), a server's ``Retry-After`` honoured up to
    ``max_retry_after``, and the whole run bounded by ``deadline`` (None: no bound). Checked when built."""

    timeout: float = 10.0
    retries: int = 3
    backoff: float = 0.2
    max_retry_after: float = 10.0
    deadline: float | None = DEFAULT_DEADLINE

    constraints: ClassVar[dict[str, Any]] = {
        "timeout": Interval(0, None, closed="neither"),
        "retries": Interval(0, None, integer=True),
        "backoff": Interval(0, None),
        "max_retry_after": Interval(0, None),
        "deadline": Interval(0, None, closed="neither"),
    }
    labels: ClassVar[dict[str, str]] = {"timeout": "--timeout", "retries": "--retries", "deadline": "--deadline"}


@dataclass(frozen=True)
class Pacing(Settings):
    """How a run's queries go out: ``batch_size`` inputs per request, ``delay`` seconds between requests, their
    times scattered at random over ``spread`` seconds, in a shuffled order unless ``shuffle`` is off."""

    batch_size: int = 1
    delay: float = 0.0
    spread: float = 0.0
    shuffle: bool = True

    constraints: ClassVar[dict[str, Any]] = {"batch_size": Interval(1, None, integer=True), "delay": Interval(0, None), "spread": Interval(0, None)}
    labels: ClassVar[dict[str, str]] = {"batch_size": "--batch-size", "delay": "--delay", "spread": "--spread"}


@dataclass(frozen=True)
class Connection(Settings):
    """How a client talks to its server: TLS checked (``verify_tls``, against ``ca_file`` or the system's CAs) and
    answers cut at ``max_response_bytes``."""

    verify_tls: bool = True
    ca_file: str | os.PathLike | None = None
    max_response_bytes: int = DEFAULT_MAX_RESPONSE

    constraints: ClassVar[dict[str, Any]] = {"max_response_bytes": Interval(1, None, integer=True, text=">= 1 byte")}
    labels: ClassVar[dict[str, str]] = {"max_response_bytes": "the response size cap", "ca_file": "--ca-cert"}

    def _check_together(self) -> None:
        if self.ca_file is not None and not self.verify_tls:
            raise UsageError("give --ca-cert or --insecure, not both")


def client_credentials(
    raw_url: str, auth: tuple[str, str] | None, headers: Mapping[str, str] | Iterable[str] | None, token: str | None
) -> tuple[list[tuple[str, str]], str | None, list[str]]:
    """(the extra headers in order, the basic-auth header value or None, every secret the client knows).

    The secrets are what ``Masker`` hides in any text the client passes on: the URL's user name,
    password and query values, credential-like headers (and a scheme's value alone), the token, and
    the basic-auth header value a server might echo back.
    """
    secrets = url_secrets(raw_url)
    extra = list(parse_headers(headers).items())
    for k, v in extra:
        if is_credential_header(k):
            secrets += [v, *v.split(None, 1)[1:]]  # "Bearer X": X alone too
    basic = None
    if token is not None:
        if auth is not None:
            raise UsageError("give credentials in the URL (user:password@) or a token, not both")
        extra = [(k, v) for k, v in extra if k.lower() != "authorization"] + [("Authorization", f"Bearer {token}")]
        secrets.append(token)
    elif auth is not None:
        basic = basic_credentials(*auth)
        secrets += [basic, basic.split(None, 1)[1]]
    return extra, basic, secrets
