"""The Open Inference Protocol (KServe v2 REST), as both halves of tamperprobe speak it.

The reference server (``tamperprobe.server``) and the ``kserve`` client
(``tamperprobe.served.clients.kserve``) share this module, so each rule of the protocol is
written once: the datatype table, how a tensor is written and read (JSON ``data`` and the
binary tensor extension), the classification extension's ``"score:index"`` entries, and the
names under which a tamperprobe server returns each output spec.

Datatypes
---------

``FP16``, ``FP32``, ``FP64``, ``INT8`` ... ``INT64`` and ``UINT8`` ... ``UINT64`` are numeric
(``DATATYPES`` maps each to its little-endian numpy dtype; its ``itemsize`` is the byte size in
binary form). ``BYTES`` elements are strings, in binary form each a 4-byte little-endian length
and the bytes. ``BOOL`` and ``BF16`` are not read as numbers.

A tensor is ``{"name", "datatype", "shape", "data"}`` with ``data`` flat (row-major) or nested,
or, with the binary extension, ``"parameters": {"binary_data_size": N}`` and N bytes after the
JSON header, whose length the ``Inference-Header-Content-Length`` HTTP header gives.

Outputs of a tamperprobe server
-------------------------------

The server's output spec decides what a response reveals (``output_layout``):

===============  ======================================================================
``top1``         ``label``          INT64 ``[B, 1]``
``topk:K``       ``labels``         INT64 ``[B, K]`` (most likely first)
``top1-prob:N``  ``label``          INT64 ``[B, 1]`` and ``probability`` FP64 ``[B, 1]``
                 (the top-1 softmax probability rounded to N decimals)
``probs:N``      ``probabilities``  FP64  ``[B, C]``, softmax rounded to N decimals
``logits``       ``logits``         FP32  ``[B, C]``, unrounded
===============  ======================================================================

Every value is exactly ``OutputSpec.reveal`` of the model's logits (``reveal_outputs``).

Classification extension: an output requested with ``parameters.classification: K`` comes
back as BYTES ``[B, K]`` strings ``"score:index"``, ranked by the model's logits (most likely
first), the score being that output's value (``classify``). It applies to the per-class
outputs (``K <= C``) and to ``probability`` (``K = 1``); label outputs carry no score.

Anything that breaks these rules raises ``ProtocolError``: the server answers it with a 400,
the client reports a malformed response.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np

from ._util import one_line
from .outputs import OutputSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
BYTES = "BYTES"
DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in (
        ("FP16", "<f2"),
        ("FP32", "<f4"),
        ("FP64", "<f8"),
        ("INT8", "<i1"),
        ("INT16", "<i2"),
        ("INT32", "<i4"),
        ("INT64", "<i8"),
        ("UINT8", "<u1"),
        ("UINT16", "<u2"),
        ("UINT32", "<u4"),
        ("UINT64", "<u8"),
    )
}
_BY_NUMPY_NAME = {dtype.name: name for name, dtype in DATATYPES.items()}

# Output names of a tamperprobe server (``output_layout``).
LABEL, LABELS, PROBABILITY, PROBABILITIES, LOGITS = "label", "labels", "probability", "probabilities", "logits"


class ProtocolError(ValueError):
    """A message that does not follow the protocol (the server's 400, the client's malformed response)."""


def is_numeric(datatype: object) -> TypeGuard[str]:
    """Is ``datatype`` one of the numeric datatypes (any other value, of any type, is not)?"""
    return isinstance(datatype, str) and datatype in DATATYPES


def is_integer(datatype: str) -> bool:
    """Does ``datatype`` (a numeric one) hold integers?"""
    return DATATYPES[datatype].kind in "iu"


def datatype_of(dtype: Any, default: str = "FP32") -> str:
    """The datatype of a numpy dtype (``float32`` -> ``FP32``); ``default`` for any other."""
    return _BY_NUMPY_NAME.get(np.dtype(dtype).name, default)


def read_shape(shape: Any, what: str) -> list[int]:
    """A tensor's ``shape``: a non-empty list of sizes >= 0."""
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(f"{what} has no valid shape")
    return list(shape)


# --------------------------------------------------------------------------- reading tensors


def flatten(data: list) -> list:
    """Nested lists as one flat list, row-major (iterative: deep nesting cannot exhaust the stack)."""
    out: list = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def decode_json(data: Any, datatype: object, shape: list[int], what: str, *, finite: bool = True) -> np.ndarray:
    """A tensor's JSON ``data`` (flat or nested) as a flat array of ``datatype``.

    Numeric datatypes take JSON numbers only (no booleans, no strings); integer datatypes take
    integers (or integral floats) within their range, checked exactly (float64 cannot hold every
    INT64); floats must fit the datatype. NaN and infinities are refused unless ``finite`` is
    False. ``BYTES`` and other datatypes give an object array of the values as sent.
    """
    if not isinstance(data, list):
        raise ProtocolError(f"{what} data must be a list (flat row-major or nested)")
    flat = flatten(data)
    if len(flat) != math.prod(shape):
        raise ProtocolError(f"{what} has {len(flat)} values for shape {shape}")
    if not is_numeric(datatype):
        return np.array(flat, dtype=object)
    bad = [v for v in flat if type(v) not in (int, float)]  # None and booleans included
    if bad:
        raise ProtocolError(f"value of {what} {one_line(repr(bad[0]), 40)} is not a number")
    nonfinite = any(isinstance(v, float) and not math.isfinite(v) for v in flat)
    if nonfinite and finite:
        raise ProtocolError(f"{what} contains NaN or infinite values")
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu":
        return np.array(_integers(flat, datatype, what), dtype=dtype)
    try:
        wide = np.array(flat, dtype=np.float64)
    except OverflowError:  # an integer beyond float64
        raise ProtocolError(f"{what} holds a value out of range for {datatype}") from None
    with np.errstate(over="ignore"):
        out = wide.astype(dtype)
    if not np.isfinite(out[np.isfinite(wide)]).all():  # e.g. 1e300 as FP32
        raise ProtocolError(f"{what} holds a value out of range for {datatype}")
    return out


def _integers(values: list, datatype: str, what: str) -> list[int]:
    """Python numbers as exact ints of an integer datatype: integral (NaN and infinities are not) and in range."""
    if any(isinstance(v, float) and not v.is_integer() for v in values):
        raise ProtocolError(f"{what} must hold integers for {datatype}")
    ints = [int(v) for v in values]
    info = np.iinfo(DATATYPES[datatype])
    if not all(info.min <= v <= info.max for v in ints):
        raise ProtocolError(f"{what} holds a value out of range for {datatype}")
    return ints


def decode_binary(raw: bytes, datatype: str, shape: list[int], what: str, *, finite: bool = True) -> np.ndarray:
    """A numeric tensor sent with the binary extension, as a flat array of ``datatype``."""
    dtype = DATATYPES[datatype]
    need = math.prod(shape) * dtype.itemsize
    if len(raw) != need:
        raise ProtocolError(f"binary {what} has {len(raw)} bytes; shape and {datatype} need {need}")
    arr = np.frombuffer(raw, dtype=dtype)
    if finite and dtype.kind == "f" and not np.isfinite(arr).all():
        raise ProtocolError(f"{what} contains NaN or infinite values")
    return arr


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary data) of a message whose ``Inference-Header-Content-Length`` is ``header_length``."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise ProtocolError(f"{HEADER_LENGTH} must be an integer") from None
    if not 0 < n <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} is out of range")
    return body[:n], body[n:]


# --------------------------------------------------------------------------- writing tensors


def json_data(values: np.ndarray, datatype: str, what: str = "tensor") -> list:
    """A tensor's values as flat JSON ``data``: strings for BYTES, Python ints for integer
    datatypes (the values must be integers in range), and floats exactly as the datatype stores
    them (an FP32 value written as the float64 number equal to it)."""
    flat = np.asarray(values).reshape(-1)
    if datatype == BYTES:
        return [str(s) for s in flat]
    if not is_numeric(datatype):
        raise ProtocolError(f"cannot write {datatype!r} data")
    if is_integer(datatype):
        return _integers(flat.tolist(), datatype, what)
    return flat.astype(DATATYPES[datatype]).astype(np.float64).tolist()


def binary_data(values: np.ndarray, datatype: str) -> bytes:
    """A tensor's values in the binary extension's form (little-endian; BYTES length-prefixed)."""
    if datatype == BYTES:
        encoded = [str(s).encode() for s in np.asarray(values).reshape(-1)]
        return b"".join(struct.pack("<I", len(b)) + b for b in encoded)
    return np.ascontiguousarray(values, dtype=DATATYPES[datatype]).tobytes()


@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare to one bool
class Tensor:
    """One named tensor of a message: ``values`` shaped as sent (BYTES as an object array of str)."""

    name: str
    datatype: str
    values: np.ndarray

    @property
    def shape(self) -> list[int]:
        return [int(s) for s in self.values.shape]

    def entry(self, binary: bool = False) -> tuple[dict[str, Any], bytes]:
        """The tensor's JSON entry and, with ``binary``, the bytes that follow the header (else b"")."""
        head: dict[str, Any] = {"name": self.name, "datatype": self.datatype, "shape": self.shape}
        if not binary:
            head["data"] = json_data(self.values, self.datatype)
            return head, b""
        blob = binary_data(self.values, self.datatype)
        head["parameters"] = {"binary_data_size": len(blob)}
        return head, blob


# --------------------------------------------------------------------------- a tamperprobe server's outputs


def output_layout(spec: OutputSpec, classes: int) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape with -1 for the batch) of each output a server with ``spec`` returns."""
    if spec.kind == "top1":
        return [(LABEL, "INT64", [-1, 1])]
    if spec.kind == "topk":
        return [(LABELS, "INT64", [-1, spec.k])]
    if spec.kind == "top1-prob":
        return [(LABEL, "INT64", [-1, 1]), (PROBABILITY, "FP64", [-1, 1])]
    if spec.kind == "probs":
        return [(PROBABILITIES, "FP64", [-1, classes])]
    return [(LOGITS, "FP32", [-1, classes])]


def reveal_outputs(logits: np.ndarray, spec: OutputSpec) -> list[Tensor]:
    """The outputs for a batch of logits (B, C): each row exactly ``spec.reveal``; labels fill the
    integer outputs, scores the others."""
    answers = [spec.reveal(row) for row in logits]
    tensors = []
    for name, datatype, _ in output_layout(spec, int(logits.shape[1])):
        rows = [a.labels if is_integer(datatype) else a.scores for a in answers]
        tensors.append(Tensor(name, datatype, np.array(rows, dtype=DATATYPES[datatype])))
    return tensors


# --------------------------------------------------------------------------- classification extension


def _score_text(value: float, datatype: str) -> str:
    return repr(float(np.float32(value))) if datatype == "FP32" else repr(float(value))


def classify(tensor: Tensor, logits: np.ndarray, k: int) -> Tensor:
    """The classification extension on one output: BYTES [B, k] of ``"score:index"``, ranked by the logits."""
    if tensor.name == PROBABILITY:
        if k != 1:
            raise ProtocolError(f"classification on output '{PROBABILITY}' supports only 1 class (it holds the top-1 probability)")
        labels = [int(np.argsort(-row, kind="stable")[0]) for row in logits]
        text = [[f"{_score_text(p, tensor.datatype)}:{c}"] for p, c in zip(tensor.values[:, 0], labels)]
        return Tensor(tensor.name, BYTES, np.array(text, dtype=object))
    if is_integer(tensor.datatype):
        raise ProtocolError(f"classification is not available on output '{tensor.name}': it holds labels, not scores")
    classes = tensor.values.shape[1]
    if not 1 <= k <= classes:
        raise ProtocolError(f"classification count must be between 1 and {classes}, got {k}")
    rows = []
    for vals, z in zip(tensor.values, logits):
        order = np.argsort(-np.asarray(z, dtype=np.float64), kind="stable")[:k]
        rows.append([f"{_score_text(vals[c], tensor.datatype)}:{int(c)}" for c in order])
    return Tensor(tensor.name, BYTES, np.array(rows, dtype=object))


def read_classification(value: Any, what: str) -> tuple[int, float]:
    """(class index, score) of one ``"score:index[:label]"`` entry; the score may be NaN or infinite."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if not isinstance(value, str):
        raise ProtocolError(f"{what} holds {type(value).__name__}, expected 'score:index' strings")
    parts = value.split(":")
    try:
        if len(parts) < 2 or not parts[1].strip().lstrip("-").isdigit():
            raise ValueError
        return int(parts[1]), float(parts[0])
    except ValueError:
        raise ProtocolError(f"classification entry {one_line(value, 40)!r} is not 'score:index'") from None
