"""Golden files pin the fingerprint format on disk: the current v2 (signed) and the frozen v1.

tests/golden/fingerprint-v2*.tpf are written by tests/golden/make_golden.py (expected-v2.json records
what reading them must give); fingerprint-v1*.tpf and expected.json were written by version 0.1 and
are frozen. A change that stops reading old files, or reads them differently, fails here. A change
of what the writer produces (bytes) fails ``test_rewrite_is_byte_identical``: decide then whether
that is a format change. Upgrading a v1 file (read it, write it signed) must give exactly the v2 file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from tamperprobe.data import InputSpec
from tamperprobe.errors import AuthenticityError
from tamperprobe.fingerprint import FORMAT, VERSION, Fingerprint, load, save
from tamperprobe.outputs import OutputSpec, softmax64
from tamperprobe.signing import Trust, load_private_key, load_public_key

GOLDEN = Path(__file__).parent / "golden"
EXPECTED_BY_VERSION = {
    1: json.loads((GOLDEN / "expected.json").read_text(encoding="utf-8")),
    2: json.loads((GOLDEN / "expected-v2.json").read_text(encoding="utf-8")),
}
EXPECTED = EXPECTED_BY_VERSION[1]
KEYS = sorted(EXPECTED)
CASES = [(v, k) for v in (1, 2) for k in sorted(EXPECTED_BY_VERSION[v])]
TENSORS = ("inputs", "logits", "probs", "seeds", "groups")
SIGNING_KEY = load_private_key(GOLDEN / "golden-signing-key.pem")
TRUST = {1: Trust(allow_unsigned=True), 2: Trust((load_public_key(GOLDEN / "golden-signing-key.pub"),))}
META_KEYS = {
    1: ["created", "extra", "format", "generator", "input_spec", "model_digest", "output_spec", "sha256", "tolerance"],
    2: ["created", "extra", "format", "generator", "input_spec", "model_digest", "output_spec", "sha256", "signature", "tolerance"],
}


def _load(version: int, path: Path) -> Fingerprint:
    return load(path, trust=TRUST[version])


def _array(t: dict) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(t["hex"]), dtype=np.dtype(t["dtype"])).reshape(t["shape"])


def _header(raw: bytes) -> tuple[dict, int]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), 8 + n


def _expected_fingerprint(exp: dict) -> Fingerprint:
    """The fingerprint, built from the recorded values only (not from the golden file, not with make_fingerprint)."""
    t = {k: _array(v) for k, v in exp["tensors"].items()}
    f = exp["fields"]
    return Fingerprint(
        inputs=t["inputs"],
        logits=t["logits"],
        probs=t["probs"],
        input_spec=InputSpec.from_json(f["input_spec"]),
        generator=f["generator"],
        model_digest=f["model_digest"],
        output_spec=f["output_spec"],
        tolerance=f["tolerance"],
        created=f["created"],
        seeds=t.get("seeds"),
        groups=t.get("groups"),
        extra=f["extra"],
    )


def test_golden_set_is_complete():
    assert KEYS == ["float32", "uint8"] == sorted(EXPECTED_BY_VERSION[2])
    assert EXPECTED["float32"]["fields"]["input_spec"]["dtype"] == "float32"
    assert EXPECTED["uint8"]["fields"]["input_spec"]["dtype"] == "uint8"
    assert "groups" in EXPECTED["uint8"]["tensors"] and "seeds" in EXPECTED["uint8"]["tensors"]
    assert "groups" not in EXPECTED["float32"]["tensors"] and "seeds" not in EXPECTED["float32"]["tensors"]


@pytest.mark.parametrize("version,key", CASES)
def test_golden_file_is_untouched(version, key):
    """The committed bytes are the ones expected.json describes (no line-ending or LFS rewrite)."""
    exp = EXPECTED_BY_VERSION[version][key]
    raw = (GOLDEN / exp["file"]).read_bytes()
    assert len(raw) == exp["size"]
    assert hashlib.sha256(raw).hexdigest() == exp["sha256_file"]


@pytest.mark.parametrize("version,key", CASES)
def test_reading_golden_gives_exact_arrays(version, key):
    exp = EXPECTED_BY_VERSION[version][key]
    fp = _load(version, GOLDEN / exp["file"])
    for name in TENSORS:
        got = getattr(fp, name)
        if name not in exp["tensors"]:
            assert got is None, f"{name}: absent in the file, must read as None"
            continue
        want = exp["tensors"][name]
        assert got is not None, f"{name} missing"
        assert got.dtype.str == want["dtype"], name
        assert list(got.shape) == want["shape"], name
        assert np.ascontiguousarray(got).tobytes().hex() == want["hex"], f"{name}: bytes differ"
        # the human-readable values agree with the bytes (and so with what was read)
        np.testing.assert_array_equal(got, np.array(want["values"], dtype=np.dtype(want["dtype"])), err_msg=name)
    assert fp.inputs.dtype == np.dtype(fp.input_spec.dtype)
    assert fp.logits.dtype == np.float32 and fp.probs.dtype == np.float32
    assert len(fp) == exp["len"] and fp.classes == exp["classes"]
    assert fp.id == exp["id"]


@pytest.mark.parametrize("version,key", CASES)
def test_reading_golden_gives_exact_metadata(version, key):
    exp = EXPECTED_BY_VERSION[version][key]
    fp = _load(version, GOLDEN / exp["file"])
    f = exp["fields"]
    assert fp.input_spec == InputSpec.from_json(f["input_spec"])
    assert fp.input_spec.to_json() == f["input_spec"]
    assert isinstance(fp.input_spec.shape, tuple)
    assert fp.generator == f["generator"]
    assert fp.model_digest == f["model_digest"]
    assert fp.output_spec == f["output_spec"] and str(OutputSpec.parse(fp.output_spec)) == f["output_spec"]
    assert fp.tolerance == f["tolerance"] and isinstance(fp.tolerance, float)
    assert fp.created == f["created"] == "2024-05-01T12:00:00+00:00"
    assert fp.extra == f["extra"]
    # the raw header: format tag, checksum and every key, nothing more
    header, _ = _header((GOLDEN / exp["file"]).read_bytes())
    meta = json.loads(header["__metadata__"]["tamperprobe"])
    assert meta == exp["meta"]
    assert meta["format"] == f"{FORMAT}/v{version}" == f"tamperprobe.fingerprint/v{version}"
    assert sorted(meta) == META_KEYS[version]
    assert fp.version == version
    assert fp.signer == (None if version == 1 else meta["signature"]["key_id"])
    assert {k: v for k, v in header.items() if k != "__metadata__"} == exp["header_tensors"]


@pytest.mark.parametrize("version,key", CASES)
def test_golden_values_are_consistent(version, key):
    """What the format means, checked on the golden file: probs is the softmax of logits, uint8 decodes as documented."""
    fp = _load(version, GOLDEN / EXPECTED_BY_VERSION[version][key]["file"])
    np.testing.assert_array_max_ulp(fp.probs, softmax64(fp.logits).astype(np.float32), maxulp=1)
    if fp.input_spec.dtype == "uint8":
        lo, hi = fp.input_spec.low, fp.input_spec.high
        want = (fp.inputs.astype(np.float32) / np.float32(255.0)) * np.float32(hi - lo) + np.float32(lo)
        got = fp.input_spec.decode(fp.inputs)
        assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
        assert len(fp.groups) == len(fp) and len(fp.seeds) == len(fp)
    spec = OutputSpec.parse(fp.output_spec)
    for z in fp.logits:  # the intact answers verify against the stored logits
        assert spec.compare(z, spec.reveal(z), fp.tolerance).ok


def _diff(a: bytes, b: bytes) -> str:
    ha, na = _header(a)
    hb, nb = _header(b)
    lines = []
    ma = json.loads(ha.pop("__metadata__", {}).get("tamperprobe", "{}"))
    mb = json.loads(hb.pop("__metadata__", {}).get("tamperprobe", "{}"))
    for k in sorted(set(ma) | set(mb)):
        if ma.get(k) != mb.get(k):
            lines.append(f"meta[{k}]: golden {ma.get(k)!r} != now {mb.get(k)!r}")
    if ha != hb:
        lines.append(f"tensor header: golden {ha} != now {hb}")
    if a[na:] != b[nb:]:
        lines.append("tensor data differs")
    if not lines:
        lines.append(f"same header content and data: serialisation differs (header bytes {na - 8} vs {nb - 8})")
    return "; ".join(lines)


@pytest.mark.parametrize("version,key", CASES)
def test_rewrite_is_byte_identical(tmp_path, version, key):
    """Saving the same fingerprint with the current code, signed with the golden key, gives the committed v2 bytes
    (for the v1 cases: the v2 file with the same contents)."""
    exp = EXPECTED_BY_VERSION[version][key]
    golden = (GOLDEN / EXPECTED_BY_VERSION[2][key]["file"]).read_bytes()
    out = save(_expected_fingerprint(exp), tmp_path / "again.tpf", sign_key=SIGNING_KEY).read_bytes()
    assert out == golden, _diff(golden, out)


@pytest.mark.parametrize("version,key", CASES)
def test_load_then_save_is_byte_identical(tmp_path, version, key):
    """Reading a golden file and writing it back signed gives the v2 golden file: metadata survives the JSON round
    trip, and upgrading a v1 file changes nothing but the format tag and the signature."""
    golden = GOLDEN / EXPECTED_BY_VERSION[version][key]["file"]
    want = (GOLDEN / EXPECTED_BY_VERSION[2][key]["file"]).read_bytes()
    out = save(_load(version, golden), tmp_path / "again.tpf", sign_key=SIGNING_KEY).read_bytes()
    assert out == want, _diff(want, out)


@pytest.mark.parametrize("key", KEYS)
def test_unsigned_v1_is_refused_by_default(key):
    """A v1 file carries no signature: reading it needs an explicit opt-out."""
    with pytest.raises(AuthenticityError, match="version 1 file"):
        load(GOLDEN / EXPECTED[key]["file"], trust=Trust(TRUST[2].keys))


@pytest.mark.parametrize("key", KEYS)
def test_v2_needs_a_trusted_key(key):
    path = GOLDEN / EXPECTED_BY_VERSION[2][key]["file"]
    with pytest.raises(AuthenticityError, match="no public key is trusted"):
        load(path, trust=Trust())
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(AuthenticityError, match="not among the trusted keys"):
        load(path, trust=Trust((other,)))


def _make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("key", KEYS)
def test_make_fingerprint_reproduces_golden(key):
    """The generator script still builds the same fingerprint. ``probs`` comes from ``exp`` and may
    differ by one float32 ulp on another platform, so it is compared to within one ulp; everything
    else must be bit-identical."""
    exp = EXPECTED[key]
    fp = _make_golden().BUILDERS[key]()
    for name in TENSORS:
        got = getattr(fp, name)
        if name not in exp["tensors"]:
            assert got is None
        elif name == "probs":
            np.testing.assert_array_max_ulp(got, _array(exp["tensors"][name]), maxulp=1)
        else:
            assert got.dtype.str == exp["tensors"][name]["dtype"]
            assert np.ascontiguousarray(got).tobytes().hex() == exp["tensors"][name]["hex"], name
    golden = _load(1, GOLDEN / exp["file"])
    assert (fp.input_spec, fp.generator, fp.model_digest, fp.output_spec, fp.tolerance, fp.created, fp.extra) == (
        golden.input_spec,
        golden.generator,
        golden.model_digest,
        golden.output_spec,
        golden.tolerance,
        golden.created,
        golden.extra,
    )


def test_version_constant():
    """Bumping VERSION means a new format: add new golden files, keep these (old files must still load)."""
    assert VERSION == 2


# ----------------------------------------------------------------------------- evaluation documents


def _make_evaluation_golden():
    spec = importlib.util.spec_from_file_location("make_evaluation_golden", GOLDEN / "make_evaluation_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_evaluation_golden_comparison_sees_keys_order_types_and_values():
    differences = _make_evaluation_golden().differences
    doc = {"a": 1, "b": [{"x": 0.5, "s": "measured", "f": True}], "c": None}
    assert differences(doc, json.loads(json.dumps(doc))) == []
    assert differences(doc, {"b": doc["b"], "a": 1, "c": None})  # key order is part of the document
    assert differences(doc, {**doc, "a": 1.0})  # an int became a float
    assert differences(doc, {**doc, "b": [{"x": 0.5, "s": "measured", "f": 1}]})  # a bool became an int
    assert differences(doc, {**doc, "b": [{"x": 0.5001, "s": "measured", "f": True}]})
    assert differences(doc, {**doc, "b": [{"x": 0.5 + 1e-9, "s": "measured", "f": True}]}) == []  # last digits of a float


def test_campaign_and_adversary_documents_match_the_golden_ones(trained_mlp):
    """``results.json`` and ``adversary.json`` of a small run: keys, order, rows and statuses as committed (make_evaluation_golden.py)."""
    mod = _make_evaluation_golden()
    for name, doc in mod.documents(trained_mlp).items():
        expected = json.loads((GOLDEN / "evaluation" / name).read_text(encoding="utf-8"))
        assert mod.differences(expected, doc) == [], name
