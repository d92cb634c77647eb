"""TorchServe inference API: ``POST /predictions/{name}[/{version}]``.

The endpoint is the inference API's base URL (``http://host:8080``) or a model URL
(``.../predictions/NAME[/VERSION]``); the model name defaults to ``model``.

Request: one marker per request (TorchServe batches on the server side), the body being the
JSON nested list of one input without the batch axis, ``Content-Type: application/json``; a
custom handler receives it parsed as the request's ``body``. For any other request format use
``--protocol json`` with a template.

Response, any of:

* ``{class: probability, ...}``: the default image classifier's top-5 (``{"7": 0.93, "1": 0.04}``);
  keys must be class indices (a model packaged with ``index_to_name.json`` answers class names,
  which cannot be compared with the fingerprint's class indices: package it without the file or
  use a template);
* a dict of named outputs (``{"logits": [...]}``, ``{"label": 3, "probability": 0.9}``, ...);
* a list of numbers: every class score (probabilities if they lie in [0, 1] and sum to 1, else
  logits), or, if every element is a JSON integer, labels, most likely first;
* a plain label (``7`` or ``"7"``);
* any of these wrapped in a one-element list (one request of a batch).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import numpy as np

from ...outputs import Answer, OutputSpec
from .base import (
    _LABEL_KEYS,
    _LOGIT_KEYS,
    _PROB_VECTOR_KEYS,
    Failure,
    HTTPTarget,
    Parts,
    as_label,
    as_vector,
    guess_kind,
    nested,
    parts_from_label_map,
    parts_from_named,
    to_answer,
)

_NAMED = set(_LABEL_KEYS) | set(_LOGIT_KEYS) | set(_PROB_VECTOR_KEYS)


class TorchServeClient(HTTPTarget):
    protocol = "torchserve"
    max_batch = 1

    model_url_pattern = r"^(.*?)/predictions/([^/]+)(?:/([^/]+))?/?$"
    default_model_name = "model"

    def endpoint_url(self) -> str:
        return self._predict_url()

    def _predict_url(self) -> str:
        url = f"{self.url}/predictions/{quote(self.model_name, safe='')}"
        return url + (f"/{quote(self.version, safe='')}" if self.version else "")

    def _query_batch(self, x: np.ndarray, spec: OutputSpec) -> list[Answer]:
        kind = "iu" if x.dtype.kind in "iu" else "f"
        doc = self.request("POST", self._predict_url(), json_body=nested(x[0], kind[0])).json()
        return [to_answer(parse_prediction(doc), spec, self.classes)]


def parse_prediction(doc: Any) -> Parts:
    """One TorchServe-style prediction (see the module doc) as Parts."""
    while isinstance(doc, list) and len(doc) == 1 and isinstance(doc[0], (list, dict)):
        doc = doc[0]
    if isinstance(doc, dict):
        if not doc:
            raise Failure("malformed response: empty prediction")
        if any(str(k).lower() in _NAMED for k in doc):
            return parts_from_named(doc)
        return parts_from_label_map(doc)
    if isinstance(doc, list):
        if not doc:
            raise Failure("malformed response: empty prediction")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in doc):
            return Parts(labels=[as_label(v) for v in doc])
        values = as_vector(doc, "scores")
        return Parts(probs=values) if guess_kind("", values) == "probs" else Parts(logits=values)
    if isinstance(doc, (int, str)) and not isinstance(doc, bool):
        return Parts(labels=[as_label(doc)])
    raise Failure(f"malformed response: unexpected prediction {str(doc)[:40]!r}")
