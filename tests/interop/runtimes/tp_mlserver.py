"""An MLServer custom runtime serving a TorchScript classifier (``mlserver.MLModel``).

model-settings.json ``parameters.extra``: ``model_path`` (TorchScript file), ``output_spec`` (what the
responses reveal, see ``tp_outputs``) and ``input_shape`` (one input without the batch axis).

* ``POST /v2/models/NAME/infer`` (Open Inference Protocol): one input tensor; outputs named as in
  ``tp_outputs.tensors`` (``label``/``labels`` INT64, ``probability``/``probabilities`` FP64, ``logits``
  FP32), encoded with MLServer's ``NumpyCodec``.
* ``POST /tp/NAME/predict`` (a custom REST endpoint, MLServer's ``custom_handler``): body
  ``{"image": [...]}`` (one input, nested), answer ``{"result": {named outputs}}``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import tp_outputs
from fastapi import HTTPException, Request
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.handlers import custom_handler
from mlserver.types import InferenceRequest, InferenceResponse

torch.set_num_threads(1)


class TorchScriptClassifier(MLModel):
    async def load(self) -> bool:
        extra = self.settings.parameters.extra if self.settings.parameters else {}
        self._net = torch.jit.load(extra["model_path"]).eval()
        self._spec = str(extra["output_spec"])
        self._shape = [int(s) for s in extra["input_shape"]]
        tp_outputs.LOADED[self.name] = self
        return True

    def logits(self, x: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape([-1, *self._shape])
        with torch.no_grad():
            return self._net(t).numpy()

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        outputs = [NumpyCodec.encode_output(name, value) for name, value in tp_outputs.tensors(self.logits(x), self._spec).items()]
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id, outputs=outputs)

    # MLServer registers the route once per loaded model; whichever instance answers dispatches by name
    # (through tp_outputs: MLServer reloads this module for each model, so a class attribute would not do).
    @custom_handler(rest_path="/tp/{model_name}/predict")
    async def predict_json(self, model_name: str, request: Request) -> dict[str, Any]:
        model = tp_outputs.LOADED.get(model_name)
        if not isinstance(model, MLModel):
            raise HTTPException(status_code=404, detail=f"no model {model_name}")
        body = await request.json()
        z = model.logits(np.asarray(body["image"], dtype=np.float32)[None])
        return {"result": tp_outputs.named(z[0], model._spec)}
