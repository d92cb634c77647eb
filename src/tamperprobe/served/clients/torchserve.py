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

from typing import Any, ClassVar
from urllib.parse import quote

import numpy as np

from ...outputs import Answer, OutputSpec
from ..targets import QueryFailure
from .answers import (
    LABEL_KEYS,
    LOGIT_KEYS,
    PROB_VECTOR_KEYS,
    Failure,
    Parts,
    as_label,
    parts_from_label_map,
    parts_from_value,
    to_answer,
)
from .http import HTTPTarget, nested

_NAMED = set(LABEL_KEYS) | set(LOGIT_KEYS) | set(PROB_VECTOR_KEYS)


class TorchServeClient(HTTPTarget):
    protocol: ClassVar[str] = "torchserve"
    summary: ClassVar[str] = "TorchServe inference API (POST /predictions/NAME)"
    max_batch: ClassVar[int | None] = 1

    model_url_pattern: ClassVar[str | None] = r"^(.*?)/predictions/([^/]+)(?:/([^/]+))?/?$"
    default_model_name: ClassVar[str | None] = "model"

    def endpoint_url(self) -> str:
        """``/predictions/NAME[/VERSION]``: where the markers go."""
        url = f"{self.url}/predictions/{quote(self.model_name or '', safe='')}"
        return url + (f"/{quote(self.version, safe='')}" if self.version else "")

    def _query_batch(self, x: np.ndarray, spec: OutputSpec) -> list[Answer | QueryFailure]:
        doc = self.request("POST", self.endpoint_url(), json_body=nested(x[0])).json()
        return [to_answer(parse_prediction(doc), spec, self.classes)]


def parse_prediction(doc: Any) -> Parts:
    """One TorchServe-style prediction (see the module doc) as Parts."""
    while isinstance(doc, list) and len(doc) == 1 and isinstance(doc[0], (list, dict)):
        doc = doc[0]
    if isinstance(doc, (dict, list)) and not doc:
        raise Failure("malformed response: empty prediction")
    if isinstance(doc, dict) and not any(str(k).lower() in _NAMED for k in doc):
        return parts_from_label_map(doc)
    if isinstance(doc, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in doc):
        return Parts(labels=[as_label(v) for v in doc])
    return parts_from_value(doc)
