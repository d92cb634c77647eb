"""The request-shape router: a proxy keyed on headers, body keys and number format, against the verifier's clients."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tamperprobe.errors import UsageError
from tamperprobe.evaluation.adversary import PASSIVE, Traffic, run_adversary
from tamperprobe.evaluation.routers import (
    Operator,
    RequestShapeOldClient,
    RequestShapeRouter,
    client_shapes,
    cost_of,
    request_shape,
)
from tamperprobe.models import TorchModel


@pytest.fixture(scope="module")
def setting(digits, trained_cnn):
    train, test = digits
    x = np.unique(test.x.reshape(len(test.x), -1), axis=0).reshape(-1, *test.x.shape[1:])
    return TorchModel(trained_cnn), train, Traffic.split(x, seen=140, calibration=200, seed=0)


def _body(doc: dict, separators: tuple[str, str] = (", ", ": ")) -> bytes:
    return json.dumps(doc, separators=separators).encode()


def test_shape_ignores_tensor_values_and_lengths_but_not_keys_headers_or_number_format():
    head = [("User-Agent", "python-requests/2.34.2"), ("Content-Length", "10")]
    a = request_shape("POST", "/v2/models/m/infer", head, _body({"inputs": [{"data": [0.5, 0.25]}]}))
    other_values = request_shape("POST", "/v2/models/m/infer?x=1", [head[0], ("Content-Length", "99")], _body({"inputs": [{"data": [0.1] * 7}]}))
    assert a == other_values
    assert a != request_shape("POST", "/v2/models/m/infer", head, _body({"id": "tp-1", "inputs": [{"data": [0.5]}]}))
    assert a != request_shape("POST", "/v2/models/m/infer", head[::-1], _body({"inputs": [{"data": [0.5]}]}))  # header order
    assert a != request_shape("POST", "/v2/models/m/infer", [("User-Agent", "curl/8.5.0"), head[1]], _body({"inputs": [{"data": [0.5]}]}))
    assert a != request_shape("POST", "/v2/models/m/infer", head, _body({"inputs": [{"data": [0.5]}]}, (",", ":")))  # separators
    assert a != request_shape("POST", "/v2/models/m/infer", head, b'{"inputs": [{"data": [0.500000]}]}')  # fixed decimals
    assert a.numbers == ("repr",)


def test_the_verifier_sends_the_ordinary_shape_and_the_old_client_does_not(setting):
    _, train, traffic = setting
    ordinary = set(client_shapes("python-requests", traffic.seen))
    assert len(ordinary) == 1
    assert set(client_shapes("tamperprobe", train.x[:50])) == ordinary
    old = set(client_shapes("tamperprobe-id", train.x[:50]))
    assert len(old) == 1 and not old & ordinary and next(iter(old)).skeleton.startswith("{id:str,")
    with pytest.raises(UsageError, match="unknown client"):
        client_shapes("wget", train.x[:1])


@pytest.mark.parametrize("cost", [0.0, 0.05, 0.2, 0.5])
def test_at_any_cost_markers_are_flagged_no_more_often_than_ordinary_traffic(setting, cost):
    """With the ordinary client's shape the router can only pick at random: a marker and an ordinary request are
    flagged with the same probability, 1 − threshold (the tie-break is uniform in [0, 1))."""
    model, train, traffic = setting
    router = RequestShapeRouter().fit(traffic.seen, operator=Operator(model))
    router.calibrate(router.score(traffic.calibration), cost)
    markers = router.score(train.x, sender="verifier")
    ordinary = np.concatenate([router.score(traffic.measure), router.score(traffic.seen)])
    assert (markers < 1.0).all() and (ordinary < 1.0).all()  # no shape is new: the scores are the tie-break alone
    p = 1.0 - router.threshold_
    for scores in (markers, ordinary):
        assert abs(float((scores > router.threshold_).mean()) - p) <= 4 * np.sqrt(p * (1 - p) / len(scores)) + 1e-9
    assert p <= cost + 4 * np.sqrt(max(cost, 1e-3) / len(traffic.calibration))


def test_the_old_client_with_an_id_key_is_flagged_for_free(setting):
    model, train, traffic = setting
    router = RequestShapeOldClient().fit(traffic.seen, operator=Operator(model))
    router.calibrate(router.score(traffic.calibration), 0.0)
    assert cost_of(router.score(traffic.measure), router.threshold_) == 0.0
    assert (router.score(train.x[:40], sender="verifier") > router.threshold_).all()
    with pytest.raises(UsageError, match="not 'proxy'"):
        router.score(train.x[:1], sender="proxy")


def test_harness_scores_markers_as_the_verifier_sends_them(setting):
    """In run_adversary the shape router costs nothing against the old client and changes nothing against today's."""
    model, train, traffic = setting
    ev = run_adversary(
        model,
        train,
        traffic,
        methods=["badv"],
        attacks=["noise"],
        routers=[RequestShapeRouter(), RequestShapeOldClient()],
        specs=["logits"],
        costs=(0.0, 0.05),
        bag=24,
        resamples=2000,
        seed=0,
    )
    assert ev.errors == []
    flagged = {(r["router"], r["cost"]): r["flagged"] for r in ev.flagged}
    assert flagged[("request-shape-id", 0.0)] == 1.0 and flagged[("request-shape", 0.0)] == 0.0
    assert flagged[("request-shape", 0.05)] <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 24)
    rate = {(r["router"], r["cost"]): r["rate"] for r in ev.detection if r["ns"] == 10}
    assert rate[("request-shape-id", 0.0)] == 0.0 and rate[("request-shape", 0.0)] == rate[(PASSIVE, 0.0)] == 1.0


class _Counting:
    """A model that counts the inputs it answers (to see which routers run O on every request)."""

    def __init__(self, model):
        self.model, self.rows = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def logits(self, x, *args, **kwargs):
        self.rows += len(x)
        return self.model.logits(x, *args, **kwargs)


@pytest.mark.parametrize("name", ["margin-original", "margin-tampered", "learned", "request-shape", "gradient"])
def test_which_routers_run_the_original_on_every_request(setting, name):
    """A router on O's margin (or gradient) runs O on every request it scores, one on T's margin or the request's shape never."""
    from tamperprobe.evaluation.routers import get_router

    model, train, traffic = setting
    router = RequestShapeRouter() if name == "request-shape" else get_router(name)
    original = _Counting(model)
    router.fit(traffic.seen, operator=Operator(original, model), seen=train.x[:30])  # type: ignore[arg-type]
    original.rows = 0
    router.score(traffic.calibration)
    assert original.rows == (len(traffic.calibration) if router.runs_original else 0)
    assert router.runs_original == (name in ("margin-original", "gradient"))
