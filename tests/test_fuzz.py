"""Property-based fuzzing (hypothesis) of the parsers and the comparison rule.

Properties:

* ``OutputSpec.parse`` on any text returns a spec that survives ``str``/``parse``, or raises UsageError.
* ``OutputSpec.compare`` on any answer (labels out of range, negative, duplicated, huge; scores
  NaN/inf/huge; any tolerance) against any logits never raises and returns a bool.
* ``reveal`` then ``compare`` is always a match, for every spec; an answer that is clearly wrong is not.
* ``fingerprint.load`` on mutated or truncated bytes of a valid file raises FingerprintFormatError
  or returns the whole original fingerprint, tensors and metadata (the checksum covers both).
* ``parse_infer_request`` on arbitrary JSON-ish bodies raises BadRequest (4xx) or returns a
  finite float32 array of the declared shape holding the values sent.
* A live server answers arbitrary bodies with 200 or a 4xx ``{"error": ...}``, never 5xx, and stays live.

Bugs these properties found are pinned by explicit regression tests at the end of this file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("hypothesis")  # in the [test] extra

from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import configuration as _hypothesis_configuration
from hypothesis import strategies as st

from tamperprobe import zoo
from tamperprobe.data import InputSpec
from tamperprobe.errors import AuthenticityError, FingerprintFormatError, UsageError
from tamperprobe.fingerprint import load as _load_file
from tamperprobe.models import TorchModel
from tamperprobe.outputs import DEFAULT_TOLERANCE, Answer, Match, OutputSpec, softmax64
from tamperprobe.server.app import ServerThread
from tamperprobe.server.infer import BadRequest, parse_infer_request
from tamperprobe.signing import Trust, load_public_key

# Hypothesis keeps caches in ./.hypothesis even with database=None: keep them out of the tree.
_hypothesis_configuration.set_hypothesis_home_dir(
    os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY") or Path(tempfile.gettempdir()) / "tamperprobe-hypothesis"
)

GOLDEN = Path(__file__).parent / "golden"
SHAPE = (1, 8, 8)
MAX_BATCH = 64

# database=None: no example database; deadline=None: timing noise on a busy machine.
# TAMPERPROBE_FUZZ_SCALE=20 multiplies every example budget, for a longer hunt by hand (not in CI).
SCALE = max(float(os.environ.get("TAMPERPROBE_FUZZ_SCALE", "1")), 0.01)
FUZZ = settings(
    max_examples=int(150 * SCALE),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
FUZZ_MORE = settings(FUZZ, max_examples=int(250 * SCALE))
FUZZ_SERVER = settings(FUZZ, max_examples=int(120 * SCALE))  # each example is a real HTTP round trip


# --------------------------------------------------------------------------- OutputSpec.parse

_SPEC_WORDS = ["top1", "topk", "top1-prob", "probs", "logits", "TOPK", "Top1-Prob", "prob", "top", "logit", ""]
_near_specs = st.builds(
    lambda ws, word, sep, digits, tail: f"{ws}{word}{sep}{digits}{tail}{ws}",
    st.sampled_from(["", " ", "\t", "\n ", "\u00a0"]),
    st.sampled_from(_SPEC_WORDS),
    st.sampled_from(["", ":", "::", "=", " : "]),
    st.text(alphabet="0123456789-+.e \u0663\u00b2\u2155", max_size=30),  # incl. an Arabic-Indic digit, a superscript
    st.sampled_from(["", "x", ":", ":3"]),
)


@FUZZ
@given(text=st.one_of(st.text(), _near_specs))
def test_output_spec_parse_raises_only_usage_error(text):
    try:
        spec = OutputSpec.parse(text)
    except UsageError as exc:
        assert str(exc)
        return
    assert spec.kind in ("top1", "topk", "top1-prob", "probs", "logits")
    assert spec.k >= 1
    assert spec.decimals is None or 0 <= spec.decimals <= 12
    assert OutputSpec.parse(str(spec)) == spec  # the canonical text reads back the same


# --------------------------------------------------------------------------- OutputSpec.compare / reveal

specs = st.one_of(
    st.sampled_from([OutputSpec("top1"), OutputSpec("logits")]),
    st.integers(2, 12).map(lambda k: OutputSpec("topk", k=k)),
    st.integers(0, 12).map(lambda d: OutputSpec("top1-prob", decimals=d)),
    st.integers(0, 12).map(lambda d: OutputSpec("probs", decimals=d)),
)
_EDGE_LABELS = [0, 1, -1, 9, 10, 11, 2**31, 2**63, -(2**63), 10**30]
labels = st.one_of(st.none(), st.lists(st.one_of(st.integers(-2, 12), st.sampled_from(_EDGE_LABELS), st.integers()), max_size=14).map(tuple))
_any_float = st.one_of(st.floats(), st.floats(0, 1), st.sampled_from([0.0, -0.0, 1.0, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan]))
scores = st.one_of(st.none(), st.lists(_any_float, max_size=14).map(tuple))
answers = st.builds(Answer, labels=labels, scores=scores)
any_logits = st.lists(st.floats(), max_size=12).map(lambda v: np.array(v, dtype=np.float64))
tolerances = st.one_of(st.just(DEFAULT_TOLERANCE), st.floats(0, 10), st.floats())


@FUZZ
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # softmax of inf/NaN logits warns; the property is about raising
@given(spec=specs, z=any_logits, answer=answers, tol=tolerances, as32=st.booleans())
def test_compare_never_raises(spec, z, answer, tol, as32):
    with np.errstate(over="ignore"):
        logits = z.astype(np.float32) if as32 else z
    m = spec.compare(logits, answer, tol)
    assert isinstance(m, Match)
    assert isinstance(m.ok, bool)
    assert isinstance(m.detail, str)
    str(answer)  # the report prints answers


@st.composite
def spec_and_logits(draw, width=64):
    spec = draw(specs)
    classes = draw(st.integers(max(1, spec.k), 12))
    finite = st.floats(allow_nan=False, allow_infinity=False, width=width)
    values = draw(
        st.one_of(
            st.lists(finite, min_size=classes, max_size=classes),
            st.lists(st.floats(-10, 10, width=width), min_size=classes, max_size=classes),
            st.lists(st.sampled_from([0.0, 1.0, -1.0, 1e-7]), min_size=classes, max_size=classes),  # ties, near-ties
        )
    )
    return spec, np.array(values, dtype=np.float32 if width == 32 else np.float64)


@FUZZ
@pytest.mark.filterwarnings("ignore:overflow encountered in subtract:RuntimeWarning")  # e.g. [1e308, -1e308]: exp(-inf) = 0, right
@given(sz=st.one_of(spec_and_logits(), spec_and_logits(width=32)), tol=st.sampled_from([DEFAULT_TOLERANCE, 0.0, 1e-3]))
def test_reveal_then_compare_always_matches(sz, tol):
    spec, z = sz
    answer = spec.reveal(z)
    m = spec.compare(z, answer, tol)
    assert m.ok, (str(spec), z.tolist(), answer, m.detail)


@FUZZ
@given(sz=spec_and_logits(), wrong=st.integers(0, 11), delta=st.floats(1e-3, 1e3))
def test_clearly_wrong_answers_do_not_match(sz, wrong, delta):
    spec, z = sz
    assume(np.all(np.abs(z) < 1e6))
    tol = DEFAULT_TOLERANCE
    c = wrong % z.size
    top = float(z.max())
    if z[c] < top - tol - 1e-9:  # a label whose logit is clearly below the top one
        assert not OutputSpec("top1").compare(z, Answer(labels=(c,)), tol).ok
    bad = list(OutputSpec("logits").reveal(z).scores)
    bad[c] += tol + 1e-6 * abs(bad[c]) + delta
    assert not OutputSpec("logits").compare(z, Answer(scores=tuple(bad)), tol).ok
    if spec.kind == "probs":
        off = list(spec.reveal(z).scores)
        off[c] = float(softmax64(z)[c]) + 0.5 * 10.0**-spec.decimals + tol + 1e-3  # beyond the rounding slack
        assert not spec.compare(z, Answer(scores=tuple(off)), tol).ok


# --------------------------------------------------------------------------- fingerprint.load on damaged bytes

_ORIGINALS = {
    name: (GOLDEN / name).read_bytes()
    for name in ("fingerprint-v1.tpf", "fingerprint-v1-uint8.tpf", "fingerprint-v2.tpf", "fingerprint-v2-uint8.tpf")
}
# v1 files carry no signature (accepted here on purpose); v2 files must verify with the golden test key
_GOLDEN_TRUST = Trust((load_public_key(GOLDEN / "golden-signing-key.pub"),), allow_unsigned=True)


def load(path):
    return _load_file(path, trust=_GOLDEN_TRUST)


def _meta_span(raw: bytes) -> tuple[int, int]:
    """Byte range of the JSON string holding the tamperprobe metadata inside the safetensors header."""
    (n,) = struct.unpack("<Q", raw[:8])
    inner = json.loads(raw[8 : 8 + n])["__metadata__"]["tamperprobe"]
    encoded = json.dumps(inner, ensure_ascii=False).encode()
    start = raw.index(encoded)
    return start, start + len(encoded)


_SPANS = {name: _meta_span(raw) for name, raw in _ORIGINALS.items()}


@st.composite
def mutations(draw, outside_meta=False):
    name = draw(st.sampled_from(sorted(_ORIGINALS)))
    raw = bytearray(_ORIGINALS[name])
    lo, hi = _SPANS[name]
    allowed = [i for i in range(len(raw)) if not lo <= i < hi] if outside_meta else None

    def pos(size):
        if allowed is not None:
            return allowed[draw(st.integers(0, len(allowed) - 1))] if allowed else 0
        return draw(st.integers(0, max(size - 1, 0)))

    ops = draw(st.lists(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "zero_run"]), min_size=1, max_size=3))
    if outside_meta:  # only length-preserving edits, so positions keep their meaning
        ops = [o for o in ops if o in ("flip", "set", "zero_run")] or ["flip"]
    for op in ops:
        if not raw:
            break
        i = pos(len(raw))
        if op == "flip":
            raw[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            raw[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del raw[draw(st.integers(0, len(raw) - 1)) :]
        elif op == "insert":
            raw[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del raw[i : i + draw(st.integers(1, 8))]
        elif op == "zero_run":
            for j in range(i, min(i + draw(st.integers(1, 8)), len(raw))):
                if allowed is None or not lo <= j < hi:
                    raw[j] = 0
    return name, bytes(raw)


@pytest.fixture(scope="module")
def fuzz_dir():
    with tempfile.TemporaryDirectory(prefix="tp-fuzz-") as d:
        yield Path(d)


def _same_tensors(a, b) -> bool:
    for k in ("inputs", "logits", "probs", "seeds", "groups"):
        x, y = getattr(a, k), getattr(b, k)
        if (x is None) != (y is None):
            return False
        if x is not None and (x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes()):
            return False
    return True


def _same_meta(a, b) -> bool:
    return (a.input_spec, a.generator, a.model_digest, a.output_spec, a.tolerance, a.created, a.extra) == (
        b.input_spec,
        b.generator,
        b.model_digest,
        b.output_spec,
        b.tolerance,
        b.created,
        b.extra,
    )


_ORIGINAL_FPS = {name: load(GOLDEN / name) for name in _ORIGINALS}


@FUZZ
@given(m=mutations())
def test_load_damaged_file_raises_format_error_or_gives_original_tensors(fuzz_dir, m):
    name, raw = m
    p = fuzz_dir / "damaged.tpf"
    p.write_bytes(raw)
    try:
        fp = load(p)
    except (FingerprintFormatError, AuthenticityError) as exc:
        assert str(exc)
        return
    assert _same_tensors(fp, _ORIGINAL_FPS[name]), "damaged file read back with different tensors"
    assert _same_meta(fp, _ORIGINAL_FPS[name]), "damaged file read back with different metadata"


@FUZZ
@given(m=mutations(outside_meta=True))
def test_load_damage_outside_metadata_is_detected_or_harmless(fuzz_dir, m):
    """Damage anywhere but inside the metadata string: an error, or the whole original fingerprint, id included."""
    name, raw = m
    p = fuzz_dir / "damaged.tpf"
    p.write_bytes(raw)
    try:
        fp = load(p)
    except (FingerprintFormatError, AuthenticityError):
        return
    orig = _ORIGINAL_FPS[name]
    assert _same_tensors(fp, orig) and _same_meta(fp, orig) and fp.id == orig.id


# --------------------------------------------------------------------------- inference requests

DTYPES = {
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
}
_EDGE_INTS = [
    0,
    1,
    -1,
    127,
    128,
    -128,
    -129,
    255,
    256,
    2**15,
    2**16,
    2**31 - 1,
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64 - 1,
    2**64,
    10**30,
]
_EDGE_FLOATS = [
    0.0,
    -0.0,
    0.5,
    1.0,
    255.0,
    255.5,
    65504.0,
    65520.0,
    3.4028234663852886e38,
    3.5e38,
    1e30,
    1e300,
    -1e300,
    5e-324,
    1e-40,
    2.0**63,
    2.0**64,
    -(2.0**63),
    math.nan,
    math.inf,
    -math.inf,
]
numbers = st.one_of(
    st.integers(-3, 300), st.sampled_from(_EDGE_INTS), st.integers(), st.floats(-2, 2), st.floats(), st.sampled_from(_EDGE_FLOATS), st.booleans()
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
json_values = st.recursive(
    json_scalars,
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
    max_leaves=10,
)
_header_text = st.text(alphabet="0123456789-+ abcxyz", max_size=8).map(str.strip)  # h11 refuses padded values


@dataclasses.dataclass
class Req:
    body: bytes
    header_length: str | None = None


def _nest(flat: list, shape: list[int]) -> list:
    for d in reversed(shape[1:]):
        flat = [flat[i : i + d] for i in range(0, len(flat), d)]
    return flat


def _values_for(datatype: str):
    """Values that mostly fit ``datatype`` (in range integers, finite floats), with edge cases around the limits."""
    if datatype in DTYPES and np.dtype(DTYPES[datatype]).kind in "iu":
        info = np.iinfo(DTYPES[datatype])
        lo, hi = int(info.min), int(info.max)
        edges = st.sampled_from([lo, hi, lo - 1, hi + 1, float(lo), float(hi), 2.0**63, 2.0**64, 2**63, 2**64 - 1])
        return st.one_of(st.integers(max(lo, -300), min(hi, 300)), st.integers(lo, hi), edges, edges, st.integers(-3, 3).map(float))
    limit = {"FP16": 65504.0, "FP32": 3.4028234663852886e38}.get(datatype, 1e308)
    return st.one_of(
        st.floats(0, 1),
        st.floats(-limit, limit),
        st.integers(-(2**70), 2**70),
        st.sampled_from([0.0, -0.0, limit, -limit, 5e-324, 1e-40, 6e-8, 65520.0, 3.5e38]),
    )


@st.composite
def infer_requests(draw):
    """Inference requests: half well-formed apart from the values, half with any part replaced by junk."""
    kind = draw(st.sampled_from(["json"] * 6 + ["binary"] * 2 + ["garbage", "anyjson"]))
    if kind == "garbage":
        return Req(draw(st.binary(max_size=200)), draw(st.none() | _header_text))
    if kind == "anyjson":
        return Req(json.dumps(draw(json_values)).encode(), draw(st.none() | _header_text))
    wild = draw(st.booleans())  # False: a well-formed request, only the values vary

    def junk(well_formed, *alternatives, p=4):
        """``well_formed`` or, in wild mode with chance 1/p, one of the alternatives."""
        if wild and draw(st.integers(0, p - 1)) == 0:
            return draw(st.one_of(*alternatives))
        return well_formed

    batch = draw(st.integers(1, 3))
    batch = junk(batch, st.sampled_from([0, -1, MAX_BATCH, MAX_BATCH + 1, 10**20]))
    shape = junk(
        [batch, *SHAPE],
        st.sampled_from([[batch, 64], [batch, 1, 8], [batch, 1, 8, 9], [batch, 1, 8, 8, 1], [True, 1, 8, 8], [1.0, 1, 8, 8], [], [-1, -1, 8, 8]]),
        json_values,
    )
    datatype = junk(draw(st.sampled_from(sorted(DTYPES))), st.sampled_from(["BOOL", "BYTES", "BF16", "fp32", "", "FP8"]), json_values)
    name = junk("input", st.sampled_from(["x", "", "INPUT"]), json_values, p=8)
    plain = isinstance(shape, list) and shape and all(type(d) is int and 0 <= d <= 256 for d in shape)
    count = math.prod(shape) if plain else draw(st.integers(0, 70))
    count = junk(count, st.sampled_from([max(count - 1, 0), count + 1]))
    tensor: dict = {"name": name, "shape": shape, "datatype": datatype}
    blob = b""
    known = isinstance(datatype, str) and datatype in DTYPES
    if kind == "binary":
        itemsize = np.dtype(DTYPES[datatype]).itemsize if known else 4
        if known and draw(st.booleans()):  # sensible values, as a client would send them
            with np.errstate(all="ignore"):
                vals = np.full(count, draw(st.floats(-300, 300))).astype(DTYPES[datatype])
            blob = vals.astype(np.dtype(DTYPES[datatype]).newbyteorder("<")).tobytes()
        else:
            blob = draw(st.binary(min_size=count * itemsize, max_size=count * itemsize))
        blob = junk(blob, st.sampled_from([blob[:-1], blob + b"\0"]))
        tensor["parameters"] = {"binary_data_size": junk(len(blob), st.sampled_from([len(blob) + 1, -1, "8", None]))}
        if wild and draw(st.integers(0, 9)) == 0:
            tensor["data"] = [0.0] * count
    elif wild and draw(st.integers(0, 9)) == 0:
        tensor["data"] = draw(json_values)
    else:
        values = _values_for(datatype if known else "FP64")
        fill = draw(values)
        odd = st.one_of(values, numbers, json_scalars) if wild else st.one_of(values, values, numbers)
        overrides = draw(st.dictionaries(st.integers(0, max(count - 1, 0)), odd, max_size=4))
        flat = [overrides.get(i, fill) for i in range(count)]
        tensor["data"] = _nest(flat, shape) if plain and count == math.prod(shape) and draw(st.booleans()) else flat
        if wild and draw(st.integers(0, 19)) == 0:
            tensor["parameters"] = draw(json_values)
    req: dict = {"inputs": junk([tensor], st.sampled_from([[], [tensor, tensor], tensor, [1], "input"]), p=6)}
    if draw(st.booleans()):
        req["id"] = draw(st.one_of(st.text(max_size=10), json_values if wild else st.one_of(st.integers(), st.floats())))
    if draw(st.integers(0, 2)) == 0:
        out = {"name": draw(st.sampled_from(["label", "probability", "label", "probability", "logits", "x"]))}
        if draw(st.booleans()):
            out["parameters"] = junk(
                draw(st.fixed_dictionaries({}, optional={"classification": st.integers(0, 2), "binary_data": st.booleans()})),
                st.fixed_dictionaries(
                    {}, optional={"classification": st.one_of(st.integers(-1, 12), json_values), "binary_data": st.one_of(st.booleans(), json_values)}
                ),
                json_values,
            )
        req["outputs"] = junk([out], st.sampled_from([[out, out], out]), json_values)
    if draw(st.integers(0, 3)) == 0:
        req["parameters"] = junk({"binary_data_output": draw(st.booleans())}, st.fixed_dictionaries({"binary_data_output": json_values}), json_values)
    head = json.dumps(req).encode()  # allow_nan: NaN/Infinity tokens, which Python's JSON reader accepts
    if kind == "binary":
        header_length = junk(str(len(head)), st.sampled_from([None, "0", "-5", str(len(head) + len(blob) + 1), "x"]))
    else:
        header_length = junk(None, st.sampled_from(["0", str(len(head)), "nope", str(len(head) + 1)]))
    return Req(head + blob, header_length)


def _flatten(v):
    if isinstance(v, list):
        for item in v:
            yield from _flatten(item)
    else:
        yield v


def _request_head(r: Req):
    try:
        return json.loads(r.body[: int(r.header_length)] if r.header_length else r.body)
    except Exception:
        return None


def _first_input(head):
    try:
        t = head["inputs"][0]
        return t if isinstance(t, dict) else None
    except Exception:
        return None


def _has_nonfinite(v) -> bool:
    if isinstance(v, float):
        return not math.isfinite(v)
    if isinstance(v, list):
        return any(_has_nonfinite(x) for x in v)
    if isinstance(v, dict):
        return any(_has_nonfinite(x) for x in v.values())
    return False


def _check_parsed(r: Req, req: dict, x: np.ndarray) -> None:
    assert isinstance(req, dict)
    t = req["inputs"][0]
    assert x.dtype == np.float32
    assert x.shape == tuple(t["shape"]) and x.shape[1:] == SHAPE and 1 <= x.shape[0] <= MAX_BATCH
    assert np.isfinite(x).all()
    datatype = t["datatype"]
    params = t.get("parameters") if isinstance(t.get("parameters"), dict) else {}
    if "binary_data_size" in params:  # the values are exactly the bytes sent
        blob = r.body[int(r.header_length) :]
        want = np.frombuffer(blob, dtype=np.dtype(DTYPES[datatype]).newbyteorder("<")).astype(np.float32)
        assert np.array_equal(x.reshape(-1), want)
        return
    values = list(_flatten(t["data"]))
    ref = np.array([float(v) for v in values], dtype=np.float64)
    rtol, atol = (2.0**-10, 2.0**-24) if datatype == "FP16" else (2.0**-23, 2.0**-148)
    np.testing.assert_allclose(x.reshape(-1).astype(np.float64), ref, rtol=rtol, atol=atol, err_msg=f"values changed on the way in ({datatype})")


@FUZZ_MORE
@given(r=infer_requests())
def test_parse_infer_request_raises_only_bad_request(r):
    try:
        req, x = parse_infer_request(r.body, r.header_length, SHAPE, MAX_BATCH)
    except BadRequest as exc:
        assert 400 <= exc.status < 500 and str(exc)
        event("BadRequest")
        return
    event("accepted")
    _check_parsed(r, req, x)


# --------------------------------------------------------------------------- live server


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    module = zoo.build("perceptron", SHAPE).eval()
    srv = ServerThread(TorchModel(module, "m"), input_spec=InputSpec(SHAPE), output_spec="top1-prob:4", max_batch=MAX_BATCH, log_level="critical")
    with srv:
        # no keep-alive: after a 500, uvicorn drops the connection and a pooled one would fail the next request
        with httpx.Client(base_url=srv.url, timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            yield srv, client


_PATHS = ["/v2/models/model/infer"] * 6 + [
    "/v2/models/model/versions/1/infer",
    "/v2/models/model/versions/2/infer",
    "/v2/models/other/infer",
    "/v2/models/model",
    "/v2/models/model/infer/",
    "/v2/repository/index",
]


@FUZZ_SERVER
@given(
    r=infer_requests(),
    path=st.sampled_from(_PATHS),
    content_type=st.sampled_from([None, "application/json", "application/octet-stream", "text/plain", "x/y; a=b"]),
)
def test_live_server_never_answers_5xx(server, r, path, content_type):
    srv, client = server
    headers = {}
    if r.header_length is not None:
        headers["Inference-Header-Content-Length"] = r.header_length
    if content_type:
        headers["Content-Type"] = content_type
    resp = client.post(path, content=r.body, headers=headers)
    event(f"HTTP {resp.status_code}")
    assert "location" not in resp.headers  # never a redirect (a trailing slash is a 404, not a Host-echoing 307)
    assert resp.status_code == 200 or 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300], r)
    if resp.status_code == 200 and path.endswith("/infer"):
        hl = resp.headers.get("inference-header-content-length")
        head = json.loads(resp.content[: int(hl)] if hl else resp.content)
        assert head["model_name"] == "model" and isinstance(head["outputs"], list) and head["outputs"]
        for o in head["outputs"]:
            assert o["name"] in ("label", "probability") and ("data" in o or "parameters" in o)
    elif resp.status_code == 200:
        assert resp.json() == [{"name": "model", "version": "1", "state": "READY"}]
    else:
        err = resp.json()
        assert isinstance(err, dict) and list(err) == ["error"] and isinstance(err["error"], str) and err["error"]
    assert client.get("/v2/health/live").status_code == 200


def test_live_server_still_alive_after_fuzz(server):
    srv, client = server
    assert srv._thread is not None and srv._thread.is_alive()
    assert client.get("/v2/health/live").json() == {"live": True}
    body = {"inputs": [{"name": "input", "shape": [1, *SHAPE], "datatype": "FP32", "data": [0.5] * 64}]}
    r = client.post("/v2/models/model/infer", json=body)
    assert r.status_code == 200 and [o["name"] for o in r.json()["outputs"]] == ["label", "probability"]


# --------------------------------------------------------------------------- regressions of bugs fuzzing found


def _rewrite_meta(raw: bytes, change) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["tamperprobe"])
    change(meta)
    header["__metadata__"]["tamperprobe"] = json.dumps(meta)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + raw[8 + n :]


def _infer_body(**tensor) -> bytes:
    t = {"name": "input", "shape": [1, *SHAPE], "datatype": "FP32", "data": [0.0] * 64}
    t.update(tensor)
    return json.dumps({"inputs": [t]}).encode()


def test_regression_parse_spec_with_huge_number():
    with pytest.raises(UsageError):
        OutputSpec.parse("topk:" + "1" * 5000)


@pytest.mark.parametrize("version", ["\u00b2", "9" * 5000])
def test_regression_load_odd_format_version(tmp_path, version):
    p = tmp_path / "odd.tpf"
    p.write_bytes(_rewrite_meta(_ORIGINALS["fingerprint-v1.tpf"], lambda m: m.update(format=f"tamperprobe.fingerprint/v{version}")))
    with pytest.raises(FingerprintFormatError):
        load(p)


def test_regression_metadata_not_covered_by_checksum(tmp_path):
    raw = _ORIGINALS["fingerprint-v1-uint8.tpf"]
    i = raw.index(b'"tolerance\\": 0.0001') + len(b'"tolerance\\": 0.000')
    damaged = raw[:i] + bytes([raw[i] ^ 0x06]) + raw[i + 1 :]  # '1' -> '7', one byte
    p = tmp_path / "damaged.tpf"
    p.write_bytes(damaged)
    try:
        fp = load(p)
    except FingerprintFormatError:
        return  # fixed
    assert fp.tolerance == 0.0007 and _same_tensors(fp, _ORIGINAL_FPS["fingerprint-v1-uint8.tpf"])
    pytest.fail("a damaged metadata byte went unnoticed: tolerance 0.0001 read back as 0.0007")


@pytest.mark.parametrize("datatype", [["FP32"], {}])
def test_regression_unhashable_datatype(datatype):
    with pytest.raises(BadRequest):
        parse_infer_request(_infer_body(datatype=datatype), None, SHAPE, MAX_BATCH)


def test_regression_int64_out_of_range_wraps():
    body = _infer_body(datatype="INT64", data=[0] * 63 + [2**63])
    try:
        _, x = parse_infer_request(body, None, SHAPE, MAX_BATCH)
    except BadRequest:
        return  # fixed
    pytest.fail(f"INT64 9223372036854775808 (out of range) accepted as {x.reshape(-1)[-1]}")


def test_regression_uint64_max_wraps():
    _, x = parse_infer_request(_infer_body(datatype="UINT64", data=[0] * 63 + [2**64 - 1]), None, SHAPE, MAX_BATCH)
    assert x.reshape(-1)[-1] == np.float32(2.0**64)


def test_regression_nonfinite_id_is_a_500(server):
    srv, client = server
    body = b'{"id": NaN, ' + _infer_body()[1:]
    r = client.post("/v2/models/model/infer", content=body)
    assert r.status_code < 500, r.text


def test_regression_unhashable_datatype_is_a_500(server):
    srv, client = server
    r = client.post("/v2/models/model/infer", content=_infer_body(datatype=["FP32"]))
    assert r.status_code < 500, r.text


def test_regression_huge_finite_input_is_a_500(server):
    srv, client = server
    r = client.post("/v2/models/model/infer", content=_infer_body(data=[3.4e38] * 64))
    assert r.status_code < 500, r.text


def test_regression_compare_probs_with_no_classes():
    m = OutputSpec("probs", decimals=2).compare(np.zeros(0), Answer(scores=()))
    assert isinstance(m.ok, bool)


def test_a_damaged_file_that_begins_like_an_encrypted_one_is_a_damaged_file(fuzz_dir):
    """Found by the fuzzer in CI: the magic of an encrypted file followed by no key id is damage, not a request for a key."""
    from tamperprobe.signing import ENCRYPTION_MAGIC

    raw = (GOLDEN / next(iter(_ORIGINALS))).read_bytes()
    p = fuzz_dir / "damaged.tpf"
    p.write_bytes(ENCRYPTION_MAGIC + raw[len(ENCRYPTION_MAGIC) :])
    with pytest.raises(AuthenticityError, match="header is damaged"):
        load(p)
