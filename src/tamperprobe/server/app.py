"""Serve a classifier over the Open Inference Protocol (KServe v2 REST, as Triton and MLServer speak it).

Endpoints
---------

==========================================  ==================================================
``GET  /v2/health/live``                    200 ``{"live": true}``       (always open)
``GET  /v2/health/ready``                   200 ``{"ready": true}``      (always open)
``GET  /v2``                                server metadata: name, version, extensions
``POST /v2/repository/index``               ``[{"name", "version", "state"}]`` (one model)
``GET  /v2/models/{name}[/versions/1]``     model metadata: name, versions, platform, inputs, outputs
``GET  /v2/models/{name}[/versions/1]/ready``  200 ``{"name", "ready": true}``
``POST /v2/models/{name}[/versions/1]/infer``  inference
==========================================  ==================================================

With a token (``--token``), every endpoint except ``/v2/health/*`` needs
``Authorization: Bearer <token>`` and answers 401 otherwise: liveness and readiness probes
of an orchestrator carry no credentials, and they reveal nothing about the model.

Inference request: ``{"id"?, "inputs": [{"name", "shape", "datatype", "data"}], "outputs"?, "parameters"?}``.
There is exactly one input, named as in the model metadata (``input``), with shape
``[B, *input_shape]``, ``1 <= B <= max_batch``. ``data`` is flat (row-major) or nested.
Datatypes FP16/FP32/FP64 and INT8..INT64/UINT8..UINT64 are accepted and cast to float32 as
they are (no rescaling); integer data must hold integers in range; BOOL, BF16 and BYTES are
rejected. The binary tensor extension (``Inference-Header-Content-Length`` and
``parameters.binary_data_size`` / ``binary_data`` / ``binary_data_output``) is supported both
ways, as tritonclient uses it by default. ``id`` is echoed.

Output mapping: the server's output spec decides what a response reveals. Clients
(``tamperprobe.served.clients.kserve``) rely on these names, datatypes and shapes:

===============  ======================================================================
``top1``         ``label``          INT64 ``[B, 1]``
``topk:K``       ``labels``         INT64 ``[B, K]`` (most likely first)
``top1-prob:N``  ``label``          INT64 ``[B, 1]`` and ``probability`` FP64 ``[B, 1]``
                 (the top-1 softmax probability rounded to N decimals)
``probs:N``      ``probabilities``  FP64  ``[B, C]``, softmax rounded to N decimals
``logits``       ``logits``         FP32  ``[B, C]``, unrounded
===============  ======================================================================

Every value is exactly ``OutputSpec.reveal`` of the model's logits. Without ``outputs`` in
the request every output is returned; naming an unknown output is a 400.

Classification extension: a requested output with ``parameters.classification: K`` comes
back as BYTES ``[B, K]`` strings ``"score:index"``, ranked by the model's logits (most likely
first), the score being that output's (rounded) value. It applies to the per-class outputs
(``probabilities``, ``logits``, ``K <= C``) and to ``probability`` (``K = 1``, giving
``"p:label"``); label outputs carry no score and answer 400.

Errors are ``{"error": "..."}``: 400 for bad input (malformed JSON, wrong datatype, shape
not matching the model's input, batch above the cap, body above the cap by Content-Length
or by actual size, NaN/inf, unknown output, bad classification), 401 without the token,
404 for an unknown model, version or path, 500 if the model itself fails. Bad input never
takes the server down.

The served model is held by a ``ModelHolder`` whose ``swap`` replaces it at run time
(thread-safe; requests in flight finish on the model they started with), which is how a demo
tampers with a running server.

Input spec of the served model, in order of precedence: ``input_shape`` (``--input-shape
1,8,8``), the fingerprint's input spec (``--fingerprint FP``), the ONNX input shape, the
example shape recorded in a ``.pt2`` program. A TorchScript file or ``module:attr`` records
none, so it needs one of the first two. The model is run once on zeros of that shape at start
(and on every swap) to learn the number of classes and to catch a wrong shape early.
"""

from __future__ import annotations

import hmac
import json
import math
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request  # resolved at module level: the route annotations below refer to it

from ..data import InputSpec
from ..errors import ModelLoadError, UsageError
from ..models import ExportedModel, Model, OnnxModel, TorchModel, load_model
from ..outputs import OutputSpec

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_BODY = 8 << 20  # bytes
INPUT_NAME = "input"
VERSION = "1"

# KServe v2 datatypes accepted as input, and the numpy dtype each is read as.
_INPUT_DTYPES = {
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
}
_NUMPY_TO_V2 = {np.dtype(v).name: k for k, v in _INPUT_DTYPES.items()}
_OUT_DTYPES = {"INT64": "<i8", "FP32": "<f4", "FP64": "<f8"}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


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


class BadRequest(Exception):
    """A client error answered with 400 (or ``status``) and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- model holder


def parse_shape(text: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """``"1,8,8"``, ``"1x8x8"``, ``"(1, 8, 8)"`` or a sequence -> (1, 8, 8)."""
    if isinstance(text, (tuple, list)):
        dims = [int(d) for d in text]
    else:
        parts = [p for p in re.split(r"[,x× ]+", str(text).strip().strip("()[]")) if p]
        try:
            dims = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"bad input shape {text!r}: expected e.g. 1,28,28") from None
    if not dims or any(d < 1 for d in dims):
        raise UsageError(f"bad input shape {text!r}: expected positive sizes without the batch axis, e.g. 1,28,28")
    return tuple(dims)


def infer_input_spec(model: Model, input_shape=None, fingerprint=None) -> InputSpec:
    """The input spec to serve ``model`` with (see the module doc for the precedence)."""
    if input_shape is not None:
        return InputSpec(parse_shape(input_shape), "float32", -math.inf, math.inf)
    if fingerprint is not None:
        if isinstance(fingerprint, (str, Path)):
            from ..fingerprint import load

            fingerprint = load(fingerprint)
        return fingerprint.input_spec
    if isinstance(model, OnnxModel):
        shape = model.session.get_inputs()[0].shape[1:]
        if shape and all(isinstance(d, int) and d > 0 for d in shape):
            return InputSpec(tuple(shape), "float32", -math.inf, math.inf)
    elif isinstance(model, ExportedModel):
        try:
            for node in model.module.graph.nodes:
                if node.op == "placeholder" and "val" in node.meta:
                    dims = tuple(int(d) for d in node.meta["val"].shape[1:])
                    if dims and all(d > 0 for d in dims):
                        return InputSpec(dims, "float32", -math.inf, math.inf)
                    break
        except (AttributeError, TypeError, ValueError):
            pass
    raise UsageError(f"cannot infer the input shape of {model.source}: pass --input-shape (e.g. 1,28,28) or --fingerprint FP")


def _platform(model: Model) -> str:
    return {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch", "export": "pytorch_export"}.get(model.format, "pytorch_module")


class ModelHolder:
    """The served model, swappable at run time. Readers take a consistent snapshot; ``swap`` is atomic."""

    def __init__(self, model: Model, input_spec: InputSpec) -> None:
        self._lock = threading.Lock()
        self.input_spec = input_spec
        self.input_shape = tuple(int(d) for d in input_spec.shape)
        self.classes = self._probe(model)
        self._model = model
        self.generation = 0

    def _probe(self, model: Model) -> int:
        try:
            out = model.logits(np.zeros((1, *self.input_shape), dtype=np.float32))
        except ModelLoadError as exc:
            raise ModelLoadError(f"{model.source} does not run on inputs of shape {self.input_shape}: {exc}") from None
        except Exception as exc:  # a model that breaks on this shape
            raise ModelLoadError(f"{model.source} does not run on inputs of shape {self.input_shape}: {exc}") from None
        if out.ndim != 2 or out.shape[0] != 1 or out.shape[1] < 1:
            raise ModelLoadError(f"{model.source} returned shape {tuple(out.shape)}; expected logits (1, C)")
        return int(out.shape[1])

    @property
    def model(self) -> Model:
        with self._lock:
            return self._model

    def swap(self, model: Model) -> Model:
        """Serve ``model`` from now on; returns the previous one. It must take the same input and classes."""
        classes = self._probe(model)
        if classes != self.classes:
            raise UsageError(f"cannot swap: the new model has {classes} classes, the served one {self.classes}")
        with self._lock:
            old, self._model = self._model, model
            self.generation += 1
        return old


# --------------------------------------------------------------------------- outputs


@dataclass
class _Out:
    name: str
    datatype: str
    values: np.ndarray  # (B, k)

    def shape(self) -> list[int]:
        return [int(s) for s in self.values.shape]


def output_layout(spec: OutputSpec, classes: int) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape with -1 for the batch) of each output a server with ``spec`` returns."""
    if spec.kind == "top1":
        return [("label", "INT64", [-1, 1])]
    if spec.kind == "topk":
        return [("labels", "INT64", [-1, spec.k])]
    if spec.kind == "top1-prob":
        return [("label", "INT64", [-1, 1]), ("probability", "FP64", [-1, 1])]
    if spec.kind == "probs":
        return [("probabilities", "FP64", [-1, classes])]
    return [("logits", "FP32", [-1, classes])]


def reveal_outputs(logits: np.ndarray, spec: OutputSpec) -> list[_Out]:
    """The outputs of a response for a batch of logits (B, C), each row exactly ``spec.reveal``."""
    answers = [spec.reveal(row) for row in logits]
    if spec.kind in ("top1", "topk"):
        name = "label" if spec.kind == "top1" else "labels"
        return [_Out(name, "INT64", np.array([a.labels for a in answers], dtype=np.int64))]
    if spec.kind == "top1-prob":
        return [
            _Out("label", "INT64", np.array([a.labels for a in answers], dtype=np.int64)),
            _Out("probability", "FP64", np.array([a.scores for a in answers], dtype=np.float64)),
        ]
    if spec.kind == "probs":
        return [_Out("probabilities", "FP64", np.array([a.scores for a in answers], dtype=np.float64))]
    return [_Out("logits", "FP32", np.asarray(logits, dtype=np.float32))]


def _score_text(value: float, datatype: str) -> str:
    return repr(float(np.float32(value))) if datatype == "FP32" else repr(float(value))


def _classify(out: _Out, logits: np.ndarray, k: int) -> _Out:
    """The classification extension on one output: BYTES [B, k] of "score:index", ranked by the logits."""
    if out.name == "probability":
        if k != 1:
            raise BadRequest("classification on output 'probability' supports only 1 class (it holds the top-1 probability)")
        labels = np.asarray([int(np.argsort(-row, kind="stable")[0]) for row in logits])
        text = [[f"{_score_text(p, out.datatype)}:{c}"] for p, c in zip(out.values[:, 0], labels)]
        return _Out(out.name, "BYTES", np.array(text, dtype=object))
    if out.datatype == "INT64":
        raise BadRequest(f"classification is not available on output '{out.name}': it holds labels, not scores")
    classes = out.values.shape[1]
    if not 1 <= k <= classes:
        raise BadRequest(f"classification count must be between 1 and {classes}, got {k}")
    rows = []
    for vals, z in zip(out.values, logits):
        order = np.argsort(-np.asarray(z, dtype=np.float64), kind="stable")[:k]
        rows.append([f"{_score_text(vals[c], out.datatype)}:{int(c)}" for c in order])
    return _Out(out.name, "BYTES", np.array(rows, dtype=object))


def _binary(out: _Out) -> bytes:
    if out.datatype == "BYTES":
        parts = []
        for s in out.values.reshape(-1):
            b = str(s).encode()
            parts.append(struct.pack("<I", len(b)) + b)
        return b"".join(parts)
    return np.ascontiguousarray(out.values, dtype=_OUT_DTYPES[out.datatype]).tobytes()


def _json_data(out: _Out) -> list:
    flat = out.values.reshape(-1)
    if out.datatype == "BYTES":
        return [str(s) for s in flat]
    if out.datatype == "INT64":
        return [int(v) for v in flat]
    if out.datatype == "FP32":
        return [float(np.float32(v)) for v in flat]
    return [float(v) for v in flat]


# --------------------------------------------------------------------------- request parsing


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{what} must be an integer")
    return value


def _tensor_from_json(data: Any, datatype: str, count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest("input 'data' must be a list (flat row-major or nested)")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise BadRequest("input 'data' is ragged or not numeric") from None
    if arr.dtype.kind not in "iuf" or arr.dtype == object:
        raise BadRequest("input 'data' must hold only numbers")
    if arr.size != count:
        raise BadRequest(f"input 'data' has {arr.size} values; shape needs {count}")
    arr = arr.reshape(-1).astype(np.float64) if arr.dtype.kind == "f" else arr.reshape(-1)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise BadRequest("input contains NaN or infinite values")
    np_type = np.dtype(_INPUT_DTYPES[datatype])
    if np_type.kind in "iu":
        # exact integer arithmetic: float64 cannot hold every int64/uint64 (2**63 - 1 rounds up to 2**63)
        info = np.iinfo(np_type)
        values = []
        for v in np.asarray(data, dtype=object).reshape(-1):
            if isinstance(v, float):
                if v != int(v):
                    raise BadRequest(f"input of datatype {datatype} must hold integers")
                v = int(v)
            if not info.min <= int(v) <= info.max:
                raise BadRequest(f"input value out of range for {datatype}")
            values.append(int(v))
        return np.array(values, dtype=np_type)
    with np.errstate(over="ignore"):
        out = arr.astype(np_type)
    if not np.isfinite(out).all():  # e.g. 1e300 as FP32
        raise BadRequest(f"input value out of range for {datatype}")
    return out


def _tensor_from_binary(raw: bytes, datatype: str, count: int) -> np.ndarray:
    np_type = np.dtype(_INPUT_DTYPES[datatype]).newbyteorder("<")
    if len(raw) != count * np_type.itemsize:
        raise BadRequest(f"binary input has {len(raw)} bytes; shape and {datatype} need {count * np_type.itemsize}")
    arr = np.frombuffer(raw, dtype=np_type)
    if np_type.kind == "f" and not np.isfinite(arr).all():
        raise BadRequest("input contains NaN or infinite values")
    return arr


def parse_infer_request(body: bytes, header_length: str | None, input_shape: tuple[int, ...], max_batch: int) -> tuple[dict, np.ndarray]:
    """Parse and validate an inference request: (the JSON header, the input as float32 (B, *input_shape))."""
    binary = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest("Inference-Header-Content-Length must be an integer") from None
        if not 0 < n <= len(body):
            raise BadRequest("Inference-Header-Content-Length is out of range")
        body, binary = body[:n], body[n:]
    try:
        req = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
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
    if not isinstance(datatype, str) or datatype not in _INPUT_DTYPES:
        raise BadRequest(f"unsupported input datatype {datatype!r}: use FP32, FP64, FP16 or an integer type")
    shape = t.get("shape")
    if not isinstance(shape, list) or not shape:
        raise BadRequest("input 'shape' must be a list of integers")
    shape = [_as_int(d, "input 'shape'") for d in shape]
    if tuple(shape[1:]) != input_shape:
        raise BadRequest(f"input shape {shape} does not match the model's input [-1, {', '.join(map(str, input_shape))}]")
    if not 1 <= shape[0] <= max_batch:
        raise BadRequest(f"batch size {shape[0]} is out of range: 1 to {max_batch}")
    count = int(np.prod(shape))
    params = t.get("parameters") if isinstance(t.get("parameters"), dict) else {}
    if "binary_data_size" in params:
        size = _as_int(params["binary_data_size"], "binary_data_size")
        if size != len(binary):
            raise BadRequest(f"binary_data_size is {size} but {len(binary)} bytes follow the header")
        arr = _tensor_from_binary(binary, datatype, count)
    else:
        if binary:
            raise BadRequest("binary data follows the header but no input declares binary_data_size")
        if "data" not in t:
            raise BadRequest("input has no 'data'")
        arr = _tensor_from_json(t["data"], datatype, count)
    with np.errstate(over="ignore"):
        x = arr.astype(np.float32).reshape(shape)
    if not np.isfinite(x).all():
        raise BadRequest("input value out of range for the model's float32 input")
    return req, x


def _requested_outputs(req: dict, available: dict[str, _Out]) -> list[tuple[str, bool | None, int]]:
    """(name, binary?, classification K or 0) per requested output; every output when none is named."""
    default_binary = bool((req.get("parameters") or {}).get("binary_data_output", False)) if isinstance(req.get("parameters"), dict) else False
    wanted = req.get("outputs")
    if wanted is None or wanted == []:
        return [(name, default_binary, 0) for name in available]
    if not isinstance(wanted, list):
        raise BadRequest("'outputs' must be a list")
    out = []
    for o in wanted:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise BadRequest("each requested output needs a 'name'")
        name = o["name"]
        if name not in available:
            raise BadRequest(f"unknown output {name!r}: this server returns {', '.join(available)}")
        params = o.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest("output 'parameters' must be an object")
        k = params.get("classification", 0)
        k = _as_int(k, "classification")
        if k < 0:
            raise BadRequest("classification count must be positive")
        binary = params.get("binary_data", default_binary)
        out.append((name, bool(binary), k))
    return out


# --------------------------------------------------------------------------- the app


def create_app(
    holder: ModelHolder,
    *,
    name: str = "model",
    output_spec: str | OutputSpec = "logits",
    token: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body: int = DEFAULT_MAX_BODY,
):
    """The FastAPI application serving ``holder`` under model name ``name``."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .. import __version__

    spec = OutputSpec.parse(output_spec)
    if spec.label_count > holder.classes:
        raise UsageError(f"output spec {spec} asks for {spec.label_count} labels; the model has {holder.classes} classes")
    if max_batch < 1 or max_body < 1024:
        raise UsageError("max batch must be >= 1 and max body >= 1024 bytes")
    app = FastAPI(title="tamperprobe model server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.holder = holder
    app.state.output_spec = spec
    app.state.model_name = name

    def error(message: str, status: int = 400, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def unauthorized(request: Request) -> JSONResponse | None:
        if token is None:
            return None
        auth = request.headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
            return None
        return error("missing or invalid bearer token", 401, {"WWW-Authenticate": "Bearer"})

    def check_model(model_name: str, version: str | None) -> None:
        if model_name != name:
            raise BadRequest(f"unknown model {model_name!r}", 404)
        if version not in (None, "", VERSION):
            raise BadRequest(f"unknown version {version!r} of model {model_name!r}", 404)

    @app.exception_handler(BadRequest)
    async def _bad(_request, exc: BadRequest):
        return error(str(exc), exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc: StarletteHTTPException):
        msg = "not found" if exc.status_code == 404 else str(exc.detail)
        return error(msg, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, exc: RequestValidationError):
        return error(f"invalid request: {exc.errors()[:1]}", 400)

    @app.exception_handler(Exception)
    async def _internal(_request, exc: Exception):
        return error(f"internal error: {type(exc).__name__}", 500)

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": True}

    @app.get("/v2")
    async def server_metadata(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        return {"name": "tamperprobe", "version": __version__, "extensions": ["classification", "binary_tensor_data", "model_repository"]}

    @app.post("/v2/repository/index")
    async def repository_index(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        return [{"name": name, "version": VERSION, "state": "READY"}]

    def metadata() -> dict:
        dtype = _NUMPY_TO_V2.get(np.dtype(holder.input_spec.dtype).name, "FP32")
        return {
            "name": name,
            "versions": [VERSION],
            "platform": _platform(holder.model),
            "inputs": [{"name": INPUT_NAME, "datatype": dtype, "shape": [-1, *holder.input_shape]}],
            "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in output_layout(spec, holder.classes)],
        }

    @app.get("/v2/models/{model_name}")
    @app.get("/v2/models/{model_name}/versions/{version}")
    async def model_metadata(request: Request, model_name: str, version: str | None = None):
        if (denied := unauthorized(request)) is not None:
            return denied
        check_model(model_name, version)
        return metadata()

    @app.get("/v2/models/{model_name}/ready")
    @app.get("/v2/models/{model_name}/versions/{version}/ready")
    async def model_ready(request: Request, model_name: str, version: str | None = None):
        if (denied := unauthorized(request)) is not None:
            return denied
        check_model(model_name, version)
        return {"name": name, "ready": True}

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > max_body:
                    raise BadRequest(f"request body of {int(declared)} bytes exceeds the limit of {max_body}")
            except ValueError:
                raise BadRequest("bad Content-Length") from None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise BadRequest(f"request body exceeds the limit of {max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/v2/models/{model_name}/infer")
    @app.post("/v2/models/{model_name}/versions/{version}/infer")
    async def infer(request: Request, model_name: str, version: str | None = None):
        if (denied := unauthorized(request)) is not None:
            return denied
        check_model(model_name, version)
        body = await read_body(request)
        req, x = parse_infer_request(body, request.headers.get("inference-header-content-length"), holder.input_shape, max_batch)
        x = decode_inputs(holder.input_spec, x)
        model = holder.model  # one snapshot for the whole request
        try:
            logits = await run_in_threadpool(model.logits, x)
        except ModelLoadError as exc:
            return error(f"model failed: {exc}", 500)
        if logits.ndim != 2 or logits.shape != (x.shape[0], holder.classes):
            return error(f"model returned shape {list(logits.shape)}, expected [{x.shape[0]}, {holder.classes}]", 500)
        if not np.isfinite(logits).all():
            return error("model produced NaN or infinite outputs", 500)
        available = {o.name: o for o in reveal_outputs(logits, spec)}
        wanted = _requested_outputs(req, available)
        resp: dict[str, Any] = {"model_name": name, "model_version": VERSION}
        if "id" in req:
            resp["id"] = req["id"]
        outputs, blobs = [], []
        for out_name, binary, k in wanted:
            out = available[out_name]
            if k:
                out = _classify(out, logits, k)
            entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape()}
            if binary:
                blob = _binary(out)
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = _json_data(out)
            outputs.append(entry)
        resp["outputs"] = outputs
        head = json.dumps(resp, allow_nan=False).encode()
        if not blobs:
            return Response(head, media_type="application/json")
        return Response(
            head + b"".join(blobs),
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(len(head))},
        )

    return app


# --------------------------------------------------------------------------- running it


def _holder_for(model, input_spec=None, input_shape=None, fingerprint=None) -> ModelHolder:
    if isinstance(model, ModelHolder):
        return model
    loaded = model if isinstance(model, (TorchModel, OnnxModel)) else load_model(model)
    if input_spec is None:
        input_spec = infer_input_spec(loaded, input_shape, fingerprint)
    return ModelHolder(loaded, input_spec)


def serve(
    model_path: str | Model,
    host: str = "127.0.0.1",
    port: int = 8080,
    name: str = "model",
    output_spec: str | OutputSpec = "logits",
    token: str | None = None,
    *,
    input_shape=None,
    fingerprint=None,
    input_spec: InputSpec | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body: int = DEFAULT_MAX_BODY,
    log_level: str = "info",
) -> None:
    """Serve a model until interrupted (blocking). See the module doc for the protocol."""
    import uvicorn

    holder = _holder_for(model_path, input_spec, input_shape, fingerprint)
    app = create_app(holder, name=name, output_spec=output_spec, token=token, max_batch=max_batch, max_body=max_body)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off")
    uvicorn.Server(config).run()


class ServerThread:
    """Run the model server on 127.0.0.1 in a background thread (tests, the demo).

    ``with ServerThread(model, input_shape=(1, 8, 8)) as srv: ... srv.url ... srv.holder.swap(m2)``.
    ``model`` is a path, a ``Model`` or a ``ModelHolder``; ``port=0`` picks a free port.
    """

    def __init__(
        self,
        model,
        *,
        name: str = "model",
        output_spec: str | OutputSpec = "logits",
        token: str | None = None,
        input_spec: InputSpec | None = None,
        input_shape=None,
        fingerprint=None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_body: int = DEFAULT_MAX_BODY,
        log_level: str = "warning",
        start_timeout: float = 20.0,
    ) -> None:
        self.holder = _holder_for(model, input_spec, input_shape, fingerprint)
        self.name = name
        self.app = create_app(self.holder, name=name, output_spec=output_spec, token=token, max_batch=max_batch, max_body=max_body)
        self.host = host
        self._port = port
        self._log_level = log_level
        self._start_timeout = start_timeout
        self._server = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._bound_port: int | None = None

    @property
    def port(self) -> int:
        if self._bound_port is None:
            raise RuntimeError("server not started")
        return self._bound_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def swap(self, model: Model) -> Model:
        return self.holder.swap(model)

    def start(self) -> ServerThread:
        import uvicorn

        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so (else ~40 ms per request)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self.host, self._port))
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot listen on {self.host}:{self._port}: {exc.strerror or exc}") from None
        sock.listen(128)
        self._sock = sock
        self._bound_port = int(sock.getsockname()[1])
        config = uvicorn.Config(self.app, log_level=self._log_level, lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="tamperprobe-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the model server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None  # .url stays readable: a stopped server's URL refuses connections

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
