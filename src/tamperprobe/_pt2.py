"""Loading a ``torch.export`` archive (``.pt2``) from a suspect party without letting it act.

``torch.export.load`` unpickles weights or constants whose config says ``use_pickle``, custom and
opaque objects, legacy ``<model>.pt`` weight files, and falls back to an unrestricted ``torch.load``
for anything a ``weights_only`` load refuses; AOTInductor packages carry native code; the graph
may call ``aten.from_file`` (which maps a file writable) or ``aten.save``. And torch's zip reader
does not read a file the way Python's ``zipfile`` does (of two entries with one name, it takes the
first), so a check that reads the archive with one reader approves nothing the other will load.

So torch never reads the suspect file. ``clean_pt2`` reads it once, with ``_strictzip`` (which
refuses any layout two readers could resolve differently), approves exactly the parts
``torch.export.save`` writes for one model — the program JSON, raw tensor payloads named by their
configs, sample inputs that load with ``weights_only=True`` — and writes those approved bytes into
a fresh archive in memory (the sample inputs re-serialized from what the safe load read). Every
other part is refused by name. ``load_pt2`` hands only that rebuilt archive to
``torch.export.load``.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

from ._strictzip import ArchiveRefused, read_archive
from ._util import one_line
from .errors import ModelLoadError

#: The parts torch.export.save writes for the one model ``model``, besides its payloads.
PROGRAM, WEIGHTS_CONFIG, CONSTANTS_CONFIG, SAMPLE_INPUTS = (
    "models/model.json",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
    "data/sample_inputs/model.pt",
)
#: Written by torch's zip writer; checked where they matter, then written afresh by the rebuild.
_BOOKKEEPING = {"archive_format": b"pt2", "archive_version": b"0", "byteorder": b"little", ".data/version": None, ".data/serialization_id": None}
_PAYLOAD = {"data/weights/": re.compile(r"weight_[0-9]{1,9}"), "data/constants/": re.compile(r"tensor_[0-9]{1,9}")}

#: aten operators a program may not call: they open files by name (``from_file`` maps one writable).
DENIED_ATEN = frozenset({"from_file", "save"})
#: Higher-order operators a plain inference program may use (control flow and grad/autocast regions).
ALLOWED_HIGHER_ORDER = frozenset({"cond", "while_loop", "map_impl", "wrap_with_set_grad_enabled", "wrap_with_autocast"})
#: Python-level symbolic-shape operators the deserializer accepts (arithmetic and comparisons).
ALLOWED_SYMBOLIC = frozenset(
    {f"_operator.{n}" for n in ("eq ne le ge lt gt neg pos mul add sub floordiv mod pow truediv and_ or_ lshift rshift getitem".split())}
    | {f"torch.sym_{n}" for n in ("not", "int", "float", "ite", "max", "min", "sqrt")}
    | {"math.trunc"}
)


class Pt2Refused(ModelLoadError):
    """A ``.pt2`` archive holding anything beyond the plain parts of one exported program (or an ambiguous zip)."""


def _refuse(path: Any, why: str) -> Pt2Refused:
    return Pt2Refused(f"{path}: refusing a torch.export archive that {why} (it could run code when loaded); re-export it, or verify an ONNX file")


def _targets(doc: Any, found: set[str], depth: int = 0) -> None:
    """Every operator name a node of the program (or of a nested graph) calls."""
    if depth > 200:
        raise ValueError("nested too deeply")
    if isinstance(doc, dict):
        if "target" in doc:  # a node anywhere (nested graphs included); over-inclusive on purpose
            if not isinstance(doc["target"], str):
                raise ValueError("a node target that is not a name")
            found.add(doc["target"])
        for value in doc.values():
            _targets(value, found, depth + 1)
    elif isinstance(doc, list):
        for value in doc:
            _targets(value, found, depth + 1)


def _operator_refused(target: str) -> str | None:
    """Why a program may not call ``target`` (None when it may)."""
    if target in ALLOWED_SYMBOLIC:
        return None
    parts = target.split(".")
    if target.startswith("torch.ops.aten.") and len(parts) in (4, 5):
        return f"calls aten.{parts[3]}, which opens files" if parts[3] in DENIED_ATEN else None
    if target.startswith("torch.ops.higher_order.") and len(parts) == 4 and parts[3] in ALLOWED_HIGHER_ORDER:
        return None
    return f"calls the operator {target[:100]!r}, outside the aten set a plain program uses"


def _check_program(path: Any, blob: bytes) -> None:
    try:
        doc = json.loads(blob)
        found: set[str] = set()
        _targets(doc, found)
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise _refuse(path, f"has an unreadable {PROGRAM}") from None
    for target in sorted(found):
        why = _operator_refused(target)
        if why:
            raise _refuse(path, why)


def _payloads(path: Any, folder: str, blob: bytes) -> set[str]:
    """The payload names a weights or constants config refers to; refused unless every entry is a raw tensor."""
    try:
        config = json.loads(blob)["config"]
        if not isinstance(config, dict):
            raise TypeError
    except (ValueError, TypeError, KeyError, RecursionError):
        raise _refuse(path, f"has an unreadable {folder}config") from None
    names = set()
    for fqn, meta in config.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False or not isinstance(meta.get("tensor_meta"), dict):
            raise _refuse(path, f"stores {str(fqn)[:80]!r} pickled")
        name = meta.get("path_name")
        if not isinstance(name, str) or not _PAYLOAD[folder].fullmatch(name):
            raise _refuse(path, f"stores {str(fqn)[:80]!r} as a custom or opaque object")
        names.add(folder + name)
    return names


def _sample_inputs(path: Any, blob: bytes) -> bytes:
    """The sample inputs, read with ``weights_only=True`` and written again (so torch never sees the suspect's pickle)."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "pickle protocol 4" chatter: the restricted unpickler decides
            value = torch.load(io.BytesIO(blob), weights_only=True)
    except Exception:
        raise _refuse(path, f"holds sample inputs ({SAMPLE_INPUTS}) that only a full unpickler can read") from None
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def approved_parts(path: Any, data: bytes) -> dict[str, bytes]:
    """The parts of the archive in ``data`` a loader may read, by their name under the archive root; ``Pt2Refused`` otherwise."""
    try:
        entries = read_archive(data)
    except ArchiveRefused as exc:
        raise _refuse(path, exc.why) from None
    roots = {name.split("/", 1)[0] for name in entries}
    if len(roots) != 1 or any("/" not in name for name in entries):
        raise _refuse(path, "does not have the layout torch.export.save writes")
    root = roots.pop() + "/"
    parts = {name[len(root) :]: blob for name, blob in entries.items()}
    for name, want in _BOOKKEEPING.items():
        if want is not None and parts.get(name, want) != want:
            raise _refuse(path, f"says {name} is {parts[name][:20]!r}")
    for name in (PROGRAM, WEIGHTS_CONFIG, CONSTANTS_CONFIG, SAMPLE_INPUTS):
        if name not in parts:
            raise _refuse(path, f"lacks {name} (one program named 'model' is what torch.export.save writes)")
    payloads = _payloads(path, "data/weights/", parts[WEIGHTS_CONFIG]) | _payloads(path, "data/constants/", parts[CONSTANTS_CONFIG])
    known = {PROGRAM, WEIGHTS_CONFIG, CONSTANTS_CONFIG, SAMPLE_INPUTS, *_BOOKKEEPING}
    for name in parts:
        if name not in known and name not in payloads:
            raise _refuse(path, f"contains {name[:100]}")
    missing = sorted(payloads - set(parts))
    if missing:
        raise _refuse(path, f"lacks the payload {missing[0]} its config names")
    _check_program(path, parts[PROGRAM])
    approved = {name: parts[name] for name in (PROGRAM, WEIGHTS_CONFIG, CONSTANTS_CONFIG, *sorted(payloads))}
    approved[SAMPLE_INPUTS] = _sample_inputs(path, parts[SAMPLE_INPUTS])
    return approved


def clean_pt2(path: Any, data: bytes) -> bytes:
    """A fresh archive, written by torch's own writer in memory, holding only the approved parts of ``data``."""
    approved = approved_parts(path, data)  # before the writer's import, which pulls in torch._dynamo: a refusal is quick
    from torch.export.pt2_archive import PT2ArchiveWriter

    buf = io.BytesIO()
    with PT2ArchiveWriter(buf) as writer:
        for name, blob in approved.items():
            writer.write_bytes(name, blob)
    return buf.getvalue()


def load_pt2(path: Path) -> Any:
    """The program's module, loaded by torch from the rebuilt archive only (see the module doc)."""
    import torch

    from ._torch import quiet

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {one_line(exc)}") from None
    clean = clean_pt2(path, data)
    try:
        with quiet():
            return torch.export.load(io.BytesIO(clean)).module()
    except Exception as exc:
        raise ModelLoadError(f"cannot load torch.export program {path}: {one_line(exc)}") from None
