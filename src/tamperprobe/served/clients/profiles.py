"""Client profiles: each request goes out exactly as a named ordinary client would send it.

An operator who can tell tamperprobe's requests from ordinary traffic can answer them with the
original model and everything else with the tampered one. So a request carries nothing an
ordinary client would not: a ``Profile`` is the exact request of one client, byte for byte
(tests/test_client_profiles.py captures the real libraries on a socket and compares):

* the header names, their order and their values, Host, Content-Length and the credentials in
  the places that client puts them;
* the JSON body as that client serialises it (``separators``; numbers as Python's ``repr``,
  which ``json``, ``rapidjson`` and a file written by ``json.dump`` share), or the binary tensor
  extension (``binary``, tritonclient's default for the Open Inference Protocol);
* one connection per request or kept alive (``keep_alive``), as that client does;
* over TLS, a ClientHello of the same shape (``tls``: cipher list, extensions and their order);
* no request id (none of these clients sends one).

==================  ==============================================================================
``python-requests``  ``requests.post(url, json=body)``, the default: the installed requests' User-Agent
                     and Accept-Encoding (``requests.utils.default_headers()`` at run time: the profile
                     tracks the installed version; without requests, the headers of requests 2.32.3);
                     a new connection for every request
``python-requests-session``  the same through one ``requests.Session()``: one kept-alive connection
``tritonclient``     ``tritonclient.http.InferenceServerClient(...).infer(name, inputs)``: compact JSON,
                     the tensor in binary and binary outputs requested, no Content-Type, one kept-alive
                     connection; ``kserve`` only
``curl``             ``curl -X POST -H 'Content-Type: application/json' -d @file URL``: the installed curl's
                     User-Agent (``curl --version``; else curl 7.88.1), a new connection for every request,
                     ``Expect: 100-continue`` on a body over 1 MiB (and the body held back up to 1 s);
                     over plain HTTP only: curl's TLS (OpenSSL's cipher list, ALPN h2, then HTTP/2) is not
                     reproduced
==================  ==============================================================================

Only the owner knows what their application's requests look like, so a profile can also be a
JSON file (``--client-profile FILE``)::

    {
      "base": "python-requests",
      "headers": [["Host", "{host}"], ["User-Agent", "shop-frontend/4.2"], ["Accept", "application/json"],
                  ["{extra}", ""], ["Content-Type", "application/json"], ["Content-Length", "{length}"]],
      "separators": [",", ":"],
      "keep_alive": true,
      "input": {"name": "input__0", "datatype": "FP32"}
    }

Every key but ``headers`` is optional (``tls``: the ClientHello's shape, ``httpx``, ``urllib3`` or
``no-alpn``, ``_transport.tls_context``) (taken from ``base``, default ``python-requests``).
``headers`` lists every header in order, values literal or one of the placeholders ``{host}``,
``{length}`` (Content-Length; required), ``{basic}`` (HTTP basic credentials of the URL's
``user:password@``), ``{header_length}`` (the binary extension's JSON length); the entry
``["{extra}", ""]`` says where ``--header`` and the bearer token go (at the end if absent).
Content-Type, Content-Length and the binary header are left out of a request without a body.
``input`` (``kserve`` only) names the served model's input and datatype, so no metadata request
is made (an ordinary client knows its model's input; a metadata request is a request of another
shape).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..._util import one_line
from ...errors import UsageError
from ..untrusted import clean

HOST, LENGTH, BASIC, HEADER_LENGTH, EXTRA = "{host}", "{length}", "{basic}", "{header_length}", "{extra}"
_PLACEHOLDERS = (HOST, LENGTH, BASIC, HEADER_LENGTH)
_BODY_HEADERS = frozenset({"content-length", "content-type", "inference-header-content-length"})
_TOKEN_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

REQUESTS_FALLBACK = "2.32.3"  # the requests whose headers the profile shows when requests is not installed
CURL_FALLBACK = "7.88.1"


@dataclass(frozen=True)
class Profile:
    """The exact shape of one client's requests (see the module doc)."""

    name: str
    headers: tuple[tuple[str, str], ...]
    separators: tuple[str, str] = (", ", ": ")
    keep_alive: bool = False
    binary: bool = False  # kserve: tensors in the binary extension, binary outputs requested
    protocols: tuple[str, ...] | None = None  # the dialects this client speaks (None: any)
    source: str = ""  # what it reproduces, with the version it tracks
    input_name: str | None = None  # kserve: the served model's input, known without a metadata request
    input_datatype: str | None = None
    tls: str = "httpx"  # the ClientHello's shape: _transport.TLS_STYLES
    expect_above: int | None = None  # a body longer than this goes with "Expect: 100-continue" (curl: 1 MiB)

    def dumps(self, body: Any) -> bytes:
        """``body`` as this client writes JSON (NaN and infinities refused, ValueError)."""
        return json.dumps(body, allow_nan=False, separators=self.separators).encode()

    def head(
        self,
        *,
        host: str,
        length: int | None,
        extra: Iterable[tuple[str, str]] = (),
        basic: str | None = None,
        header_length: int | None = None,
    ) -> list[tuple[str, str]]:
        """The request's headers in order: ``length`` None for a request without a body (no body headers)."""
        values = {HOST: host, LENGTH: None if length is None else str(length), BASIC: basic}
        values[HEADER_LENGTH] = None if header_length is None else str(header_length)
        extra = list(extra)
        literal = {n.lower() for n, v in self.headers if n != EXTRA and v not in _PLACEHOLDERS}
        replacing = {k.lower(): (k, v) for k, v in extra if k.lower() in literal}  # given again: replaces the client's, in place
        rest = [(k, v) for k, v in extra if k.lower() not in literal]
        out: list[tuple[str, str]] = []
        placed = False
        for name, value in self.headers:
            if name == EXTRA:
                out += rest
                placed = True
            elif length is None and name.lower() in _BODY_HEADERS:
                continue
            elif name.lower() in replacing:
                out.append(replacing[name.lower()])
            elif value not in _PLACEHOLDERS:
                out.append((name, value))
            elif values[value] is not None:
                out.append((name, str(values[value])))
        out = out if placed else out + rest
        if self.expect_above is not None and length is not None and length > self.expect_above:
            out.append(("Expect", "100-continue"))  # the body then waits for the server's "100 Continue", at most 1 s
        return out


@functools.cache
def _requests_headers() -> tuple[str, str, str]:
    """(User-Agent, Accept-Encoding, source) of the installed requests, else of requests 2.32.3 without brotli."""
    try:
        import requests.utils
    except ImportError:
        return (
            f"python-requests/{REQUESTS_FALLBACK}",
            "gzip, deflate",
            f"python-requests {REQUESTS_FALLBACK} (requests is not installed: a fixed copy)",
        )
    h = requests.utils.default_headers()
    return str(h["User-Agent"]), str(h["Accept-Encoding"]), f"python-requests {requests.__version__} (the installed version, tracked at run time)"


@functools.cache
def _curl_version() -> str:
    """The installed curl's version (``curl --version``), else ``CURL_FALLBACK``."""
    exe = shutil.which("curl")
    if exe:
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=5, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        m = re.match(r"curl (\d+(?:\.\d+)+)", out)
        if m:
            return m.group(1)
    return CURL_FALLBACK


def _geventhttpclient_version() -> str:
    try:
        from importlib.metadata import version

        return version("geventhttpclient")
    except Exception:  # noqa: BLE001 - not installed: the version tritonclient 2.73 pulled in
        return "2.6.1"


def python_requests() -> Profile:
    """``requests.post(url, json=body)`` with the installed requests (see the module doc)."""
    ua, accept_encoding, source = _requests_headers()
    from ._transport import decodable

    accept_encoding = ", ".join(e for e in (p.strip() for p in accept_encoding.split(",")) if decodable(e))
    head = (
        ("Host", HOST),
        ("User-Agent", ua),
        ("Accept-Encoding", accept_encoding),
        ("Accept", "*/*"),
        ("Connection", "keep-alive"),
        (EXTRA, ""),
        ("Content-Length", LENGTH),
        ("Content-Type", "application/json"),
        ("Authorization", BASIC),
    )
    return Profile("python-requests", head, source=source, tls="urllib3")


def python_requests_session() -> Profile:
    """``requests.Session().post(url, json=body)``: python-requests' requests on one kept-alive connection."""
    return replace(python_requests(), name="python-requests-session", keep_alive=True)


def tritonclient() -> Profile:
    """``tritonclient.http``'s ``infer`` with its defaults (binary tensors both ways, one kept-alive connection)."""
    version = _geventhttpclient_version()
    head = (
        ("User-Agent", f"python/gevent-http-client-{version}"),
        (EXTRA, ""),
        ("Inference-Header-Content-Length", HEADER_LENGTH),
        ("authorization", BASIC),  # as tritonclient.http.auth.BasicAuth writes it
        ("Host", HOST),
        ("Content-Length", LENGTH),
    )
    source = f"tritonclient.http over geventhttpclient {version}"
    return Profile("tritonclient", head, separators=(",", ":"), keep_alive=True, binary=True, protocols=("kserve",), source=source, tls="no-alpn")


def curl() -> Profile:
    """``curl -X POST -H 'Content-Type: application/json' -d @file URL`` (a file written by ``json.dump``)."""
    version = _curl_version()
    head = (
        ("Host", HOST),
        ("Authorization", BASIC),
        ("User-Agent", f"curl/{version}"),
        ("Accept", "*/*"),
        ("Content-Type", "application/json"),
        (EXTRA, ""),
        ("Content-Length", LENGTH),
    )
    return Profile("curl", head, source=f"curl {version}", expect_above=1 << 20)


BUILTIN = {"python-requests": python_requests, "python-requests-session": python_requests_session, "tritonclient": tritonclient, "curl": curl}
ALIASES = {
    "requests": "python-requests",
    "requests-session": "python-requests-session",
    "triton": "tritonclient",
    "tritonclient.http": "tritonclient",
}
DEFAULT = "python-requests"


def load_profile(spec: str | os.PathLike | Mapping[str, Any] | Profile | None) -> Profile:
    """A profile by name (``python-requests``, ``tritonclient``, ``curl``), from a JSON file or a dict; None: the default."""
    if isinstance(spec, Profile):
        return spec
    if spec is None:
        return BUILTIN[DEFAULT]()
    if isinstance(spec, str) and not spec.lstrip().startswith("{"):
        key = ALIASES.get(spec.strip().lower(), spec.strip().lower())
        if key in BUILTIN:
            return BUILTIN[key]()
        if not Path(spec).is_file():
            raise UsageError(f"unknown client profile {clean(spec, 80)!r}: give one of {', '.join(BUILTIN)} or a profile file")
    doc = spec
    if isinstance(spec, (str, os.PathLike)):
        text = str(spec) if str(spec).lstrip().startswith("{") else _read(Path(spec))
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"client profile is not valid JSON: {one_line(exc)}") from None
    if not isinstance(doc, Mapping):
        raise UsageError("a client profile file must be a JSON object")
    return _from_doc(doc)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read client profile {path}: {one_line(getattr(exc, 'strerror', None) or exc)}") from None


_KEYS = {"base", "name", "headers", "separators", "keep_alive", "binary", "input", "tls"}


def _from_doc(doc: Mapping[str, Any]) -> Profile:
    """An owner-described profile (see the module doc); UsageError naming what is wrong."""
    unknown = set(doc) - _KEYS
    if unknown:
        raise UsageError(f"client profile: unknown key(s) {', '.join(sorted(map(str, unknown)))} (known: {', '.join(sorted(_KEYS))})")
    base = load_profile(str(doc.get("base", DEFAULT)))
    changes: dict[str, Any] = {"name": str(doc.get("name", "owner")), "source": "described by the owner"}
    if "headers" in doc:
        changes["headers"] = _headers(doc["headers"])
    if "separators" in doc:
        seps = doc["separators"]
        if not (isinstance(seps, list) and len(seps) == 2 and all(isinstance(s, str) and s.strip() in (",", ":") for s in seps)):
            raise UsageError('client profile: "separators" must be [item, key] like [", ", ": "] or [",", ":"]')
        changes["separators"] = (seps[0], seps[1])
    for key in ("keep_alive", "binary"):
        if key in doc:
            if not isinstance(doc[key], bool):
                raise UsageError(f'client profile: "{key}" must be true or false')
            changes[key] = doc[key]
    if "tls" in doc:
        from ._transport import TLS_STYLES

        if doc["tls"] not in TLS_STYLES:
            raise UsageError(f'client profile: "tls" must be one of {", ".join(TLS_STYLES)}')
        changes["tls"] = doc["tls"]
    if "input" in doc:
        inp = doc["input"]
        if not (isinstance(inp, Mapping) and isinstance(inp.get("name"), str) and isinstance(inp.get("datatype"), str)):
            raise UsageError('client profile: "input" must be {"name": ..., "datatype": ...}')
        changes["input_name"], changes["input_datatype"] = inp["name"], inp["datatype"].upper()
    if changes.get("binary") and base.protocols is None:
        changes["protocols"] = ("kserve",)
    return replace(base, **changes)


def _headers(items: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(items, list) or not all(isinstance(i, list) and len(i) == 2 and all(isinstance(s, str) for s in i) for i in items):
        raise UsageError('client profile: "headers" must be a list of [name, value] pairs of strings')
    out: list[tuple[str, str]] = []
    for name, value in items:
        if name == EXTRA:
            out.append((EXTRA, ""))
            continue
        if not _TOKEN_NAME.fullmatch(name) or any(ch in value for ch in "\r\n\0"):
            raise UsageError(f"client profile: bad header {clean(name, 60)!r}: a token name and a one-line value")
        if "{" in value and value not in _PLACEHOLDERS:
            raise UsageError(f"client profile: header {name}: a placeholder must be the whole value, one of {', '.join(_PLACEHOLDERS)}")
        out.append((name, value))
    names = [n.lower() for n, _ in out]
    if len(set(names)) != len(names):
        raise UsageError("client profile: a header is listed twice")
    for need, where in ((HOST, "Host"), (LENGTH, "Content-Length")):
        if (where.lower(), need) not in [(n.lower(), v) for n, v in out]:
            raise UsageError(f'client profile: "headers" needs ["{where}", "{need}"]')
    return tuple(out)
