"""A KServe Python model server (``kserve.Model`` + ``kserve.ModelServer``) serving TorchScript classifiers.

Run as ``python tp_kserve.py CONFIG.json``; the config gives ``http_port`` and ``models``: a list of
``{"name", "model_path", "output_spec", "input_shape", "classes", "declare_metadata", "v1_layout"}``. One
``predict`` answers both protocols KServe speaks:

* v1 ``POST /v1/models/NAME:predict``: ``{"instances": [...]}`` -> ``{"predictions": [...]}``, each
  prediction as ``tp_outputs.v1_prediction`` writes it (a plain label, a probability list, or named
  outputs), or with ``"v1_layout": "tf"`` and a ``topk:K`` spec as ``tp_outputs.tf_topk`` does
  (``{"classes": [...], "scores": [...]}``);
* v2 ``POST /v2/models/NAME/infer`` (Open Inference Protocol): an ``InferRequest`` -> an
  ``InferResponse`` with the outputs of ``tp_outputs.tensors``.

``declare_metadata`` false leaves ``get_input_types``/``get_output_types`` as KServe's defaults (empty
lists), as most custom models do. gRPC is off, and the HTTP server listens on 127.0.0.1 only: KServe's
REST server hard-codes host 0.0.0.0, so ``uvicorn.Config`` is wrapped before the server starts.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import torch
import tp_outputs
import uvicorn

torch.set_num_threads(1)

_Config = uvicorn.Config


class _LoopbackConfig(_Config):  # type: ignore[misc,valid-type]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["host"] = "127.0.0.1"
        super().__init__(*args, **kwargs)


uvicorn.Config = _LoopbackConfig  # type: ignore[misc]

import kserve  # noqa: E402  (after the loopback patch, before the server is built)
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse  # noqa: E402


class TorchScriptClassifier(kserve.Model):
    def __init__(
        self, name: str, model_path: str, output_spec: str, input_shape: list[int], classes: int, declare_metadata: bool = True, v1_layout: str = ""
    ) -> None:
        super().__init__(name)
        self.v1_layout = v1_layout
        self.classes = int(classes)
        self.model_path = model_path
        self.output_spec = output_spec
        self.input_shape = [int(s) for s in input_shape]
        self.declare_metadata = declare_metadata

    def load(self) -> bool:
        self._net = torch.jit.load(self.model_path).eval()
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict]:
        if not self.declare_metadata:
            return super().get_input_types()
        return [{"name": "input", "datatype": "FP32", "shape": [-1, *self.input_shape]}]

    def get_output_types(self) -> list[dict]:
        if not self.declare_metadata:
            return super().get_output_types()
        return tp_outputs.output_metadata(self.output_spec, self.classes)

    def _logits(self, x: Any) -> np.ndarray:
        t = torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape([-1, *self.input_shape])
        with torch.no_grad():
            return self._net(t).numpy()

    def predict(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        if isinstance(payload, InferRequest):  # v2
            z = self._logits(payload.inputs[0].as_numpy())
            outputs = [
                InferOutput(name=name, shape=list(value.shape), datatype=tp_outputs.DATATYPES[name], data=value)
                for name, value in tp_outputs.tensors(z, self.output_spec).items()
            ]
            return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=outputs)
        z = self._logits(payload["instances"])  # v1
        if self.v1_layout == "tf":
            k = tp_outputs.parse_spec(self.output_spec)[1]
            return {"predictions": [tp_outputs.tf_topk(row, k) for row in z]}
        return {"predictions": [tp_outputs.v1_prediction(row, self.output_spec) for row in z]}


def main(config_path: str) -> None:
    config = json.loads(open(config_path).read())
    models = []
    for m in config["models"]:
        model = TorchScriptClassifier(
            m["name"], m["model_path"], m["output_spec"], m["input_shape"], m["classes"], m.get("declare_metadata", True), m.get("v1_layout", "")
        )
        model.load()
        models.append(model)
    kserve.ModelServer(http_port=int(config["http_port"]), enable_grpc=False, workers=1).start(models)


if __name__ == "__main__":
    main(sys.argv[1])
