"""What the server serves: one model (``Single``) or a Triton-style model repository (``Repository``).

A repository is a folder with one sub-folder per model, named as the model is in its URLs::

    DIR/<name>/model.pt | model.pt2 | model.onnx     exactly one of them
    DIR/<name>/config.toml                          optional: output_spec, input_shape, max_batch

``config.toml`` is read with ``tomllib``; an unknown key, a value of the wrong type or a bad value
is a ``UsageError`` naming the file and the key, found at start (every config is read then; no model
is). Keys left out take the server's defaults (``serve``'s ``--output-spec``, ``--input-shape``,
``--max-batch``); a model whose input shape nobody gives must record one (ONNX, ``.pt2``).

Models load lazily (at their first request, metadata or readiness query) unless ``eager``. Model
files with the same bytes share one loaded instance, keyed by the SHA-256 of the file: a repository
of 1,000 names for a few distinct files holds a few models in memory. Every load of a file is logged
with the server's resident memory after it and what it added (``on_event``); a name served by a file
already loaded takes neither memory nor a log line. A model that fails to load answers 503
with the reason until it is loaded again (``POST /v2/repository/models/<name>/load``).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._util import one_line
from ..errors import TamperprobeError, UsageError
from ..outputs import OutputSpec
from .holder import ModelHolder, Shape, infer_input_spec, parse_shape

MODEL_FILES = ("model.pt", "model.pt2", "model.onnx")
CONFIG_KEYS = ("output_spec", "input_shape", "max_batch")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class Served:
    """One model as the routes serve it."""

    name: str
    holder: ModelHolder
    spec: OutputSpec
    max_batch: int


def served(name: str, holder: ModelHolder, output_spec: str | OutputSpec, max_batch: int) -> Served:
    spec = OutputSpec.parse(output_spec)
    if spec.label_count > holder.classes:
        raise UsageError(f"output spec {spec} asks for {spec.label_count} labels; the model has {holder.classes} classes")
    if max_batch < 1:
        raise UsageError("max batch must be >= 1")
    return Served(name, holder, spec, max_batch)


def rss_mib() -> float | None:
    """This process's resident memory in MiB (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Single:
    """A server of one model, loaded before the server starts."""

    def __init__(self, model: Served) -> None:
        self.model = model

    def names(self) -> list[str]:
        return [self.model.name]

    def loaded(self, name: str) -> Served | None:
        return self.model if name == self.model.name else None

    def get(self, name: str) -> Served:
        if name != self.model.name:
            raise KeyError(name)
        return self.model

    def state(self, name: str) -> tuple[str, str]:
        return "READY", ""

    def load(self, name: str) -> Served:
        return self.get(name)

    def unload(self, name: str) -> None:
        raise UsageError("this server serves one model: it cannot unload it")


@dataclass(frozen=True)
class Entry:
    """A model of the repository as found at start: its file and its (checked) configuration."""

    name: str
    path: Path
    output_spec: OutputSpec | None
    input_shape: tuple[int, ...] | None
    max_batch: int | None


def read_config(path: Path) -> dict[str, Any]:
    """The checked keys of one ``config.toml`` (only those it sets)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {one_line(exc)}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {one_line(exc)}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in CONFIG_KEYS:
            raise UsageError(f"{path}: unknown key {key!r} (known: {', '.join(CONFIG_KEYS)})")
        try:
            if key == "output_spec":
                if not isinstance(value, str):
                    raise UsageError("a string such as 'top1' or 'probs:3'")
                out[key] = OutputSpec.parse(value)
            elif key == "input_shape":
                if not (isinstance(value, list) and value and all(isinstance(d, int) and not isinstance(d, bool) for d in value)):
                    raise UsageError("a list of positive integers without the batch axis, e.g. [1, 28, 28]")
                out[key] = parse_shape(value)
            else:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise UsageError("an integer >= 1")
                out[key] = value
        except TamperprobeError as exc:
            raise UsageError(f"{path}: bad {key} {value!r}: {one_line(exc)}") from None
    return out


def scan(root: str | os.PathLike) -> list[Entry]:
    """Every model of the repository ``root``, its configuration checked; a folder that breaks the layout is an error."""
    base = Path(root)
    if not base.is_dir():
        raise UsageError(f"model repository {base} is not a folder")
    entries = []
    for d in sorted(base.iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        if not NAME.fullmatch(d.name):
            raise UsageError(f"{d}: a model name has letters, digits, '_', '.' or '-' (at most 128, not first)")
        files = [d / f for f in MODEL_FILES if (d / f).is_file()]
        if len(files) != 1:
            found = ", ".join(f.name for f in files) or "none"
            raise UsageError(f"{d}: a model folder holds exactly one of {', '.join(MODEL_FILES)} (found: {found})")
        config = read_config(d / "config.toml") if (d / "config.toml").exists() else {}
        entries.append(Entry(d.name, files[0], config.get("output_spec"), config.get("input_shape"), config.get("max_batch")))
    if not entries:
        raise UsageError(f"model repository {base} holds no model folder (DIR/<name>/model.pt|pt2|onnx)")
    return entries


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Repository:
    """The models of a repository folder, loaded on first use (or all at once: ``load_all``), byte-identical files shared.

    ``output_spec``, ``input_shape`` and ``max_batch`` are the defaults for models whose config
    leaves them out; ``on_event`` hears one line per load, failure and unload.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        output_spec: str | OutputSpec = "logits",
        input_shape: Shape | None = None,
        max_batch: int = 64,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.root = Path(root)
        self.entries = {e.name: e for e in scan(root)}
        self._default_spec = OutputSpec.parse(output_spec)
        self._default_shape = None if input_shape is None else parse_shape(input_shape)
        self._max_batch = max_batch
        self._say = on_event or (lambda _text: None)
        self._lock = threading.Lock()  # guards the dictionaries below; loads run outside it, one per file at a time
        self._loading: dict[str, threading.Lock] = {}
        self._served: dict[str, Served] = {}
        self._failed: dict[str, str] = {}
        self._holders: dict[tuple[str, tuple[int, ...] | None], ModelHolder] = {}  # (file digest, input shape) -> shared holder

    def names(self) -> list[str]:
        return list(self.entries)

    def loaded(self, name: str) -> Served | None:
        return self._served.get(name)

    def state(self, name: str) -> tuple[str, str]:
        if name in self._served:
            return "READY", ""
        if name in self._failed:
            return "UNAVAILABLE", self._failed[name]
        return "UNAVAILABLE", "not loaded yet: loads on first use"

    def get(self, name: str) -> Served:
        """The served model ``name``, loading it if needed (blocking: call it off the event loop). KeyError if unknown."""
        entry = self.entries[name]
        done = self._served.get(name)
        if done is not None:
            return done
        if name in self._failed:
            raise UsageError(f"model {name!r} failed to load: {self._failed[name]}")
        return self.load(name, entry)

    def load(self, name: str, entry: Entry | None = None, report: bool = True) -> Served:
        """Load ``name`` now (again after a failure); errors are recorded, logged if ``report``, and raised."""
        entry = entry or self.entries[name]
        digest = file_digest(entry.path)
        with self._lock:
            gate = self._loading.setdefault(digest, threading.Lock())
        with gate:
            if name in self._served:
                return self._served[name]
            try:
                model = self._build(entry, digest)
            except (TamperprobeError, OSError) as exc:
                with self._lock:
                    self._failed[name] = one_line(exc)
                if report:
                    self._say(f"model {name!r} failed to load from {entry.path}: {one_line(exc)}")
                raise UsageError(f"model {name!r} failed to load: {one_line(exc)}") from None
            with self._lock:
                self._served[name] = model
                self._failed.pop(name, None)
            return model

    def _build(self, entry: Entry, digest: str) -> Served:
        from ..models import load_model

        shape = entry.input_shape or self._default_shape
        key = (digest, shape)
        holder = self._holders.get(key)
        if holder is None:  # a name whose file (and shape) is loaded already takes no memory and no log line
            before = rss_mib()
            shared = next((h for (d, _), h in self._holders.items() if d == digest), None)
            model = shared.model if shared is not None else load_model(entry.path)
            holder = ModelHolder(model, infer_input_spec(model, shape))
            with self._lock:
                self._holders[key] = holder
            after = rss_mib()
            grew = f"{after - before:+.1f} MiB" if before is not None and after is not None else "n/a"
            how = "shared with an identical file" if shared is not None else "loaded"
            self._say(f"model {entry.name!r}: {how} {entry.path.name} (sha256 {digest[:12]}), RSS {after or 0:.0f} MiB ({grew})")
        return served(entry.name, holder, entry.output_spec or self._default_spec, entry.max_batch or self._max_batch)

    def unload(self, name: str) -> None:
        """Forget ``name``'s loaded model (its memory goes once no other name shares it); it loads again on next use."""
        self.entries[name]  # noqa: B018 - KeyError for an unknown name
        with self._lock:
            gone = self._served.pop(name, None)
            self._failed.pop(name, None)
            if gone is not None and not any(s.holder is gone.holder for s in self._served.values()):
                self._holders = {k: h for k, h in self._holders.items() if h is not gone.holder}
        if gone is not None:
            self._say(f"model {name!r} unloaded")

    def load_all(self) -> None:
        """Load every model now (``--eager``): the first failure is raised."""
        for name, entry in self.entries.items():
            self.load(name, entry, report=False)  # the error itself is the report
