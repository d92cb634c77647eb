"""Open Inference Protocol (KServe v2 REST: Triton, MLServer, KServe, ``tamperprobe serve``).

The endpoint is the server's base URL (``http://host:8000``) or a model URL
(``.../v2/models/NAME[/versions/V][/infer]``, which sets the model name and version). Without a
model name the client asks ``POST /v2/repository/index`` and takes the only model listed,
falling back to ``model``.

Before the first marker it reads the model metadata once (``GET /v2/models/NAME``), unless the
client profile names the input (``"input": {"name", "datatype"}``, ``profiles.py``):
the input's name and datatype, the input shape (a mismatch with the fingerprint fails every
marker with a clear reason instead of sending them), and the class count from a per-class
output (``[-1, C]``), used to reject answers with another number of classes.

Each request sends ``{"inputs": [{"name", "shape": [B, ...], "datatype", "data"}]}`` (no request
id: none of the ordinary clients sends one) without ``outputs``, so the server returns every
output; under a profile with ``binary`` (tritonclient's) the tensor goes in the binary extension
and binary outputs are asked for, as tritonclient does. Each output, JSON or binary, is read by
its datatype and name (tensors as ``tamperprobe.oip`` reads them):

* INT/UINT outputs are labels, most likely first (``label``, ``labels``, a Triton ``argmax``);
* BYTES outputs are the classification extension: ``"score:index[:label]"`` per class, most
  likely first; the scores are probabilities if the output's name says so (``prob``,
  ``softmax``) and of unknown kind otherwise;
* an FP output of shape ``[B, 1]`` named ``probability``/``*prob*`` is the top-1 probability;
* other FP outputs are per-class scores: probabilities if the name says ``prob``/``softmax``,
  logits if it says ``logit``, else probabilities when every row lies in [0, 1] and sums to 1,
  else logits.

The spec's answer is then taken from these as ``answers.to_answer`` describes (richer outputs
are reduced as ``OutputSpec.reveal`` would, e.g. full logits while verifying ``top1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote

import numpy as np

from ... import oip
from ...errors import UsageError
from ...outputs import Answer, OutputSpec
from ..targets import QueryFailure
from .answers import Failure, Parts, as_label, as_number, guess_kind, to_answer
from .http import HTTPResponse, HTTPTarget


@dataclass(frozen=True)
class _Metadata:
    input_name: str
    datatype: str
    input_shape: list[int] | None  # without the batch axis; -1 for a free size


class KServeClient(HTTPTarget):
    protocol: ClassVar[str] = "kserve"
    summary: ClassVar[str] = "Open Inference Protocol / KServe v2 (Triton, MLServer, tamperprobe serve)"
    aliases: ClassVar[tuple[str, ...]] = ("v2", "oip", "triton", "mlserver", "kserve-v2")
    model_url_pattern: ClassVar[str | None] = r"^(.*?)/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/infer|/ready)?/?$"

    def __init__(self, url: str, **kw: Any) -> None:
        super().__init__(url, **kw)
        self._meta: _Metadata | None = None
        if self.profile.input_name is not None:  # the owner named the input: no metadata request
            datatype = self.profile.input_datatype
            if not oip.is_numeric(datatype):
                raise UsageError(f"client profile: input datatype {datatype!r} is not a numeric Open Inference Protocol datatype")
            self._meta = _Metadata(self.profile.input_name, datatype, None)

    def _model_url(self) -> str:
        url = f"{self.url}/v2/models/{quote(self.model_name or 'model', safe='')}"
        if self.version:
            url += f"/versions/{quote(self.version, safe='')}"
        return url

    def _prepare(self, spec: OutputSpec, x: np.ndarray) -> None:
        if self.model_name is None:
            resp = self.request("POST", f"{self.url}/v2/repository/index", json_body={}, ok_statuses=(400, 404, 405, 501))
            names: list[str] = []
            if resp.status == 200:
                doc = resp.json()
                if isinstance(doc, list):
                    names = [d["name"] for d in doc if isinstance(d, dict) and isinstance(d.get("name"), str)]
            if len(names) > 1:
                raise Failure(f"the server has {len(names)} models ({', '.join(names[:5])}): give --model-name")
            self.model_name = names[0] if names else "model"
            self._set_name(self._model_url())
        if self._meta is None:
            self._meta = self._read_metadata(self.request("GET", self._model_url()).json(), x)
        want = self._meta.input_shape
        got = list(x.shape[1:])
        if want is not None and (len(want) != len(got) or any(w >= 0 and w != g for w, g in zip(want, got))):
            raise Failure(f"the served model takes inputs of shape {want}; the fingerprint's markers have shape {got}")

    def _read_metadata(self, doc: Any, x: np.ndarray) -> _Metadata:
        if not isinstance(doc, dict) or not isinstance(doc.get("inputs", []), list):
            raise Failure("malformed response: model metadata is not an object with a list of inputs")
        if not doc.get("inputs"):
            # MLServer without declared inputs, and KServe's default for a kserve.Model, answer "inputs": []:
            # send the markers as they are, under the protocol's usual input name, and read the outputs as usual
            return _Metadata("input", oip.datatype_of(x.dtype), None)
        if len(doc["inputs"]) != 1:
            raise Failure(f"the served model has {len(doc['inputs'])} inputs; tamperprobe sends one")
        inp = doc["inputs"][0]
        if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
            raise Failure("malformed response: model metadata input has no name")
        datatype = inp.get("datatype")
        if not oip.is_numeric(datatype):
            raise Failure(f"the served model's input datatype is {datatype!r}; tamperprobe sends numeric tensors")
        shape = inp.get("shape")
        input_shape = None
        if isinstance(shape, list) and len(shape) >= 1 and all(isinstance(d, int) for d in shape):
            input_shape = [int(d) for d in shape[1:]]
        for out in doc.get("outputs") or []:
            if self.classes is None and isinstance(out, dict):
                self.classes = _class_count(out)
        return _Metadata(inp["name"], datatype, input_shape)

    def _send(self, x: np.ndarray) -> HTTPResponse:
        """One infer request for ``x``, as the profile's client writes it: JSON ``data``, or the binary extension."""
        meta = self._meta or _Metadata("input", oip.datatype_of(x.dtype), None)
        try:
            data = oip.json_data(x, meta.datatype, "the markers")  # also checks that integers fit the datatype
        except oip.ProtocolError as exc:
            raise Failure(f"cannot send the markers as the served model's input: {exc}") from None
        tensor: dict[str, Any] = {"name": meta.input_name, "shape": [int(s) for s in x.shape], "datatype": meta.datatype}
        url = f"{self._model_url()}/infer"
        if not self.profile.binary:
            return self.request("POST", url, json_body={"inputs": [{**tensor, "data": data}]})
        raw = oip.binary_data(x, meta.datatype)
        head = {"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}], "parameters": {"binary_data_output": True}}
        try:
            text = self.profile.dumps(head)
        except ValueError:
            raise Failure("cannot send NaN or infinite inputs as JSON") from None
        return self.request("POST", url, content=text + raw, header_length=len(text))

    def _query_batch(self, x: np.ndarray, spec: OutputSpec) -> list[Answer | QueryFailure]:
        resp = self._send(x)
        try:
            head, raw = oip.split_body(resp.body, resp.headers.get(oip.HEADER_LENGTH))
        except oip.ProtocolError as exc:
            raise Failure(f"malformed response: {exc}") from None
        doc = HTTPResponse(resp.status, resp.headers, head).json()
        if not isinstance(doc, dict):
            raise Failure("malformed response: expected a JSON object")
        outputs = doc.get("outputs")
        if not isinstance(outputs, list) or not outputs:
            raise Failure("malformed response: no outputs")
        parts = [Parts() for _ in range(len(x))]
        offset = 0
        for out in outputs:
            try:
                offset = self._read_output(out, parts, raw, offset)
            except oip.ProtocolError as exc:
                raise Failure(f"malformed response: {exc}") from None
        if offset != len(raw):
            raise Failure(f"malformed response: {len(raw) - offset} bytes of binary data no output claims")
        answers: list[Answer | QueryFailure] = []
        for p in parts:
            if p.empty():
                raise Failure("malformed response: no labels or scores among the outputs")
            answers.append(to_answer(p, spec, self.classes))
        return answers

    def _read_output(self, out: Any, parts: list[Parts], raw: bytes, offset: int) -> int:
        """Read one output into ``parts``; its binary data (if any) starts at ``offset`` of ``raw``: the offset after it."""
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise oip.ProtocolError("output without a name")
        name, datatype = out["name"], out.get("datatype")
        what = f"output '{name}'"
        shape = oip.read_shape(out.get("shape"), what)
        batch = len(parts)
        if shape[0] != batch:
            raise oip.ProtocolError(f"{what} has shape {shape}, expected a batch of {batch}")
        params = out.get("parameters")
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:  # the binary extension (tritonclient's default): the bytes follow the JSON
            if not (isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= len(raw) - offset):
                raise oip.ProtocolError(f"{what} has a binary_data_size out of range")
            chunk, offset = raw[offset : offset + size], offset + size
            if datatype == oip.BYTES:
                flat = np.array(_byte_strings(chunk, math.prod(shape), what), dtype=object)
            elif oip.is_numeric(datatype):
                flat = oip.decode_binary(chunk, datatype, shape, what, finite=False)
            else:
                return offset  # BOOL or an unknown type: not something tamperprobe reads
        elif "data" in out:
            flat = oip.decode_json(out["data"], datatype, shape, what, finite=False)
        else:
            raise oip.ProtocolError(f"{what} has no data")
        self._use_output(name, datatype, flat, parts, what)
        return offset

    def _use_output(self, name: str, datatype: Any, flat: np.ndarray, parts: list[Parts], what: str) -> None:
        batch = len(parts)
        rows = flat.reshape(batch, -1).tolist() if batch else []
        lname = name.lower()
        if datatype == oip.BYTES:
            kind = "probs" if ("prob" in lname or "softmax" in lname) else None
            for p, row in zip(parts, rows):
                if p.ranked is None:
                    p.ranked = [_ranked_entry(v, what) for v in row]
                    p.ranked_kind = kind
            return
        if not oip.is_numeric(datatype):
            return  # BOOL or an unknown type: not something tamperprobe reads
        if oip.is_integer(datatype):
            for p, row in zip(parts, rows):
                if p.labels is None or "label" in lname or "class" in lname:
                    p.labels = [as_label(v) for v in row]
            return
        values = [[as_number(v, f"value of {what}") for v in row] for row in rows]
        if flat.size == batch and ("prob" in lname or "conf" in lname):  # one value per row: the top-1 probability
            for p, row in zip(parts, values):
                p.probability = row[0]
            return
        kinds = {guess_kind(name, row) for row in values}
        kind = "probs" if kinds == {"probs"} else "logits"
        for p, row in zip(parts, values):
            if kind == "probs" and p.probs is None:
                p.probs = row
            elif kind == "logits" and p.logits is None:
                p.logits = row


def _byte_strings(raw: bytes, count: int, what: str) -> list[str]:
    """``count`` BYTES elements in binary form (each a 4-byte little-endian length and the bytes), as text."""
    out: list[str] = []
    pos = 0
    for _ in range(count):
        if pos + 4 > len(raw):
            raise oip.ProtocolError(f"binary {what} ends inside an element")
        n = int.from_bytes(raw[pos : pos + 4], "little")
        if pos + 4 + n > len(raw):
            raise oip.ProtocolError(f"binary {what} ends inside an element")
        out.append(raw[pos + 4 : pos + 4 + n].decode("utf-8", errors="replace"))
        pos += 4 + n
    if pos != len(raw):
        raise oip.ProtocolError(f"binary {what} has {len(raw) - pos} bytes beyond its elements")
    return out


def _ranked_entry(value: Any, what: str) -> tuple[int, float]:
    index, score = oip.read_classification(value, what)
    return index, as_number(score)


def _class_count(out: dict) -> int | None:
    """The class count a per-class score output declares (shape ``[-1, C]``, C > 1), else None."""
    shape, datatype = out.get("shape"), out.get("datatype")
    if not (oip.is_numeric(datatype) and not oip.is_integer(datatype) and str(out.get("name", "")).lower() != oip.PROBABILITY):
        return None
    if isinstance(shape, list) and len(shape) == 2 and isinstance(shape[-1], int) and shape[-1] > 1:
        return int(shape[-1])
    return None
