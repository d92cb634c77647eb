"""What an endpoint client is built from: its URL, its extra headers and credentials, its limits.

``HTTPTarget.__init__`` calls these; each raises ``UsageError`` with a one-line message for a bad
option and never echoes a value that may be a secret.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

from ...errors import UsageError
from ..credentials import basic_credentials, is_credential_header, redact_url, url_secrets
from ..untrusted import clean

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


def check_limits(
    timeout: float,
    deadline: float | None,
    retries: int,
    batch_size: int,
    delay: float,
    backoff: float,
    max_retry_after: float,
    spread: float,
    max_response_bytes: int,
) -> None:
    """UsageError for a client option out of range."""
    for name, value in (("--timeout", timeout), ("--deadline", math.inf if deadline is None else deadline)):
        if not value > 0:
            raise UsageError(f"{name} must be > 0 seconds")
    if retries < 0:
        raise UsageError("--retries must be >= 0")
    if batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if not (delay >= 0 and backoff >= 0 and max_retry_after >= 0):
        raise UsageError("--delay, backoff and max_retry_after must be >= 0")
    if not (0 <= spread < math.inf and delay < math.inf):
        raise UsageError("--spread and --delay must be finite numbers of seconds >= 0")
    if max_response_bytes < 1:
        raise UsageError("the response size cap must be >= 1 byte")


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
