"""The fingerprint file: bit-exact round trip, a clear error for every kind of damage, and authenticity:
a file that was not signed by a trusted key, or was altered after signing, is refused."""

import json
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tamperprobe.data import InputSpec
from tamperprobe.errors import AuthenticityError, FingerprintFormatError, UsageError
from tamperprobe.fingerprint import MAX_TOLERANCE, make_fingerprint
from tamperprobe.fingerprint import load as _load_file
from tamperprobe.fingerprint import save as _save_file
from tamperprobe.signing import Trust, generate_secret_key, load_secret_key

OWNER = Ed25519PrivateKey.generate()
TRUST = Trust((OWNER.public_key(),))


def save(fp, path, **kw):
    """Save as the owner does: signed with the owner's key."""
    return _save_file(fp, path, sign_key=OWNER, **kw)


def load(path, **kw):
    """Load as a verifier does: trusting the owner's public key only."""
    return _load_file(path, trust=TRUST, **kw)


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


# ----------------------------------------------------------------------------- authenticity


def _file_parts(p):
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return raw, n, header


def _forge(p, change_tensors=None, change_meta=None, resign_with=None, drop_signature=False):
    """What an attacker with the file but without the owner's key can do: rewrite tensors and metadata, then
    recompute the checksum (and re-sign with a key of their own)."""
    from safetensors.numpy import save as st_save

    from tamperprobe.fingerprint import _content_digest, _signed_message
    from tamperprobe.signing import sign

    raw, n, header = _file_parts(p)
    meta = json.loads(header["__metadata__"]["tamperprobe"])
    back = _load_file(p, trust=TRUST)
    tensors = {k: np.ascontiguousarray(v) for k, v in back._tensors().items()}
    if change_tensors:
        change_tensors(tensors)
    if change_meta:
        change_meta(meta)
    meta["sha256"] = _content_digest(tensors, meta)
    if drop_signature:
        meta.pop("signature", None)
    if resign_with is not None:
        meta["signature"] = sign(_signed_message(meta["sha256"]), resign_with)
    p.write_bytes(st_save(tensors, metadata={"tamperprobe": json.dumps(meta, sort_keys=True)}))


def test_recomputed_checksum_does_not_forge_a_signature(tmp_path):
    """The attack of issue 9: replace the expected logits with a tampered model's and recompute the checksum."""
    p = tmp_path / "a.tpf"
    save(_fp(), p)

    def tampered(t):
        t["logits"] = t["logits"] + np.float32(0.5)

    _forge(p, change_tensors=tampered)
    with pytest.raises(AuthenticityError, match="signature does not match"):
        load(p)


@pytest.mark.parametrize("change", [{"tolerance": 0.01}, {"output_spec": "top1"}, {"model_digest": "sha256:other"}, {"created": "x"}])
def test_every_metadata_field_is_signed(tmp_path, change):
    p = tmp_path / "a.tpf"
    save(_fp(), p)
    _forge(p, change_meta=lambda m: m.update(change))
    with pytest.raises(AuthenticityError, match="signature does not match"):
        load(p)


def test_attacker_without_the_private_key_cannot_make_an_acceptable_file(tmp_path):
    p = tmp_path / "a.tpf"
    save(_fp(), p)
    _forge(p, drop_signature=True)
    with pytest.raises(AuthenticityError, match="not signed"):
        load(p)
    save(_fp(), p)
    _forge(p, change_meta=lambda m: m.update(tolerance=0.01), resign_with=Ed25519PrivateKey.generate())
    with pytest.raises(AuthenticityError, match="not among the trusted keys"):
        load(p)


def test_unsigned_files_need_an_explicit_opt_out(tmp_path):
    p = tmp_path / "a.tpf"
    _save_file(_fp(), p, sign_key=None)
    with pytest.raises(AuthenticityError, match="not signed"):
        _load_file(p, trust=TRUST)
    back = _load_file(p, trust=Trust(TRUST.keys, allow_unsigned=True))
    assert back.signer is None and back.inputs.tobytes() == _fp().inputs.tobytes()


def test_signer_is_reported(tmp_path):
    from tamperprobe.signing import key_id

    p = tmp_path / "a.tpf"
    save(_fp(), p)
    assert load(p).signer == key_id(OWNER.public_key())


def test_id_covers_the_metadata():
    a = _fp()
    b = make_fingerprint(
        a.inputs,
        a.logits,
        a.input_spec,
        a.generator,
        a.model_digest,
        output_spec=a.output_spec,
        tolerance=2e-5,
        created=a.created,
        seeds=a.seeds,
        groups=a.groups,
        extra=a.extra,
    )
    assert b.id != a.id


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e-9, MAX_TOLERANCE * 1.01, 1e9, "x"])
def test_tolerance_is_bounded(tmp_path, bad):
    with pytest.raises(UsageError, match="tolerance"):
        make_fingerprint(np.zeros((1, 1, 8, 8), np.float32), np.zeros((1, 3), np.float32), InputSpec((1, 8, 8)), {}, "d", tolerance=bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e9, -1.0])
def test_a_signed_file_with_an_unbounded_tolerance_is_refused(tmp_path, bad):
    """Even the owner's own signature does not make NaN, inf or a huge tolerance acceptable on reading."""
    p = tmp_path / "a.tpf"
    save(_fp(), p)
    _forge(p, change_meta=lambda m: m.update(tolerance=bad), resign_with=OWNER)
    with pytest.raises(FingerprintFormatError, match="tolerance"):
        load(p)


def test_encrypted_at_rest(tmp_path, monkeypatch):
    fp = _fp()
    key = load_secret_key(generate_secret_key(tmp_path / "secret.key"))
    p = tmp_path / "a.tpf"
    save(fp, p, encrypt_key=key)
    raw = p.read_bytes()
    assert fp.inputs.tobytes()[:32] not in raw and b"tamperprobe.fingerprint" not in raw  # a copied file reveals no markers
    with pytest.raises(UsageError, match="is encrypted"):
        load(p)
    with pytest.raises(UsageError, match="not with the given key"):
        load(p, secret_key=bytes(32))
    back = load(p, secret_key=key)
    assert back.inputs.tobytes() == fp.inputs.tobytes() and back.id == fp.id
    broken = bytearray(raw)
    broken[-3] ^= 1
    p.write_bytes(bytes(broken))
    with pytest.raises(AuthenticityError, match="altered or damaged"):
        load(p, secret_key=key)
    assert oct((tmp_path / "secret.key").stat().st_mode & 0o777) == "0o600"


def test_fingerprint_file_is_private(tmp_path):
    p = save(_fp(), tmp_path / "a.tpf")
    assert p.stat().st_mode & 0o077 == 0
