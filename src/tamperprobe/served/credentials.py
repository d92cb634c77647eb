"""Secrets on the served side: where tokens come from, and keeping them out of everything shown or stored.

Tokens (a client's bearer token, ``serve``'s required token) come from an environment variable
(``--token-env VAR``) or a file (``--token-file FILE``), never from the command line, where any
user of the machine can read them (``ps``, shell history). An empty or multi-line token is refused.

Whatever names an endpoint (a target name, a report, a history row, a metric label, an event, a
hook's ``TAMPERPROBE_ENDPOINT``) shows its URL through ``redact_url``: parsed with
``urllib.parse``, never cut out of the text by a pattern, and shown with no ``user:password@``,
every query value replaced by ``***`` (``?api_key=***``), no fragment. In free text
(``redact_urls_in``) every piece that parses as a URL with a scheme is shown so, and anything like
``userinfo@`` is masked. ``Masker`` hides the secrets a client knows (its token, the URL's
password or token user name and its query values, credential-like headers, the basic-auth header
value) in any text it passes on, such as a server's error message that echoes a request back.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote, unquote, unquote_plus, urlsplit, urlunsplit

from ..errors import UsageError

REDACTED = "***"
_CREDENTIAL_HEADER = re.compile(r"auth|token|key|secret|cookie|session|password|credential", re.IGNORECASE)
_QUERY_SAFE = "!$&'()*+,;=:@/?~"
_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")


def redact_url(url: str) -> str:
    """``url`` without ``user:password@``, with every query value shown as ``***`` (a bare query
    word too: ``?sk-123`` shows as ``?***``) and no fragment; ``(unparsable URL)`` when it does not parse."""
    try:
        parts = urlsplit(str(url).strip())
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # an unparsable URL: show nothing that could be a secret
        return "(unparsable URL)"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    pairs = [p.partition("=") for p in parts.query.split("&")] if parts.query else []
    query = "&".join(f"{k}={REDACTED}" if sep else REDACTED for k, sep, _ in pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _url_start(token: str) -> int:
    """Where a URL with a scheme (``scheme://``) starts in ``token``, or -1."""
    at = token.find("://")
    if at <= 0:
        return -1
    start = at
    while start > 0 and token[start - 1] in _SCHEME_CHARS:
        start -= 1
    while start < at and not token[start].isalpha():  # a scheme starts with a letter
        start += 1
    return start if start < at else -1


def _redact_token(token: str) -> str:
    """One white-space-free piece of free text: a URL in it redacted, anything like ``userinfo@`` masked."""
    start = _url_start(token)
    if start >= 0:
        return token[:start] + redact_url(token[start:])
    if "@" in token:  # user:password@host, or the rest of a URL whose password held a space
        return REDACTED + token[token.rindex("@") :]
    return token


def redact_urls_in(text: str) -> str:
    """``text`` with its URLs redacted by structure (``redact_url``), never by a pattern over the text.

    A text that is one URL as a whole (an endpoint, even one whose password holds a quote or a
    space) is parsed whole. Otherwise each white-space-separated piece is looked at: one that holds
    a URL with a scheme has that URL (to the piece's end) redacted, and one that holds ``@``
    (``user:password@host``, or the tail of a URL cut by a space) shows ``***`` up to its last ``@``.
    """
    text = str(text)
    whole = text.strip()
    if _url_start(whole) == 0:
        try:
            if urlsplit(whole).netloc:
                text = text.replace(whole, redact_url(whole))  # its path may hold more text: the pieces are looked at too
        except ValueError:
            pass
    return re.sub(r"\S+", lambda m: _redact_token(m.group(0)), text)  # white-space-separated pieces, each parsed


def url_secrets(url: str) -> list[str]:
    """The secret parts of a URL: its password (its user name when it has none: a token given as
    the user name) and its query values (a bare query word too), as written and percent-decoded."""
    try:
        parts = urlsplit(str(url).strip())
    except ValueError:
        return []
    found = [parts.password] if parts.password else [parts.username] if parts.username else []  # no password: the user name is the token
    found += [v for p in parts.query.split("&") for v in (p.partition("=")[2] or p,) if v] if parts.query else []
    decoded = [unquote_plus(v) for v in found] + [unquote(v) for v in found]
    return found + decoded + [quote(v, safe=_QUERY_SAFE) for v in decoded]  # and as httpx percent-encodes it on the wire


def basic_credentials(user: str, password: str) -> str:
    """The ``Authorization`` value of HTTP basic authentication, as requests writes it (Latin-1 when it can, else UTF-8)."""
    pair = f"{user}:{password}"
    try:
        raw = pair.encode("latin-1")
    except UnicodeEncodeError:
        raw = pair.encode("utf-8")
    return "Basic " + base64.b64encode(raw).decode("ascii")


def is_credential_header(name: str) -> bool:
    """A header whose value is probably a secret (Authorization, X-Api-Key, Cookie, ...)."""
    return bool(_CREDENTIAL_HEADER.search(name))


def check_token(value: str, where: str) -> str:
    """A usable bearer token: non-empty, one line, no spaces inside; UsageError otherwise (never echoing the value)."""
    token = value.strip()
    if not token:
        raise UsageError(f"{where} is empty: refusing an empty token")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in token):
        raise UsageError(f"{where} holds spaces, line breaks or control characters: a token is one word")
    return token


def read_token(token_env: str | None = None, token_file: str | os.PathLike | None = None) -> str | None:
    """The token named by ``token_env`` (an environment variable) or ``token_file`` (a file); None when neither is given.

    Giving both, an unset variable, an unreadable file or an empty token is a UsageError.
    """
    if token_env and token_file:
        raise UsageError("give --token-env or --token-file, not both")
    if token_env:
        value = os.environ.get(token_env)
        if value is None:
            raise UsageError(f"environment variable {token_env} is not set (--token-env)")
        return check_token(value, f"environment variable {token_env} (--token-env)")
    if token_file:
        p = Path(token_file)
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read token file {p}: {exc.strerror or exc}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"token file {p} is not UTF-8 text") from None
        return check_token(text, f"token file {p} (--token-file)")
    return None


class Masker:
    """Replaces known secret values by ``***`` in text (values shorter than 4 characters are left alone)."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        values = {s for s in secrets if s and len(s) >= 4}
        self._secrets = sorted(values, key=len, reverse=True)  # longest first: a secret containing another is hidden whole

    def __call__(self, text: str) -> str:
        for s in self._secrets:  # the known secrets first, whole; then whatever a URL in the text holds
            text = text.replace(s, REDACTED)
        return redact_urls_in(text)
