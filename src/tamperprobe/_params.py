"""The one convention for plug-ins (marker methods, attacks): scikit-learn-like hyper-parameters.

A plug-in is a class whose ``__init__`` takes keyword-only hyper-parameters with defaults and
only stores each under its own name (``self.epsilon = epsilon``). Everything else follows:

* ``param_names()`` reads the names back from the constructor signature, ``get_params()`` their
  values, ``repr()`` shows them (and doubles as a test id);
* ``constraints`` declares what each accepts (``Interval``, ``Options``, a type); ``validated()``
  checks every value in one place and returns them coerced to the declared types. The base class
  of a plug-in family calls it from its public entry point, so a hand-built instance is checked
  exactly as one built from a name;
* ``presets`` (optional) names sets of values selected by a ``preset`` hyper-parameter:
  ``validated()`` puts the chosen preset's values in place of the defaults, and refuses a
  parameter given another value than both its default and the preset's;
* ``parse_params(cls, ["key=value", ...])`` turns command-line text into keyword arguments,
  coercing each value by the constructor's annotation (``float``, ``int``, ``bool``, ``str``,
  ``list[str]``, optional types), so every command shares one parser.

Settings objects (a campaign's settings, a retry policy, a connection, a schedule) use the same
machinery without being plug-ins: a frozen dataclass deriving from ``Settings`` declares its
fields' types and ``constraints``, and every instance is coerced and checked when it is built.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import numbers
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import UsageError


@dataclass(frozen=True)
class Interval:
    """A number in ``[low, high]`` (``closed`` says which ends belong); ``integer`` requires a whole number."""

    low: float | None = None
    high: float | None = None
    closed: str = "both"  # both | left | right | neither
    integer: bool = False
    text: str = ""  # how messages say the range, when the symbols would not ("at least 0 (0: all)")

    def check(self, name: str, value: Any) -> float | int:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise UsageError(f"{name} must be a number, got {value!r}")
        v = float(value)
        if not math.isfinite(v):
            raise UsageError(f"{name} must be a finite number, got {value!r}")
        if self.integer and v != int(v):
            raise UsageError(f"{name} must be a whole number, got {value!r}")
        lo_ok = self.low is None or (v >= self.low if self.closed in ("both", "left") else v > self.low)
        hi_ok = self.high is None or (v <= self.high if self.closed in ("both", "right") else v < self.high)
        if not (lo_ok and hi_ok):
            raise UsageError(f"{name} must be {self.describe()}, got {value!r}")
        return int(v) if self.integer else v

    def describe(self) -> str:
        if self.text:
            return self.text
        lo = "" if self.low is None else ("[" if self.closed in ("both", "left") else "(") + f"{self.low:g}"
        hi = "" if self.high is None else f"{self.high:g}" + ("]" if self.closed in ("both", "right") else ")")
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return (">= " if lo[0] == "[" else "> ") + lo[1:]
        if hi:
            return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
        return "a number"


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values."""

    values: tuple[Any, ...]

    def __init__(self, *values: Any) -> None:
        object.__setattr__(self, "values", tuple(values))

    def check(self, name: str, value: Any) -> Any:
        if value not in self.values:
            raise UsageError(f"unknown {name} {value!r}: choose one of {', '.join(map(str, self.values))}")
        return value


class Configurable:
    """Base of every plug-in: hyper-parameters live in the constructor signature and nowhere else."""

    name: ClassVar[str] = ""
    constraints: ClassVar[dict[str, Any]] = {}
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY]

    @classmethod
    def param_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls.__init__)
        return {n: hints.get(n, Any) for n in cls.param_names()}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        sig = inspect.signature(cls.__init__)
        return {p.name: p.default for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY}

    def get_params(self) -> dict[str, Any]:
        """Every hyper-parameter as given to the constructor (what is recorded with a result)."""
        return {n: getattr(self, n) for n in self.param_names()}

    def validated(self) -> dict[str, Any]:
        """Every hyper-parameter checked against ``constraints`` and its annotation, coerced; raises UsageError."""
        types_ = self.param_types()
        out = {}
        for n, v in self.get_params().items():
            v = coerce(n, v, types_[n])
            rule = self.constraints.get(n)
            if rule is not None and v is not None:
                v = rule.check(n, v)
            out[n] = v
        if out.get("preset") is not None:
            out = self._apply_preset(out)
        return out

    def _apply_preset(self, params: dict[str, Any]) -> dict[str, Any]:
        if params["preset"] not in self.presets:
            raise UsageError(f"unknown preset {params['preset']!r}: choose one of {', '.join(self.presets) or '(none)'}")
        defaults = self.defaults()
        out = dict(params)
        for key, value in self.presets[params["preset"]].items():
            if out[key] not in (defaults[key], value):
                raise UsageError(f"preset={params['preset']} sets {key}={value}: drop {key}={out[key]} or the preset")
            out[key] = value
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def _origin(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    return typing.get_origin(tp), typing.get_args(tp)


def coerce(name: str, value: Any, tp: Any) -> Any:
    """``value`` as annotation ``tp`` requires: numbers from numbers, lists from comma text; raises UsageError."""
    origin, args = _origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return coerce(name, value, a)
            except UsageError as exc:
                errors.append(str(exc))
        raise UsageError(errors[0] if errors else f"bad value for {name}: {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        if isinstance(value, numbers.Integral) and value in (0, 1):
            return bool(value)
        raise UsageError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UsageError(f"{name} must be a whole number, got {value!r}")
        if isinstance(value, str):
            value = _number(name, value)
        if isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value) == round(float(value)):
            return round(float(value))
        raise UsageError(f"{name} must be a whole number, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise UsageError(f"{name} must be a number, got {value!r}")
        if isinstance(value, str):
            value = _number(name, value)
        if isinstance(value, numbers.Real):
            v = float(value)
            if not math.isfinite(v):
                raise UsageError(f"{name} must be a finite number, got {value!r}")
            return v
        raise UsageError(f"{name} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UsageError(f"{name} must be text, got {value!r}")
    if origin in (list, tuple) or tp in (list, tuple):
        item = args[0] if args else Any
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{name} must be a list, got {value!r}")
        return [coerce(name, v, item) for v in value]
    return value


def _number(name: str, text: str) -> float | int:
    try:
        v = json.loads(text)
    except ValueError:
        try:
            v = float(text)
        except ValueError:
            raise UsageError(f"{name} must be a number, got {text!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UsageError(f"{name} must be a number, got {text!r}")
    return v


def parse_kv(items: Iterable[str] | None, option: str = "--param") -> dict[str, str]:
    """``["key=value", ...]`` -> ``{key: value}`` (values as text); raises UsageError on an item without ``=``."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise UsageError(f"bad {option} {item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def parse_params(cls: type[Configurable], items: Iterable[str] | dict[str, Any] | None, option: str = "--param") -> dict[str, Any]:
    """Keyword arguments for ``cls`` from ``key=value`` texts (or a dict), coerced by the constructor's annotations."""
    raw = dict(items) if isinstance(items, dict) else parse_kv(items, option)
    types_ = cls.param_types()
    unknown = [k for k in raw if k not in types_]
    if unknown:
        what = f"{cls.name or cls.__name__}"
        raise UsageError(f"unknown parameter(s) {', '.join(unknown)} for {what}: valid are {', '.join(types_) or '(none)'}")
    return {k: coerce(k, v, types_[k]) for k, v in raw.items()}


def build(cls: type[Configurable], params: dict[str, Any] | None = None) -> Any:
    """An instance of ``cls`` from keyword parameters (text or typed), validated; UsageError on anything wrong."""
    kwargs = parse_params(cls, params or {})
    obj = cls(**kwargs)
    obj.validated()
    return obj


class Settings:
    """Base of settings objects: a frozen dataclass whose fields are coerced and checked when an instance is built.

    A subclass is declared ``@dataclass(frozen=True)`` with typed fields and, as a plug-in does,
    ``constraints`` (field -> ``Interval``, ``Options`` or anything with ``check(name, value)``).
    ``labels`` names a field in messages (e.g. its command-line option), ``_check_together`` ties
    several fields together. Simple annotations (``int``, ``float``, ``bool``, ``str``, optional
    ones) are coerced as ``--param`` values are; other fields are left as given. Anything wrong
    raises ``UsageError`` from the constructor, so an object that exists is valid.
    """

    constraints: ClassVar[dict[str, Any]] = {}
    labels: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        hints = _class_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            name = self.labels.get(f.name, f.name)
            value = getattr(self, f.name)
            if _simple(hints.get(f.name, Any)):
                value = coerce(name, value, hints[f.name])
            rule = self.constraints.get(f.name)
            if rule is not None and value is not None:
                value = rule.check(name, value)
            object.__setattr__(self, f.name, value)
        self._check_together()

    def _check_together(self) -> None:
        """Rules that tie several (checked) fields together; raise UsageError. None by default."""

    def to_json(self) -> dict[str, Any]:
        """The fields as a dict (what a result records)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


_HINTS: dict[type, dict[str, Any]] = {}


def _class_hints(cls: type) -> dict[str, Any]:
    """A settings class's field annotations, resolved once per class (settings are built for every client and run)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _simple(tp: Any) -> bool:
    """Whether ``coerce`` handles annotation ``tp`` as a scalar: int, float, bool, str, or an optional one of them."""
    origin, args = _origin(tp)
    if origin in (typing.Union, types.UnionType):
        return all(a is type(None) or a in (int, float, bool, str) for a in args)
    return tp in (int, float, bool, str)
