"""The fleet file: every endpoint to verify, each pinned to its fingerprint (TOML, read with ``tomllib``).

::

    [fleet]                 # optional: settings of the fleet process itself
    concurrency = 32        # endpoints verified at once
    history = "fleet.sqlite"

    [defaults]              # any endpoint field; endpoints override
    protocol = "kserve"
    every = "1h"
    trust_keys = ["owner.pub"]

    [[endpoint]]
    name = "digits-eu"      # unique; labels metrics, history, hooks
    url = "https://models.example.internal/v2/models/digits"
    fingerprint = "digits-v3.tpf"
    expect = "digits:v3"    # fingerprint id or model name:version it must carry
    token_env = "EU_TOKEN"  # or token_file; never the secret itself

Everything is checked before anything is sent: an error names the file, the entry and the field
in one line (``UsageError``, exit 2), and an unknown field is an error (a typo must not silently
drop a setting such as ``expect``). Relative paths are relative to the fleet file's folder.
Secrets never live in the file: ``token_env`` names an environment variable, ``token_file`` a
file; a credential header or a URL with a password or a secret query value is refused.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .._util import parse_duration
from ..errors import UsageError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FP_ID = re.compile(r"[0-9a-f]{16}")  # a fingerprint id, as ``fingerprint.check_expected`` reads one


def _positive(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"must be a number > 0, got {v!r}")
    return float(v)


def _non_negative(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise ValueError(f"must be a number >= 0, got {v!r}")
    return float(v)


def _count(low: int) -> Callable[[str, Any], int]:
    def check(name: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"must be a whole number >= {low}, got {v!r}")
        return v

    return check


def _text(name: str, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"must be a non-empty string, got {v!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise ValueError("must not hold control characters")
    return v


def _flag(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, got {v!r}")
    return v


def _duration(name: str, v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"must be a duration such as 30s, 10m or 1h, got {v!r}")
    try:
        return parse_duration(v)
    except UsageError as exc:
        raise ValueError(str(exc)) from None


def _paths(name: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(p, str) and p for p in v):
        raise ValueError("must be a path or a non-empty list of paths")
    return tuple(v)


def _headers(name: str, v: Any) -> tuple[tuple[str, str], ...]:
    from ..served.credentials import is_credential_header

    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise ValueError('must be a table of strings, e.g. headers = { "X-Team" = "ml" }')
    for k, x in v.items():
        if is_credential_header(k):
            raise ValueError(f"header {k!r} holds a secret: use token_env or token_file")
        if any(ord(c) < 32 or ord(c) == 127 for c in k + x):
            raise ValueError(f"header {k!r} holds control characters")
    return tuple(v.items())


def _url(name: str, v: Any) -> str:
    from urllib.parse import parse_qsl, urlsplit

    from ..served.credentials import is_credential_header

    text = _text(name, v)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if port == 0:
        raise ValueError("has port 0")
    if parts.password or parts.username:
        raise ValueError("holds credentials: use token_env or token_file")
    if any(is_credential_header(k) for k, _ in parse_qsl(parts.query)):
        raise ValueError("holds a secret in its query: use token_env or token_file")
    return text


def _spec(name: str, v: Any) -> str:
    from ..outputs import OutputSpec

    text = _text(name, v)
    try:
        OutputSpec.parse(text)
    except UsageError as exc:
        raise ValueError(str(exc)) from None
    return text


def _expect(name: str, v: Any) -> str:
    """A fingerprint id (16 hex digits) or ``NAME:VERSION``: the two forms ``fingerprint.check_expected`` compares against."""
    text = _text(name, v).strip()
    if _FP_ID.fullmatch(text.lower()):
        return text
    model, sep, version = text.partition(":")
    if not (sep and model and version):
        raise ValueError(f"must be a fingerprint id (16 hex digits) or NAME:VERSION, got {text[:60]!r}")
    return text


def _protocol(name: str, v: Any) -> str:
    from ..served.clients import protocol_name

    try:
        return protocol_name(_text(name, v))
    except UsageError as exc:
        raise ValueError(str(exc)) from None


@dataclass(frozen=True)
class Endpoint:
    """One endpoint of the fleet and everything a run against it needs; built by ``load``, every field checked."""

    name: str
    url: str
    fingerprint: Path
    expect: str | None = None
    protocol: str = "kserve"
    model_name: str | None = None
    output_spec: str | None = None
    tolerance: float | None = None
    per_run: int | None = None
    decoys: float | None = None
    allow_repeat: bool = False
    every: float = 3600.0
    spread: float = 0.0
    deadline: float = 300.0
    timeout: float = 10.0
    retries: int = 3
    batch_size: int = 1
    delay: float = 0.0
    max_inconclusive: int = 0
    token_env: str | None = None
    token_file: Path | None = None
    headers: tuple[tuple[str, str], ...] = ()
    insecure: bool = False
    ca_cert: Path | None = None
    template: Path | None = None
    client_profile: str | None = None
    hook: str | None = None
    trust_keys: tuple[Path, ...] = ()
    allow_unsigned: bool = False
    decrypt_key: Path | None = None


@dataclass(frozen=True)
class Settings:
    """The fleet process's own settings (the ``[fleet]`` table)."""

    concurrency: int = 32
    per_endpoint_connections: int = 4
    history: Path | None = None
    event_log: Path | None = None


@dataclass(frozen=True)
class Fleet:
    """A loaded fleet file: its settings and its endpoints, in file order."""

    path: Path
    settings: Settings
    endpoints: tuple[Endpoint, ...] = field(default_factory=tuple)

    def fingerprints(self) -> dict[Path, list[Endpoint]]:
        """Endpoints grouped by fingerprint file: each file is read and checked once per pass."""
        out: dict[Path, list[Endpoint]] = {}
        for e in self.endpoints:
            out.setdefault(e.fingerprint, []).append(e)
        return out


# every field a [defaults] table or an [[endpoint]] entry may hold, with its check; paths are resolved after checking
_PATH = "path"
ENDPOINT_FIELDS: dict[str, Callable[[str, Any], Any] | str] = {
    "name": _text,
    "url": _url,
    "fingerprint": _PATH,
    "expect": _expect,
    "protocol": _protocol,
    "model_name": _text,
    "output_spec": _spec,
    "tolerance": _positive,
    "per_run": _count(1),
    "decoys": _non_negative,
    "allow_repeat": _flag,
    "every": _duration,
    "spread": _duration,
    "deadline": _duration,
    "timeout": _positive,
    "retries": _count(0),
    "batch_size": _count(1),
    "delay": _non_negative,
    "max_inconclusive": _count(0),
    "token_env": _text,
    "token_file": _PATH,
    "headers": _headers,
    "insecure": _flag,
    "ca_cert": _PATH,
    "template": _PATH,
    "client_profile": _text,
    "hook": _text,
    "trust_keys": _paths,
    "allow_unsigned": _flag,
    "decrypt_key": _PATH,
}
SETTINGS_FIELDS: dict[str, Callable[[str, Any], Any] | str] = {
    "concurrency": _count(1),
    "per_endpoint_connections": _count(1),
    "history": _PATH,
    "event_log": _PATH,
}
assert set(ENDPOINT_FIELDS) == {f.name for f in fields(Endpoint)}
assert set(SETTINGS_FIELDS) == {f.name for f in fields(Settings)}


def _check_table(table: Any, checks: Mapping[str, Any], base: Path, where: str) -> dict[str, Any]:
    """Every field of ``table`` checked and coerced; an unknown or bad field raises UsageError naming ``where``."""
    if not isinstance(table, dict):
        raise UsageError(f"{where}: must be a table")
    out: dict[str, Any] = {}
    for key, value in table.items():
        check = checks.get(key)
        if check is None:
            close = ", ".join(sorted(k for k in checks if k[:3] == key[:3])) or ", ".join(checks)
            raise UsageError(f"{where}: unknown field {key!r} (fields: {close})")
        try:
            if check == _PATH:
                out[key] = base / Path(_text(key, value))
            elif key == "trust_keys":
                out[key] = tuple(base / p for p in _paths(key, value))
            else:
                out[key] = check(key, value)
        except ValueError as exc:
            raise UsageError(f"{where}: field {key!r} {exc}") from None
    return out


def _endpoint(raw: Any, defaults: dict[str, Any], base: Path, where: str) -> Endpoint:
    values = {**defaults, **_check_table(raw, ENDPOINT_FIELDS, base, where)}
    for required in ("name", "url", "fingerprint"):
        if required not in values:
            raise UsageError(f"{where}: missing field {required!r}")
    if values.get("token_env") and values.get("token_file"):
        raise UsageError(f"{where}: give token_env or token_file, not both")
    if values.get("spread", 0.0) > values.get("deadline", 300.0):
        raise UsageError(f"{where}: field 'spread' must not exceed 'deadline'")
    if not NAME.match(values["name"]):
        raise UsageError(f"{where}: field 'name' must be letters, digits, '.', '_' or '-' (at most 128), got {values['name']!r}")
    return Endpoint(**values)


def load(path: str | Path) -> Fleet:
    """Read and check the fleet file at ``path``; raises UsageError (exit 2) with file, entry and field on any problem."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"{p}: cannot read the fleet file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{p}: the fleet file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{p}: not valid TOML: {exc}") from None
    return parse(data, p)


def parse(data: Mapping[str, Any], path: Path) -> Fleet:
    """A fleet from the parsed TOML ``data`` of the file at ``path`` (relative paths from its folder)."""
    base = path.parent
    unknown = sorted(set(data) - {"fleet", "defaults", "endpoint"})
    if unknown:
        raise UsageError(f"{path}: unknown table {unknown[0]!r} (tables: [fleet], [defaults], [[endpoint]])")
    settings = Settings(**_check_table(data.get("fleet", {}), SETTINGS_FIELDS, base, f"{path}: [fleet]"))
    defaults = _check_table(data.get("defaults", {}), ENDPOINT_FIELDS, base, f"{path}: [defaults]")
    if "name" in defaults:
        raise UsageError(f"{path}: [defaults]: field 'name' cannot come from [defaults]: every endpoint needs its own")
    raw = data.get("endpoint", [])
    if not isinstance(raw, list) or not raw:
        raise UsageError(f"{path}: no [[endpoint]] entries")
    endpoints: list[Endpoint] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(raw, 1):
        name = entry.get("name") if isinstance(entry, dict) else None
        where = f"{path}: endpoint {i}" + (f" ({name})" if isinstance(name, str) else "")
        e = _endpoint(entry, defaults, base, where)
        if e.name in seen:
            raise UsageError(f"{where}: name {e.name!r} is also endpoint {seen[e.name]}'s: names must be unique")
        seen[e.name] = i
        endpoints.append(e)
    return Fleet(path, settings, tuple(endpoints))
