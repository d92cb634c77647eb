"""One inference request against the served model: check it, read its input, build the response.

No web framework here: the routes in ``app.py`` call these functions, and the fuzz tests call
``parse_infer_request`` directly. The tensor rules themselves are ``tamperprobe.oip``'s.

Request: ``{"id"?, "inputs": [{"name", "shape", "datatype", "data"}], "outputs"?, "parameters"?}``.
There is exactly one input, named ``input``, with shape ``[B, *input_shape]``,
``1 <= B <= max_batch``. Datatypes FP16/FP32/FP64 and INT8..INT64/UINT8..UINT64 are accepted and
cast to float32 as they are (no rescaling); integer data must hold integers in range; BOOL, BF16
and BYTES are rejected. The binary tensor extension is supported both ways (``binary_data_size``
on the input, ``binary_data`` / ``binary_data_output`` for the outputs), as tritonclient uses it
by default. ``id`` is echoed. Without ``outputs`` every output is returned; naming an unknown
output, or one output twice (a short request could otherwise ask for a response many times its
size), is a 400, and so is a response over the server's cap (``build_response``'s ``limit``).
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

import numpy as np

from .. import oip
from .._util import one_line
from ..data import InputSpec
from ..outputs import OutputSpec

INPUT_NAME = "input"


class BadRequest(Exception):
    """A client error answered with ``status`` (400 unless said otherwise) and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers

    def __reduce__(self) -> tuple:  # crosses from the parser process intact
        return (BadRequest, (str(self), self.status, self.headers))


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{what} must be an integer")
    return value


def parse_infer_request(body: bytes, header_length: str | None, input_shape: tuple[int, ...], max_batch: int) -> tuple[dict, np.ndarray]:
    """Parse and validate an inference request: (the JSON header, the input as float32 (B, *input_shape))."""
    try:
        return _parse(body, header_length, input_shape, max_batch)
    except oip.ProtocolError as exc:
        raise BadRequest(str(exc)) from None


def max_containers(input_shape: tuple[int, ...], max_batch: int) -> int:
    """The most JSON lists and objects a request may hold: a batch nested one list per value, and room for the rest.

    Parsing cost grows with the number of containers far faster than with plain bytes, and
    ``json.loads`` holds the interpreter for all of it: a body of ``[],[],...`` costs ~10x the
    time of a body of numbers of the same size. Refusing more containers than a real request can
    hold (counting ``[`` and ``{`` bytes, a cheap upper bound) keeps the worst parse near the
    cost of the numbers themselves.
    """
    return 2 * max_batch * math.prod(input_shape) + 256


def _parse(body: bytes, header_length: str | None, input_shape: tuple[int, ...], max_batch: int) -> tuple[dict, np.ndarray]:
    head, binary = oip.split_body(body, header_length)
    if head.count(b"[") + head.count(b"{") > max_containers(input_shape, max_batch):
        raise BadRequest("request JSON holds more lists and objects than a batch of inputs needs")
    try:
        req = json.loads(head, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {one_line(exc)}") from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply") from None
    if not isinstance(req, dict):
        raise BadRequest("request body must be a JSON object")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("request needs a non-empty 'inputs' list")
    if len(inputs) != 1:
        raise BadRequest(f"the model takes exactly one input ('{INPUT_NAME}'), got {len(inputs)}")
    t = inputs[0]
    if not isinstance(t, dict):
        raise BadRequest("each input must be an object with name, shape, datatype, data")
    if t.get("name") != INPUT_NAME:
        raise BadRequest(f"unknown input {t.get('name')!r}: the model's input is '{INPUT_NAME}'")
    datatype = t.get("datatype")
    if not oip.is_numeric(datatype):
        raise BadRequest(f"unsupported input datatype {datatype!r}: use FP32, FP64, FP16 or an integer type")
    shape = t.get("shape")
    if not isinstance(shape, list) or not shape:
        raise BadRequest("input 'shape' must be a list of integers")
    shape = [_as_int(d, "input 'shape'") for d in shape]
    if tuple(shape[1:]) != input_shape:
        raise BadRequest(f"input shape {shape} does not match the model's input [-1, {', '.join(map(str, input_shape))}]")
    if not 1 <= shape[0] <= max_batch:
        raise BadRequest(f"batch size {shape[0]} is out of range: 1 to {max_batch}")
    params = t.get("parameters")
    if not isinstance(params, dict):
        params = {}
    if "binary_data_size" in params:
        size = _as_int(params["binary_data_size"], "binary_data_size")
        if size != len(binary):
            raise BadRequest(f"binary_data_size is {size} but {len(binary)} bytes follow the header")
        arr = oip.decode_binary(binary, datatype, shape, "input")
    else:
        if binary:
            raise BadRequest("binary data follows the header but no input declares binary_data_size")
        if "data" not in t:
            raise BadRequest("input has no 'data'")
        arr = oip.decode_json(t["data"], datatype, shape, "input")
    with np.errstate(over="ignore"):
        x = arr.astype(np.float32).reshape(shape)
    if not np.isfinite(x).all():
        raise BadRequest("input value out of range for the model's float32 input")
    return req, x


def parse_compact(body: bytes, header_length: str | None, input_shape: tuple[int, ...], max_batch: int) -> tuple[dict, np.ndarray]:
    """``parse_infer_request`` returning only what the response needs of the header (``id``, ``outputs``,
    ``parameters``): what a parser process sends back, without the input data it already decoded."""
    req, x = parse_infer_request(body, header_length, input_shape, max_batch)
    return {k: req[k] for k in ("id", "outputs", "parameters") if k in req}, x


def decode_inputs(input_spec: InputSpec, x: np.ndarray) -> np.ndarray:
    """Request inputs as the model takes them: an 8-bit input spec maps pixels 0..255 into the model's range.

    Float inputs must lie in the input spec's range [low, high] when it is finite (with a 1e-6
    relative slack): values far outside it are a client error, not a reason to run the model.
    """
    if input_spec.dtype != "uint8":
        low, high = input_spec.low, input_spec.high
        slack = 1e-6 * max(1.0, abs(low) if math.isfinite(low) else 0.0, abs(high) if math.isfinite(high) else 0.0)
        if (math.isfinite(low) and x.min() < low - slack) or (math.isfinite(high) and x.max() > high + slack):
            raise BadRequest(f"input values must lie in [{low:g}, {high:g}]")
        return x
    if not (np.all(x == np.rint(x)) and x.min() >= 0 and x.max() <= 255):
        raise BadRequest("the model takes 8-bit pixels: integers from 0 to 255")
    return input_spec.decode(x.astype(np.uint8))


def requested_outputs(req: dict, available: dict[str, oip.Tensor]) -> list[tuple[str, bool, int]]:
    """(name, binary?, classification K or 0) per requested output; every output when none is named."""
    req_params = req.get("parameters")
    default_binary = bool(req_params.get("binary_data_output", False)) if isinstance(req_params, dict) else False
    wanted = req.get("outputs")
    if wanted is None or wanted == []:
        return [(name, default_binary, 0) for name in available]
    if not isinstance(wanted, list):
        raise BadRequest("'outputs' must be a list")
    out: list[tuple[str, bool, int]] = []
    seen: set[str] = set()
    for o in wanted:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise BadRequest("each requested output needs a 'name'")
        name = o["name"]
        if name not in available:
            raise BadRequest(f"unknown output {name!r}: this server returns {', '.join(available)}")
        if name in seen:
            raise BadRequest(f"output {name!r} is requested more than once")
        seen.add(name)
        params = o.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest("output 'parameters' must be an object")
        k = _as_int(params.get("classification", 0), "classification")
        if k < 0:
            raise BadRequest("classification count must be positive")
        out.append((name, bool(params.get("binary_data", default_binary)), k))
    return out


def build_response(
    req: dict, logits: np.ndarray, spec: OutputSpec, model_name: str, version: str, limit: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """The response body for ``logits`` (B, C) and its extra HTTP headers (the header length when binary data follows);
    a body over ``limit`` bytes is a 400 (the request asks for more than the server sends at once)."""
    available = {t.name: t for t in oip.reveal_outputs(logits, spec)}
    head: dict[str, Any] = {"model_name": model_name, "model_version": version}
    if "id" in req:
        head["id"] = req["id"]
    entries, blobs = [], []
    for name, binary, k in requested_outputs(req, available):
        tensor = available[name]
        if k:
            try:
                tensor = oip.classify(tensor, logits, k)
            except oip.ProtocolError as exc:
                raise BadRequest(str(exc)) from None
        entry, blob = tensor.entry(binary)
        entries.append(entry)
        if binary:
            blobs.append(blob)
    head["outputs"] = entries
    text = json.dumps(head, allow_nan=False).encode()
    size = len(text) + sum(len(b) for b in blobs)
    if limit is not None and size > limit:
        raise BadRequest(f"the response would be {size} bytes, over the server's limit of {limit}: ask for a smaller batch")
    if not blobs:
        return text, {}
    return text + b"".join(blobs), {oip.HEADER_LENGTH: str(len(text))}
