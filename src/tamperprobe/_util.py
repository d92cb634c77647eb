"""Small helpers with no heavy imports: one-line error text, atomic file writes, stable seeds, durations."""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol


def one_line(exc: BaseException | str, limit: int = 300, *, with_type: bool = False) -> str:
    """The first line of an exception's text (or a string), cut to ``limit`` characters.

    An exception with no text gives its type name; ``with_type`` prefixes ``TypeName: ``.
    """
    text = exc if isinstance(exc, str) else str(exc)
    lines = text.strip().splitlines()
    first = lines[0].strip()[:limit] if lines else ""
    if isinstance(exc, BaseException):
        if not first:
            return type(exc).__name__
        if with_type:
            return f"{type(exc).__name__}: {first}"
    return first


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write a file so that readers see the old or the new content, never a part.

    ``write(tmp)`` writes the whole content to ``tmp``, a file in the same folder, which then
    replaces ``path``. Missing parent folders are created; on failure the temporary file is removed.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def derive_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed derived from ``seed`` and names (stable across runs and processes, unlike ``hash``)."""
    return zlib.crc32("|".join([str(int(seed)), *map(str, parts)]).encode()) & 0x7FFFFFFF


class Progress(Protocol):
    """A progress callback: ``progress(done, total)`` or ``progress(done, total, what)``, ``what`` naming the current step."""

    def __call__(self, done: int, total: int, what: str = "", /) -> None: ...


def env_secret(variable: str, option: str = "--token-env") -> str:
    """The value of environment variable ``variable`` (a token named by ``option``); UsageError if unset or empty."""
    from .errors import UsageError

    value = os.environ.get(variable)
    if not value:
        raise UsageError(f"environment variable {variable} is not set or empty ({option})")
    return value


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str | float | int) -> float:
    """``30s``, ``10m``, ``1h30m``, ``1.5h``, ``2d``, ``500ms`` or plain seconds (``90``) -> seconds; anything else is a UsageError."""
    from .errors import UsageError

    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        try:
            value = float(s)
        except ValueError:
            import re

            pieces = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)", s)
            if not s or "".join(a + b for a, b in pieces) != s:
                raise UsageError(f"bad duration {text!r}: use e.g. 30s, 10m, 1h, 1h30m") from None
            value = sum(float(a) * _UNITS[b] for a, b in pieces)
    if not value >= 0 or value == float("inf"):
        raise UsageError(f"bad duration {text!r}: must be a finite number of seconds >= 0")
    return value
