"""Table-driven tests of the output specifications and the one comparison rule."""

import math

import numpy as np
import pytest

from tamperprobe.errors import UsageError
from tamperprobe.outputs import Answer, OutputSpec, softmax64

TOL = 3e-5


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("top1", "top1"),
        ("TOP1", "top1"),
        ("topk:3", "topk:3"),
        ("topk:1", "top1"),
        ("top1-prob:2", "top1-prob:2"),
        ("probs:1", "probs:1"),
        ("logits", "logits"),
        (" probs:4 ", "probs:4"),
    ],
)
def test_parse_canonical(text, canonical):
    assert str(OutputSpec.parse(text)) == canonical


@pytest.mark.parametrize("text", ["", "top2", "topk", "topk:0", "probs", "probs:x", "logits:3", "top1:2", "probs:13", "top1-prob"])
def test_parse_rejects(text):
    with pytest.raises(UsageError, match="bad output spec"):
        OutputSpec.parse(text)


Z = np.array([0.5, 3.0, 1.0, 2.0])  # ranking 1, 3, 2, 0


@pytest.mark.parametrize(
    "spec, answer, ok",
    [
        ("top1", Answer(labels=(1,)), True),
        ("top1", Answer(labels=(3,)), False),
        ("top1", Answer(labels=None), False),
        ("top1", Answer(labels=(7,)), False),
        ("topk:3", Answer(labels=(1, 3, 2)), True),
        ("topk:3", Answer(labels=(3, 1, 2)), False),  # order matters
        ("topk:3", Answer(labels=(1, 3, 0)), False),
        ("topk:3", Answer(labels=(1, 3)), False),
        ("topk:3", Answer(labels=(1, 1, 2)), False),
        ("logits", Answer(scores=tuple(Z)), True),
        ("logits", Answer(scores=tuple(Z + 2e-5)), True),
        ("logits", Answer(scores=tuple(Z + 1e-4)), False),
        ("logits", Answer(scores=(0.5, 3.0, 1.0, math.nan)), False),
        ("logits", Answer(scores=(0.5, 3.0, 1.0)), False),
    ],
)
def test_compare_table(spec, answer, ok):
    assert OutputSpec.parse(spec).compare(Z, answer, TOL).ok is ok


def test_reveal_is_matched_by_compare_for_every_spec():
    rng = np.random.default_rng(0)
    for spec in ["top1", "topk:3", "top1-prob:2", "probs:1", "probs:3", "logits"]:
        s = OutputSpec.parse(spec)
        for _ in range(200):
            z = rng.normal(size=10) * 3
            assert s.compare(z, s.reveal(z), TOL).ok, (spec, z)


def test_near_tie_label_accepted_either_way():
    z = np.array([1.0, 1.0 + 1e-5, -2.0])
    spec = OutputSpec.parse("top1")
    assert spec.compare(z, Answer(labels=(0,)), TOL).ok
    assert spec.compare(z, Answer(labels=(1,)), TOL).ok
    # outside the tolerance the order is enforced
    z2 = np.array([1.0, 1.0 + 1e-3, -2.0])
    assert not spec.compare(z2, Answer(labels=(0,)), TOL).ok


def _logits_for_prob(p_top: float) -> np.ndarray:
    """Two-class logits whose class-0 probability is exactly p_top (up to float)."""
    return np.array([math.log(p_top / (1 - p_top)), 0.0])


@pytest.mark.parametrize(
    "p, observed, decimals, ok",
    [
        (0.73, 0.73, 2, True),
        (0.734, 0.73, 2, True),
        (0.736, 0.74, 2, True),
        (0.736, 0.73, 2, False),  # wrong side, far from the boundary
        (0.745, 0.74, 2, True),  # exactly at a rounding boundary: either side matches
        (0.745, 0.75, 2, True),
        (0.745 + 1e-6, 0.74, 2, True),  # within tolerance of the boundary
        (0.745 + 1e-3, 0.74, 2, False),
        (0.85, 0.8, 1, True),  # 0.85 -> 0.8 or 0.9 both fine
        (0.85, 0.9, 1, True),
        (0.85, 0.7, 1, False),
    ],
)
def test_rounding_boundaries_top1_prob(p, observed, decimals, ok):
    z = _logits_for_prob(p)
    spec = OutputSpec.parse(f"top1-prob:{decimals}")
    assert spec.compare(z, Answer(labels=(0,), scores=(observed,)), TOL).ok is ok


def test_rounding_boundary_probs_both_sides():
    z = _logits_for_prob(0.25)  # probs 0.25 / 0.75, both on a 1-decimal boundary
    spec = OutputSpec.parse("probs:1")
    for a in (0.2, 0.3):
        for b in (0.7, 0.8):
            assert spec.compare(z, Answer(scores=(a, b)), TOL).ok
    assert not spec.compare(z, Answer(scores=(0.1, 0.8)), TOL).ok


def test_benign_float_noise_never_mismatches():
    """Logit noise well below the tolerance never changes the verdict, for any spec."""
    rng = np.random.default_rng(1)
    for spec in ["top1", "topk:3", "top1-prob:2", "probs:2", "logits"]:
        s = OutputSpec.parse(spec)
        for _ in range(300):
            z = rng.normal(size=10)
            z[rng.integers(10)] = z.max() + rng.uniform(0, 1e-5)  # near-ties at the top
            noisy = z + rng.uniform(-1e-5, 1e-5, size=10)
            assert s.compare(z, s.reveal(noisy), TOL).ok, (spec, z, noisy)


def test_softmax64_matches_definition():
    z = np.array([[1.0, 2.0, 3.0]])
    e = np.exp(z)
    np.testing.assert_allclose(softmax64(z), e / e.sum(), rtol=1e-15)


def test_topk_larger_than_classes_is_usage_error():
    with pytest.raises(UsageError):
        OutputSpec.parse("topk:5").reveal(np.zeros(3))


@pytest.mark.parametrize("text", ["probs:0", "top1-prob:0", "probs:0000"])
def test_zero_decimals_are_refused(text):
    """Probabilities rounded to 0 decimals are all 0 or 1: an API answering 0.5 everywhere would match them."""
    with pytest.raises(UsageError, match="0 decimals prove nothing"):
        OutputSpec.parse(text)


COVERS = {  # (what an answer reveals, what the fingerprint was made for): does the first reveal at least the second?
    ("logits", "probs:3"): True,
    ("probs:3", "probs:2"): True,
    ("probs:2", "probs:3"): False,
    ("probs:2", "topk:5"): True,
    ("probs:2", "top1-prob:2"): True,
    ("probs:2", "logits"): False,
    ("top1-prob:3", "top1-prob:2"): True,
    ("top1-prob:3", "top1"): True,
    ("top1-prob:3", "topk:2"): False,
    ("topk:3", "topk:2"): True,
    ("topk:2", "topk:3"): False,
    ("topk:3", "top1-prob:1"): False,
    ("top1", "top1"): True,
    ("top1", "topk:2"): False,
    ("top1", "logits"): False,
}


@pytest.mark.parametrize("pair", COVERS)
def test_covers_says_whether_a_spec_reveals_at_least_another(pair):
    answer, made_for = pair
    assert OutputSpec.parse(answer).covers(made_for) is COVERS[pair]
    assert OutputSpec.parse(answer).covers(answer)  # every spec covers itself
