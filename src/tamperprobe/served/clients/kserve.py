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
output is read by its datatype and name:

* INT/UINT outputs are labels, most likely first (``label``, ``labels``, a Triton ``argmax``);
* BYTES outputs are the classification extension: ``"score:index[:label]"`` per class, most
  likely first; the scores are probabilities if the output's name says so (``prob``,
  ``softmax``) and of unknown kind otherwise;
* an FP output of shape ``[B, 1]`` named ``probability``/``*prob*`` is the top-1 probability;
* other FP outputs are per-class scores: probabilities if the name says ``prob``/``softmax``,
  logits if it says ``logit``, else probabilities when every row lies in [0, 1] and sums to 1,
  else logits.

The spec's answer is then taken from these as ``base.to_answer`` describes (richer outputs are
reduced as ``OutputSpec.reveal`` would, e.g. full logits while verifying ``top1``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import numpy as np

from ...outputs import Answer, OutputSpec
from .base import Failure, HTTPTarget, Parts, as_label, as_number, guess_kind, redact_url, to_answer

_V2_NUMERIC = {
    "FP16": "f",
    "FP32": "f",
    "FP64": "f",
    "INT8": "i",
    "INT16": "i",
    "INT32": "i",
    "INT64": "i",
    "UINT8": "u",
    "UINT16": "u",
    "UINT32": "u",
    "UINT64": "u",
}
_NUMPY_TO_V2 = {
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
}


class KServeClient(HTTPTarget):
    protocol = "kserve"

    model_url_pattern = r"^(.*?)/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/infer|/ready)?/?$"

    def __init__(self, url: str, **kw: Any) -> None:
        super().__init__(url, **kw)
        self._meta: dict | None = None
        self._counter = 0

    def _model_url(self) -> str:
        url = f"{self.url}/v2/models/{quote(self.model_name or 'model', safe='')}"
        if self.version:
            url += f"/versions/{quote(self.version, safe='')}"
        return url

    def _prepare(self, spec: OutputSpec, x: np.ndarray) -> None:
        if self.model_name is None:
            resp = self.request("POST", f"{self.url}/v2/repository/index", json_body={}, ok_statuses=(400, 404, 405, 501))
            names = []
            if resp.status == 200:
                doc = resp.json()
                if isinstance(doc, list):
                    names = [d.get("name") for d in doc if isinstance(d, dict) and isinstance(d.get("name"), str)]
            if len(names) > 1:
                raise Failure(f"the server has {len(names)} models ({', '.join(names[:5])}): give --model-name")
            self.model_name = names[0] if names else "model"
            self.name = f"{self.protocol}:{redact_url(self._model_url())}"
        if self._meta is None:
            doc = self.request("GET", self._model_url()).json()
            self._meta = self._read_metadata(doc)
        meta = self._meta
        want = meta["input_shape"]
        got = list(x.shape[1:])
        if want is not None and (len(want) != len(got) or any(w >= 0 and w != g for w, g in zip(want, got))):
            raise Failure(f"the served model takes inputs of shape {want}; the fingerprint's markers have shape {got}")

    def _read_metadata(self, doc: Any) -> dict:
        if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
            raise Failure("malformed response: model metadata has no inputs")
        if len(doc["inputs"]) != 1:
            raise Failure(f"the served model has {len(doc['inputs'])} inputs; tamperprobe sends one")
        inp = doc["inputs"][0]
        if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
            raise Failure("malformed response: model metadata input has no name")
        datatype = inp.get("datatype")
        if datatype not in _V2_NUMERIC:
            raise Failure(f"the served model's input datatype is {datatype!r}; tamperprobe sends numeric tensors")
        shape = inp.get("shape")
        input_shape = None
        if isinstance(shape, list) and len(shape) >= 1 and all(isinstance(d, int) for d in shape):
            input_shape = [int(d) for d in shape[1:]]
        classes = self.classes
        for out in doc.get("outputs") or []:
            if not isinstance(out, dict):
                continue
            oshape, odt, oname = out.get("shape"), out.get("datatype"), str(out.get("name", "")).lower()
            if (
                classes is None
                and odt in ("FP16", "FP32", "FP64")
                and isinstance(oshape, list)
                and len(oshape) == 2
                and isinstance(oshape[-1], int)
                and oshape[-1] > 1
                and oname != "probability"
            ):
                classes = int(oshape[-1])
        self.classes = classes
        return {"input_name": inp["name"], "datatype": datatype, "input_shape": input_shape}

    def _query_batch(self, x: np.ndarray, spec: OutputSpec) -> list[Answer]:
        meta = self._meta or {"input_name": "input", "datatype": _NUMPY_TO_V2.get(x.dtype.name, "FP32"), "input_shape": None}
        datatype = meta["datatype"]
        kind = _V2_NUMERIC[datatype]
        flat = x.reshape(-1)
        if kind in "iu":
            if not np.all(np.asarray(flat) == np.round(flat)):
                raise Failure(f"the served model takes {datatype} inputs; the markers are not integers")
            data = flat.astype(np.int64).tolist()
        else:
            data = flat.astype(np.float64).tolist()
        self._counter += 1
        req_id = f"tp-{self._counter}"
        body = {"id": req_id, "inputs": [{"name": meta["input_name"], "shape": [int(s) for s in x.shape], "datatype": datatype, "data": data}]}
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
            self._read_output(out, parts, len(x))
        answers = []
        for p in parts:
            if p.empty():
                raise Failure("malformed response: no labels or scores among the outputs")
            answers.append(to_answer(p, spec, self.classes))
        return answers

    def _read_output(self, out: Any, parts: list[Parts], batch: int) -> None:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise Failure("malformed response: output without a name")
        name, datatype, shape = out["name"], out.get("datatype"), out.get("shape")
        if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise Failure(f"malformed response: output '{name}' has no valid shape")
        if "data" not in out:
            raise Failure(f"malformed response: output '{name}' has no data (binary data was not requested)")
        if shape[0] != batch:
            raise Failure(f"malformed response: output '{name}' has shape {shape}, expected a batch of {batch}")
        data = out["data"]
        flat = _flatten(data)
        count = int(np.prod(shape))
        if len(flat) != count:
            raise Failure(f"malformed response: output '{name}' has {len(flat)} values for shape {shape}")
        per_row = count // batch if batch else 0
        rows = [flat[i * per_row : (i + 1) * per_row] for i in range(batch)]
        lname = name.lower()
        if datatype == "BYTES":
            for p, row in zip(parts, rows):
                if p.ranked is None:
                    p.ranked = [_classification_entry(v, name) for v in row]
                    p.ranked_kind = "probs" if ("prob" in lname or "softmax" in lname) else None
            return
        if datatype not in _V2_NUMERIC:
            return  # BOOL or an unknown type: not something tamperprobe reads
        if _V2_NUMERIC[datatype] in "iu":
            for p, row in zip(parts, rows):
                if p.labels is None or "label" in lname or "class" in lname:
                    p.labels = [as_label(v) for v in row]
            return
        values = [[as_number(v, f"value of output '{name}'") for v in row] for row in rows]
        if per_row == 1 and ("prob" in lname or "conf" in lname):
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


def _flatten(data: Any) -> list:
    if not isinstance(data, list):
        raise Failure("malformed response: output data must be a list")
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


def _classification_entry(value: Any, name: str) -> tuple[int, float]:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if not isinstance(value, str):
        raise Failure(f"malformed response: output '{name}' holds {type(value).__name__}, expected 'score:index' strings")
    parts = value.split(":")
    if len(parts) < 2:
        raise Failure(f"malformed response: classification entry {value[:40]!r} is not 'score:index'")
    try:
        score = float(parts[0])
    except ValueError:
        raise Failure(f"malformed response: classification entry {value[:40]!r} is not 'score:index'") from None
    return as_label(parts[1], "class index"), as_number(score)
