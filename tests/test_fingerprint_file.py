"""The fingerprint file: bit-exact round trip, and a clear error for every kind of damage."""

import json
import struct

import numpy as np
import pytest

from tamperprobe.data import InputSpec
from tamperprobe.errors import FingerprintFormatError
from tamperprobe.fingerprint import load, make_fingerprint, save


def _fp(n=5, dtype="float32", groups=True):
    rng = np.random.default_rng(3)
    spec = InputSpec((1, 8, 8), dtype, 0.0, 1.0 if dtype == "float32" else 255.0)
    if dtype == "uint8":
        x = rng.integers(0, 256, size=(n, 1, 8, 8)).astype(np.uint8)
    else:
        x = rng.random((n, 1, 8, 8), dtype=np.float32)
    logits = rng.normal(size=(n, 10)).astype(np.float32)
    return make_fingerprint(
        x,
        logits,
        spec,
        {"method": "sensitive", "params": {"epsilon": 0.1, "steps": 50}, "seed": 7, "selection": "manc", "bag": 20},
        "sha256:abc",
        output_spec="probs:2",
        tolerance=1e-5,
        seeds=x.astype(np.float32),
        groups=np.repeat(np.arange((n + 1) // 2), 2)[:n] if groups else None,
        extra={"note": "x"},
    )


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_round_trip_bit_exact(tmp_path, dtype):
    fp = _fp(dtype=dtype)
    save(fp, tmp_path / "a.tpf")
    back = load(tmp_path / "a.tpf")
    for name in ("inputs", "logits", "probs", "seeds", "groups"):
        a, b = getattr(fp, name), getattr(back, name)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    assert back.input_spec == fp.input_spec
    assert back.generator == fp.generator
    assert (back.model_digest, back.output_spec, back.tolerance, back.created, back.extra) == (
        fp.model_digest,
        fp.output_spec,
        fp.tolerance,
        fp.created,
        fp.extra,
    )
    assert back.id == fp.id


def test_id_changes_with_content():
    a, b = _fp(), _fp()
    assert a.id == b.id
    c = make_fingerprint(a.inputs, a.logits + 1e-3, a.input_spec, a.generator, a.model_digest)
    assert c.id != a.id


def test_probs_are_softmax_of_logits():
    fp = _fp()
    e = np.exp(fp.logits.astype(np.float64) - fp.logits.max(1, keepdims=True))
    np.testing.assert_allclose(fp.probs, e / e.sum(1, keepdims=True), rtol=1e-6)


def test_truncated_file(tmp_path):
    p = tmp_path / "a.tpf"
    save(_fp(), p)
    raw = p.read_bytes()
    for cut in (3, 20, len(raw) // 2, len(raw) - 1):
        p.write_bytes(raw[:cut])
        with pytest.raises(FingerprintFormatError, match="not a readable fingerprint"):
            load(p)


def test_altered_tensor_byte(tmp_path):
    p = tmp_path / "a.tpf"
    save(_fp(), p)
    raw = bytearray(p.read_bytes())
    raw[-5] ^= 0x01  # inside the tensor data at the end of the file
    p.write_bytes(bytes(raw))
    with pytest.raises(FingerprintFormatError, match="altered or damaged"):
        load(p)


def _rewrite_meta(p, change):
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["tamperprobe"])
    change(meta)
    header["__metadata__"]["tamperprobe"] = json.dumps(meta)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    p.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_future_version(tmp_path):
    p = tmp_path / "a.tpf"
    save(_fp(), p)
    _rewrite_meta(p, lambda m: m.update(format="tamperprobe.fingerprint/v9"))
    with pytest.raises(FingerprintFormatError, match="v9.*upgrade tamperprobe"):
        load(p)


def test_unknown_format_and_altered_metadata(tmp_path):
    p = tmp_path / "a.tpf"
    save(_fp(), p)
    _rewrite_meta(p, lambda m: m.update(format="something/v1"))
    with pytest.raises(FingerprintFormatError, match="unknown format"):
        load(p)
    save(_fp(), p)
    _rewrite_meta(p, lambda m: m.update(tolerance=1.0))  # a looser tolerance would hide tampering
    with pytest.raises(FingerprintFormatError, match="altered or damaged"):
        load(p)


def test_not_a_fingerprint(tmp_path):
    from safetensors.numpy import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(p))
    with pytest.raises(FingerprintFormatError, match="not a tamperprobe fingerprint"):
        load(p)
    q = tmp_path / "text.tpf"
    q.write_text("hello")
    with pytest.raises(FingerprintFormatError):
        load(q)
    with pytest.raises(FingerprintFormatError, match="not found"):
        load(tmp_path / "missing.tpf")
