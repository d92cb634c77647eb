"""Markers without free tells: bounded (natural-looking) boundary paths, crossed pairs, margin-matched markers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tamperprobe.errors import UsageError
from tamperprobe.evaluation.routers import nearest_earlier
from tamperprobe.models import TorchModel
from tamperprobe.outputs import top_margin
from tamperprobe.owner.markers import decode_uint8
from tamperprobe.owner.methods import get_method, method_names

LINF = 8 / 255


@pytest.fixture(scope="module")
def model(trained_cnn):
    return TorchModel(trained_cnn)


def test_new_methods_are_registered():
    assert {"crossed", "matched"} <= set(method_names())
    with pytest.raises(UsageError, match="linf"):
        get_method("boundary", linf=0.1).validated()  # the blend path is not bounded
    with pytest.raises(UsageError, match="linf"):
        get_method("crossed", path="blend", linf=0.1).validated()


def _saturated_seed_pixels_moved(x: np.ndarray, seeds: np.ndarray) -> int:
    at_end = (seeds <= 0.5 / 255) | (seeds >= 1 - 0.5 / 255)
    return int((at_end & (x != seeds)).sum())


@pytest.mark.parametrize("uint8", [False, True])
def test_bounded_gradient_path_stays_in_the_ball_and_leaves_saturated_pixels(model, digits, uint8):
    train, _ = digits
    method = get_method("boundary", path="gradient", linf=0.25, uint8=uint8, max_steps=30, neighbors=8, greedy_steps=20)
    bag = method.generate(model, train, 16, np.random.default_rng(0))
    assert len(bag) >= 2
    x, seeds = bag.inputs, bag.seeds
    if uint8:
        assert x.dtype == np.uint8
        assert np.abs(x.astype(int) - seeds.astype(int)).max() <= int(np.floor(0.25 * 255))
        x, seeds = decode_uint8(x, 0.0, 1.0), decode_uint8(seeds, 0.0, 1.0)
    assert np.abs(x - seeds).max() <= 0.25 + 1e-6
    assert bag.info["linf_to_seed"].max() <= 0.25 + 1e-6
    assert _saturated_seed_pixels_moved(x, seeds) == 0
    assert (bag.info["margin"] >= method.delta).all()


def test_linf_of_8_over_255_means_a_psnr_of_at_least_30_db(model, digits):
    train, _ = digits
    bag = get_method("boundary", path="gradient", linf=LINF, saturated=True, max_steps=30).generate(model, train, 40, np.random.default_rng(1))
    if len(bag) == 0:  # pragma: no cover - digits that no 8/255 step flips
        pytest.skip("no digit flips within 8/255")
    assert bag.info["linf_to_seed"].max() <= LINF + 1e-6
    assert bag.info["psnr"].min() >= 30.0


@pytest.fixture(scope="module")
def crossed(model, digits):
    train, _ = digits
    return get_method("crossed").generate(model, train, 24, np.random.default_rng(0))


def test_crossed_pair_halves_come_from_different_paths_and_are_no_near_twins(crossed, model, digits):
    boundary = get_method("boundary").generate(model, digits[0], 24, np.random.default_rng(0))
    n = len(crossed) // 2
    assert n >= 4 and crossed.groups.tolist() == np.repeat(np.arange(n), 2).tolist()
    source = crossed.info["source_path"]
    assert len(np.unique(source)) == len(source)  # each path gives one half, once; its other half is never sent
    assert crossed.info["path"] == "gradient"  # path=auto on a model with weights in PyTorch form
    images = np.concatenate([crossed.info["seed_index"], crossed.info["partner_index"]])
    images = images[images >= 0]  # gradient paths have no blend partner (-1)
    assert len(images) == len(crossed) and len(np.unique(images)) == len(images)  # no natural image feeds two markers
    label = crossed.info["label"]
    assert (label[0::2] < label[1::2]).all()  # two sides of the same class boundary
    assert (model.logits(crossed.inputs).argmax(axis=1) == label).all()
    twin = crossed.info["twin_distance"][0::2]
    boundary_twin = np.linalg.norm((boundary.inputs[0::2] - boundary.inputs[1::2]).reshape(len(boundary) // 2, -1), axis=1)
    assert twin.min() > 100 * boundary_twin.max()
    # no marker is a near-twin of another marker of the fingerprint either
    assert nearest_earlier(crossed.inputs)[1:].min() > 100 * boundary_twin.max()


def test_crossed_takes_blend_paths_without_weights_and_refuses_linf_there(trained_cnn, digits, tmp_path):
    """``path=auto`` needs gradients for the gradient path; an ONNX file has none, so it blends (and a bound on the gradient path is refused)."""
    pytest.importorskip("onnxruntime")
    from tamperprobe.models import load_model

    train, _ = digits
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(trained_cnn, torch.as_tensor(train.x[:1]), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    onnx = load_model(path)
    bag = get_method("crossed").generate(onnx, train, 8, np.random.default_rng(0))
    assert bag.info["path"] == "blend" and (bag.info["partner_index"] >= 0).all()
    assert (onnx.logits(bag.inputs).argmax(axis=1) == bag.info["label"]).all()
    with pytest.raises(UsageError, match="linf bounds the gradient path"):
        get_method("crossed", linf=0.1).generate(onnx, train, 8, np.random.default_rng(0))


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_a_boundary_shift_in_one_direction_flips_one_half_of_every_crossed_pair(crossed, trained_cnn, direction):
    """The label-only guarantee that survives de-correlation: a shift of z_a − z_c by more than k·δ, the same everywhere, is seen."""
    k_delta = 1.5e-4
    flipped = []
    for i in range(0, len(crossed), 2):
        a = int(crossed.info["label"][i])
        tampered = copy.deepcopy(trained_cnn)
        with torch.no_grad():
            tampered.head[-1].bias[a] += direction * 3 * k_delta
        labels = TorchModel(tampered).logits(crossed.inputs[i : i + 2]).argmax(axis=1)
        flipped.append(bool((labels != crossed.info["label"][i : i + 2]).any()))
    assert all(flipped)


@pytest.fixture(scope="module")
def reference_margins(model, digits):
    _, test = digits
    return top_margin(model.logits(test.x))[1]


@pytest.mark.parametrize("uint8", [False, True])
def test_matched_margins_cannot_be_told_from_ordinary_ones(model, digits, reference_margins, uint8):
    from scipy.stats import ks_2samp

    train, _ = digits
    bag = get_method("matched", linf=0.3, uint8=uint8).generate(model, train, 60, np.random.default_rng(0))
    assert len(bag) >= 50
    x = decode_uint8(bag.inputs, 0.0, 1.0) if uint8 else bag.inputs
    margins = top_margin(model.logits(x))[1]
    assert ks_2samp(margins, reference_margins).pvalue > 0.05
    seeds = decode_uint8(bag.seeds, 0.0, 1.0) if uint8 else bag.seeds
    assert np.abs(x - seeds).max() <= 0.3 + 1e-6
    assert _saturated_seed_pixels_moved(x, seeds) == 0
    if not uint8:  # the float markers hit their targets exactly
        np.testing.assert_allclose(bag.info["margin"], bag.info["target"], rtol=1e-3, atol=1e-3)


def test_matched_grid_markers_are_random_bit_images_of_matched_margins(model, digits, reference_margins):
    from scipy.stats import ks_2samp

    train, _ = digits
    bag = get_method("matched", source="grid").generate(model, train, 40, np.random.default_rng(0))
    assert len(bag) >= 30
    assert ks_2samp(top_margin(model.logits(bag.inputs))[1], reference_margins).pvalue > 0.05
    assert (bag.info["seed_index"] == -1).all()


def test_margin_router_pays_for_matched_markers_what_it_pays_for_ordinary_traffic(model, digits, reference_margins):
    """A router that catches a share of matched markers flags a comparable share of ordinary traffic."""
    from tamperprobe.evaluation.routers import threshold_for_cost

    train, _ = digits
    bag = get_method("matched", linf=0.3).generate(model, train, 100, np.random.default_rng(2))
    markers = -top_margin(model.logits(bag.inputs))[1]
    for cost in (0.05, 0.2, 0.5):
        t = threshold_for_cost(-reference_margins, cost)
        assert abs((markers > t).mean() - cost) < 0.15
    boundary = get_method("boundary").generate(model, train, 20, np.random.default_rng(0))
    assert (-top_margin(model.logits(boundary.inputs))[1] > threshold_for_cost(-reference_margins, 0.01)).all()
