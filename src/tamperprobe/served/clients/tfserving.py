"""TensorFlow Serving REST and KServe v1: ``POST /v1/models/{name}[/versions/{v}]:predict``.

The endpoint is the server's base URL (``http://host:8501``) or a model URL
(``.../v1/models/NAME[/versions/V][:predict]``); the model name defaults to ``model``.

Request (row format): ``{"instances": [input, ...]}``, each input a nested list without the
batch axis; ``batch_size`` inputs per request. Response: ``{"predictions": [p, ...]}``, one per
instance, each being a list of class scores (probabilities if they lie in [0, 1] and sum to 1,
else logits), a dict of named outputs (``{"probabilities": [...], "classes": 3}``,
``{"logits": [...]}``; see ``answers.parts_from_value``), or a plain label. Errors come as
``{"error": "..."}`` with a non-2xx status.
"""

from __future__ import annotations

from typing import ClassVar
from urllib.parse import quote

import numpy as np

from ...outputs import Answer, OutputSpec
from ..targets import QueryFailure
from .answers import Failure, parts_from_value, to_answer
from .http import HTTPTarget, nested


class TFServingClient(HTTPTarget):
    protocol: ClassVar[str] = "tfserving"
    summary: ClassVar[str] = "TensorFlow Serving / KServe v1 (POST /v1/models/NAME:predict)"
    aliases: ClassVar[tuple[str, ...]] = ("tf-serving", "v1", "kserve-v1")

    model_url_pattern: ClassVar[str | None] = r"^(.*?)/v1/models/([^/:]+)(?:/versions/([^/:]+))?(?::predict)?/?$"
    default_model_name: ClassVar[str | None] = "model"

    def endpoint_url(self) -> str:
        """``/v1/models/NAME[/versions/V]:predict``: where the markers go."""
        url = f"{self.url}/v1/models/{quote(self.model_name or '', safe='')}"
        if self.version:
            url += f"/versions/{quote(self.version, safe='')}"
        return url + ":predict"

    def _query_batch(self, x: np.ndarray, spec: OutputSpec) -> list[Answer | QueryFailure]:
        doc = self.request("POST", self.endpoint_url(), json_body={"instances": nested(x)}).json()
        if not isinstance(doc, dict) or "predictions" not in doc:
            raise Failure("malformed response: missing 'predictions'")
        preds = doc["predictions"]
        if not isinstance(preds, list) or len(preds) != len(x):
            got = len(preds) if isinstance(preds, list) else type(preds).__name__
            raise Failure(f"malformed response: {got} predictions for {len(x)} instances")
        return [to_answer(parts_from_value(p), spec, self.classes) for p in preds]
