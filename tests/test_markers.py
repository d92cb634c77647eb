"""TamperNN's marker generators (natural, grid, wght, badv) and boundary pairs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from tamperprobe.errors import UsageError
from tamperprobe.models import TorchModel
from tamperprobe.outputs import OutputSpec, top_margin
from tamperprobe.owner.markers import decode_uint8, encode_uint8
from tamperprobe.owner.methods import get_method, method_names

CONFIGS = [
    ("natural", {}),
    ("grid", {}),
    ("wght", {}),
    ("badv", {}),
    ("boundary", {}),
    ("boundary", {"path": "gradient"}),
    ("boundary", {"pairs": False}),
    ("boundary", {"uint8": True}),
    ("boundary", {"uint8": True, "path": "gradient"}),
]
DELTA = 1e-4


@pytest.fixture(scope="module")
def model(trained_cnn):
    return TorchModel(trained_cnn, "tests:cnn")


@pytest.fixture(scope="module")
def test_set(digits):
    return digits[1]


def _gen(model, data, name, params, bag=20, seed=0):
    return get_method(name, **params).generate(model, data, bag, np.random.default_rng(seed))


def _model_domain(bag, data):
    return decode_uint8(bag.inputs, data.low, data.high) if bag.inputs.dtype == np.uint8 else bag.inputs


def _last_linear_int8(module):
    mod = copy.deepcopy(module)
    last = [m for m in mod.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        scale = last.weight.abs().max() / 127
        last.weight.copy_(torch.round(last.weight / scale) * scale)
    return TorchModel(mod, "tests:int8-last")


def test_registry_has_the_tampernn_methods():
    for name in ("natural", "grid", "wght", "badv", "boundary"):
        assert name in method_names()
        assert get_method(name).name == name
    with pytest.raises(UsageError):
        get_method("boundary", delta=-1.0)
    with pytest.raises(UsageError):
        get_method("boundary", path="sideways")
    with pytest.raises(UsageError):
        get_method("wght", source="nowhere")
    with pytest.raises(UsageError):
        get_method("grid", bogus=1)


@pytest.mark.parametrize("name", method_names())
def test_shared_preconditions_are_checked_for_every_method(model, test_set, name):
    from tamperprobe.data import Dataset

    gen = get_method(name)
    empty = Dataset(test_set.x[:0], test_set.y[:0], "empty", test_set.low, test_set.high)
    with pytest.raises(UsageError, match="bag"):
        gen.generate(model, test_set, 0, np.random.default_rng(0))
    with pytest.raises(UsageError, match="empty"):
        gen.generate(model, empty, 4, np.random.default_rng(0))
    # parameters are validated at generation too, however the object was built
    bad = type(gen)(**{gen.param_names()[0]: "not a value"})
    with pytest.raises(UsageError):
        bad.generate(model, test_set, 4, np.random.default_rng(0))


@pytest.mark.parametrize("params", [{}, {"uint8": True, "path": "gradient"}])
def test_generation_leaves_no_state_on_the_method(model, test_set, params):
    gen = get_method("boundary", **params)
    before = dict(vars(gen))
    _ = gen.generate(model, test_set, 6, np.random.default_rng(0))
    assert vars(gen) == before
    assert "Boundary(delta=0.0001, k=1.5" in repr(gen)


@pytest.mark.parametrize("name,params", CONFIGS, ids=[f"{n}{'-' + '-'.join(f'{k}={v}' for k, v in p.items()) if p else ''}" for n, p in CONFIGS])
def test_shape_range_dtype_and_determinism(model, test_set, name, params):
    bag = 8  # four boundary pairs: shape, range, dtype and determinism do not depend on the size
    a = _gen(model, test_set, name, params, bag=bag)
    b = _gen(model, test_set, name, params, bag=bag)
    assert len(a) == bag
    assert a.inputs.shape == (bag, 1, 8, 8) and a.seeds.shape == a.inputs.shape
    if params.get("uint8"):
        assert a.inputs.dtype == np.uint8 and a.seeds.dtype == np.uint8
        x = decode_uint8(a.inputs, test_set.low, test_set.high)
        assert x.dtype == np.float32 and x.min() >= test_set.low and x.max() <= test_set.high
    else:
        assert a.inputs.dtype == np.float32
        assert a.inputs.min() >= test_set.low and a.inputs.max() <= test_set.high
    assert np.isfinite(_model_domain(a, test_set)).all()
    for k, v in a.info.items():
        if isinstance(v, np.ndarray):
            assert len(v) == len(a), k
    # deterministic for a seed, bit for bit
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.seeds, b.seeds)
    assert (a.groups is None) == (b.groups is None)
    if a.groups is not None:
        assert np.array_equal(a.groups, b.groups)
    # another seed gives other markers
    c = _gen(model, test_set, name, params, bag=bag, seed=1)
    assert not np.array_equal(a.inputs, c.inputs)


def test_wght_markers_flip_under_their_recorded_perturbation(model, test_set):
    from tamperprobe.owner.methods.wght import perturb_weights

    bag = _gen(model, test_set, "wght", {}, bag=30)
    assert len(bag) == 30
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    flipped = []
    for i in range(len(bag)):
        with perturb_weights(model.module, bag.info["epsilon"][i], bag.info["perturbation_seed"][i]):
            flipped.append(model.logits(bag.inputs[i : i + 1]).argmax(1)[0] != bag.info["label"][i])
    # the generator judges flips at the default batch size on its whole pool; one marker alone runs
    # at batch size 1, so a flip within float noise could differ on another CPU (all 30 flip here)
    assert np.mean(flipped) >= 0.95, np.mean(flipped)
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())  # restored bit-exactly
    assert np.array_equal(model.logits(bag.inputs).argmax(1), bag.info["label"])
    steps = np.log2(bag.info["epsilon"] / 1e-4)  # eps_start 1e-4, raised by factor 2
    assert np.allclose(steps, np.round(steps)) and steps.min() >= 0


def test_badv_markers_are_classified_differently_from_their_seeds(model, test_set):
    bag = _gen(model, test_set, "badv", {}, bag=30)
    assert len(bag) == 30
    seed_labels = model.logits(bag.seeds).argmax(1)
    assert np.array_equal(seed_labels, bag.info["seed_label"])
    for batch in (1, 64):
        assert (model.logits(bag.inputs, batch_size=batch).argmax(1) != seed_labels).all()
    # just past the flip: a tiny FGSM step, far smaller than the input range
    assert (bag.info["epsilon"] > 0).all() and np.median(bag.info["epsilon"]) < 0.5
    step = np.abs(bag.inputs - bag.seeds).reshape(len(bag), -1).max(axis=1)
    assert (step <= bag.info["epsilon"] + 1e-6).all()


@pytest.mark.parametrize("path", ["blend", "gradient"])
def test_boundary_pairs_straddle_with_margin_delta(model, test_set, path):
    bag = _gen(model, test_set, "boundary", {"path": path, "delta": DELTA}, bag=40)
    assert len(bag) == 40
    assert np.array_equal(bag.groups, np.repeat(np.arange(20), 2))
    for batch in (1, 64, 256):
        labels, margins = top_margin(model.logits(bag.inputs, batch_size=batch))
        assert (margins >= DELTA).all(), (batch, margins.min())
        assert (margins <= 3 * DELTA).all()
        assert (labels[0::2] != labels[1::2]).all()
        assert np.array_equal(labels, bag.info["label"])
    assert (bag.info["margin"] >= DELTA).all()
    # the two members are nearly identical, and their seed is the pair's natural start
    gap = np.abs(bag.inputs[0::2] - bag.inputs[1::2]).max()
    assert gap < 1e-3
    assert np.isfinite(bag.info["psnr"]).all() and (bag.info["psnr"] > 0).all()
    assert np.array_equal(bag.seeds[0::2], bag.seeds[1::2])
    assert np.array_equal(bag.seeds, test_set.x[bag.info["seed_index"]])


def test_boundary_single_sided_markers(model, test_set):
    bag = _gen(model, test_set, "boundary", {"pairs": False, "delta": 2e-4, "k": 2.0}, bag=15)
    assert len(bag) == 15 and bag.groups is None
    for batch in (1, 64):
        _, margins = top_margin(model.logits(bag.inputs, batch_size=batch))
        assert (margins >= 2e-4).all() and (margins <= 4e-4).all()


def test_uint8_markers_are_exact_and_survive_a_round_trip(model, test_set):
    bag = _gen(model, test_set, "boundary", {"uint8": True, "delta": DELTA}, bag=30)
    assert bag.inputs.dtype == np.uint8 and len(bag) == 30
    enc = bag.encoding
    assert enc is not None and enc.dtype == "uint8" and (enc.low, enc.high) == (test_set.low, test_set.high)
    assert "input_encoding" not in bag.info  # a typed field, not an info entry
    np.testing.assert_array_equal(bag.decoded(), decode_uint8(bag.inputs, test_set.low, test_set.high))
    # through JSON (a list of ints, as an HTTP API would carry it) and through raw bytes
    via_json = np.asarray(json.loads(json.dumps(bag.inputs.tolist())), dtype=np.uint8)
    via_bytes = np.frombuffer(bag.inputs.tobytes(), dtype=np.uint8).reshape(bag.inputs.shape)
    assert np.array_equal(via_json, bag.inputs) and np.array_equal(via_bytes, bag.inputs)
    assert json.loads(json.dumps(bag.inputs.tolist())) == bag.inputs.astype(int).tolist()
    x = decode_uint8(via_json, enc.low, enc.high)
    assert np.array_equal(x, decode_uint8(bag.inputs, test_set.low, test_set.high))
    assert np.array_equal(encode_uint8(x, test_set.low, test_set.high), bag.inputs)
    for batch in (1, 64, 256):
        labels, margins = top_margin(model.logits(x, batch_size=batch))
        assert (margins >= DELTA).all(), (batch, margins.min())
        assert (labels[0::2] != labels[1::2]).all()
    # the greedy pixel search brings most margins close to delta
    assert np.median(bag.info["margin"]) < 10 * DELTA
    assert np.isfinite(bag.info["psnr"]).all()


def test_boundary_pairs_catch_int8_quantization_of_the_last_layer(model, test_set):
    """Measured honestly over 100 pairs: boundary pairs flip, natural markers do not."""
    spec = OutputSpec.parse("top1")
    tampered = _last_linear_int8(model.module)

    def detected(bag):
        ref = model.logits(_model_domain(bag, test_set))
        got = tampered.logits(_model_domain(bag, test_set), batch_size=64)
        changed = np.array([not spec.compare(ref[i], spec.reveal(got[i])).ok for i in range(len(bag))])
        if bag.groups is None:
            return changed.mean()
        return np.mean([changed[bag.groups == g].any() for g in np.unique(bag.groups)])

    pairs = _gen(model, test_set, "boundary", {"delta": DELTA}, bag=200)
    natural = _gen(model, test_set, "natural", {}, bag=200)
    share_pairs, share_natural = detected(pairs), detected(natural)
    assert share_pairs >= 0.9, share_pairs
    assert share_natural <= 0.1, share_natural


def test_boundary_fingerprint_end_to_end(model, test_set):
    """Through create_fingerprint and verify: intact model INTACT under top1, tampered one TAMPERED."""
    from tamperprobe.owner.generate import create_fingerprint
    from tamperprobe.served.targets import LocalTarget
    from tamperprobe.served.verify import verify

    fp = create_fingerprint(model, test_set, method="boundary", select="random", size=20, bag=60, seed=0, output_spec="top1")
    assert len(fp) == 20 and fp.groups is not None
    assert verify(fp, LocalTarget(model)).verdict == "INTACT"
    assert verify(fp, LocalTarget(model, batch_size=1)).verdict == "INTACT"
    assert verify(fp, LocalTarget(_last_linear_int8(model.module))).verdict == "TAMPERED"
