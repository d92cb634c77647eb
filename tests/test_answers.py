"""Reading what an API answered into the normal form (served/clients/answers.py)."""

from __future__ import annotations

import pytest

from tamperprobe.outputs import OutputSpec
from tamperprobe.served.clients.answers import parts_from_named, to_answer
from tamperprobe.served.clients.http import Failure


def test_tensorflow_topk_layout_is_a_ranking_not_a_score_vector():
    """Found against a real KServe v1 server: {"classes": [3, 5, 8], "scores": [...]} is TensorFlow's top-k answer.
    Read as a 3-long probability vector it failed any model with more than 3 classes."""
    parts = parts_from_named({"classes": [3, 5, 8], "scores": [0.93, 0.04, 0.01]})
    assert to_answer(parts, OutputSpec.parse("topk:3"), classes=10).labels == (3, 5, 8)
    top = to_answer(parts, OutputSpec.parse("top1-prob:2"), classes=10)
    assert top.labels == (3,) and top.scores == (0.93,)
    with pytest.raises(Failure, match="not every class probability"):
        to_answer(parts, OutputSpec.parse("probs:2"), classes=10)


def test_classes_in_order_with_a_full_vector_stay_a_vector():
    parts = parts_from_named({"classes": [0, 1, 2], "probabilities": [0.2, 0.7, 0.1]})
    assert to_answer(parts, OutputSpec.parse("probs:1"), classes=3).scores == (0.2, 0.7, 0.1)
