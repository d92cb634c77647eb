"""Secrets on the served side: where tokens come from, and keeping them out of everything shown or stored.

Tokens (a client's bearer token, ``serve``'s required token) come from an environment variable
(``--token-env VAR``) or a file (``--token-file FILE``), never from the command line, where any
user of the machine can read them (``ps``, shell history). An empty or multi-line token is refused.

Whatever names an endpoint (a target name, a report, a history row, a hook's
``TAMPERPROBE_ENDPOINT``) shows its URL through ``redact_url``: no ``user:password@``, every
query value replaced by ``***`` (``?api_key=***``), no fragment. ``Masker`` hides the secrets a
client knows (its token, the URL's password and query values, credential-like headers) in any
text it passes on, such as a server's error message that echoes a request back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ..errors import UsageError

REDACTED = "***"
_CREDENTIAL_HEADER = re.compile(r"auth|token|key|secret|cookie|session|password|credential", re.IGNORECASE)
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>,.;:!?)\]]", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` without ``user:password@``, with every query value shown as ``***`` and no fragment."""
    try:
        parts = urlsplit(str(url).strip())
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # an unparsable URL: show nothing that could be a secret
        return "(unparsable URL)"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    query = "&".join(f"{k}={REDACTED}" if v else k for k, v in parse_qsl(parts.query, keep_blank_values=True))
    if parts.query and not query:
        query = REDACTED
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact_urls_in(text: str) -> str:
    """``text`` with every URL in it shown through ``redact_url``."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


def url_secrets(url: str) -> list[str]:
    """The secret parts of a URL: the password of its user info and its query values."""
    try:
        parts = urlsplit(str(url).strip())
    except ValueError:
        return []
    found = [parts.password] if parts.password else []
    found += [v for _, v in parse_qsl(parts.query, keep_blank_values=True) if v]
    return found


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
        text = redact_urls_in(text)
        for s in self._secrets:
            text = text.replace(s, REDACTED)
        return text
