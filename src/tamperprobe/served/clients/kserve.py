"""Open Inference Protocol (KServe v2 REST: Triton, MLServer, KServe, ``tamperprobe serve``).

The endpoint is the server's base URL (``http://host:8000``) or a model URL
(``.../v2/models/NAME[/versions/V][/infer]``, which sets the model name and version). Without a
model name the client asks ``POST /v2/repository/index`` and takes the only model listed,
falling back to ``model``.

Before the first marker of each query it reads the model metadata (``GET /v2/models/NAME``):
the input's name and datatype, the input shape (a mismatch with the fingerprint fails every
marker with a clear reason instead of sending them), and the class count from a per-class
output (``[-1, C]``), used to reject answers with another number of classes.

Each request sends ``{"id", "inputs": [{"name", "shape": [B, ...], "datatype", "data"}]}``
without ``outputs``, so the server returns every output (as JSON, not binary), and each
output is read by its datatype and name (tensors as ``tamperprobe.oip`` reads them):

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

from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote

import numpy as np

from ... import oip
from ...outputs import Answer, OutputSpec
from ..targets import QueryFailure
from .answers import Failure, Parts, as_label, as_number, guess_kind, to_answer
from .http import HTTPTarget


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
        self._counter = 0

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

    def _query_batch(self, x: np.ndarray, spec: OutputSpec) -> list[Answer | QueryFailure]:
        meta = self._meta or _Metadata("input", oip.datatype_of(x.dtype), None)
        try:
            data = oip.json_data(x, meta.datatype, "the markers")
        except oip.ProtocolError as exc:
            raise Failure(f"cannot send the markers as the served model's input: {exc}") from None
        self._counter += 1
        req_id = f"tp-{self._counter}"
        body = {"id": req_id, "inputs": [{"name": meta.input_name, "shape": [int(s) for s in x.shape], "datatype": meta.datatype, "data": data}]}
        doc = self.request("POST", f"{self._model_url()}/infer", json_body=body).json()
        if not isinstance(doc, dict):
            raise Failure("malformed response: expected a JSON object")
        if "id" in doc and doc["id"] != req_id:
            raise Failure(f"malformed response: id {doc['id']!r} does not echo the request's {req_id!r}")
        outputs = doc.get("outputs")
        if not isinstance(outputs, list) or not outputs:
            raise Failure("malformed response: no outputs")
        parts = [Parts() for _ in range(len(x))]
        for out in outputs:
            try:
                self._read_output(out, parts)
            except oip.ProtocolError as exc:
                raise Failure(f"malformed response: {exc}") from None
        answers: list[Answer | QueryFailure] = []
        for p in parts:
            if p.empty():
                raise Failure("malformed response: no labels or scores among the outputs")
            answers.append(to_answer(p, spec, self.classes))
        return answers

    def _read_output(self, out: Any, parts: list[Parts]) -> None:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise oip.ProtocolError("output without a name")
        name, datatype = out["name"], out.get("datatype")
        what = f"output '{name}'"
        shape = oip.read_shape(out.get("shape"), what)
        if "data" not in out:
            raise oip.ProtocolError(f"{what} has no data (binary data was not requested)")
        batch = len(parts)
        if shape[0] != batch:
            raise oip.ProtocolError(f"{what} has shape {shape}, expected a batch of {batch}")
        flat = oip.decode_json(out["data"], datatype, shape, what, finite=False)
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
