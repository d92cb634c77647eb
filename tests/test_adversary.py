"""An operator who sees the queries: routers, threshold calibration, the cost, and detection under a router."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tamperprobe.errors import UsageError
from tamperprobe.evaluation.adversary import PASSIVE, Traffic, run_adversary
from tamperprobe.evaluation.adversary_report import markdown, write_adversary_report
from tamperprobe.evaluation.protocol import exact_random_detection
from tamperprobe.evaluation.routers import (
    ExactRepeat,
    Gradient,
    Learned,
    MarginOriginal,
    MarginTampered,
    NearTwin,
    Operator,
    cost_of,
    get_router,
    image_statistics,
    nearest_earlier,
    router_names,
    threshold_for_cost,
)
from tamperprobe.models import TorchModel
from tamperprobe.outputs import OutputSpec, top_margin


@pytest.fixture(scope="module")
def setting(digits, trained_cnn):
    """The digits CNN, its training part as the owner's data, and deduplicated held-out digits as ordinary traffic."""
    train, test = digits
    x = np.unique(test.x.reshape(len(test.x), -1), axis=0).reshape(-1, *test.x.shape[1:])
    traffic = Traffic.split(x, seen=140, calibration=200, seed=0)
    return TorchModel(trained_cnn), train, traffic


# ----------------------------------------------------------------------------- threshold and cost


@pytest.mark.parametrize("cost", [0.0, 0.01, 0.05, 0.2, 0.5, 1.0])
def test_threshold_hits_the_requested_cost_on_distinct_scores(cost):
    scores = np.random.default_rng(1).normal(size=1000)
    t = threshold_for_cost(scores, cost)
    assert cost_of(scores, t) == math.floor(cost * 1000 + 1e-9) / 1000


def test_ties_at_the_threshold_are_not_flagged_so_the_cost_never_exceeds_the_request():
    scores = np.array([0.0] * 90 + [1.0] * 10)
    for cost in (0.01, 0.05, 0.1, 0.15, 0.5):
        assert cost_of(scores, threshold_for_cost(scores, cost)) <= cost
    assert cost_of(scores, threshold_for_cost(scores, 0.1)) == 0.1
    assert cost_of(scores, threshold_for_cost(scores, 0.05)) == 0.0  # the ten tied scores cannot be split


def test_cost_is_the_share_above_the_threshold_and_bad_costs_are_refused():
    assert cost_of(np.array([1.0, 2.0, 3.0, 4.0]), 2.0) == 0.5
    assert cost_of(np.array([]), 0.0) == 0.0
    with pytest.raises(UsageError):
        threshold_for_cost(np.ones(3), 1.5)
    with pytest.raises(UsageError):
        threshold_for_cost(np.array([]), 0.1)


# ----------------------------------------------------------------------------- routers


def test_exact_repeat_flags_repeats_at_zero_ordinary_cost(setting):
    model, _, traffic = setting
    router = ExactRepeat().fit(traffic.seen, operator=Operator(model))
    ordinary = router.score(traffic.calibration, [traffic.seen])
    assert not ordinary.any()
    router.calibrate(ordinary, 0.05)
    assert cost_of(router.score(traffic.measure, [traffic.seen, traffic.calibration]), router.threshold_) == 0.0
    fresh = traffic.measure[0] * 0.5
    requests = np.stack([traffic.seen[3], fresh, fresh, traffic.calibration[7]])
    assert router.flag(requests, [traffic.seen, traffic.calibration]).tolist() == [True, False, True, True]
    nudged = traffic.seen[3].copy()
    nudged.flat[0] = np.nextafter(nudged.flat[0], np.float32(2.0))  # one ulp away is not a repeat
    assert not router.flag(nudged[None], [traffic.seen]).any()


def test_near_twin_flags_the_second_of_a_pair_and_not_the_first(setting):
    model, _, traffic = setting
    router = NearTwin().fit(traffic.seen, operator=Operator(model))
    router.calibrate(router.score(traffic.calibration, [traffic.seen]), 0.01)
    assert 0 < router.distance_ < np.inf
    history = [traffic.seen, traffic.calibration, traffic.measure]
    far = np.clip(1.0 - traffic.measure[:2], 0, 1)  # inverted digits: far from every ordinary digit
    twin = far[0] + np.float32(1e-3)
    assert router.flag(np.stack([far[0], twin]), history).tolist() == [False, True]
    assert router.flag(np.stack([twin, far[0]]), history).tolist() == [False, True]
    assert router.flag(np.stack([far[0], far[1]]), history).tolist() == [False, False]


def test_nearest_earlier_is_the_brute_force_distance_to_earlier_rows():
    rng = np.random.default_rng(0)
    h, r = rng.random((30, 5)), rng.random((12, 5))
    d = nearest_earlier(r, [h[:10], h[10:]])
    for i in range(len(r)):
        earlier = np.concatenate([h, r[:i]])
        assert d[i] == pytest.approx(np.sqrt(((earlier - r[i]) ** 2).sum(axis=1)).min(), abs=1e-9)
    assert np.isinf(nearest_earlier(r[:1])[0])


def test_margin_routers_score_minus_the_margin_of_their_model(setting, trained_mlp):
    model, _, traffic = setting
    other = TorchModel(trained_mlp)
    x = traffic.calibration[:50]
    on_o = MarginOriginal().fit(traffic.seen, operator=Operator(model, other)).score(x)
    on_t = MarginTampered().fit(traffic.seen, operator=Operator(model, other)).score(x)
    np.testing.assert_allclose(on_o, -top_margin(model.logits(x))[1])
    np.testing.assert_allclose(on_t, -top_margin(other.logits(x))[1])
    with pytest.raises(UsageError, match="tampered"):
        MarginTampered().fit(traffic.seen, operator=Operator(model))


def test_margin_router_flags_boundary_markers_at_one_percent(setting):
    from tamperprobe.owner.methods import get_method

    model, train, traffic = setting
    bag = get_method("boundary").generate(model, train, 10, np.random.default_rng(0))
    router = MarginOriginal().fit(traffic.seen, operator=Operator(model))
    router.calibrate(router.score(traffic.calibration), 0.01)
    assert router.flag(bag.inputs).all()
    assert cost_of(router.score(traffic.measure), router.threshold_) < 0.05


def test_gradient_router_is_the_norm_of_the_margin_gradient(digits):
    import torch

    from tamperprobe import zoo

    torch.manual_seed(0)
    linear = zoo.build("perceptron", (1, 8, 8))
    model = TorchModel(linear)
    x = digits[0].x[:20]
    z = model.logits(x).astype(np.float64)
    order = np.argsort(-z, axis=1)
    w = linear.net[1].weight.detach().double().numpy()
    expected = np.linalg.norm(w[order[:, 0]] - w[order[:, 1]], axis=1)  # linear: the gradient is W_a − W_b
    norm = Gradient().fit(x, operator=Operator(model)).score(x)
    np.testing.assert_allclose(norm, expected, rtol=1e-5)
    dist = Gradient(measure="distance").fit(x, operator=Operator(model)).score(x)
    np.testing.assert_allclose(dist, expected / top_margin(z)[1], rtol=1e-5)


def test_image_statistics_measure_what_they_name():
    flat = np.full((1, 1, 4, 4), 0.5, dtype=np.float32)
    grid = (np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4) * 17) / 255
    off = grid + np.float32(0.3 / 255)
    f = image_statistics(np.concatenate([flat, grid, off]), 0.0, 1.0, bins=4)
    mean, std, tv, _, _, dark, bright = f[:, :7].T
    assert mean[0] == pytest.approx(0.5) and std[0] == pytest.approx(0.0) and tv[0] == pytest.approx(0.0)
    assert dark[1] == pytest.approx(1 / 16) and bright[1] == pytest.approx(1 / 16)
    np.testing.assert_allclose(f[:, 7:11].sum(axis=1), 1.0)  # the histogram is a distribution
    off_grid = f[:, -1]
    assert off_grid[1] == 0.0 and off_grid[2] == 1.0  # 0.5 is not on the 8-bit grid {k/255} either: 127.5/255
    assert image_statistics(grid, 0.0, 1.0, grid8=False).shape[1] == f.shape[1] - 1 + 4


def test_learned_router_learns_markers_it_has_seen(setting):
    model, _, traffic = setting
    rng = np.random.default_rng(0)
    markers = rng.random(traffic.seen[:60].shape).astype(np.float32)  # uniform noise: nothing like a digit
    router = Learned().fit(traffic.seen, operator=Operator(model), seen=markers[:40])
    router.calibrate(router.score(traffic.calibration), 0.05)
    assert router.flag(markers[40:]).mean() == 1.0  # unseen markers of the same kind
    with pytest.raises(UsageError, match="seen"):
        Learned().fit(traffic.seen, operator=Operator(model))


def test_routers_follow_the_plug_in_convention():
    assert router_names() == ["exact-repeat", "near-twin", "margin-original", "margin-tampered", "gradient", "learned"]
    r = get_router("gradient", measure="distance")
    assert repr(r) == "Gradient(measure='distance')" and r.clone().get_params() == {"measure": "distance"}
    assert get_router("learned", C="0.5").C == 0.5
    with pytest.raises(UsageError):
        get_router("gradient", measure="sideways")
    with pytest.raises(UsageError):
        get_router("oracle")


# ----------------------------------------------------------------------------- the harness


@pytest.fixture(scope="module")
def evaluation(setting):
    model, train, traffic = setting
    return run_adversary(
        model,
        train,
        traffic,
        methods=["badv", "boundary"],
        attacks=["noise", "fp16"],
        routers=["exact-repeat", "near-twin", "margin-original", "learned"],
        specs=["top1", "logits"],
        costs=(0.0, 0.01, 0.05, 0.2),
        bag=24,
        resamples=20000,
        seed=0,
    )


def test_harness_runs_without_errors(evaluation):
    assert evaluation.errors == []
    assert {r["method"] for r in evaluation.methods} == {"badv", "boundary"}
    boundary = next(r for r in evaluation.methods if r["method"] == "boundary")
    assert boundary["units"] == boundary["markers"] // 2 and boundary["twin_distance_median"] < 0.01
    assert boundary["margin_ks_p"] < 1e-6  # boundary margins are nothing like ordinary traffic's


def test_measured_cost_is_the_held_out_share_above_the_calibrated_threshold(evaluation, setting):
    model, _, traffic = setting
    score_cal = -top_margin(model.logits(traffic.calibration))[1]
    score_meas = -top_margin(model.logits(traffic.measure))[1]
    for row in (r for r in evaluation.routers if r["router"] == "margin-original"):
        t = threshold_for_cost(score_cal, row["cost"])
        assert row["calibration_cost"] == pytest.approx(cost_of(score_cal, t))
        assert row["measured_cost"] == pytest.approx(cost_of(score_meas, t))
        assert row["calibration_cost"] == math.floor(row["cost"] * len(score_cal) + 1e-9) / len(score_cal)


def test_detection_under_a_router_is_detection_over_the_unflagged_markers(evaluation, setting, trained_cnn):
    """badv markers stand alone and are picked uniformly: the rate is 1 − C(n−m, k)/C(n, k), m = changed and unflagged."""
    from tamperprobe.attacks import run_attack
    from tamperprobe.evaluation.runner import make_bag

    model, train, traffic = setting
    bag, _ = make_bag(model, train, "badv", {}, 24, 0, "badv")
    tampered = run_attack("fp16", trained_cnn, None).model
    changed = OutputSpec.parse("top1").changed(model.logits(bag.inputs), TorchModel(tampered).logits(bag.inputs))
    assert changed.sum() >= 3
    score = -top_margin(model.logits(bag.inputs))[1]
    score_cal = -top_margin(model.logits(traffic.calibration))[1]
    n = len(bag)
    for cost in (0.0, 0.01, 0.05, 0.2):
        unflagged = ~(score > threshold_for_cost(score_cal, cost))
        m = int((changed & unflagged).sum())
        for ns in (2, 4, 6, 10):
            rate = evaluation.rate("badv", "fp16", "top1", "margin-original", cost, ns)
            assert rate == pytest.approx(exact_random_detection(n, m, ns), abs=0.015)
    for ns in (2, 10):
        passive = evaluation.rate("badv", "fp16", "top1", PASSIVE, 0.0, ns)
        assert passive == pytest.approx(exact_random_detection(n, int(changed.sum()), ns), abs=0.015)


def test_fresh_markers_escape_the_exact_repeat_router_and_repeated_ones_do_not(evaluation, setting):
    for m in ("badv", "boundary"):
        for ns in (2, 10):
            passive = evaluation.rate(m, "fp16", "top1", PASSIVE, 0.0, ns)
            assert evaluation.rate(m, "fp16", "top1", "exact-repeat", 0.01, ns) == passive
    model, train, traffic = setting
    repeat = run_adversary(
        model,
        train,
        traffic,
        methods=["badv"],
        attacks=["fp16"],
        routers=["exact-repeat"],
        specs=["top1"],
        costs=(0.01,),
        bag=24,
        resamples=200,
        reuse="repeat",
    )
    assert repeat.rate("badv", "fp16", "top1", PASSIVE, 0.0, 10) > 0.5
    assert repeat.rate("badv", "fp16", "top1", "exact-repeat", 0.01, 10) == 0.0
    assert next(r for r in repeat.routers if r["router"] == "exact-repeat")["measured_cost"] == 0.0


def test_near_twin_catches_exactly_the_second_half_of_each_boundary_pair(evaluation):
    flagged = {(r["method"], r["router"], r["cost"]): r["flagged"] for r in evaluation.flagged}
    assert flagged[("boundary", "near-twin", 0.0)] == pytest.approx(0.5)  # one half of every pair, in either order
    assert flagged[("badv", "near-twin", 0.0)] == 0.0
    # a pair now detects only through the half sent first: detection drops although the router costs nothing
    assert evaluation.rate("boundary", "fp16", "top1", "near-twin", 0.0, 10) < evaluation.rate("boundary", "fp16", "top1", PASSIVE, 0.0, 10)


def test_richer_outputs_make_the_margin_router_pay_for_every_marker(evaluation):
    """Under logits every marker's answer changes under fp16, so only what the router flags escapes."""
    flagged = {(r["method"], r["router"], r["cost"]): r["flagged"] for r in evaluation.flagged}
    assert evaluation.rate("badv", "fp16", "logits", PASSIVE, 0.0, 2) == 1.0
    assert flagged[("badv", "margin-original", 0.01)] == 1.0  # badv markers sit on the boundary
    assert evaluation.rate("badv", "fp16", "logits", "margin-original", 0.01, 2) == 0.0


def test_breaking_cost_is_the_first_sweep_cost_below_the_target(evaluation):
    for row in evaluation.breaking:
        rates = {c: evaluation.rate(row["method"], row["attack"], row["spec"], row["router"], c, 10) for c in (0.0, 0.01, 0.05, 0.2)}
        if row["status"] == "falls":
            assert rates[row["cost"]] < 0.99 and all(r >= 0.99 for c, r in rates.items() if c < row["cost"])
        elif row["status"] == "never":
            assert all(r >= 0.99 for r in rates.values())
        else:
            assert row["passive"] < 0.99


def test_report_files(evaluation, tmp_path):
    import json

    written = {p.name for p in write_adversary_report(evaluation, tmp_path)}
    assert {"adversary.md", "adversary.json", "detection.csv", "breaking.csv", "routers.csv"} <= written
    assert json.loads((tmp_path / "adversary.json").read_text())["format"] == "tamperprobe.adversary/v1"
    text = markdown(evaluation)
    assert "## Cost at which detection at N_S = 10 falls below 99%" in text and "near-twin @1%" in text


def test_traffic_split_is_disjoint_and_checked():
    x = np.arange(100, dtype=np.float32)[:, None]
    t = Traffic.split(x, seen=10, calibration=30)
    parts = [t.seen, t.calibration, t.measure]
    assert [len(p) for p in parts] == [10, 30, 60]
    assert len(np.unique(np.concatenate(parts))) == 100
    with pytest.raises(UsageError):
        Traffic.split(x, seen=60, calibration=60)


def test_pair_guarantee_counts_shifted_and_silent_pairs():
    from tamperprobe.evaluation.adversary import pair_guarantee

    # two pairs on the 0|1 boundary, each half with margin 1e-4; a third class far below
    intact = np.array([[1e-4, 0.0, -5.0], [0.0, 1e-4, -5.0], [1e-4, 0.0, -5.0], [0.0, 1e-4, -5.0]])
    unit_of = np.array([0, 0, 1, 1])
    same = intact + np.array([1e-3, 0.0, 0.0])  # z_0 − z_1 up by 1e-3 everywhere: the class-1 halves flip
    counts = pair_guarantee(intact, same, unit_of)
    assert counts == {"pairs": 2, "shifted": 2, "shifted_opposite": 0, "silent_shifted": 0, "silent_shifted_same_sign": 0}
    apart = intact.copy()
    apart[0, 0] += 1e-3  # the boundary moves away from both halves of pair 0: nothing flips
    apart[1, 1] += 1e-3
    counts = pair_guarantee(intact, apart, unit_of)
    assert counts == {"pairs": 2, "shifted": 1, "shifted_opposite": 1, "silent_shifted": 1, "silent_shifted_same_sign": 0}


def test_adversary_json_reads_back_to_the_same_document(evaluation):
    import json

    from tamperprobe.evaluation.results import AdversaryEvaluation

    doc = json.loads(json.dumps(evaluation.to_json()))
    again = AdversaryEvaluation.from_json(doc)
    assert again.to_json() == doc
    assert again.rate("boundary", "noise", "top1", PASSIVE, 0.0, 10) == evaluation.rate("boundary", "noise", "top1", PASSIVE, 0.0, 10) is not None
