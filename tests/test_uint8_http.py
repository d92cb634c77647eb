"""8-bit boundary markers over real HTTP: sent as UINT8 pixels, decoded by the server, verified label-only."""

import copy

import numpy as np
import pytest
import torch

from tamperprobe.models import TorchModel
from tamperprobe.owner.generate import create_fingerprint
from tamperprobe.served.clients import make_client
from tamperprobe.served.verify import INTACT, TAMPERED, verify
from tamperprobe.server.app import ServerThread


@pytest.fixture(scope="module")
def u8(trained_cnn, digits):
    model = TorchModel(trained_cnn, "cnn")
    fp = create_fingerprint(model, digits[0], method="boundary", size=6, bag=18, seed=2, output_spec="top1", params={"uint8": True})
    return model, fp


def test_uint8_markers_verify_over_kserve(u8, trained_cnn):
    model, fp = u8
    assert fp.inputs.dtype == np.uint8
    with ServerThread(model, name="digits", output_spec="top1", fingerprint=fp) as srv:
        client = make_client("kserve", srv.url, model_name="digits", seed=0, input_spec=fp.input_spec, classes=fp.classes)
        assert verify(fp, client).verdict == INTACT
        tampered = copy.deepcopy(trained_cnn)
        with torch.no_grad():
            for p in tampered.parameters():
                p.copy_(p.half().float())
        srv.swap(TorchModel(tampered, "fp16"))
        assert verify(fp, client).verdict == TAMPERED


def test_server_rejects_non_pixel_values_for_uint8_model(u8):
    import httpx

    model, fp = u8
    with ServerThread(model, name="digits", output_spec="top1", fingerprint=fp) as srv:
        body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
        r = httpx.post(f"{srv.url}/v2/models/digits/infer", json=body)
        assert r.status_code == 400 and "8-bit" in r.json()["error"]
        meta = httpx.get(f"{srv.url}/v2/models/digits").json()
        assert meta["inputs"][0]["datatype"] == "UINT8"
