"""TensorFlow Serving REST and KServe v1: ``POST /v1/models/{name}[/versions/{v}]:predict``.

The endpoint is the server's base URL (``http://host:8501``) or a model URL
(``.../v1/models/NAME[/versions/V][:predict]``); the model name defaults to ``model``.

Request (row format): ``{"instances": [input, ...]}``, each input a nested list without the
batch axis; ``batch_size`` inputs per request. Response: ``{"predictions": [p, ...]}``, one per
instance, each being a list of class scores (probabilities if they lie in [0, 1] and sum to 1,
else logits), a dict of named outputs (``{"probabilities": [...], "classes": 3}``,
``{"logits": [...]}``; see ``base.parts_from_named``), or a plain label. Errors come as
``{"error": "..."}`` with a non-2xx status.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import numpy as np

from ...outputs import Answer, OutputSpec
from .base import Failure, HTTPTarget, Parts, as_label, as_vector, guess_kind, nested, parts_from_named, to_answer


class TFServingClient(HTTPTarget):
    protocol = "tfserving"

    model_url_pattern = r"^(.*?)/v1/models/([^/:]+)(?:/versions/([^/:]+))?(?::predict)?/?$"
    default_model_name = "model"

    def endpoint_url(self) -> str:
        return self._predict_url()

    def _predict_url(self) -> str:
        url = f"{self.url}/v1/models/{quote(self.model_name, safe='')}"
        if self.version:
            url += f"/versions/{quote(self.version, safe='')}"
        return url + ":predict"

    def _query_batch(self, x: np.ndarray, spec: OutputSpec) -> list[Answer]:
        kind = "iu" if x.dtype.kind in "iu" else "f"
        doc = self.request("POST", self._predict_url(), json_body={"instances": nested(x, kind[0])}).json()
        if not isinstance(doc, dict) or "predictions" not in doc:
            raise Failure("malformed response: missing 'predictions'")
        preds = doc["predictions"]
        if not isinstance(preds, list) or len(preds) != len(x):
            got = len(preds) if isinstance(preds, list) else type(preds).__name__
            raise Failure(f"malformed response: {got} predictions for {len(x)} instances")
        return [to_answer(parse_instance(p), spec, self.classes) for p in preds]


def parse_instance(pred: Any) -> Parts:
    if isinstance(pred, dict):
        return parts_from_named(pred)
    if isinstance(pred, list):
        if len(pred) == 1 and isinstance(pred[0], list):
            pred = pred[0]
        values = as_vector(pred, "scores")
        return Parts(probs=values) if guess_kind("", values) == "probs" else Parts(logits=values)
    if isinstance(pred, (int, str)) and not isinstance(pred, bool):
        return Parts(labels=[as_label(pred)])
    raise Failure(f"malformed response: unexpected prediction {str(pred)[:40]!r}")
