"""Inputs carry their encoding as a typed field (``Bag.encoding``), read by selection, generation and the campaign."""

from __future__ import annotations

import numpy as np

from tamperprobe.evaluation.campaign import make_bag
from tamperprobe.owner.generate import create_fingerprint
from tamperprobe.owner.markers import UINT8_DECODE, decode_uint8
from tamperprobe.owner.methods import Bag, Encoding


def test_encoding_decodes_like_the_input_spec_and_survives_take() -> None:
    u = np.arange(2 * 4, dtype=np.uint8).reshape(2, 1, 2, 2) * 30
    bag = Bag(u, u.copy(), None, {"score": np.array([1.0, 2.0])}, Encoding("uint8", 0.0, 16.0))
    np.testing.assert_array_equal(bag.decoded(), decode_uint8(u, 0.0, 16.0))
    kept = bag.take(np.array([1]))
    assert kept.encoding == bag.encoding and kept.info["score"].tolist() == [2.0]
    assert Encoding("uint8", 0.0, 16.0).record() == {"dtype": "uint8", "low": 0.0, "high": 16.0, "decode": UINT8_DECODE}
    plain = Bag(u.astype(np.float32), u.astype(np.float32))
    assert plain.encoding is None and plain.decoded().dtype == np.float32


def test_uint8_markers_reach_the_fingerprint_and_the_campaign_decoded(trained_cnn, digits) -> None:
    from tamperprobe.models import TorchModel

    model = TorchModel(trained_cnn, "cnn")
    fp = create_fingerprint(model, digits[0], method="matched", size=4, bag=8, seed=0, output_spec="top1", params={"uint8": True}, tolerance=1e-4)
    assert fp.inputs.dtype == np.uint8 and fp.input_spec.dtype == "uint8"
    assert fp.extra["input_encoding"] == {
        "dtype": "uint8",
        "low": digits[0].low,
        "high": digits[0].high,
        "decode": UINT8_DECODE,
    }  # the file keeps its record
    bag, _ = make_bag(model, digits[0], "matched", {"uint8": True}, 8, 0, "matched")
    assert bag.inputs.dtype == np.float32 and bag.encoding is None  # the campaign runs model-domain inputs
    levels = (bag.inputs - digits[0].low) / (digits[0].high - digits[0].low) * 255
    assert np.isclose(levels, np.round(levels), atol=1e-3).all()  # 8-bit levels, decoded
