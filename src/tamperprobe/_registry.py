"""The one registry type for plug-ins: marker methods, attacks, routers and protocol clients.

A ``Registry`` maps a name to a class, given as ``"package.module:Class"`` and imported the
first time it is read (so listing names, and a command's ``--help``, import no torch), or as the
class itself. What every family needs of its registry lives here once:

* ``names()``, and ``cls(name)``: the class, or a one-line ``UsageError`` listing the choices
  (``canonical`` first resolves a name case-insensitively and through the classes' ``aliases``
  when the registry declares them);
* ``build(entry, params)``: an instance from a registered name and keyword parameters (text from
  the command line or typed values), or a hand-built instance as is; both validated by the
  constraint machinery of ``_params`` (``Configurable.validated``), so a bad value fails here
  and not half-way through a run;
* ``describe()`` and ``help()``: one line per entry for help texts, from the family's own
  summary, else the first line of the class docstring, read from the source when the module is
  not imported yet.

Adding a plug-in is one new module plus one line in its family's registry (``register`` does
the same at run time, ``monkeypatch.setitem`` in a test).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import typing
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any, Generic, TypeVar

from .errors import UsageError

T = TypeVar("T")


def first_line(doc: str | None) -> str:
    """The first line of a docstring, without its final full stop ("" for none)."""
    lines = (doc or "").strip().splitlines()
    return lines[0].strip().rstrip(".") if lines else ""


def _split(ref: str) -> tuple[str, str]:
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise UsageError(f"a registry entry is 'package.module:Class', got {ref!r}")
    return module, attr


def class_docstring(ref: str) -> str | None:
    """The docstring of class ``"module:Class"``, from the imported module or else read from its source without importing it."""
    module, attr = _split(ref)
    if module in sys.modules:
        return getattr(getattr(sys.modules[module], attr, None), "__doc__", None)
    try:
        spec = importlib.util.find_spec(module)
        source = Path(spec.origin).read_text(encoding="utf-8") if spec is not None and spec.origin else ""
    except (ImportError, OSError, ValueError):
        return None
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == attr:
            return ast.get_docstring(node)
    return None


class Registry(MutableMapping[str, type[T]], Generic[T]):
    """Classes of one plug-in family by name, imported on first use (see the module doc).

    ``kind`` names the family in messages (``"method"``, ``"attack"``, ...); ``base`` is the class
    (or its ``"module:Class"``) every entry must derive from; ``summary`` gives an entry's help
    line (default: its docstring's first line); ``aliases`` names a class attribute listing other
    names ``canonical`` accepts.
    """

    def __init__(
        self,
        kind: str,
        entries: Mapping[str, str | type[T]],
        *,
        base: str | type | None = None,
        summary: Callable[[type[T]], str] | None = None,
        aliases: str | None = None,
    ) -> None:
        self.kind = kind
        self._entries: dict[str, str | type[T]] = dict(entries)
        self._base = base
        self._summary = summary
        self._aliases = aliases

    # -- the mapping

    def __getitem__(self, name: str) -> type[T]:
        entry = self._entries[name]
        if isinstance(entry, str):
            module, attr = _split(entry)
            loaded = getattr(importlib.import_module(module), attr, None)
            if not isinstance(loaded, type) or not issubclass(loaded, self.base()):
                raise UsageError(f"{self.kind} {name!r} is registered as {entry}, which is not a {self.base().__name__}")
            self._entries[name] = entry = typing.cast("type[T]", loaded)
        return entry

    def __setitem__(self, name: str, entry: str | type[T]) -> None:
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"

    # -- what every family needs

    def base(self) -> type:
        """The class every entry derives from (``object`` when none is declared)."""
        if isinstance(self._base, str):
            module, attr = _split(self._base)
            self._base = getattr(importlib.import_module(module), attr)
        return self._base if isinstance(self._base, type) else object

    def register(self, name: str, entry: str | type[T]) -> None:
        """Add (or replace) one entry: the one registry line of a new plug-in, at run time."""
        self[name] = entry

    def names(self) -> list[str]:
        """Every registered name, in registry order."""
        return list(self._entries)

    def unknown(self, name: object) -> UsageError:
        """The one-line error for a name that is not registered, listing the choices."""
        return UsageError(f"unknown {self.kind} {name!r}: choose one of {', '.join(self._entries) or '(none registered)'}")

    def canonical(self, name: str) -> str:
        """The registered name for ``name``: itself or, in a registry with ``aliases``, a name or alias in any case."""
        if name in self._entries:
            return name
        if self._aliases:
            key = str(name).strip().lower()
            for registered in self._entries:
                if key == registered.lower():
                    return registered
            for registered in self._entries:
                if key in tuple(getattr(self[registered], self._aliases, ())):
                    return registered
        raise self.unknown(name)

    def cls(self, name: str) -> type[T]:
        """The class registered as ``name`` (or an alias); ``UsageError`` listing the choices for an unknown one."""
        if not isinstance(name, str):
            raise UsageError(f"a {self.kind} is a name or a {self.base().__name__} instance, not {type(name).__name__}")
        return self[self.canonical(name)]

    def build(self, entry: str | T, params: Mapping[str, Any] | None = None) -> T:
        """A validated instance: the class named ``entry`` built from ``params`` (text or typed), or an instance as is.

        Parameters are coerced by the constructor's annotations, unknown keys refused and every
        value checked by the class's ``constraints`` (``_params.build``). An instance already
        holds its parameters: giving ``params`` with one is a ``UsageError``; it is validated too.
        """
        from ._params import build

        if isinstance(entry, self.base()) and not isinstance(entry, (str, type)):
            if params:
                raise UsageError(f"parameters {', '.join(params)} given with a {type(entry).__name__} instance: set them in its constructor")
            validated = getattr(entry, "validated", None)
            if callable(validated):
                validated()
            return entry
        if not isinstance(entry, str):
            raise UsageError(f"a {self.kind} is a name or a {self.base().__name__} instance, not {type(entry).__name__}")
        built: T = build(self.cls(entry), dict(params or {}))  # type: ignore[arg-type]
        return built

    def describe(self) -> dict[str, str]:
        """Name -> one-line description: the family's ``summary``, else the class docstring's first line (read without importing)."""
        out = {}
        for name, entry in self._entries.items():
            if self._summary is not None:
                out[name] = self._summary(self[name]) or name
            elif isinstance(entry, str):
                out[name] = first_line(class_docstring(entry)) or name
            else:
                out[name] = first_line(entry.__doc__) or name
        return out

    def help(self, sep: str = "; ") -> str:
        """Every entry as ``name: description``, joined by ``sep``: the text of a command's help for this family."""
        return sep.join(f"{name}: {text}" if text != name else name for name, text in self.describe().items())
